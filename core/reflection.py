"""gRPC server reflection under both names clients ask for: `grpc.reflection.v1` (what
grpcurl and buf try first) and `grpc.reflection.v1alpha`.

grpcio-reflection (1.85) implements only v1alpha. The v1 protocol is the same protocol
promoted: identical messages, field numbers and semantics, only the package name differs.
So one v1alpha servicer answers both: v1 requests are decoded with the v1alpha message
classes (the bytes are the same) and its answers encoded back unchanged. For `describe`
to work on the v1 service itself, a v1 file descriptor is derived at import time from the
v1alpha one (package renamed, type references rewritten) and added to the default pool.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

V1_PACKAGE = "grpc.reflection.v1"
V1_SERVICE_NAME = f"{V1_PACKAGE}.ServerReflection"
V1ALPHA_SERVICE_NAME: str = reflection.SERVICE_NAME
_V1_FILE = "grpc/reflection/v1/reflection.proto"


def _register_v1_descriptor() -> None:
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(_V1_FILE)
        return  # another library (or an earlier import) registered it already
    except KeyError:
        pass
    fdp = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(fdp)
    old = "." + fdp.package
    fdp.name, fdp.package = _V1_FILE, V1_PACKAGE
    fdp.ClearField("options")  # Java/Go package options name the v1alpha packages
    for message in fdp.message_type:
        for field in message.field:
            if field.type_name.startswith(old + "."):
                field.type_name = "." + V1_PACKAGE + field.type_name[len(old):]
    for service in fdp.service:
        for method in service.method:
            method.input_type = "." + V1_PACKAGE + method.input_type[len(old):]
            method.output_type = "." + V1_PACKAGE + method.output_type[len(old):]
    pool.Add(fdp)


_register_v1_descriptor()


def enable_reflection(service_names: tuple[str, ...], server: grpc.aio.Server) -> None:
    """Serves reflection for `service_names` (plus both reflection services) on `server`."""
    names = (*service_names, V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME)
    servicer = reflection.aio.ReflectionServicer(names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1 = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=_serialize)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(V1_SERVICE_NAME, {"ServerReflectionInfo": v1}),))


def _serialize(message: Any) -> bytes:
    return bytes(message.SerializeToString())
