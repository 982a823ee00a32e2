"""The aiohttp app serving OpenAI's REST/SSE surface. Each handler parses JSON into the
request message, calls the core through a Transport with the caller's credentials,
and writes the reply or the mapped error. No routing, auth or provider logic here.

Headers: `Authorization: Bearer <key>`; `X-Request-Id` (echoed, or generated; on
every response); `X-Switchboard-Timeout: <seconds>` sets a deadline for the request,
like a gRPC deadline (the shorter of it and the channel's timeouts wins); a W3C
`traceparent` header becomes the parent of the request's trace span.

Operations endpoints (no auth; docs/operations.md): GET /healthz, /readyz, /metrics.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Protocol

import grpc
import orjson
from aiohttp import web

from switchboard.core.errors import GatewayError, invalid
from switchboard.core.gateway import CallContext, new_request_id
from switchboard.core.keys import bearer_token
from switchboard.facade import openai_json as oj
from switchboard.facade.admin_routes import add_admin_routes
from switchboard.facade.transport import Transport
from switchboard.v1 import inference_pb2 as pb

log = logging.getLogger("switchboard.facade")


class Ops(Protocol):
    """What the operations endpoints need (built by core/runtime.py)."""

    async def ready(self) -> tuple[bool, dict[str, str]]: ...

    async def metrics(self) -> tuple[bytes, str]: ...


TRANSPORT = web.AppKey("transport", Transport)
OPS = web.AppKey("ops", Ops)
RID = web.RequestKey("rid", str)
_RID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_JSON = "application/json"
_SSE_HEADERS = {"content-type": "text/event-stream", "cache-control": "no-cache",
                "x-accel-buffering": "no"}
_DONE = b"data: [DONE]\n\n"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _request_id(request: web.Request) -> str:
    rid = request.headers.get("x-request-id", "")
    return rid if _RID.match(rid) else new_request_id()


def _context(request: web.Request, rid: str) -> CallContext:
    deadline = None
    raw = request.headers.get("x-switchboard-timeout")
    if raw:
        try:
            seconds = float(raw)
        except ValueError:
            raise invalid("X-Switchboard-Timeout must be a number of seconds",
                          "x-switchboard-timeout") from None
        if seconds <= 0:
            raise invalid("X-Switchboard-Timeout must be positive", "x-switchboard-timeout")
        deadline = asyncio.get_running_loop().time() + seconds
    return CallContext(api_key=bearer_token(request.headers.get("authorization")),
                       request_id=rid, surface="rest", deadline=deadline,
                       peer=request.remote or "", traceparent=request.headers.get("traceparent", ""))


def _json(data: object, rid: str, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type=_JSON,
                        headers={"x-request-id": rid})


def error_response(err: GatewayError, rid: str) -> web.Response:
    headers = err.http_headers()
    headers["x-request-id"] = rid
    return web.Response(body=oj.error_json(err), status=err.http_status,
                        content_type=_JSON, headers=headers)


async def _body(request: web.Request) -> object:
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"Request body exceeds the limit of {request.app._client_max_size} "
                           "bytes.", code="request_too_large") from None
    if not raw:
        raise invalid("The request body is empty; send a JSON object.", None)
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise invalid(f"We could not parse the JSON body of your request ({exc.msg} at "
                      f"position {exc.pos}).", None, code="invalid_json") from None


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure becomes an OpenAI error object with the table's status."""
    rid = request.get(RID) or _request_id(request)
    request[RID] = rid
    try:
        return await handler(request)
    except GatewayError as err:
        resp = error_response(err, rid)
        if err.code == "request_too_large":
            resp.set_status(413)
        return resp
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        status = {404: grpc.StatusCode.NOT_FOUND, 405: grpc.StatusCode.UNIMPLEMENTED}.get(
            exc.status, grpc.StatusCode.INVALID_ARGUMENT)
        mapped = GatewayError(status, f"{request.method} {request.path}: {exc.reason}",
                              code="not_found" if exc.status == 404 else None)
        resp = error_response(mapped, rid)
        resp.set_status(exc.status)
        return resp
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unhandled error in request %s", rid)
        return error_response(GatewayError(
            grpc.StatusCode.INTERNAL,
            f"The gateway hit an internal error (request id {rid})."), rid)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    rid = request[RID]
    params, stream = oj.parse_chat(await _body(request))
    ctx = _context(request, rid)
    transport = request.app[TRANSPORT]
    if not stream:
        resp = await transport.chat(pb.CreateChatCompletionRequest(params=params), ctx)
        return _json(oj.chat_response_json(resp), rid)
    return await _relay_stream(request, transport.stream_chat(
        pb.StreamChatCompletionRequest(params=params), ctx), rid,
        params.stream_options.include_usage)


async def _relay_stream(request: web.Request, chunks: object, rid: str,
                        include_usage: bool) -> web.StreamResponse:
    """SSE relay: headers go out only with the first chunk, so an error before it still
    gets its proper HTTP status; an error after it becomes a final `error` event."""
    it = chunks.__aiter__()  # type: ignore[attr-defined]
    try:
        first = await it.__anext__()
    except StopAsyncIteration:
        first = None
    resp = web.StreamResponse(headers={**_SSE_HEADERS, "x-request-id": rid})
    await resp.prepare(request)
    write, dumps, chunk_json = resp.write, orjson.dumps, oj.chunk_json  # per-chunk loop
    # Backpressure: aiohttp waits for the client only every 64 KiB written; waiting after
    # each event while the connection's buffer is over its mark (facade/guard.py) stops
    # the next upstream read sooner (a no-op when the client keeps up).
    drain = request.writer.drain
    try:
        if first is not None:
            chunk = first
            while True:
                has_usage = chunk.HasField("usage")
                if chunk.choices or not has_usage:
                    # one write per event: relayed as it arrives, never batched
                    await write(b"data: " + dumps(chunk_json(chunk, include_usage)) + b"\n\n")
                if include_usage and has_usage:
                    await write(b"data: " + dumps(oj.usage_chunk_json(chunk)) + b"\n\n")
                await drain()
                try:
                    chunk = await it.__anext__()
                except StopAsyncIteration:
                    break
        await write(_DONE)
    except GatewayError as err:
        await resp.write(b"data: " + oj.error_json(err) + b"\n\n")
    finally:
        await it.aclose()
    return resp


async def list_models(request: web.Request) -> web.StreamResponse:
    ctx = _context(request, request[RID])
    resp = await request.app[TRANSPORT].list_models(pb.ListModelsRequest(), ctx)
    return _json(oj.models_json(resp.models), request[RID])


async def get_model(request: web.Request) -> web.StreamResponse:
    ctx = _context(request, request[RID])
    resp = await request.app[TRANSPORT].get_model(
        pb.GetModelRequest(model=request.match_info["model"]), ctx)
    return _json(oj.model_json(resp.model), request[RID])


async def images_generations(request: web.Request) -> web.StreamResponse:
    rid = request[RID]
    req = oj.parse_image(await _body(request))
    resp = await request.app[TRANSPORT].create_image(req, _context(request, rid))
    return _json(oj.image_response_json(resp), rid)


# ---- operations endpoints: the answers come from core/health.py and core/metrics.py ----

async def healthz(request: web.Request) -> web.StreamResponse:
    return _json({"status": "ok"}, request[RID])


async def readyz(request: web.Request) -> web.StreamResponse:
    ready, checks = await request.app[OPS].ready()
    return _json({"status": "ready" if ready else "not ready", "checks": checks}, request[RID],
                 200 if ready else 503)


async def metrics(request: web.Request) -> web.StreamResponse:
    body, content_type = await request.app[OPS].metrics()
    return web.Response(body=body, headers={"content-type": content_type})


def add_ops_routes(app: web.Application, ops: Ops) -> None:
    app[OPS] = ops
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)


def create_ops_app(ops: Ops) -> web.Application:
    """Only /healthz, /readyz and /metrics (for `switchboard core --http ADDR`)."""
    app = web.Application(middlewares=[errors_middleware])
    add_ops_routes(app, ops)
    return app


def create_app(transport: Transport, *, max_body_bytes: int = 20 * 1024 * 1024,
               ops: Ops | None = None) -> web.Application:
    app = web.Application(middlewares=[errors_middleware], client_max_size=max_body_bytes)
    app[TRANSPORT] = transport
    if ops is not None:
        add_ops_routes(app, ops)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", get_model)
    app.router.add_post("/v1/images/generations", images_generations)
    add_admin_routes(app, transport)
    return app
