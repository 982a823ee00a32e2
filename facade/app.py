"""The aiohttp app serving OpenAI's REST/SSE surface. Each handler parses JSON into the
request message, calls the core through a Transport with the caller's credentials,
and writes the reply or the mapped error. No routing, auth or provider logic here.

Headers: `Authorization: Bearer <key>`; `X-Request-Id` (echoed, or generated; on
every response); `x-ratelimit-*` on admitted responses of keys with limits
(core/limits.py); `X-Switchboard-Timeout: <seconds>` sets a deadline for the request,
like a gRPC deadline (the shorter of it and the channel's timeouts wins); a W3C
`traceparent` header becomes the parent of the request's trace span.

Operations endpoints (no auth; docs/operations.md): GET /healthz, /readyz, /metrics.

Every error is an OpenAI error object, including the ones aiohttp's HTTP parser raises
before a handler runs (URL or header too long, too many headers, bad chunk sizes,
unknown method): `JsonErrorRunner` serves the app with a protocol whose `handle_error`
writes JSON instead of aiohttp's plain text.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, Protocol

import grpc
import orjson
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError
from aiohttp.web_protocol import RequestHandler

from switchboard.core.errors import GatewayError, invalid
from switchboard.core.gateway import CallContext, new_request_id
from switchboard.core.keys import bearer_token
from switchboard.facade import openai_json as oj
from switchboard.facade.admin_routes import add_admin_routes
from switchboard.facade.body import read_json
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
# The longest X-Switchboard-Timeout accepted: a day. Larger (or non-finite) values are a
# client bug, and event loops cannot schedule timers that far out anyway.
MAX_TIMEOUT_S = 86400.0

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
        if not (math.isfinite(seconds) and 0 < seconds <= MAX_TIMEOUT_S):
            raise invalid(f"X-Switchboard-Timeout must be a number of seconds greater than 0 "
                          f"and at most {MAX_TIMEOUT_S:g}, got {raw[:40]!r}",
                          "x-switchboard-timeout")
        deadline = asyncio.get_running_loop().time() + seconds
    return CallContext(api_key=bearer_token(request.headers.get("authorization")),
                       request_id=rid, surface="rest", deadline=deadline,
                       peer=request.remote or "", traceparent=request.headers.get("traceparent", ""))


def _json(data: object, rid: str, status: int = 200,
          extra: dict[str, str] | None = None) -> web.Response:
    headers = {"x-request-id": rid}
    if extra:  # x-ratelimit-* of an admitted request (CallContext.response_headers)
        headers.update(extra)
    return web.Response(body=orjson.dumps(data), status=status, content_type=_JSON,
                        headers=headers)


def error_response(err: GatewayError, rid: str) -> web.Response:
    headers = err.http_headers()
    headers["x-request-id"] = rid
    return web.Response(body=oj.error_json(err), status=err.http_status,
                        content_type=_JSON, headers=headers)


async def _body(request: web.Request) -> object:
    return await read_json(request)


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
    except web.RequestPayloadError:
        # Any handler reading the body: its framing is broken (e.g. a bad chunk size).
        resp = error_response(invalid("The request body could not be read: its transfer "
                                      "framing is broken.", None, code="invalid_body"), rid)
        resp.force_close()  # the rest of the body cannot be framed: say the connection ends
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
        return _json(oj.chat_response_json(resp), rid, extra=ctx.response_headers)
    return await _relay_stream(request, transport.stream_chat(
        pb.StreamChatCompletionRequest(params=params), ctx), rid,
        params.stream_options.include_usage, ctx)


async def _relay_stream(request: web.Request,
                        chunks: AsyncGenerator[pb.StreamChatCompletionResponse, None], rid: str,
                        include_usage: bool, ctx: CallContext) -> web.StreamResponse:
    """SSE relay: headers go out only with the first chunk, so an error before it still
    gets its proper HTTP status; an error after it becomes a final `error` event."""
    it = chunks  # an async generator is its own iterator (and can be aclose()d)
    try:
        first = await it.__anext__()
    except StopAsyncIteration:
        first = None
    resp = web.StreamResponse(headers={**_SSE_HEADERS, "x-request-id": rid,
                                       **(ctx.response_headers or {})})
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
    ctx = _context(request, rid)
    resp = await request.app[TRANSPORT].create_image(req, ctx)
    return _json(oj.image_response_json(resp), rid, extra=ctx.response_headers)


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


class JsonErrorProtocol(RequestHandler):
    """aiohttp's per-connection protocol, answering its own errors (bad request line or
    headers, and anything that escapes the app) as an OpenAI error object."""

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status < 500 or isinstance(exc, BadHttpMethod):
            # A malformed request is the client's fault (scanners, TLS hellos on a plain
            # port, broken clients): one debug line, no traceback in the gateway's log.
            self.logger.debug("unparsable HTTP request from %s: %s", request.remote, exc)
        else:
            self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
        if request.writer.output_size > 0:  # mid-response: nothing can be sent any more
            raise ConnectionError("response already started; cannot send the error")
        if status >= 500:
            err = GatewayError(grpc.StatusCode.INTERNAL, "The gateway hit an internal error.")
        else:
            reason = (getattr(exc, "message", None) or message or "malformed request").strip()
            err = invalid(f"The HTTP request could not be parsed: {reason[:200]}", None,
                          code="bad_http_request")
        resp = web.Response(body=oj.error_json(err), status=status, content_type=_JSON)
        resp.force_close()  # the parser's state is unknown: never reuse this connection
        return resp

    def log_exception(self, *args: Any, **kw: Any) -> None:
        # After a refused body aiohttp drains the rest of it and meets the same broken
        # framing/encoding again: the client's fault, already answered with a 400.
        exc = kw.get("exc_info")
        if isinstance(exc, (web.RequestPayloadError, HttpProcessingError)):
            self.logger.debug("broken request body from a client: %s", exc)
            return
        super().log_exception(*args, **kw)


class _JsonErrorServer(web.Server):
    def __call__(self) -> RequestHandler:
        return JsonErrorProtocol(self, loop=self._loop, **self._kwargs)


class JsonErrorRunner(web.AppRunner):
    """web.AppRunner whose connections answer parser errors with OpenAI-shaped JSON.
    aiohttp has no public hook for them (they bypass middlewares), so the server the
    runner builds is given a protocol class that overrides `handle_error`. Request
    bodies are decompressed by facade/body.py, not by aiohttp (see there why)."""

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        super().__init__(app, auto_decompress=False, **kwargs)

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _JsonErrorServer  # same object and state, our protocol factory
        return server


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
