"""Builds the grpc.aio server: the inference and admin servicers, grpc.health.v1 (the
whole server and each of our services) and server reflection, v1 and v1alpha (so
`grpcurl list` and `buf curl` work)."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from switchboard.core.admin import AdminAPI, AdminServicer
from switchboard.core.gateway import Gateway
from switchboard.core.reflection import enable_reflection
from switchboard.core.service import InferenceServicer
from switchboard.v1 import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Our services: each is known to the health service (and to reflection) by name.
SERVICES = (inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name,
            admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name)


def build_grpc_server(gateway: Gateway, address: str, *, reuse_port: bool = False
                      ) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """A configured, not yet started server and the port it bound."""
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.so_reuseport", 1 if reuse_port else 0),
    ])
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(gateway), server)
    admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(AdminAPI(gateway)), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection((*SERVICES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name), server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind gRPC listener on {address}")
    return server, port, health_servicer


async def mark_serving(health_servicer: health.aio.HealthServicer, serving: bool) -> None:
    status = (health_pb2.HealthCheckResponse.SERVING if serving
              else health_pb2.HealthCheckResponse.NOT_SERVING)
    for name in ("", *SERVICES):
        await health_servicer.set(name, status)
