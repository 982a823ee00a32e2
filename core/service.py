"""gRPC servicers: thin adapters from grpc.aio calls to the Gateway pipeline. They turn
metadata and deadlines into a CallContext and GatewayErrors into statuses. An admitted
request of a key with rate limits gets its x-ratelimit-* values as initial metadata
(the REST headers' names), before the response."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import NoReturn

import grpc

from switchboard.core.errors import GatewayError
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
    rid = md.get("x-request-id") or new_request_id()
    surface = "rest" if md.get("x-switchboard-surface") == "rest" else "grpc"
    return CallContext(api_key=bearer_token(md.get("authorization")), request_id=rid[:128],
                       surface=surface, deadline=deadline, peer=context.peer() or "",
                       traceparent=md.get("traceparent", ""))


async def abort(context: grpc.aio.ServicerContext, err: GatewayError, rid: str) -> NoReturn:
    await context.abort(err.status, err.message,
                        trailing_metadata=(*err.grpc_trailers(), ("x-request-id", rid)))
    raise AssertionError("unreachable")  # context.abort always raises


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def CreateChatCompletion(self, request: pb.CreateChatCompletionRequest,
                                   context: grpc.aio.ServicerContext
                                   ) -> pb.CreateChatCompletionResponse:
        ctx = call_context(context)
        context.set_trailing_metadata((("x-request-id", ctx.request_id),))
        try:
            resp = await self.gateway.chat(request, ctx)
        except GatewayError as err:
            await abort(context, err, ctx.request_id)
        if ctx.response_headers:
            await context.send_initial_metadata(tuple(ctx.response_headers.items()))
        return resp

    async def StreamChatCompletion(self, request: pb.StreamChatCompletionRequest,
                                   context: grpc.aio.ServicerContext
                                   ) -> AsyncIterator[pb.StreamChatCompletionResponse]:
        ctx = call_context(context)
        context.set_trailing_metadata((("x-request-id", ctx.request_id),))
        try:
            first = True
            async for chunk in self.gateway.stream_chat(request, ctx):
                if first:
                    first = False
                    if ctx.response_headers:
                        await context.send_initial_metadata(tuple(ctx.response_headers.items()))
                yield chunk
        except GatewayError as err:
            await abort(context, err, ctx.request_id)

    async def ListModels(self, request: pb.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        ctx = call_context(context)
        try:
            return await self.gateway.list_models(request, ctx)
        except GatewayError as err:
            await abort(context, err, ctx.request_id)

    async def GetModel(self, request: pb.GetModelRequest,
                       context: grpc.aio.ServicerContext) -> pb.GetModelResponse:
        ctx = call_context(context)
        try:
            return await self.gateway.get_model(request, ctx)
        except GatewayError as err:
            await abort(context, err, ctx.request_id)

    async def CreateImage(self, request: pb.CreateImageRequest,
                          context: grpc.aio.ServicerContext) -> pb.CreateImageResponse:
        ctx = call_context(context)
        context.set_trailing_metadata((("x-request-id", ctx.request_id),))
        try:
            resp = await self.gateway.create_image(request, ctx)
        except GatewayError as err:
            await abort(context, err, ctx.request_id)
        if ctx.response_headers:
            await context.send_initial_metadata(tuple(ctx.response_headers.items()))
        return resp
