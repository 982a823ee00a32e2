"""How the façade reaches the core. Both transports expose the Gateway's methods with
the same messages and raise the same GatewayErrors:

- in one process the façade holds the `Gateway` itself and calls it directly: a
  grpc.aio hop would cost ~0.5 ms CPU per request (docs/design.md, "Performance");
- apart, `GrpcTransport` is a real gRPC client over one long-lived channel.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any, Protocol, TypedDict

import grpc

from switchboard.core.errors import GatewayError
from switchboard.core.gateway import CallContext
from switchboard.core.server import MAX_MESSAGE_BYTES
from switchboard.v1 import inference_pb2 as pb
from switchboard.v1 import inference_pb2_grpc as pb_grpc


class Transport(Protocol):
    async def chat(self, req: pb.CreateChatCompletionRequest,
                   ctx: CallContext) -> pb.CreateChatCompletionResponse: ...

    def stream_chat(self, req: pb.StreamChatCompletionRequest,
                    ctx: CallContext) -> AsyncGenerator[pb.StreamChatCompletionResponse, None]: ...

    async def list_models(self, req: pb.ListModelsRequest,
                          ctx: CallContext) -> pb.ListModelsResponse: ...

    async def get_model(self, req: pb.GetModelRequest, ctx: CallContext) -> pb.GetModelResponse: ...

    async def create_image(self, req: pb.CreateImageRequest,
                           ctx: CallContext) -> pb.CreateImageResponse: ...


class _CallArgs(TypedDict):
    """The keyword arguments every stub call gets (typed so the stub's signature checks them)."""

    metadata: tuple[tuple[str, str], ...]
    timeout: float | None


class GrpcTransport:
    """The façade as a gRPC client of a core running elsewhere."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.aio.insecure_channel(target, options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ])
        self.stub = pb_grpc.InferenceServiceStub(self.channel)
        self._calls: set[Any] = set()
        self._abort: GatewayError | None = None

    async def close(self) -> None:
        await self.channel.close()

    @staticmethod
    def _call_args(ctx: CallContext) -> _CallArgs:
        md = [("x-request-id", ctx.request_id), ("x-switchboard-surface", ctx.surface)]
        if ctx.traceparent:
            md.append(("traceparent", ctx.traceparent))
        if ctx.api_key:
            md.append(("authorization", f"Bearer {ctx.api_key}"))
        timeout = None
        if ctx.deadline is not None:
            timeout = max(0.001, ctx.deadline - asyncio.get_running_loop().time())
        return {"metadata": tuple(md), "timeout": timeout}

    def abort_inflight(self, error: GatewayError) -> int:
        """End every call still open with `error` (the drain period of a façade-only
        process is over): open SSE streams get it as their final error event."""
        self._abort = error
        for call in list(self._calls):
            call.cancel()
        return len(self._calls)

    def _failure(self, exc: BaseException) -> GatewayError | None:
        """The GatewayError for a failed call; None for a plain cancellation."""
        if isinstance(exc, grpc.aio.AioRpcError):
            return GatewayError.from_rpc_error(exc)
        a = self._abort
        if a is None:
            return None  # the client went away: stay a cancellation
        # A fresh instance per call: one shared exception would collect every traceback.
        return GatewayError(a.status, a.message, code=a.code)

    @staticmethod
    async def _limit_headers(call: Any, ctx: CallContext) -> None:
        """The core's x-ratelimit-* initial metadata, for the REST response headers."""
        md = await call.initial_metadata()
        if md:
            headers = {k: v for k, v in md if k.startswith("x-ratelimit-") and isinstance(v, str)}
            if headers:
                ctx.response_headers = headers

    async def _unary(self, method: Any, req: Any, ctx: CallContext) -> Any:
        call = method(req, **self._call_args(ctx))
        self._calls.add(call)
        try:
            resp = await call
            await self._limit_headers(call, ctx)
            return resp
        except (grpc.aio.AioRpcError, asyncio.CancelledError) as exc:
            err = self._failure(exc)
            if err is None:
                raise
            raise err from None
        finally:
            self._calls.discard(call)

    async def chat(self, req: pb.CreateChatCompletionRequest,
                   ctx: CallContext) -> pb.CreateChatCompletionResponse:
        return await self._unary(self.stub.CreateChatCompletion, req, ctx)

    async def stream_chat(self, req: pb.StreamChatCompletionRequest,
                          ctx: CallContext) -> AsyncGenerator[pb.StreamChatCompletionResponse, None]:
        call = self.stub.StreamChatCompletion(req, **self._call_args(ctx))
        self._calls.add(call)
        try:
            first = True
            async for msg in call:
                if first:
                    first = False
                    await self._limit_headers(call, ctx)
                yield msg
        except (grpc.aio.AioRpcError, asyncio.CancelledError) as exc:
            err = self._failure(exc)
            if err is None:
                raise
            raise err from None
        finally:
            self._calls.discard(call)
            call.cancel()  # no-op when finished; cancels the core's work when we stop early

    async def list_models(self, req: pb.ListModelsRequest,
                          ctx: CallContext) -> pb.ListModelsResponse:
        return await self._unary(self.stub.ListModels, req, ctx)

    async def get_model(self, req: pb.GetModelRequest, ctx: CallContext) -> pb.GetModelResponse:
        return await self._unary(self.stub.GetModel, req, ctx)

    async def create_image(self, req: pb.CreateImageRequest,
                           ctx: CallContext) -> pb.CreateImageResponse:
        return await self._unary(self.stub.CreateImage, req, ctx)
