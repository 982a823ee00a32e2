"""Builds the grpc.aio server: the inference servicer, grpc.health.v1 and server
reflection (so `grpcurl list` works).

What a slow or hostile client may cost the gRPC listener comes from the `server:` config
(README "Slow clients"), as far as grpc core allows: a connection must finish its
HTTP/2 handshake within `header_timeout_s` (`grpc.server_handshake_timeout_ms`), one
without calls is sent GOAWAY after `idle_timeout_s` (`grpc.max_connection_idle_ms`),
and beyond `max_connections` new connections are refused
(`grpc.max_allowed_incoming_connections`). HTTP/2 flow control already keeps a client
that stops reading a stream from growing our buffers.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from switchboard.core.admin import AdminAPI, AdminServicer
from switchboard.core.config import ServerSettings
from switchboard.core.gateway import Gateway
from switchboard.core.service import InferenceServicer
from switchboard.v1 import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc

MAX_MESSAGE_BYTES = 64 * 1024 * 1024


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
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(gateway), server)
    admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(AdminAPI(gateway)), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    service_names = (
        inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name,
        admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(service_names, server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind gRPC listener on {address}")
    return server, port, health_servicer


async def mark_serving(health_servicer: health.aio.HealthServicer, serving: bool) -> None:
    status = (health_pb2.HealthCheckResponse.SERVING if serving
              else health_pb2.HealthCheckResponse.NOT_SERVING)
    for name in ("", inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name):
        await health_servicer.set(name, status)
