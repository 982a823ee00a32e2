"""Builds the grpc.aio server: the inference and admin servicers, grpc.health.v1 (the
whole server and each of our services) and server reflection, v1 and v1alpha (so
`grpcurl list` and `buf curl` work).

Every RPC passes through one interceptor, core/edge.py's `ErrorBoundary`: it refuses
undecodable requests with INVALID_ARGUMENT, fixes the request id, and turns errors
into statuses (scrubbed, from the one table). The servicers only raise GatewayError.

What a slow or hostile client may cost the gRPC listener comes from the `server:` config
(README "Slow clients"), as far as grpc core allows: a connection must finish its
HTTP/2 handshake within `header_timeout_s` (`grpc.server_handshake_timeout_ms`), one
without calls is sent GOAWAY after `idle_timeout_s` (`grpc.max_connection_idle_ms`),
and beyond `max_connections` new connections are refused
(`grpc.max_allowed_incoming_connections`). HTTP/2 flow control already keeps a client
that stops reading a stream from growing our buffers.
"""

from __future__ import annotations

import socket

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from switchboard.core.admin import AdminAPI, AdminServicer
from switchboard.core.config import ServerSettings
from switchboard.core.contract import MAX_MESSAGE_BYTES
from switchboard.core.edge import ErrorBoundary
from switchboard.core.gateway import Gateway
from switchboard.core.reflection import enable_reflection
from switchboard.core.service import InferenceServicer
from switchboard.v1 import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc

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
    ], interceptors=[ErrorBoundary()])
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(gateway), server)
    admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(AdminAPI(gateway)), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
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
