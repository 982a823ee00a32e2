"""Errors at the edges (issue 12, item 4): every RPC of the core's gRPC server and every
route of the REST app end their errors through one boundary — core/edge.py's
interceptor and the façade's renderer — which scrubs secrets and takes statuses from
the one table. The RPCs and routes here are added by the test itself, with no error
handling of their own, to show a new method gets all of that without doing anything.
Real servers over loopback: the core's gRPC server as build_grpc_server makes it and
the façade app as create_app makes it, served by the runner the CLI uses."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import orjson
import pytest
from aiohttp import web
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from switchboard.core.composition.runtime import admin_caller
from switchboard.core.errors import GatewayError
from switchboard.core.gateway import Gateway
from switchboard.core.logs import update_secrets
from switchboard.core.redact import REDACTED
from switchboard.core.server import build_grpc_server
from switchboard.facade.app import JsonErrorRunner, create_app
from switchboard.v1 import inference_pb2 as pb
from tests.harness import channel_yaml, make_config

# A secret the config knows (the channel's upstream key) and one only its shape gives away.
KNOWN = "upstream-secret-leaky"
SHAPED = "sk-proj-notinconfig0123456789"
SERVICE = "switchboard.test.Leaky"


def _leak(status: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> GatewayError:
    return GatewayError(status, f"upstream said: key {KNOWN} rejected, also {SHAPED}",
                        code="upstream_error", param="model")


def _assert_scrubbed(text: str) -> None:
    assert KNOWN not in text and SHAPED not in text, text
    assert REDACTED in text, text


@pytest.fixture
async def gateway() -> AsyncIterator[Gateway]:
    cfg = make_config(f"channels:\n{channel_yaml('leaky', 'openai', 'http://127.0.0.1:9/v1', ['m'])}\n")
    update_secrets(cfg)  # what Runtime.start does with a config
    gw = Gateway(cfg)
    yield gw
    await gw.close()


# ---------------------------------------------------------------- gRPC ----


async def _fail(request: pb.ListModelsRequest, context: grpc.aio.ServicerContext) -> Any:
    raise _leak()


async def _fail_later(request: pb.ListModelsRequest,
                      context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ListModelsResponse]:
    yield pb.ListModelsResponse(models=[pb.Model(id="first")])
    raise _leak(grpc.StatusCode.RESOURCE_EXHAUSTED)


async def _crash(request: pb.ListModelsRequest, context: grpc.aio.ServicerContext) -> Any:
    raise RuntimeError(f"a bug that quotes {KNOWN}")


@pytest.fixture
async def grpc_channel(gateway: Gateway) -> AsyncIterator[grpc.aio.Channel]:
    server, port, _health = build_grpc_server(gateway, "127.0.0.1:0")
    # A new service registered the plain grpc way: no try/except, no abort, no scrub.
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        "Fail": grpc.unary_unary_rpc_method_handler(
            _fail, pb.ListModelsRequest.FromString, pb.ListModelsResponse.SerializeToString),
        "FailLater": grpc.unary_stream_rpc_method_handler(
            _fail_later, pb.ListModelsRequest.FromString, pb.ListModelsResponse.SerializeToString),
        "Crash": grpc.unary_unary_rpc_method_handler(
            _crash, pb.ListModelsRequest.FromString, pb.ListModelsResponse.SerializeToString),
    }),))
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield channel
    finally:
        await channel.close()
        await server.stop(None)


def _details(err: grpc.aio.AioRpcError) -> tuple[str, error_details_pb2.ErrorInfo]:
    status = rpc_status.from_call(err)  # grpcio-status checks code and message agree
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return status.message, info


async def test_new_unary_rpc_is_scrubbed_and_mapped_at_the_grpc_edge(
        grpc_channel: grpc.aio.Channel) -> None:
    call = grpc_channel.unary_unary(f"/{SERVICE}/Fail", pb.ListModelsRequest.SerializeToString,
                                    pb.ListModelsResponse.FromString)
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await call(pb.ListModelsRequest(), metadata=(("x-request-id", "rid-leak-1"),), timeout=10)
    err = exc.value
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    _assert_scrubbed(err.details() or "")
    message, info = _details(err)
    _assert_scrubbed(message)
    assert (info.reason, info.metadata["param"]) == ("upstream_error", "model")
    assert ("x-request-id", "rid-leak-1") in tuple(err.trailing_metadata() or ())


async def test_new_streaming_rpc_is_scrubbed_after_its_first_message(
        grpc_channel: grpc.aio.Channel) -> None:
    call = grpc_channel.unary_stream(f"/{SERVICE}/FailLater", pb.ListModelsRequest.SerializeToString,
                                     pb.ListModelsResponse.FromString)
    got: list[str] = []
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        async for msg in call(pb.ListModelsRequest(), timeout=10):
            got.append(msg.models[0].id)
    assert got == ["first"]
    assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    _assert_scrubbed(exc.value.details() or "")
    _assert_scrubbed(_details(exc.value)[0])
    rid = dict(exc.value.trailing_metadata() or ()).get("x-request-id")
    assert isinstance(rid, str) and rid  # generated when the caller sent none


async def test_new_rpc_gets_the_request_guard_and_hides_bugs(
        grpc_channel: grpc.aio.Channel) -> None:
    raw = grpc_channel.unary_unary(f"/{SERVICE}/Fail")  # bytes in, bytes out
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await raw(b"\xff\xff\xff", timeout=10)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid protobuf message" in (exc.value.details() or "")
    crash = grpc_channel.unary_unary(f"/{SERVICE}/Crash", pb.ListModelsRequest.SerializeToString,
                                     pb.ListModelsResponse.FromString)
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await crash(pb.ListModelsRequest(), timeout=10)
    assert exc.value.code() == grpc.StatusCode.INTERNAL
    details = exc.value.details() or ""
    assert "internal error" in details and KNOWN not in details and "RuntimeError" not in details


# ---------------------------------------------------------------- REST ----


async def _rest_fail(request: web.Request) -> web.StreamResponse:
    raise _leak(grpc.StatusCode.RESOURCE_EXHAUSTED)


async def test_new_route_is_scrubbed_and_mapped_at_the_rest_edge(gateway: Gateway) -> None:
    app = create_app(gateway, admin=admin_caller(gateway))
    app.router.add_get("/v1/leaky", _rest_fail)  # a new route, no error handling of its own
    runner = JsonErrorRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/v1/leaky",
                                headers={"x-request-id": "rid-leak-2"}) as resp:
                text = await resp.text()
                assert resp.status == 429  # RESOURCE_EXHAUSTED's row in the table
                assert resp.headers["x-request-id"] == "rid-leak-2"
    finally:
        await runner.cleanup()
    _assert_scrubbed(text)
    error = orjson.loads(text)["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "rate_limit_exceeded", "upstream_error", "model")
