"""Model → channel resolution, channel choice, failover, hedging, timeouts and drain.

Resolution: a request's model resolves to an ordered list of *groups*: a route's
targets in order (aliases and fallback chains, nested routes expanded), else the model
itself. Inside a group, channels form priority tiers (higher `priority` first); inside
a tier the order is a weighted random draw without replacement. Each channel maps the
public model name to its upstream name.

Attempts walk that list (docs/failure-contract.md is the user-facing statement):
- A channel whose circuit is open is skipped (core/circuit.py). When *every* candidate
  is open the request goes to them anyway, the one whose cool-down ends soonest first
  ("panic routing": the breaker never makes an outage by itself); it is counted in
  `switchboard_circuit_panic_total{model}` and logged once per episode.
- The breaker hears one verdict per request per channel (`_Tally`), however many
  attempts the request made there: failure for connect errors, 5xx/529, malformed
  replies and channel timeouts; nothing for 429s, client errors, the caller's deadline
  and cancellations.
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
ends in DEADLINE_EXCEEDED, never blaming the channel. Which limit ran out is decided from
the limits themselves, not from the clock after the fact (uvloop fires a timer up to a
millisecond early): a channel limit within `SAME_INSTANT_S` of the caller's deadline is
the caller's deadline. A non-streaming call has no first token before its whole answer,
so only `connect` and `total` apply to it.

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
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeAlias, TypeVar

import grpc

from switchboard.core.circuit import PANIC_TICKET, REFUSED, Breaker, make_breaker
from switchboard.core.config import ChannelConfig, Config
from switchboard.core.errors import GatewayError, model_not_found
from switchboard.core.providers import make_client
from switchboard.core.providers.base import HttpPool, ProviderClient, UpstreamError
from switchboard.v1 import inference_pb2 as pb

T = TypeVar("T")
log = logging.getLogger("switchboard.router")

Chunk: TypeAlias = pb.StreamChatCompletionResponse
ChunkIter: TypeAlias = AsyncGenerator[Chunk, None]

# A channel limit this close to the caller's deadline is the caller's deadline: the two
# timers would fire in the same instant, and the caller's is the one that matters.
SAME_INSTANT_S = 0.005


class CallerDeadline(TimeoutError):
    """The caller's deadline ran out during an attempt (not a channel timeout)."""


def _limits(deadline: float | None, channel_at: float | None) -> tuple[float | None, bool]:
    """(when the attempt must stop, whether that is the caller's deadline)."""
    if deadline is None:
        return channel_at, False
    if channel_at is None or deadline <= channel_at + SAME_INSTANT_S:
        return deadline, True
    return channel_at, False


@asynccontextmanager
async def _bounded(deadline: float | None, channel_at: float | None) -> AsyncIterator[None]:
    """A timeout scope: raises CallerDeadline when it was the caller's deadline that ran
    out, TimeoutError when it was the channel's limit."""
    when, callers = _limits(deadline, channel_at)
    scope = asyncio.timeout_at(when)
    try:
        async with scope:
            yield
    except TimeoutError:
        if callers and scope.expired():
            raise CallerDeadline() from None
        raise


class _Tally:
    """The breaker tickets one request holds (one per channel) and each channel's verdict,
    reported once when the request is done with the channel: a request counts once per
    channel however many attempts it made there. No verdict = released."""

    __slots__ = ("breaker", "tickets", "verdicts")

    def __init__(self, breaker: Breaker) -> None:
        self.breaker = breaker
        self.tickets: dict[str, str] = {}
        self.verdicts: dict[str, bool] = {}

    async def take(self, channel: str) -> str:
        ticket = self.tickets.get(channel)
        if ticket is None:
            ticket = await self.breaker.allow(channel)
            if ticket != REFUSED:
                self.tickets[channel] = ticket
        return ticket

    async def settle(self) -> None:
        tickets, self.tickets = self.tickets, {}
        for channel, ticket in tickets.items():
            verdict = self.verdicts.get(channel)
            if verdict is True:
                await self.breaker.record_success(channel, ticket)
            elif verdict is False:
                await self.breaker.record_failure(channel, ticket)
            else:
                await self.breaker.release(channel, ticket)


@dataclass(frozen=True)
class Candidate:
    channel: ChannelConfig
    client: ProviderClient
    upstream_model: str
    model: str = ""  # the public model name this candidate serves (after routes)


@dataclass
class Outcome:
    """What happened while serving one request (for usage, logs and tests)."""

    channel: str = ""
    # What served the request: public model name (after routes) and upstream name
    # (after model_map); pricing and the ledger use them (core/limits.py).
    model: str = ""
    upstream_model: str = ""
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


def attempts_summary(attempts: list[tuple[str, str]]) -> str:
    """Each channel once, in the order first tried, with its last error (and how many
    attempts it had): three identical connect errors in a row tell the caller nothing."""
    last: dict[str, tuple[str, int]] = {}
    for channel, why in attempts:
        last[channel] = (why, last[channel][1] + 1 if channel in last else 1)
    return "; ".join(f"{ch}: {why}" + (f" ({n} attempts)" if n > 1 else "")
                     for ch, (why, n) in last.items())


class Router:
    # Observability hook (core/observe.py): wraps each upstream attempt for spans and
    # upstream-error metrics. None = call directly.
    attempt_hook: Callable[[Candidate, Awaitable[Any]], Awaitable[Any]] | None = None
    # Metrics hook: called with the model of each request sent by panic routing.
    panic_hook: Callable[[str], None] | None = None

    def __init__(self, config: Config, http: HttpPool, breaker: Breaker | None = None,
                 drain: Drain | None = None, panics: set[str] | None = None) -> None:
        self.config = config
        self.settings = config.router
        self.breaker: Breaker = breaker or make_breaker(config.limits, config.router.circuit,
                                                               config.limit_settings)
        self.drain = drain or Drain()
        # Models in a panic-routing episode (logged once per episode); shared across
        # reloads like the breaker.
        self.panics: set[str] = panics if panics is not None else set()
        self._clients = {c.name: make_client(c, http) for c in config.channels}
        self._by_model: dict[str, list[Candidate]] = {}
        for c in config.channels:
            for public, upstream in c.models.items():
                self._by_model.setdefault(public, []).append(
                    Candidate(c, self._clients[c.name], upstream, public))
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

    def targets(self, model: str) -> list[str]:
        """The public model names `model` resolves to (routes expanded; itself if none)."""
        return self._targets(model, set())

    def served_names(self, model: str) -> list[tuple[str, str]]:
        """(public name, upstream name) of every candidate that could serve `model`."""
        return [(t, c.upstream_model) for t in self._targets(model, set())
                for c in self._by_model.get(t, ())]

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

    @staticmethod
    def _after(seconds: float) -> float | None:
        """The loop time `seconds` from now (None: no limit)."""
        return asyncio.get_running_loop().time() + seconds if seconds else None

    @staticmethod
    def _caller_out(deadline: float | None) -> bool:
        """The caller's deadline has passed (or passes in this same instant)."""
        return deadline is not None and asyncio.get_running_loop().time() >= deadline - SAME_INSTANT_S

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
        tried = attempts_summary(outcome.attempts) or "no channel available"
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

    async def _panic(self, model: str, refused: list[Candidate]) -> list[Candidate]:
        """Every candidate is open: all of them, soonest cool-down end first."""
        waits = {c.channel.name: await self.breaker.open_for(c.channel.name) for c in refused}
        order = sorted(refused, key=lambda c: waits[c.channel.name])  # stable: keeps tiers
        if model not in self.panics:
            self.panics.add(model)
            log.warning("every channel for model %s has an open circuit: routing to them anyway "
                        "(panic routing) until one closes", model)
        if self.panic_hook is not None:
            self.panic_hook(model)
        return order

    def _calm(self, model: str) -> None:
        """A request for `model` got a channel normally: any panic episode is over."""
        if model in self.panics:
            self.panics.discard(model)
            log.info("panic routing for model %s ended: a circuit closed", model)

    def _failed(self, cand: Candidate, exc: Exception, deadline: float | None,
                outcome: Outcome, tally: _Tally) -> _Failure:
        """Books a failed attempt; raises when the request must end now."""
        name = cand.channel.name
        loop = asyncio.get_running_loop()
        if isinstance(exc, CallerDeadline) or (isinstance(exc, TimeoutError)
                                               and self._caller_out(deadline)):
            # The caller's deadline, not the channel: no verdict on the channel.
            outcome.attempts.append((name, "deadline passed"))
            raise self._deadline_error("before the upstream answered") from None
        if not isinstance(exc, (UpstreamError, TimeoutError)):
            # Providers turn anything wrong with an upstream reply into UpstreamError
            # (malformed included); anything else is our bug and becomes INTERNAL.
            raise exc
        if isinstance(exc, TimeoutError):
            err = UpstreamError("timeout waiting for the upstream", retryable=True, kind="timeout")
        else:
            err = exc
        log.debug("attempt on channel %s failed: %s", name, err.message)
        outcome.attempts.append((name, err.message))
        if not err.retryable:
            raise self._client_error(err) from None  # the client's fault, not the channel's
        failure = _Failure(err, again=err.kind != "timeout")
        if err.status == 429:
            # Rate-limit pushback says the channel is alive: never a health failure.
            failure.again = False
            ra = err.retry_after
            if ra is not None and ra <= self.settings.max_retry_after_s and (
                    deadline is None or loop.time() + ra < deadline):
                failure.wait_s = ra
        else:
            tally.verdicts[name] = False
        return failure

    async def _attempts(self, model: str, deadline: float | None, outcome: Outcome, tally: _Tally,
                        call: Callable[[Candidate, float | None], Coroutine[Any, Any, T]],
                        discard: Callable[[T], Awaitable[None]] | None = None) -> T:
        """Run `call` against candidates until one succeeds (before any output). Verdicts
        go to `tally`; the caller settles it when the request is done."""
        if self.attempt_hook is not None:
            call = _hooked(self.attempt_hook, call)
        cands = self.candidates(model)
        hedge = self.hedge_delay(model)
        if hedge is not None and len(cands) > 1:
            return await self._hedged(model, cands, hedge, deadline, outcome, tally, call, discard)
        queue: deque[Candidate] = deque(cands)
        later: list[Candidate] = []
        gate = _Admission(self, model, tally, outcome)
        errors: list[UpstreamError] = []
        attempts = rounds = 0
        while attempts < self.settings.max_attempts:
            if not queue:
                if gate.can_panic():
                    queue.extend(await gate.panic())
                    continue
                if not later:
                    break
                queue.extend(later)
                later.clear()
                rounds += 1
                await self._backoff(rounds, deadline)
            cand = queue.popleft()
            name = cand.channel.name
            if not await gate.take(cand):
                continue
            attempts += 1
            try:
                result = await call(cand, deadline)
            except Exception as exc:
                failure = self._failed(cand, exc, deadline, outcome, tally)
                errors.append(failure.error)
                if failure.wait_s is not None:
                    await asyncio.sleep(failure.wait_s)
                    queue.appendleft(cand)
                elif failure.again:
                    later.append(cand)
                continue
            tally.verdicts[name] = True
            outcome.channel = name
            outcome.model, outcome.upstream_model = cand.model, cand.upstream_model
            outcome.attempts.append((name, "ok"))
            return result
        if self._caller_out(deadline):
            raise self._deadline_error("before the upstream answered")
        raise self._give_up(model, outcome, errors)

    async def _hedged(self, model: str, cands: list[Candidate], hedge_s: float,
                      deadline: float | None, outcome: Outcome, tally: _Tally,
                      call: Callable[[Candidate, float | None], Coroutine[Any, Any, T]],
                      discard: Callable[[T], Awaitable[None]] | None) -> T:
        """Like `_attempts`, but a slow first attempt gets a second one racing it."""
        queue: deque[Candidate] = deque(cands)
        gate = _Admission(self, model, tally, outcome)
        running: dict[asyncio.Task[T], Candidate] = {}
        errors: list[UpstreamError] = []
        attempts = 0

        async def launch() -> None:
            nonlocal attempts
            while attempts < self.settings.max_attempts:
                if not queue:
                    if not gate.can_panic():
                        return
                    queue.extend(await gate.panic())
                cand = queue.popleft()
                if not await gate.take(cand):
                    continue
                attempts += 1
                running[asyncio.create_task(call(cand, deadline))] = cand
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
                    cand = running.pop(task)
                    exc = task.exception()
                    if exc is None:
                        result = task.result()
                        await self._cancel_losers(running, outcome, discard)
                        tally.verdicts[cand.channel.name] = True
                        outcome.channel = cand.channel.name
                        outcome.model, outcome.upstream_model = cand.model, cand.upstream_model
                        outcome.attempts.append((cand.channel.name, "ok"))
                        return result
                    if not isinstance(exc, Exception):
                        raise exc
                    errors.append(self._failed(cand, exc, deadline, outcome, tally).error)
                if not running:
                    await launch()
            if self._caller_out(deadline):
                raise self._deadline_error("before the upstream answered")
            raise self._give_up(model, outcome, errors)
        finally:
            await self._cancel_losers(running, outcome, discard)

    async def _cancel_losers(self, running: dict[asyncio.Task[T], Candidate],
                             outcome: Outcome, discard: Callable[[T], Awaitable[None]] | None) -> None:
        """Cancel the attempts still running (closing their upstream connections) and wait
        for them; a loser that finished at the same moment has its result discarded.
        A cancelled loser gives no verdict on its channel."""
        if not running:
            return
        tasks = list(running.items())
        running.clear()
        for task, _ in tasks:
            task.cancel()
        await asyncio.wait([t for t, _ in tasks])
        for task, cand in tasks:
            outcome.attempts.append((cand.channel.name, "cancelled: another channel answered first"
                                     if outcome.channel else "cancelled"))
            if not task.cancelled() and task.exception() is None and discard is not None:
                await discard(task.result())

    # ------------------------------------------------------------- calls ----

    async def chat(self, params: pb.ChatCompletionParams, deadline: float | None,
                   outcome: Outcome) -> pb.CreateChatCompletionResponse:
        return await self._unary(params.model, deadline, outcome,
                                 lambda c: c.client.chat(params, c.upstream_model))

    async def create_image(self, req: pb.CreateImageRequest, deadline: float | None,
                           outcome: Outcome) -> pb.CreateImageResponse:
        return await self._unary(req.model, deadline, outcome,
                                 lambda c: c.client.create_image(req, c.upstream_model))

    async def _unary(self, model: str, deadline: float | None, outcome: Outcome,
                     send: Callable[[Candidate], Awaitable[T]]) -> T:
        """One unary upstream call with failover: each attempt bounded by the channel's
        `total` and the caller's deadline; the breaker hears one verdict per channel."""
        async def call(c: Candidate, dl: float | None) -> T:
            async with _bounded(dl, self._after(c.channel.timeouts.total)):
                return await send(c)

        tally = _Tally(self.breaker)
        try:
            with self._upstream_wait():
                return await self._attempts(model, deadline, outcome, tally, call)
        finally:
            await tally.settle()

    async def stream(self, params: pb.ChatCompletionParams, deadline: float | None,
                     outcome: Outcome) -> ChunkIter:
        loop = asyncio.get_running_loop()

        async def first(c: Candidate, dl: float | None
                        ) -> tuple[Candidate, ChunkIter, Chunk, float | None]:
            total_at = self._after(c.channel.timeouts.total)
            it = c.client.stream(params, c.upstream_model)
            try:
                async with _bounded(dl, self._deadline(total_at, c.channel.timeouts.first_token)):
                    chunk = await anext(it)
            except StopAsyncIteration:
                raise UpstreamError("upstream stream was empty", retryable=True,
                                    kind="malformed") from None
            except BaseException:
                await it.aclose()
                raise
            return c, it, chunk, total_at

        async def discard(opened: tuple[Candidate, ChunkIter, Chunk, float | None]) -> None:
            await opened[1].aclose()

        # The winner's verdict is given when the stream ends (a mid-stream failure
        # overrides the first token's success), so the request still counts once.
        tally = _Tally(self.breaker)
        try:
            with self._upstream_wait():
                cand, it, chunk, total_at = await self._attempts(params.model, deadline, outcome,
                                                                 tally, first, discard)
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
                        chunk_or_end = await self._next_chunk(cand, it, deadline, total_at, tally)
                    except asyncio.CancelledError:
                        d.convert(task)
                        raise
                    finally:
                        d.waiting.discard(task)
                    if chunk_or_end is None:
                        return
                    yield chunk_or_end
            finally:
                await it.aclose()
        finally:
            await tally.settle()

    async def _next_chunk(self, cand: Candidate, it: ChunkIter, deadline: float | None,
                          total_at: float | None, tally: _Tally) -> Chunk | None:
        """The next chunk after the first (None at the end); mid-stream failures become
        the errors the client sees as the stream's last event."""
        name, idle = cand.channel.name, cand.channel.timeouts.idle
        idle_at = self._after(idle)
        # The caller's deadline and the attempt's `total` both end the stream as a
        # deadline (neither says the channel is unhealthy); only `idle` blames it.
        ends = total_at if deadline is None else deadline if total_at is None else min(deadline, total_at)
        when, is_deadline = _limits(ends, idle_at)
        scope = asyncio.timeout_at(when)
        try:
            async with scope:
                return await anext(it)
        except StopAsyncIteration:
            return None
        except TimeoutError:
            if (is_deadline and scope.expired()) or self._caller_out(ends):
                raise self._deadline_error("mid-stream") from None
            why = f"stalled mid-stream for more than {idle:g}s"
        except UpstreamError as err:
            why = f"failed mid-stream: {err.message}"
        tally.verdicts[name] = False
        raise GatewayError(grpc.StatusCode.UNAVAILABLE, f"Upstream `{name}` {why}",
                           code="upstream_error")


class _Admission:
    """Which of one request's candidates the breaker lets through, and panic routing once
    every candidate was refused (shared by sequential and hedged attempts)."""

    __slots__ = ("admitted", "model", "outcome", "refused", "router", "tally")

    def __init__(self, router: Router, model: str, tally: _Tally, outcome: Outcome) -> None:
        self.router, self.model, self.tally, self.outcome = router, model, tally, outcome
        self.refused: list[Candidate] = []
        self.admitted = False

    async def take(self, cand: Candidate) -> bool:
        """Whether `cand` may be tried now (False: its circuit is open; kept for panic)."""
        ticket = await self.tally.take(cand.channel.name)
        if ticket == REFUSED:
            self.outcome.attempts.append((cand.channel.name, "circuit open"))
            self.refused.append(cand)
            return False
        if not self.admitted:
            self.admitted = True
            if ticket != PANIC_TICKET:
                self.router._calm(self.model)
        return True

    def can_panic(self) -> bool:
        return bool(self.refused) and not self.admitted

    async def panic(self) -> list[Candidate]:
        """Every candidate was refused: all of them, soonest cool-down end first."""
        order = await self.router._panic(self.model, self.refused)
        for c in self.refused:
            self.tally.tickets.setdefault(c.channel.name, PANIC_TICKET)
        self.refused.clear()
        self.admitted = True
        return order
