"""Builds the grpc.aio server: the inference and admin servicers, grpc.health.v1 (the
whole server and each of our services) and server reflection, v1 and v1alpha (so
`grpcurl list` and `buf curl` work).

Our services are registered through `_RequestGuard`: a request whose bytes are not a
valid message, or whose JSON text fields (`extra`, `*_json`) are not JSON within the
depth limit (core/bounds.py), ends with INVALID_ARGUMENT and a plain message. Left to
grpc.aio, a failing deserializer ends the call UNKNOWN with a Python class name in it.

What a slow or hostile client may cost the gRPC listener comes from the `server:` config
(README "Slow clients"), as far as grpc core allows: a connection must finish its
HTTP/2 handshake within `header_timeout_s` (`grpc.server_handshake_timeout_ms`), one
without calls is sent GOAWAY after `idle_timeout_s` (`grpc.max_connection_idle_ms`),
and beyond `max_connections` new connections are refused
(`grpc.max_allowed_incoming_connections`). HTTP/2 flow control already keeps a client
that stops reading a stream from growing our buffers.
"""

from __future__ import annotations

import inspect
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from switchboard.core.admin import AdminAPI, AdminServicer
from switchboard.core.bounds import check_json_fields
from switchboard.core.config import ServerSettings
from switchboard.core.errors import GatewayError, invalid
from switchboard.core.gateway import Gateway, new_request_id
from switchboard.core.reflection import enable_reflection
from switchboard.core.service import InferenceServicer, abort
from switchboard.v1 import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Our services: each is known to the health service (and to reflection) by name.
SERVICES = (inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name,
            admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name)


class ListenError(OSError):
    """A listener could not bind its address (port taken, no permission, bad host):
    the CLI prints `str()` as its one line and exits 2."""

    def __init__(self, surface: str, address: str, reason: str) -> None:
        super().__init__(f"cannot listen for {surface} on {address}: {reason}")
        self.surface, self.address, self.reason = surface, address, reason


def check_bindable(surface: str, address: str, *, reuse_port: bool = False) -> None:
    """Raise ListenError when `address` is already taken. grpc reports that only as a
    RuntimeError after logging its own C-core line, so the common case is found first
    with a plain socket (a race with another process still ends in the RuntimeError)."""
    host, _, port_text = address.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    try:
        port = int(port_text)
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (ValueError, OSError) as exc:
        raise ListenError(surface, address, str(exc) or "bad address") from None
    if port == 0:
        return
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as both servers do
        if reuse_port and hasattr(socket, "SO_REUSEPORT"):
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            probe.bind(sockaddr)
        except OSError as exc:
            raise ListenError(surface, address, exc.strerror or str(exc)) from None


class _Rejected:
    """What the guarded deserializer returns for a request it refuses."""

    __slots__ = ("error",)

    def __init__(self, error: GatewayError) -> None:
        self.error = error


def _safe_deserializer(decode: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
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


def _guarded(handler: Any) -> Any:
    """The same method, with a deserializer that never raises and a behaviour that ends
    refused requests with their INVALID_ARGUMENT. Streaming requests are left as they are
    (none of our services takes one)."""
    if handler.request_streaming:
        return handler
    deserializer = _safe_deserializer(handler.request_deserializer)
    if handler.response_streaming:
        stream = handler.unary_stream
        if inspect.isasyncgenfunction(stream):
            async def unary_stream(request: Any, context: grpc.aio.ServicerContext
                                   ) -> AsyncIterator[Any]:
                if isinstance(request, _Rejected):
                    await abort(context, request.error, new_request_id())
                async for item in stream(request, context):
                    yield item
            behaviour: Any = unary_stream
        else:  # a coroutine writing with context.write (grpc.health's Watch)
            async def unary_write(request: Any, context: grpc.aio.ServicerContext) -> None:
                if isinstance(request, _Rejected):
                    await abort(context, request.error, new_request_id())
                await stream(request, context)
            behaviour = unary_write
        return grpc.unary_stream_rpc_method_handler(
            behaviour, request_deserializer=deserializer,
            response_serializer=handler.response_serializer)
    unary = handler.unary_unary

    async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, _Rejected):
            await abort(context, request.error, new_request_id())
        return await unary(request, context)

    return grpc.unary_unary_rpc_method_handler(
        unary_unary, request_deserializer=deserializer,
        response_serializer=handler.response_serializer)


class _RequestGuard:
    """Passed to a generated `add_*Servicer_to_server` in place of the server: it takes
    the method handlers that function builds and registers guarded copies of them."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self.server = server
        self.services: list[str] = []

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        pass  # the same handlers arrive by name in add_registered_method_handlers

    def add_registered_method_handlers(self, service: str,
                                       handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        safe = {name: _guarded(h) for name, h in handlers.items()}
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, safe),))
        self.server.add_registered_method_handlers(service, safe)
        self.services.append(service)


def connection_options(limits: ServerSettings) -> list[tuple[str, int]]:
    """grpc core's per-connection limits for the `server:` settings (0: grpc's default)."""
    options = []
    if limits.header_timeout_s > 0:
        options.append(("grpc.server_handshake_timeout_ms", int(limits.header_timeout_s * 1000)))
    if limits.idle_timeout_s > 0:
        options.append(("grpc.max_connection_idle_ms", int(limits.idle_timeout_s * 1000)))
    if limits.max_connections > 0:
        options.append(("grpc.max_allowed_incoming_connections", limits.max_connections))
    return options


def build_grpc_server(gateway: Gateway, address: str, *, reuse_port: bool = False,
                      limits: ServerSettings | None = None,
                      ) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """A configured, not yet started server and the port it bound."""
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.so_reuseport", 1 if reuse_port else 0),
        *connection_options(limits or ServerSettings()),
    ])
    guard = _RequestGuard(server)
    as_server: Any = guard  # stands in for the server: it has the two methods the generated code calls
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(gateway), as_server)
    admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(AdminAPI(gateway)), as_server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, as_server)
    if len(guard.services) != 3:  # generated code that no longer registers by name
        raise RuntimeError("gRPC services were not registered through the request guard")
    enable_reflection((*SERVICES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name), server)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError:  # grpc's "Failed to bind to address …"
        port = 0
    if port == 0:
        raise ListenError("gRPC", address, "the address could not be bound")
    return server, port, health_servicer


async def mark_serving(health_servicer: health.aio.HealthServicer, serving: bool) -> None:
    status = (health_pb2.HealthCheckResponse.SERVING if serving
              else health_pb2.HealthCheckResponse.NOT_SERVING)
    for name in ("", *SERVICES):
        await health_servicer.set(name, status)
