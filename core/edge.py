"""The gRPC edge: where a request enters the core's server and an error leaves it.

`ErrorBoundary` is the server's one interceptor (grpc.aio.ServerInterceptor). It wraps
every method handler the server resolves — InferenceService, AdminService, and any RPC
added later, unary or server-streaming — so a servicer method only raises
`GatewayError` and never touches statuses, trailers or secrets. For each call it:

1. guards the request: the deserializer never raises; bytes that are not a valid
   message, or JSON text fields (`extra`, `*_json`) that are not JSON within the depth
   limit (core/bounds.py), end the call INVALID_ARGUMENT with a plain message (left to
   grpc.aio, a failing deserializer ends the call UNKNOWN with a Python class name);
2. fixes the request id (the caller's `x-request-id`, or a new one), sends it as a
   trailer on every reply and hands it to the servicer through `current_request_id`;
3. ends a failed call from the error table (core/errors.py): `public(err)` scrubs the
   message first (the explicit redaction step), then `GatewayError.grpc_trailers()`
   packs the google.rpc.Status with grpcio-status; an exception that is not a
   GatewayError is a bug: logged, and answered INTERNAL without its text.

`public` is also what the REST façade's error renderer calls, so both surfaces scrub
at their edge, and a new RPC or route gets it without doing anything.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from typing import Any, NoReturn

import grpc

from switchboard.core.bounds import check_json_fields
from switchboard.core.contract import new_request_id
from switchboard.core.errors import GatewayError, invalid
from switchboard.core.redact import public

log = logging.getLogger("switchboard.grpc")

# The request id the boundary fixed for the call being served (its own task's context).
current_request_id: ContextVar[str | None] = ContextVar("switchboard_grpc_rid", default=None)


class _Rejected:
    """What the guarded deserializer returns for a request it refuses."""

    __slots__ = ("error",)

    def __init__(self, error: GatewayError) -> None:
        self.error = error


def _safe_deserializer(decode: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if decode is None:  # a handler that takes the raw bytes
        return None

    def deserialize(raw: bytes) -> Any:
        try:
            msg = decode(raw)
        except Exception:  # DecodeError, or anything else the bytes provoke
            return _Rejected(invalid("The request bytes are not a valid protobuf message of "
                                     "the method's request type.", None, code="invalid_message"))
        try:
            check_json_fields(msg)
        except GatewayError as err:
            return _Rejected(err)
        return msg
    return deserialize


def _begin(context: grpc.aio.ServicerContext) -> str:
    rid = ""
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and isinstance(value, str):
            rid = value
            break
    rid = (rid or new_request_id())[:128]
    context.set_trailing_metadata((("x-request-id", rid),))
    current_request_id.set(rid)
    return rid


async def _fail(context: grpc.aio.ServicerContext, exc: Exception, rid: str) -> NoReturn:
    """End the call with the table's status for `exc` (always raises)."""
    if isinstance(exc, grpc.aio.AbortError):  # someone else's context.abort: already ended
        raise exc
    if not isinstance(exc, GatewayError):
        log.error("internal error in request %s", rid, exc_info=exc)
        exc = GatewayError(grpc.StatusCode.INTERNAL,
                           f"The gateway hit an internal error (request id {rid}).")
    err = public(exc)
    await context.abort(err.status, err.message,
                        trailing_metadata=(*err.grpc_trailers(), ("x-request-id", rid)))
    raise AssertionError("unreachable")  # context.abort always raises


def _bounded(handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
    """`handler` with the guard and the error mapping around its behaviour. (types-grpcio
    describes behaviours as sync callables; on a grpc.aio server they are coroutine and
    async-generator functions, hence the `Any` behaviours below.)"""
    if handler.request_streaming:
        # None of our services takes a request stream (reflection does): map errors only.
        if handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(
                _stream_out(handler.stream_stream), handler.request_deserializer,
                handler.response_serializer)
        return grpc.stream_unary_rpc_method_handler(
            _unary_out(handler.stream_unary), handler.request_deserializer,
            handler.response_serializer)
    deserializer = _safe_deserializer(handler.request_deserializer)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(
            _stream_out(handler.unary_stream), deserializer, handler.response_serializer)
    return grpc.unary_unary_rpc_method_handler(
        _unary_out(handler.unary_unary), deserializer, handler.response_serializer)


def _unary_out(behaviour: Any) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        rid = _begin(context)
        try:
            if isinstance(request, _Rejected):
                raise request.error
            return await behaviour(request, context)
        except Exception as exc:
            await _fail(context, exc, rid)
    return call


def _stream_out(behaviour: Any) -> Callable[[Any, grpc.aio.ServicerContext], Any]:
    if not inspect.isasyncgenfunction(behaviour):
        # A coroutine that writes with context.write (grpc.health's Watch).
        return _unary_out(behaviour)

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        rid = _begin(context)
        try:
            if isinstance(request, _Rejected):
                raise request.error
            async for item in behaviour(request, context):
                yield item
        except Exception as exc:
            await _fail(context, exc, rid)
    return stream


class ErrorBoundary(grpc.aio.ServerInterceptor):
    """The core server's one interceptor (see the module docstring)."""

    def __init__(self) -> None:
        # method -> its bounded handler: built once, not on every call.
        self._bounded: dict[str, tuple[grpc.RpcMethodHandler[Any, Any],
                                       grpc.RpcMethodHandler[Any, Any]]] = {}

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails],
                                     Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: grpc answers UNIMPLEMENTED itself
            return handler
        cached = self._bounded.get(handler_call_details.method)
        if cached is None or cached[0] is not handler:
            cached = (handler, _bounded(handler))
            self._bounded[handler_call_details.method] = cached
        return cached[1]
