"""How the façade reaches the core. Both transports expose the Gateway's methods with
the same messages and raise the same GatewayErrors:

- in one process the façade holds the `Gateway` itself and calls it directly: a
  grpc.aio hop would cost ~0.5 ms CPU per request (DESIGN.md "Performance");
- apart, `GrpcTransport` is a real gRPC client over one long-lived channel.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Protocol

import grpc

from core.errors import GatewayError
from core.gateway import CallContext
from core.server import MAX_MESSAGE_BYTES
from switchboard.v1 import inference_pb2 as pb
from switchboard.v1 import inference_pb2_grpc as pb_grpc


class Transport(Protocol):
    async def chat(self, req: pb.CreateChatCompletionRequest,
                   ctx: CallContext) -> pb.CreateChatCompletionResponse: ...

    def stream_chat(self, req: pb.StreamChatCompletionRequest,
                    ctx: CallContext) -> AsyncIterator[pb.StreamChatCompletionResponse]: ...

    async def list_models(self, req: pb.ListModelsRequest,
                          ctx: CallContext) -> pb.ListModelsResponse: ...

    async def get_model(self, req: pb.GetModelRequest, ctx: CallContext) -> pb.GetModelResponse: ...

    async def create_image(self, req: pb.CreateImageRequest,
                           ctx: CallContext) -> pb.CreateImageResponse: ...


class GrpcTransport:
    """The façade as a gRPC client of a core running elsewhere."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.aio.insecure_channel(target, options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ])
        self.stub = pb_grpc.InferenceServiceStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    @staticmethod
    def _call_args(ctx: CallContext) -> dict[str, object]:
        md = [("x-request-id", ctx.request_id), ("x-switchboard-surface", ctx.surface)]
        if ctx.traceparent:
            md.append(("traceparent", ctx.traceparent))
        if ctx.api_key:
            md.append(("authorization", f"Bearer {ctx.api_key}"))
        timeout = None
        if ctx.deadline is not None:
            timeout = max(0.001, ctx.deadline - asyncio.get_running_loop().time())
        return {"metadata": tuple(md), "timeout": timeout}

    async def chat(self, req: pb.CreateChatCompletionRequest,
                   ctx: CallContext) -> pb.CreateChatCompletionResponse:
        try:
            return await self.stub.CreateChatCompletion(req, **self._call_args(ctx))
        except grpc.aio.AioRpcError as err:
            raise GatewayError.from_rpc_error(err) from None

    async def stream_chat(self, req: pb.StreamChatCompletionRequest,
                          ctx: CallContext) -> AsyncIterator[pb.StreamChatCompletionResponse]:
        call = self.stub.StreamChatCompletion(req, **self._call_args(ctx))
        try:
            async for msg in call:
                yield msg
        except grpc.aio.AioRpcError as err:
            raise GatewayError.from_rpc_error(err) from None
        finally:
            call.cancel()  # no-op when finished; cancels the core's work when we stop early

    async def list_models(self, req: pb.ListModelsRequest,
                          ctx: CallContext) -> pb.ListModelsResponse:
        try:
            return await self.stub.ListModels(req, **self._call_args(ctx))
        except grpc.aio.AioRpcError as err:
            raise GatewayError.from_rpc_error(err) from None

    async def get_model(self, req: pb.GetModelRequest, ctx: CallContext) -> pb.GetModelResponse:
        try:
            return await self.stub.GetModel(req, **self._call_args(ctx))
        except grpc.aio.AioRpcError as err:
            raise GatewayError.from_rpc_error(err) from None

    async def create_image(self, req: pb.CreateImageRequest,
                           ctx: CallContext) -> pb.CreateImageResponse:
        try:
            return await self.stub.CreateImage(req, **self._call_args(ctx))
        except grpc.aio.AioRpcError as err:
            raise GatewayError.from_rpc_error(err) from None
