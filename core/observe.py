"""What the gateway shows operators about each request: the glue between the request
pipeline (core/gateway.py) and metrics, logs and traces.

One record per request. `Gateway._record` builds the `UsageRecord` (the ledger's
record) and hands it to `Observer.record`, which feeds the metrics at once; the
`observed`/`observed_stream` decorators around the gateway's calls open the request
span and the in-flight gauges, and when the call ends they write the one access-log
line, close the span, and — for a request that never got a record because it failed
before its key was known (401, malformed) — synthesise one for metrics and logs only
(the ledger bills keys; there is none).

Scrubbing secrets out of error messages is not done here: it is a step of each edge
(core/edge.py `public`, used by the gRPC interceptor and the REST error renderer), so a
call that skips these decorators cannot skip it. Logs and spans redact on their own.

Per-request state lives in a ContextVar so the router's attempt hook (one call per
upstream attempt) finds the request span without new parameters. A stream's
generator runs in the task iterating it, which is the request's task on both surfaces.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, cast

import grpc

from switchboard.core.config import Config
from switchboard.core.contract import CallContext
from switchboard.core.errors import GatewayError
from switchboard.core.logs import log_request
from switchboard.core.metrics import Metrics
from switchboard.core.providers.base import UpstreamError
from switchboard.core.redact import REDACTOR
from switchboard.core.tracing import Tracing
from switchboard.core.usage import UsageRecord

if TYPE_CHECKING:
    from switchboard.core.router import Candidate

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
G = TypeVar("G", bound=Callable[..., AsyncGenerator[Any, None]])


@dataclass
class RequestState:
    ctx: CallContext
    operation: str
    model: str
    stream: bool
    started: float = field(default_factory=time.perf_counter)
    span: Any = None
    record: UsageRecord | None = None
    attempts: int = 0
    prev: RequestState | None = None


_current: ContextVar[RequestState | None] = ContextVar("switchboard_request", default=None)


def classify(exc: BaseException | None) -> tuple[grpc.StatusCode, str | None, str]:
    """(status, error type for spans/logs or None, description) of how a call ended."""
    if exc is None:
        return grpc.StatusCode.OK, None, ""
    if isinstance(exc, GatewayError):
        return exc.status, exc.code or exc.status.name.lower(), exc.message
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return grpc.StatusCode.CANCELLED, "cancelled", "client went away"
    return grpc.StatusCode.INTERNAL, type(exc).__name__, "internal error"


def attempt_reason(exc: BaseException) -> str:
    """The `reason` label of an upstream error."""
    if isinstance(exc, UpstreamError):
        return f"http_{exc.status}" if exc.status else exc.kind
    if isinstance(exc, TimeoutError):
        return "timeout"
    return "error"


class Observer:
    def __init__(self, config: Config, *, known_model: Callable[[str], bool] | None = None,
                 circuit_source: Callable[[], Awaitable[list[tuple[str, str]]]] | None = None,
                 tracing: Tracing | None = None) -> None:
        self.metrics = Metrics(known_model=known_model)
        self.circuit_source = circuit_source
        self._in_flight: dict[str, tuple[Any, Any]] = {}
        self.tracing = tracing or Tracing.build(config.observability)

    def _gauges(self, surface: str) -> tuple[Any, Any]:
        gauges = self._in_flight.get(surface)
        if gauges is None:
            gauges = (self.metrics.in_flight.labels(surface),
                      self.metrics.in_flight_streams.labels(surface))
            self._in_flight[surface] = gauges
        return gauges

    async def scrape(self) -> tuple[bytes, str]:
        """The /metrics body and content type, with circuit states read now."""
        if self.circuit_source is not None:
            self.metrics.set_circuits(await self.circuit_source())
        return self.metrics.exposition()

    async def close(self) -> None:
        await self.tracing.close()

    # ------------------------------------------------------ per request ----

    def begin(self, ctx: CallContext, operation: str, model: str, stream: bool) -> RequestState:
        state = RequestState(ctx=ctx, operation=operation, model=model, stream=stream,
                             prev=_current.get())
        requests, streams = self._gauges(ctx.surface)
        requests.inc()
        if stream:
            streams.inc()
        if self.tracing.enabled:
            state.span = self.tracing.start_request(
                f"{operation} {model}".strip(), getattr(ctx, "traceparent", ""), {
                    "gen_ai.operation.name": operation, "gen_ai.request.model": model,
                    "switchboard.request_id": ctx.request_id, "switchboard.surface": ctx.surface,
                    "switchboard.stream": stream})
        _current.set(state)
        return state

    def record(self, rec: UsageRecord) -> None:
        """The request's record (from Gateway._record): metrics now, the log line at the end."""
        self.metrics.observe(rec)
        state = _current.get()
        if state is not None and state.ctx.request_id == rec.request_id:
            state.record = rec
        else:
            log_request(rec)

    def end(self, state: RequestState, exc: BaseException | None) -> None:
        requests, streams = self._gauges(state.ctx.surface)
        requests.dec()
        if state.stream:
            streams.dec()
        if _current.get() is state:
            _current.set(state.prev)
        status, error_type, description = classify(exc)
        rec = state.record
        if rec is None:
            rec = UsageRecord(request_id=state.ctx.request_id, key_name="", model=state.model,
                              surface=state.ctx.surface, status=status.name, stream=state.stream,
                              latency_ms=(time.perf_counter() - state.started) * 1000.0)
            self.metrics.observe(rec)
        if (status == grpc.StatusCode.RESOURCE_EXHAUSTED and state.attempts == 0
                and isinstance(exc, GatewayError)):
            # Refused before any upstream was tried: our own limiter, not an upstream 429.
            self.metrics.limiter_rejected(exc.code or "rate_limit_exceeded")
        log_request(rec, error=description or None, attempts=state.attempts)
        if state.span is not None:
            self.tracing.end(state.span, error_type, REDACTOR.redact(description), {
                "switchboard.key_name": rec.key_name, "switchboard.channel": rec.channel,
                "gen_ai.usage.input_tokens": rec.prompt_tokens,
                "gen_ai.usage.output_tokens": rec.completion_tokens,
                "rpc.grpc.status_code": status.value[0]})

    # ------------------------------------------------------ per attempt ----

    async def attempt(self, cand: Candidate, call: Awaitable[T]) -> T:
        """Router hook around one upstream attempt: a child span and error metrics."""
        state = _current.get()
        if state is not None:
            state.attempts += 1
        span = None
        if state is not None and state.span is not None:
            span = self.tracing.start_attempt(state.span, f"{state.operation} {cand.upstream_model}", {
                "gen_ai.operation.name": state.operation, "gen_ai.request.model": cand.upstream_model,
                "gen_ai.provider.name": cand.channel.provider,
                "switchboard.channel": cand.channel.name, "server.address": cand.channel.base_url})
        try:
            result = await call
        except (asyncio.CancelledError, GeneratorExit):
            self.tracing.end(span, "cancelled", "cancelled")
            raise
        except BaseException as exc:
            reason = attempt_reason(exc)
            self.metrics.upstream_error(cand.channel.name, reason)
            message = exc.message if isinstance(exc, UpstreamError) else type(exc).__name__
            self.tracing.end(span, reason, REDACTOR.redact(message))
            raise
        self.tracing.end(span)
        return result


# ------------------------------------------------------------ decorators ----

def _model_of(req: Any) -> str:
    params = getattr(req, "params", None)
    return str(getattr(params if params is not None else req, "model", ""))


def observed(operation: str) -> Callable[[F], F]:
    """Wraps a unary Gateway call (self.observer must exist)."""
    def deco(fn: F) -> F:
        @functools.wraps(fn)
        async def wrapper(self: Any, req: Any, ctx: CallContext) -> Any:
            obs: Observer = self.observer
            state = obs.begin(ctx, operation, _model_of(req), False)
            try:
                result = await fn(self, req, ctx)
            except BaseException as exc:
                obs.end(state, exc)
                raise
            obs.end(state, None)
            return result
        return cast(F, wrapper)
    return deco


def observed_stream(operation: str) -> Callable[[G], G]:
    """Wraps a streaming Gateway call; the request ends when the stream does."""
    def deco(fn: G) -> G:
        @functools.wraps(fn)
        async def wrapper(self: Any, req: Any, ctx: CallContext) -> AsyncGenerator[Any, None]:
            obs: Observer = self.observer
            state = obs.begin(ctx, operation, _model_of(req), True)
            inner = fn(self, req, ctx)
            error: BaseException | None = None
            try:
                async for item in inner:
                    yield item
            except BaseException as exc:
                error = exc
                raise
            finally:
                # Close the inner generator now (not at GC) so its record is written first.
                await inner.aclose()
                obs.end(state, error)
        return cast(G, wrapper)
    return deco
