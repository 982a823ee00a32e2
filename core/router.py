"""Model → channel resolution, channel choice, failover, hedging, timeouts and drain.

Resolution: a request's model resolves to an ordered list of *groups*: a route's
targets in order (aliases and fallback chains, nested routes expanded), else the model
itself. Inside a group, channels form priority tiers (higher `priority` first); inside
a tier the order is a weighted random draw without replacement. Each channel maps the
public model name to its upstream name.

Attempts walk that list (docs/failure-contract.md is the user-facing statement):
- A channel whose circuit is open is skipped (core/circuit.py); if every channel is
  cooling down the request fails at once with UNAVAILABLE.
- Before anything reached the client, a retryable failure (connect error, 429, 5xx/529,
  malformed reply, in-stream error event, first-token timeout, empty stream) moves on to
  the next channel at once. When every candidate was tried and `router.max_attempts`
  is not used up, candidates that failed fast (not by timing out) are tried again after
  a jittered exponential backoff. A 429 whose Retry-After is at most
  `router.max_retry_after_s` (and fits the caller's deadline) is waited out and the
  same channel tried again; a longer one moves on and never comes back to that channel.
- A 4xx the client caused goes straight back to it; it says nothing about the channel.
- Once a token was relayed, a failure ends the stream with an error (UNAVAILABLE, or
  DEADLINE_EXCEEDED when the deadline passed) — never a fake finish.

Timeouts (per channel, seconds, 0 = off): `connect`; `first_token` (streams: until the
first chunk); `idle` (streams: between chunks); `total` (one attempt, whole call). The
caller's deadline (gRPC deadline, REST `X-Switchboard-Timeout`) bounds everything and
ends in DEADLINE_EXCEEDED. A non-streaming call has no first token before its whole
answer, so only `connect` and `total` apply to it.

Hedging (route `hedge_after_ms`, off by default): if the first attempt has no first
token (non-streaming: no answer) after the delay, the next candidate starts alongside
it; the first to answer wins and the other is cancelled, its upstream connection
closed. One hedge per request; failures while hedged fail over as usual.

Cancellation: the upstream call runs in the caller's task (no extra task unless
hedging), so a cancelled caller — REST disconnect, gRPC cancel or deadline — cancels
the upstream read and closes its connection at once.

Drain: `abort_inflight()` ends every request still waiting on an upstream with the
given error (the runtime calls it when the shutdown grace period is over).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeAlias, TypeVar

import grpc

from switchboard.core.circuit import REFUSED, Breaker, make_breaker
from switchboard.core.config import ChannelConfig, Config
from switchboard.core.errors import GatewayError, model_not_found
from switchboard.core.providers import make_client
from switchboard.core.providers.base import HttpPool, ProviderClient, UpstreamError
from switchboard.v1 import inference_pb2 as pb

T = TypeVar("T")
log = logging.getLogger("switchboard.router")

Chunk: TypeAlias = pb.StreamChatCompletionResponse
ChunkIter: TypeAlias = AsyncIterator[Chunk]


@dataclass(frozen=True)
class Candidate:
    channel: ChannelConfig
    client: ProviderClient
    upstream_model: str


@dataclass
class Outcome:
    """What happened while serving one request (for usage, logs and tests)."""

    channel: str = ""
    attempts: list[tuple[str, str]] = field(default_factory=list)  # (channel, error or "ok")
    first_token_at: float | None = None
    hedged: bool = False


@dataclass
class _Failure:
    """How one failed attempt affects the rest of the request."""

    error: UpstreamError
    again: bool = False       # the candidate may be tried again in a later pass
    wait_s: float | None = None  # retry the same channel after this long (short 429)


def _hooked(hook: Callable[[Candidate, Awaitable[Any]], Awaitable[Any]],
            call: Callable[[Candidate, float | None], Coroutine[Any, Any, T]]
            ) -> Callable[[Candidate, float | None], Coroutine[Any, Any, T]]:
    async def wrapped(cand: Candidate, deadline: float | None) -> T:
        result: T = await hook(cand, call(cand, deadline))
        return result
    return wrapped


class Drain:
    """Requests waiting on an upstream, so a shutdown can end them with an error.
    Shared by the routers a config reload replaces (like the breaker)."""

    def __init__(self) -> None:
        self.waiting: set[asyncio.Task[Any]] = set()
        self.aborted: set[asyncio.Task[Any]] = set()
        self.error: GatewayError | None = None

    def fresh_error(self) -> GatewayError:
        """A new instance per request (one shared exception would collect every
        request's traceback)."""
        e = self.error
        assert e is not None
        return GatewayError(e.status, e.message, code=e.code)

    def convert(self, task: asyncio.Task[Any]) -> None:
        """Called with a CancelledError in flight: if the drain caused it, raise the
        drain's error instead (the task is no longer being cancelled)."""
        if task in self.aborted and self.error is not None:
            self.aborted.discard(task)
            task.uncancel()
            raise self.fresh_error() from None


class Router:
    # Observability hook (core/observe.py): wraps each upstream attempt for spans and
    # upstream-error metrics. None = call directly.
    attempt_hook: Callable[[Candidate, Awaitable[Any]], Awaitable[Any]] | None = None

    def __init__(self, config: Config, http: HttpPool, breaker: Breaker | None = None,
                 drain: Drain | None = None) -> None:
        self.config = config
        self.settings = config.router
        self.breaker: Breaker = breaker or make_breaker(config.limits, config.router.circuit,
                                                               config.limit_settings)
        self.drain = drain or Drain()
        self._clients = {c.name: make_client(c, http) for c in config.channels}
        self._by_model: dict[str, list[Candidate]] = {}
        for c in config.channels:
            for public, upstream in c.models.items():
                self._by_model.setdefault(public, []).append(
                    Candidate(c, self._clients[c.name], upstream))
        self._routes = {r.model: r for r in config.routes}

    async def close(self) -> None:
        await self.breaker.close()

    # ------------------------------------------------------------ models ----

    def model_ids(self) -> list[tuple[str, str]]:
        """(model id, owned_by) for every model served directly or through a route."""
        out = {m: cands[0].channel.owned_by for m, cands in self._by_model.items()}
        for alias in self._routes:
            out.setdefault(alias, "switchboard")
        return sorted(out.items())

    def knows(self, model: str) -> bool:
        return model in self._by_model or model in self._routes

    def candidates(self, model: str) -> list[Candidate]:
        """All candidates for `model` in attempt order (see module docstring)."""
        out: list[Candidate] = []
        seen: set[str] = set()
        for target in self._targets(model, set()):
            for cand in self._order(self._by_model.get(target, [])):
                key = f"{cand.channel.name}\0{cand.upstream_model}"
                if key not in seen:  # a chain may name the same model twice
                    seen.add(key)
                    out.append(cand)
        if not out:
            raise model_not_found(model)
        return out

    def hedge_delay(self, model: str) -> float | None:
        route = self._routes.get(model)
        if route is None or not route.hedge_after_ms:
            return None
        return route.hedge_after_ms / 1000.0

    def _targets(self, model: str, seen: set[str]) -> list[str]:
        route = self._routes.get(model)
        if route is None or model in seen:
            return [model]
        seen.add(model)
        return [t for target in route.targets for t in self._targets(target, seen)]

    @staticmethod
    def _order(cands: list[Candidate]) -> list[Candidate]:
        tiers: dict[int, list[Candidate]] = {}
        for c in cands:
            tiers.setdefault(c.channel.priority, []).append(c)
        out: list[Candidate] = []
        for prio in sorted(tiers, reverse=True):
            tier = tiers[prio]
            if len(tier) > 1:
                # Weighted order without replacement (Efraimidis–Spirakis keys).
                tier = sorted(tier, key=lambda c: random.random() ** (1.0 / max(c.channel.weight, 1e-9)),
                              reverse=True)
            out.extend(tier)
        return out

    # ------------------------------------------------------------- drain ----

    def abort_inflight(self, error: GatewayError) -> int:
        """End every request waiting on an upstream with `error`; streams paused while
        their client reads end with it as soon as they resume. Returns how many were
        interrupted."""
        d = self.drain
        d.error = error
        for task in list(d.waiting):
            d.aborted.add(task)
            task.cancel()
        return len(d.aborted)

    @contextmanager
    def _upstream_wait(self) -> Any:
        """Marks the current task as waiting on an upstream; turns a drain abort's
        cancellation into the abort error."""
        d = self.drain
        if d.error is not None:
            raise d.fresh_error()
        task = asyncio.current_task()
        assert task is not None
        d.waiting.add(task)
        try:
            yield
        except asyncio.CancelledError:
            d.convert(task)
            raise
        finally:
            d.waiting.discard(task)

    # ---------------------------------------------------------- attempts ----

    @staticmethod
    def _deadline(deadline: float | None, seconds: float) -> float | None:
        mine = asyncio.get_running_loop().time() + seconds if seconds else None
        if deadline is None:
            return mine
        return deadline if mine is None else min(deadline, mine)

    async def _backoff(self, round_: int, deadline: float | None) -> None:
        if self.settings.backoff_ms <= 0:
            return
        delay = self.settings.backoff_ms / 1000.0 * (2 ** (round_ - 1)) * random.uniform(0.5, 1.5)
        if deadline is not None:
            delay = min(delay, max(0.0, deadline - asyncio.get_running_loop().time()))
        await asyncio.sleep(delay)

    @staticmethod
    def _deadline_error(when: str) -> GatewayError:
        return GatewayError(grpc.StatusCode.DEADLINE_EXCEEDED,
                            f"The request deadline passed {when}.", code="timeout")

    def _give_up(self, model: str, outcome: Outcome, errors: list[UpstreamError]) -> GatewayError:
        if errors and all(e.status == 429 for e in errors):
            retry = min((e.retry_after for e in errors if e.retry_after is not None), default=None)
            return GatewayError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"Every channel for `{model}` is rate limited upstream.",
                                code="rate_limit_exceeded", retry_after=retry)
        if not errors:
            return GatewayError(grpc.StatusCode.UNAVAILABLE,
                                f"Every channel for model `{model}` is cooling down after "
                                "repeated failures; try again shortly.", code="upstream_error")
        tried = "; ".join(f"{ch}: {why}" for ch, why in outcome.attempts) or "no channel available"
        return GatewayError(grpc.StatusCode.UNAVAILABLE,
                            f"All upstream channels failed for model `{model}`: {tried}",
                            code="upstream_error")

    @staticmethod
    def _client_error(err: UpstreamError) -> GatewayError:
        if err.status == 404:
            return GatewayError(grpc.StatusCode.NOT_FOUND, f"Upstream: {err.message}",
                                code="model_not_found", param=err.param)
        return GatewayError(grpc.StatusCode.INVALID_ARGUMENT, f"Upstream rejected the request: "
                            f"{err.message}", param=err.param, code="upstream_bad_request")

    async def _failed(self, cand: Candidate, ticket: str, exc: Exception,
                      deadline: float | None, outcome: Outcome) -> _Failure:
        """Books a failed attempt; raises when the request must end now."""
        name = cand.channel.name
        loop = asyncio.get_running_loop()
        if not isinstance(exc, (UpstreamError, TimeoutError)):
            # Providers turn anything wrong with an upstream reply into UpstreamError
            # (malformed included); anything else is our bug and becomes INTERNAL.
            await self.breaker.release(name, ticket)
            raise exc
        if isinstance(exc, TimeoutError):
            if deadline is not None and loop.time() >= deadline:
                await self.breaker.release(name, ticket)
                outcome.attempts.append((name, "deadline passed"))
                raise self._deadline_error("before the upstream answered") from None
            err = UpstreamError("timeout waiting for the upstream", retryable=True, kind="timeout")
        else:
            err = exc
        log.debug("attempt on channel %s failed: %s", name, err.message)
        outcome.attempts.append((name, err.message))
        if not err.retryable:
            await self.breaker.release(name, ticket)
            raise self._client_error(err) from None
        await self.breaker.record_failure(name, ticket)
        failure = _Failure(err, again=err.kind != "timeout")
        if err.status == 429:
            failure.again = False
            ra = err.retry_after
            if ra is not None and ra <= self.settings.max_retry_after_s and (
                    deadline is None or loop.time() + ra < deadline):
                failure.wait_s = ra
        return failure

    async def _attempts(self, model: str, deadline: float | None, outcome: Outcome,
                        call: Callable[[Candidate, float | None], Coroutine[Any, Any, T]],
                        discard: Callable[[T], Awaitable[None]] | None = None) -> T:
        """Run `call` against candidates until one succeeds (before any output)."""
        if self.attempt_hook is not None:
            call = _hooked(self.attempt_hook, call)
        cands = self.candidates(model)
        hedge = self.hedge_delay(model)
        if hedge is not None and len(cands) > 1:
            return await self._hedged(model, cands, hedge, deadline, outcome, call, discard)
        queue: deque[Candidate] = deque(cands)
        later: list[Candidate] = []
        errors: list[UpstreamError] = []
        attempts = rounds = 0
        while attempts < self.settings.max_attempts:
            if not queue:
                if not later:
                    break
                queue.extend(later)
                later.clear()
                rounds += 1
                await self._backoff(rounds, deadline)
            cand = queue.popleft()
            name = cand.channel.name
            ticket = await self.breaker.allow(name)
            if ticket == REFUSED:
                outcome.attempts.append((name, "circuit open"))
                continue
            attempts += 1
            try:
                result = await call(cand, deadline)
            except Exception as exc:
                failure = await self._failed(cand, ticket, exc, deadline, outcome)
                errors.append(failure.error)
                if failure.wait_s is not None:
                    await asyncio.sleep(failure.wait_s)
                    queue.appendleft(cand)
                elif failure.again:
                    later.append(cand)
                continue
            except BaseException:
                await self.breaker.release(name, ticket)
                raise
            await self.breaker.record_success(name, ticket)
            outcome.channel = name
            outcome.attempts.append((name, "ok"))
            return result
        if deadline is not None and asyncio.get_running_loop().time() >= deadline:
            raise self._deadline_error("before the upstream answered")
        raise self._give_up(model, outcome, errors)

    async def _hedged(self, model: str, cands: list[Candidate], hedge_s: float,
                      deadline: float | None, outcome: Outcome,
                      call: Callable[[Candidate, float | None], Coroutine[Any, Any, T]],
                      discard: Callable[[T], Awaitable[None]] | None) -> T:
        """Like `_attempts`, but a slow first attempt gets a second one racing it."""
        queue: deque[Candidate] = deque(cands)
        running: dict[asyncio.Task[T], tuple[Candidate, str]] = {}
        errors: list[UpstreamError] = []
        attempts = 0

        async def launch() -> None:
            nonlocal attempts
            while queue and attempts < self.settings.max_attempts:
                cand = queue.popleft()
                ticket = await self.breaker.allow(cand.channel.name)
                if ticket == REFUSED:
                    outcome.attempts.append((cand.channel.name, "circuit open"))
                    continue
                attempts += 1
                running[asyncio.create_task(call(cand, deadline))] = (cand, ticket)
                return

        try:
            await launch()
            while running:
                may_hedge = not outcome.hedged and bool(queue) and attempts < self.settings.max_attempts
                done, _ = await asyncio.wait(running, timeout=hedge_s if may_hedge else None,
                                             return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    outcome.hedged = True
                    await launch()
                    continue
                for task in done:
                    cand, ticket = running.pop(task)
                    exc = task.exception()
                    if exc is None:
                        result = task.result()
                        await self._cancel_losers(running, outcome, discard)
                        await self.breaker.record_success(cand.channel.name, ticket)
                        outcome.channel = cand.channel.name
                        outcome.attempts.append((cand.channel.name, "ok"))
                        return result
                    if not isinstance(exc, Exception):
                        raise exc
                    errors.append((await self._failed(cand, ticket, exc, deadline, outcome)).error)
                if not running:
                    await launch()
            if deadline is not None and asyncio.get_running_loop().time() >= deadline:
                raise self._deadline_error("before the upstream answered")
            raise self._give_up(model, outcome, errors)
        finally:
            await self._cancel_losers(running, outcome, discard)

    async def _cancel_losers(self, running: dict[asyncio.Task[T], tuple[Candidate, str]],
                             outcome: Outcome, discard: Callable[[T], Awaitable[None]] | None) -> None:
        """Cancel the attempts still running (closing their upstream connections) and wait
        for them; a loser that finished at the same moment has its result discarded."""
        if not running:
            return
        tasks = list(running.items())
        running.clear()
        for task, _ in tasks:
            task.cancel()
        await asyncio.wait([t for t, _ in tasks])
        for task, (cand, ticket) in tasks:
            await self.breaker.release(cand.channel.name, ticket)
            outcome.attempts.append((cand.channel.name, "cancelled: another channel answered first"
                                     if outcome.channel else "cancelled"))
            if not task.cancelled() and task.exception() is None and discard is not None:
                await discard(task.result())

    # ------------------------------------------------------------- calls ----

    async def chat(self, params: pb.ChatCompletionParams, deadline: float | None,
                   outcome: Outcome) -> pb.CreateChatCompletionResponse:
        async def call(c: Candidate, dl: float | None) -> pb.CreateChatCompletionResponse:
            async with asyncio.timeout_at(self._deadline(dl, c.channel.timeouts.total)):
                return await c.client.chat(params, c.upstream_model)

        with self._upstream_wait():
            return await self._attempts(params.model, deadline, outcome, call)

    async def create_image(self, req: pb.CreateImageRequest, deadline: float | None,
                           outcome: Outcome) -> pb.CreateImageResponse:
        async def call(c: Candidate, dl: float | None) -> pb.CreateImageResponse:
            async with asyncio.timeout_at(self._deadline(dl, c.channel.timeouts.total)):
                return await c.client.create_image(req, c.upstream_model)

        with self._upstream_wait():
            return await self._attempts(req.model, deadline, outcome, call)

    async def stream(self, params: pb.ChatCompletionParams, deadline: float | None,
                     outcome: Outcome) -> ChunkIter:
        loop = asyncio.get_running_loop()

        async def first(c: Candidate, dl: float | None
                        ) -> tuple[Candidate, ChunkIter, Chunk, float | None]:
            total_at = self._deadline(dl, c.channel.timeouts.total)
            it = c.client.stream(params, c.upstream_model)
            try:
                async with asyncio.timeout_at(self._deadline(total_at, c.channel.timeouts.first_token)):
                    chunk = await anext(it)
            except StopAsyncIteration:
                raise UpstreamError("upstream stream was empty", retryable=True,
                                    kind="malformed") from None
            except BaseException:
                await it.aclose()
                raise
            return c, it, chunk, total_at

        async def discard(opened: tuple[Candidate, ChunkIter, Chunk, float | None]) -> None:
            await opened[1].aclose()  # type: ignore[attr-defined]

        with self._upstream_wait():
            cand, it, chunk, total_at = await self._attempts(params.model, deadline, outcome,
                                                             first, discard)
        outcome.first_token_at = loop.time()
        d, task = self.drain, asyncio.current_task()
        assert task is not None
        try:
            yield chunk
            while True:
                # The drain bookkeeping of _upstream_wait, inlined: this runs per chunk.
                if d.error is not None:
                    raise d.fresh_error()
                d.waiting.add(task)
                try:
                    chunk_or_end = await self._next_chunk(cand, it, total_at)
                except asyncio.CancelledError:
                    d.convert(task)
                    raise
                finally:
                    d.waiting.discard(task)
                if chunk_or_end is None:
                    return
                yield chunk_or_end
        finally:
            await it.aclose()  # type: ignore[attr-defined]

    async def _next_chunk(self, cand: Candidate, it: ChunkIter, total_at: float | None
                          ) -> Chunk | None:
        """The next chunk after the first (None at the end); mid-stream failures become
        the errors the client sees as the stream's last event."""
        name, idle = cand.channel.name, cand.channel.timeouts.idle
        try:
            async with asyncio.timeout_at(self._deadline(total_at, idle)):
                return await anext(it)
        except StopAsyncIteration:
            return None
        except TimeoutError:
            if total_at is not None and asyncio.get_running_loop().time() >= total_at:
                raise self._deadline_error("mid-stream") from None
            why = f"stalled mid-stream for more than {idle:g}s"
        except UpstreamError as err:
            why = f"failed mid-stream: {err.message}"
        await self.breaker.record_failure(name, "")
        raise GatewayError(grpc.StatusCode.UNAVAILABLE, f"Upstream `{name}` {why}",
                           code="upstream_error")
