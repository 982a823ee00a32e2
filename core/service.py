"""gRPC servicers: thin adapters from grpc.aio calls to the Gateway pipeline. They turn
metadata and deadlines into a CallContext; GatewayErrors become statuses at the edge
(core/edge.py's interceptor), not here. An admitted request of a key with rate limits
gets its x-ratelimit-* values as initial metadata (the REST headers' names), before
the response."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from switchboard.core.edge import current_request_id
from switchboard.core.gateway import CallContext, Gateway, new_request_id
from switchboard.core.keys import bearer_token
from switchboard.v1 import inference_pb2 as pb
from switchboard.v1 import inference_pb2_grpc as pb_grpc


def call_context(context: grpc.aio.ServicerContext) -> CallContext:
    md = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
    remaining = context.time_remaining()
    deadline = None
    if remaining is not None:
        deadline = asyncio.get_running_loop().time() + remaining
    # The id core/edge.py's boundary fixed (and sends as a trailer) for this call.
    rid = current_request_id.get() or md.get("x-request-id") or new_request_id()
    surface = "rest" if md.get("x-switchboard-surface") == "rest" else "grpc"
    return CallContext(api_key=bearer_token(md.get("authorization")), request_id=rid[:128],
                       surface=surface, deadline=deadline, peer=context.peer() or "",
                       traceparent=md.get("traceparent", ""))


async def _limit_headers(context: grpc.aio.ServicerContext, ctx: CallContext) -> None:
    """An admitted request's x-ratelimit-* values, as initial metadata before the reply."""
    if ctx.response_headers:
        await context.send_initial_metadata(tuple(ctx.response_headers.items()))


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    """Errors are not handled here: a GatewayError raised by the pipeline ends the call
    through core/edge.py's ErrorBoundary, which every RPC passes through."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def CreateChatCompletion(self, request: pb.CreateChatCompletionRequest,
                                   context: grpc.aio.ServicerContext
                                   ) -> pb.CreateChatCompletionResponse:
        ctx = call_context(context)
        resp = await self.gateway.chat(request, ctx)
        await _limit_headers(context, ctx)
        return resp

    async def StreamChatCompletion(self, request: pb.StreamChatCompletionRequest,
                                   context: grpc.aio.ServicerContext
                                   ) -> AsyncIterator[pb.StreamChatCompletionResponse]:
        ctx = call_context(context)
        first = True
        async for chunk in self.gateway.stream_chat(request, ctx):
            if first:
                first = False
                await _limit_headers(context, ctx)
            yield chunk

    async def ListModels(self, request: pb.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        return await self.gateway.list_models(request, call_context(context))

    async def GetModel(self, request: pb.GetModelRequest,
                       context: grpc.aio.ServicerContext) -> pb.GetModelResponse:
        return await self.gateway.get_model(request, call_context(context))

    async def CreateImage(self, request: pb.CreateImageRequest,
                          context: grpc.aio.ServicerContext) -> pb.CreateImageResponse:
        ctx = call_context(context)
        resp = await self.gateway.create_image(request, ctx)
        await _limit_headers(context, ctx)
        return resp
