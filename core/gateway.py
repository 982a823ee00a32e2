"""The request pipeline both surfaces share: authenticate → validate → check model access
→ reserve limits (core/limits.py) → route → settle limits and record usage.

Model access: the key's allowlist must allow the model requested AND every public
model a route can resolve it to (`_check_targets`); usage is recorded, and priced, by
the model that actually served the request (`Outcome.model`) next to the one asked. The gRPC
servicers (core/service.py) and the in-process façade transport call exactly these
methods with the same messages, so REST and gRPC get the same answers, errors, limits
and usage records.

Every failure leaves as a GatewayError; an unexpected exception is logged with the
request id and becomes INTERNAL without its stack reaching the client.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import grpc

from switchboard.core.config import Config

# CallContext and new_request_id live in the contract the façade shares (core/contract.py);
# re-exported here for the core's callers.
from switchboard.core.contract import CallContext as CallContext
from switchboard.core.contract import new_request_id as new_request_id
from switchboard.core.errors import GatewayError, invalid, model_not_found
from switchboard.core.keys import KeyRecord, KeyRing, check_client_network, check_model_allowed
from switchboard.core.ledger import PriceTable
from switchboard.core.limits import Limits, MemoryBackend, Ticket
from switchboard.core.logs import update_secrets
from switchboard.core.observe import Observer, observed, observed_stream
from switchboard.core.providers.base import HttpPool
from switchboard.core.router import Outcome, Router
from switchboard.core.usage import MemoryUsageSink, UsageRecord, UsageSink
from switchboard.v1 import inference_pb2 as pb

log = logging.getLogger("switchboard.gateway")


@dataclass
class _Call:
    """What one request has gathered so far, for its usage record whatever the ending."""

    key: KeyRecord | None = None
    ticket: Ticket | None = None
    outcome: Outcome = field(default_factory=Outcome)


_R = TypeVar("_R", pb.CreateChatCompletionResponse, pb.CreateImageResponse)


def _validate_chat(p: pb.ChatCompletionParams) -> None:
    if not p.model:
        raise invalid("you must provide a model parameter", "model")
    if not p.messages:
        raise invalid("messages must contain at least one message", "messages")
    for i, m in enumerate(p.messages):
        if m.role == pb.ROLE_UNSPECIFIED:
            raise invalid("each message needs a role", f"messages[{i}].role")
        if m.role == pb.ROLE_TOOL and not m.HasField("tool_call_id"):
            raise invalid("a tool message needs tool_call_id", f"messages[{i}].tool_call_id")
    if p.HasField("n") and not 1 <= p.n <= 128:
        raise invalid(f"n must be between 1 and 128, got {p.n}", "n")
    if p.HasField("temperature") and not 0 <= p.temperature <= 2:
        raise invalid(f"temperature must be between 0 and 2, got {p.temperature:g}", "temperature")
    if p.HasField("top_p") and not 0 <= p.top_p <= 1:
        raise invalid(f"top_p must be between 0 and 1, got {p.top_p:g}", "top_p")
    for name in ("max_tokens", "max_completion_tokens"):
        if p.HasField(name) and getattr(p, name) < 1:
            raise invalid(f"{name} must be at least 1", name)
    if p.HasField("top_logprobs") and not 0 <= p.top_logprobs <= 20:
        raise invalid("top_logprobs must be between 0 and 20", "top_logprobs")
    if p.tool_choice.WhichOneof("choice") == "mode" and p.tool_choice.mode not in (
            "none", "auto", "required"):
        raise invalid("tool_choice must be none, auto, required or a named function",
                      "tool_choice")


class Gateway:
    def __init__(self, config: Config, *, usage: UsageSink | None = None,
                 keyring: KeyRing | None = None, http: HttpPool | None = None,
                 limits: Limits | None = None, store: object | None = None) -> None:
        self.config = config
        # Limits reserve before routing and settle after (core/limits.py); `store` is the
        # key store + ledger database (core/store) when the runtime opened one.
        self.limits = limits or Limits(MemoryBackend(), config.limit_settings,
                                       PriceTable(config.prices))
        self.store = store
        self.http = http or HttpPool()
        self.keys = keyring or KeyRing(config.keys)
        self.router = Router(config, self.http)
        self.usage: UsageSink = usage if usage is not None else MemoryUsageSink()
        self.created = int(time.time())
        # Metrics, access logs and traces (core/observe.py); the router calls it per attempt.
        self.observer = Observer(config, known_model=lambda m: self.router.knows(m),
                                 circuit_source=self._circuit_states)
        self.router.attempt_hook = self.observer.attempt
        self.router.panic_hook = self.observer.metrics.circuit_panicked
        update_secrets(config)

    async def _circuit_states(self) -> list[tuple[str, str]]:
        return [(c.name, await self.router.breaker.state(c.name)) for c in self.config.channels]

    def reload(self, config: Config) -> None:
        """Serve `config`'s channels, keys, routes and router settings from now on.

        Everything new is built before anything is swapped, so a config that fails to
        build leaves the old one serving. Requests already running keep the router they
        started with (streams are not dropped); circuit state carries over by channel
        name and takes the new `router.circuit` settings. Listen addresses, store and
        limits backends need a restart."""
        router = Router(config, self.http, breaker=self.router.breaker, drain=self.router.drain,
                        panics=self.router.panics)
        router.attempt_hook = self.observer.attempt
        router.panic_hook = self.observer.metrics.circuit_panicked
        # Static keys are swapped in place; a store-backed ring keeps its stored keys.
        self.keys.reload_static(config.keys)
        update_secrets(config)
        self.config, self.router = config, router
        router.breaker.configure(config.router.circuit)

    async def close(self) -> None:
        await self.observer.close()
        await self.usage.close()
        await self.limits.close()
        if self.store is not None:
            await self.store.close()  # type: ignore[attr-defined]
        await self.router.close()  # the circuit breaker's Redis connection, if any
        await self.http.close()

    # ----------------------------------------------------------- helpers ----

    async def _admit(self, ctx: CallContext, model: str) -> KeyRecord:
        key = await self.keys.authenticate(ctx.api_key)
        check_client_network(key, ctx.peer)
        if not model:
            raise invalid("you must provide a model parameter", "model")
        if not self.router.knows(model):
            raise model_not_found(model)
        check_model_allowed(key, model)
        self._check_targets(key, model)
        return key

    def _check_targets(self, key: KeyRecord, model: str) -> None:
        """A route (alias, fallback chain) may reach only models the key may use: every
        public model it can resolve to must pass the key's allowlist too, else the whole
        request is refused (403) — never quietly served by a model the key may not use,
        and never shortened to the targets that pass (which would change what the alias
        means per key)."""
        if key.models == ("*",):
            return
        for target in self.router.targets(model):
            if target != model and not key.allows(target):
                raise GatewayError(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"The API key '{key.name}' is not allowed to use model `{target}`, "
                    f"which `{model}` routes to.", code="model_not_allowed", param="model")

    def _may_use(self, key: KeyRecord, model: str) -> bool:
        if not key.allows(model):
            return False
        try:
            self._check_targets(key, model)
        except GatewayError:
            return False
        return True

    def _record(self, ctx: CallContext, key: KeyRecord | None, model: str, started: float,
                outcome: Outcome, usage: pb.Usage | None, status: grpc.StatusCode,
                stream: bool, ticket: Ticket | None = None) -> None:
        loop_now = asyncio.get_running_loop().time()
        rec = UsageRecord(
            request_id=ctx.request_id, key_name=key.name if key else "", model=model,
            served_model=outcome.model, upstream_model=outcome.upstream_model,
            surface=ctx.surface, channel=outcome.channel, status=status.name,
            latency_ms=(loop_now - started) * 1000.0, stream=stream,
            ttft_ms=(outcome.first_token_at - started) * 1000.0
            if outcome.first_token_at is not None else None,
        )
        if key is not None:
            rec.key_id = key.key_id
        # Tokens (real, or estimated when the upstream sent none), cost, and settling
        # the reservation to them.
        self.limits.finish(ticket, rec, usage)
        self.observer.record(rec)
        self.usage.record(rec)

    def _internal(self, ctx: CallContext, exc: BaseException) -> GatewayError:
        log.error("internal error in request %s", ctx.request_id, exc_info=exc)
        return GatewayError(grpc.StatusCode.INTERNAL,
                            f"The gateway hit an internal error (request id {ctx.request_id}).")

    # ------------------------------------------------------------- calls ----

    async def _unary(self, ctx: CallContext, model: str,
                     run: Callable[[_Call], Awaitable[_R]]) -> _R:
        """Admit the caller, `run` the call, and record its usage whatever the ending:
        error, cancellation, a bug (INTERNAL, stack kept out of the reply) or success."""
        started = asyncio.get_running_loop().time()
        call = _Call()
        status = grpc.StatusCode.OK
        try:
            call.key = await self._admit(ctx, model)
            resp = await run(call)
        except GatewayError as err:
            status = err.status
            raise
        except asyncio.CancelledError:
            status = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            status = grpc.StatusCode.INTERNAL
            raise self._internal(ctx, exc) from None
        finally:
            if call.key is not None and status != grpc.StatusCode.OK:
                self._record(ctx, call.key, model, started, call.outcome, None, status, False,
                             call.ticket)
        self._record(ctx, call.key, model, started, call.outcome,
                     resp.usage if resp.HasField("usage") else None, status, False, call.ticket)
        return resp

    @observed("chat")
    async def chat(self, req: pb.CreateChatCompletionRequest,
                   ctx: CallContext) -> pb.CreateChatCompletionResponse:
        params = req.params

        async def run(call: _Call) -> pb.CreateChatCompletionResponse:
            assert call.key is not None
            _validate_chat(params)
            call.ticket = await self.limits.reserve_chat(
                call.key, params, ctx.request_id, lambda: self.router.served_names(params.model))
            ctx.response_headers = call.ticket.headers
            resp = await self.router.chat(params, ctx.deadline, call.outcome)
            call.outcome.first_token_at = asyncio.get_running_loop().time()
            call.ticket.observe(resp)
            return resp

        return await self._unary(ctx, params.model, run)

    @observed_stream("chat")
    async def stream_chat(self, req: pb.StreamChatCompletionRequest,
                          ctx: CallContext) -> AsyncGenerator[pb.StreamChatCompletionResponse, None]:
        """Relays the upstream chunks. A chunk carrying finish reasons is held until the
        next one so that, when usage follows it, both go out as one last message."""
        started = asyncio.get_running_loop().time()
        params = req.params
        key: KeyRecord | None = None
        ticket: Ticket | None = None
        outcome = Outcome()
        usage: pb.Usage | None = None
        status = grpc.StatusCode.OK
        held: pb.StreamChatCompletionResponse | None = None
        try:
            key = await self._admit(ctx, params.model)
            _validate_chat(params)
            ticket = await self.limits.reserve_chat(
                key, params, ctx.request_id, lambda: self.router.served_names(params.model))
            ctx.response_headers = ticket.headers
            async for chunk in self.router.stream(params, ctx.deadline, outcome):
                ticket.observe(chunk)
                if chunk.HasField("usage"):
                    usage = chunk.usage
                    if held is not None and not chunk.choices:
                        held.usage.CopyFrom(chunk.usage)
                        chunk, held = held, None
                if held is not None:
                    yield held
                    held = None
                if any(c.finish_reason for c in chunk.choices) and not chunk.HasField("usage"):
                    held = chunk
                    continue
                yield chunk
            if held is not None:
                yield held
        except GatewayError as err:
            status = err.status
            raise
        except (asyncio.CancelledError, GeneratorExit):
            status = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            status = grpc.StatusCode.INTERNAL
            raise self._internal(ctx, exc) from None
        finally:
            if key is not None:
                self._record(ctx, key, params.model, started, outcome, usage, status, True,
                             ticket)

    async def list_models(self, req: pb.ListModelsRequest,
                          ctx: CallContext) -> pb.ListModelsResponse:
        key = await self.keys.authenticate(ctx.api_key)
        return pb.ListModelsResponse(models=[
            pb.Model(id=m, created=self.created, owned_by=owner)
            for m, owner in self.router.model_ids() if self._may_use(key, m)
        ])

    async def get_model(self, req: pb.GetModelRequest, ctx: CallContext) -> pb.GetModelResponse:
        key = await self.keys.authenticate(ctx.api_key)
        for m, owner in self.router.model_ids():
            if m == req.model and self._may_use(key, m):
                return pb.GetModelResponse(model=pb.Model(id=m, created=self.created,
                                                          owned_by=owner))
        raise model_not_found(req.model)

    @observed("generate_content")
    async def create_image(self, req: pb.CreateImageRequest,
                           ctx: CallContext) -> pb.CreateImageResponse:
        async def run(call: _Call) -> pb.CreateImageResponse:
            assert call.key is not None
            if not req.prompt:
                raise invalid("prompt must not be empty", "prompt")
            if req.HasField("n") and not 1 <= req.n <= 10:
                raise invalid(f"n must be between 1 and 10, got {req.n}", "n")
            if req.HasField("response_format") and req.response_format not in ("url", "b64_json"):
                raise invalid("response_format must be url or b64_json", "response_format")
            call.ticket = await self.limits.reserve_image(
                call.key, req, ctx.request_id, lambda: self.router.served_names(req.model))
            ctx.response_headers = call.ticket.headers
            return await self.router.create_image(req, ctx.deadline, call.outcome)

        return await self._unary(ctx, req.model, run)
