"""Model → channel resolution, channel choice, failover and timeouts.

A request's model resolves to an ordered list of *groups*: a route's targets in order
(aliases and fallback chains), else the one model itself. Inside a group, channels
form priority tiers (higher `priority` first); inside a tier the order is a weighted
random draw, with channels whose circuit is open moved to the back.

Attempts walk that list. Before the first token reaches the client, a retryable
failure (connect error, 429, 5xx/529, malformed reply, first-token timeout) moves on
to the next channel, up to `router.max_attempts`, with jittered backoff. A 429 whose
Retry-After is at most `router.max_retry_after_s` is waited out and the same channel
tried again. A client-caused 4xx is returned at once. Once a token has been relayed,
a failure ends the stream with an error (never a fake finish).

Timeouts (per channel, seconds): `connect`; `first_token` (streams: until the first
chunk); `idle` (streams: between chunks); `total` (the whole call). The caller's
deadline wins when it is shorter and ends in DEADLINE_EXCEEDED.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import grpc

from core.circuit import CircuitBreaker
from core.config import ChannelConfig, Config
from core.errors import GatewayError, model_not_found
from core.providers import make_client
from core.providers.base import HttpPool, ProviderClient, UpstreamError
from switchboard.v1 import inference_pb2 as pb

T = TypeVar("T")


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


class Router:
    def __init__(self, config: Config, http: HttpPool,
                 breaker: CircuitBreaker | None = None) -> None:
        self.config = config
        self.settings = config.router
        self.breaker = breaker or CircuitBreaker()
        self._clients = {c.name: make_client(c, http) for c in config.channels}
        self._by_model: dict[str, list[Candidate]] = {}
        for c in config.channels:
            for public, upstream in c.models.items():
                self._by_model.setdefault(public, []).append(
                    Candidate(c, self._clients[c.name], upstream))
        self._routes = {r.model: r for r in config.routes}

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
        for target in self._targets(model, set()):
            out.extend(self._order(self._by_model.get(target, [])))
        if not out:
            raise model_not_found(model)
        return out

    def _targets(self, model: str, seen: set[str]) -> list[str]:
        route = self._routes.get(model)
        if route is None or model in seen:
            return [model]
        seen.add(model)
        return [t for target in route.targets for t in self._targets(target, seen)]

    def _order(self, cands: list[Candidate]) -> list[Candidate]:
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
            healthy = [c for c in tier if self.breaker.state(c.channel.name) != "open"]
            out.extend(healthy + [c for c in tier if c not in healthy])
        return out

    # ---------------------------------------------------------- attempts ----

    def _deadline(self, cand: Candidate, deadline: float | None, which: float) -> float | None:
        loop = asyncio.get_running_loop()
        mine = loop.time() + which if which else None
        if deadline is None:
            return mine
        return deadline if mine is None else min(deadline, mine)

    async def _backoff(self, attempt: int, deadline: float | None) -> None:
        if self.settings.backoff_ms <= 0:
            return
        delay = self.settings.backoff_ms / 1000.0 * (2 ** (attempt - 1)) * random.uniform(0.5, 1.5)
        if deadline is not None:
            delay = min(delay, max(0.0, deadline - asyncio.get_running_loop().time()))
        await asyncio.sleep(delay)

    def _give_up(self, model: str, outcome: Outcome,
                 errors: list[UpstreamError]) -> GatewayError:
        if errors and all(e.status == 429 for e in errors):
            retry = min((e.retry_after for e in errors if e.retry_after is not None), default=None)
            return GatewayError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"Every channel for `{model}` is rate limited upstream.",
                                code="rate_limit_exceeded", retry_after=retry)
        tried = "; ".join(f"{ch}: {why}" for ch, why in outcome.attempts) or "no channel available"
        return GatewayError(grpc.StatusCode.UNAVAILABLE,
                            f"All upstream channels failed for model `{model}`: {tried}",
                            code="upstream_error")

    def _client_error(self, err: UpstreamError) -> GatewayError:
        if err.status == 404:
            return GatewayError(grpc.StatusCode.NOT_FOUND, f"Upstream: {err.message}",
                                code="model_not_found", param=err.param)
        return GatewayError(grpc.StatusCode.INVALID_ARGUMENT, f"Upstream rejected the request: "
                            f"{err.message}", param=err.param, code="upstream_bad_request")

    async def _attempts(self, model: str, deadline: float | None, outcome: Outcome,
                        call: Callable[[Candidate, float | None], Awaitable[T]]) -> T:
        """Run `call` against candidates until one succeeds (before any output)."""
        cands = self.candidates(model)
        errors: list[UpstreamError] = []
        attempt = 0
        i = 0
        while i < len(cands) and attempt < self.settings.max_attempts:
            cand = cands[i]
            name = cand.channel.name
            if not self.breaker.allow(name) and i < len(cands) - 1:
                outcome.attempts.append((name, "circuit open"))
                i += 1
                continue
            if attempt:
                await self._backoff(attempt, deadline)
            attempt += 1
            try:
                result = await call(cand, deadline)
            except UpstreamError as err:
                outcome.attempts.append((name, err.message))
                if not err.retryable:
                    self.breaker.release_trial(name)
                    raise self._client_error(err) from None
                self.breaker.record_failure(name)
                errors.append(err)
                if (err.status == 429 and err.retry_after is not None
                        and err.retry_after <= self.settings.max_retry_after_s
                        and attempt < self.settings.max_attempts):
                    await asyncio.sleep(err.retry_after)
                    continue  # same channel again
                i += 1
                continue
            except TimeoutError:
                self.breaker.release_trial(name)
                if deadline is not None and asyncio.get_running_loop().time() >= deadline:
                    raise GatewayError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                       "The request deadline passed before the upstream answered.",
                                       code="timeout") from None
                self.breaker.record_failure(name)
                outcome.attempts.append((name, "timeout waiting for the upstream"))
                errors.append(UpstreamError("timeout", retryable=True, kind="timeout"))
                i += 1
                continue
            except BaseException:
                self.breaker.release_trial(name)
                raise
            self.breaker.record_success(name)
            outcome.channel = name
            outcome.attempts.append((name, "ok"))
            return result
        raise self._give_up(model, outcome, errors)

    # ------------------------------------------------------------- calls ----

    async def chat(self, params: pb.ChatCompletionParams, deadline: float | None,
                   outcome: Outcome) -> pb.CreateChatCompletionResponse:
        async def call(c: Candidate, dl: float | None) -> pb.CreateChatCompletionResponse:
            async with asyncio.timeout_at(self._deadline(c, dl, c.channel.timeouts.total)):
                return await c.client.chat(params, c.upstream_model)

        return await self._attempts(params.model, deadline, outcome, call)

    async def create_image(self, req: pb.CreateImageRequest, deadline: float | None,
                           outcome: Outcome) -> pb.CreateImageResponse:
        async def call(c: Candidate, dl: float | None) -> pb.CreateImageResponse:
            async with asyncio.timeout_at(self._deadline(c, dl, c.channel.timeouts.total)):
                return await c.client.create_image(req, c.upstream_model)

        return await self._attempts(req.model, deadline, outcome, call)

    async def stream(self, params: pb.ChatCompletionParams, deadline: float | None,
                     outcome: Outcome) -> AsyncIterator[pb.StreamChatCompletionResponse]:
        loop = asyncio.get_running_loop()
        opened: list[AsyncIterator[pb.StreamChatCompletionResponse]] = []

        async def first(c: Candidate, dl: float | None
                        ) -> tuple[Candidate, AsyncIterator[pb.StreamChatCompletionResponse],
                                   pb.StreamChatCompletionResponse, float | None]:
            total_at = self._deadline(c, dl, c.channel.timeouts.total)
            it = c.client.stream(params, c.upstream_model)
            try:
                async with asyncio.timeout_at(self._deadline(c, total_at,
                                                             c.channel.timeouts.first_token)):
                    chunk = await anext(it)
            except StopAsyncIteration:
                raise UpstreamError("upstream stream was empty", retryable=True,
                                    kind="malformed") from None
            except BaseException:
                await it.aclose()  # type: ignore[attr-defined]
                raise
            return c, it, chunk, total_at

        cand, it, chunk, total_at = await self._attempts(params.model, deadline, outcome, first)
        opened.append(it)
        outcome.first_token_at = loop.time()
        idle = cand.channel.timeouts.idle
        try:
            yield chunk
            while True:
                try:
                    async with asyncio.timeout_at(self._deadline(cand, total_at, idle)):
                        chunk = await anext(it)
                except StopAsyncIteration:
                    return
                except UpstreamError as err:
                    self.breaker.record_failure(cand.channel.name)
                    raise GatewayError(grpc.StatusCode.UNAVAILABLE,
                                       f"Upstream `{cand.channel.name}` failed mid-stream: "
                                       f"{err.message}", code="upstream_error") from None
                except TimeoutError:
                    if total_at is not None and loop.time() >= total_at:
                        raise GatewayError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                           "The request deadline passed mid-stream.",
                                           code="timeout") from None
                    self.breaker.record_failure(cand.channel.name)
                    raise GatewayError(grpc.StatusCode.UNAVAILABLE,
                                       f"Upstream `{cand.channel.name}` stalled mid-stream for "
                                       f"more than {idle:g}s.", code="upstream_error") from None
                yield chunk
        finally:
            await it.aclose()  # type: ignore[attr-defined]
