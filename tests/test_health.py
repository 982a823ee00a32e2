"""Probes: HTTP /healthz and /readyz (core, store, Redis), gRPC grpc.health.v1 and server
reflection (what `grpcurl list` uses), in one process and split."""

from __future__ import annotations

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from switchboard.core.gateway import Gateway
from switchboard.core.runtime import Runtime
from tests.harness import make_config, running_stack

ECHO = "channels:\n  - {name: e, provider: echo, models: [echo]}\n"


async def get(url: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return r.status, await r.json()


async def test_healthz_and_readyz_in_one_process(tmp_path) -> None:
    cfg = make_config(ECHO + f"store: sqlite:///{tmp_path}/sb.db\n")
    async with running_stack(cfg) as stack:
        assert await get(stack.http_url + "/healthz") == (200, {"status": "ok"})
        status, body = await get(stack.http_url + "/readyz")
        assert status == 200, body
        assert body == {"status": "ready", "checks": {"core": "ok", "store": "ok"}}


async def test_readyz_checks_redis_and_postgres_when_configured() -> None:
    cfg = make_config(ECHO + "store: postgresql://postgres@127.0.0.1:5432/test\n"
                      "limits: redis://127.0.0.1:6379/0\n")
    async with running_stack(cfg) as stack:
        status, body = await get(stack.http_url + "/readyz")
    assert status == 200, body
    assert body["checks"] == {"core": "ok", "store": "ok", "redis": "ok"}


async def test_readyz_fails_when_redis_or_store_is_down(tmp_path) -> None:
    # Port 1 on loopback: nothing listens there.
    cfg = make_config(ECHO + "store: postgresql://postgres@127.0.0.1:1/test\n"
                      "limits: redis://127.0.0.1:1/0\n")
    # The store opens at start-up (and refuses to start when down), so the gateway here is
    # built without it: the question is what /readyz says once a dependency goes away.
    runtime = Runtime("serve", cfg, http="127.0.0.1:0", grpc_addr="127.0.0.1:0",
                      gateway=Gateway(cfg))
    try:
        await runtime.start()
        ok, _ = await runtime.ready()
        status, body = await get(runtime.http_url + "/readyz")
        alive, _ = await get(runtime.http_url + "/healthz")
    finally:
        await runtime.stop()
    assert not ok
    assert status == 503 and body["status"] == "not ready"
    assert body["checks"]["core"] == "ok"
    assert body["checks"]["redis"] != "ok" and body["checks"]["store"] != "ok"
    assert alive == 200  # liveness does not depend on dependencies


async def test_split_facade_readiness_follows_the_core() -> None:
    cfg = make_config(ECHO)
    core = Runtime("core", cfg, http="127.0.0.1:0", grpc_addr="127.0.0.1:0")
    await core.start()
    facade = Runtime("facade", cfg, http="127.0.0.1:0", core_target=core.grpc_target)
    await facade.start()
    try:
        # `core --http` serves the probes and metrics too
        assert (await get(core.http_url + "/healthz"))[0] == 200
        assert (await get(core.http_url + "/readyz"))[0] == 200
        status, body = await get(facade.http_url + "/readyz")
        assert status == 200 and body["checks"]["core"] == "ok"
        await core.stop()
        status, body = await get(facade.http_url + "/readyz")
        assert status == 503 and body["checks"]["core"] != "ok"
    finally:
        await facade.stop()
    ok, checks = await core.ready()
    assert not ok and checks["draining"] == "shutting down"


async def test_grpc_health_and_reflection() -> None:
    async with running_stack(make_config(ECHO)) as stack:
        health = health_pb2_grpc.HealthStub(stack.channel)
        for service in ("", "switchboard.v1.InferenceService"):
            resp = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(stack.channel)
        call = refl.ServerReflectionInfo()
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        resp = await call.read()
        names = {s.name for s in resp.list_services_response.service}
        await call.write(reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="switchboard.v1.InferenceService"))
        files = await call.read()
        await call.done_writing()
        assert {"switchboard.v1.InferenceService", "grpc.health.v1.Health",
                "grpc.reflection.v1alpha.ServerReflection"} <= names
        assert files.file_descriptor_response.file_descriptor_proto
        status_during_stop = None
        await stack.runtime.stop()
        try:
            await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.aio.AioRpcError as err:
            status_during_stop = err.code()
        assert status_during_stop is not None
        await stack.runtime.start()  # the harness stops it again on exit


def _field(number: int, value: str) -> bytes:
    """A protobuf length-delimited field, encoded by hand (a raw client, no stubs)."""
    data = value.encode()
    return bytes([number << 3 | 2, len(data)]) + data


async def test_reflection_v1_raw_client_and_admin_health() -> None:
    """grpcurl and buf ask `grpc.reflection.v1` first: a raw client speaking v1 by its method
    path gets the service list and descriptors (including v1's own); the health service
    knows AdminService."""
    from google.protobuf import descriptor_pb2

    async with running_stack(make_config(ECHO)) as stack:
        health = health_pb2_grpc.HealthStub(stack.channel)
        resp = await health.Check(health_pb2.HealthCheckRequest(service="switchboard.v1.AdminService"))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await health.Check(health_pb2.HealthCheckRequest(service="switchboard.v1.Nope"))
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

        call = stack.channel.stream_stream("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo")()
        await call.write(_field(7, ""))  # list_services
        await call.write(_field(4, "switchboard.v1.AdminService"))  # file_containing_symbol
        await call.write(_field(4, "grpc.reflection.v1.ServerReflection"))
        answers = [reflection_pb2.ServerReflectionResponse.FromString(await call.read()) for _ in range(3)]
        await call.done_writing()
        names = {s.name for s in answers[0].list_services_response.service}
        assert {"switchboard.v1.InferenceService", "switchboard.v1.AdminService", "grpc.health.v1.Health",
                "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"} <= names
        for answer, package, service in ((answers[1], "switchboard.v1", "AdminService"),
                                         (answers[2], "grpc.reflection.v1", "ServerReflection")):
            files = [descriptor_pb2.FileDescriptorProto.FromString(b)
                     for b in answer.file_descriptor_response.file_descriptor_proto]
            first = files[0]
            assert (first.package, [s.name for s in first.service]) == (package, [service]), first
        v1 = files[0]
        method = v1.service[0].method[0]
        assert (method.input_type, method.output_type) == (
            ".grpc.reflection.v1.ServerReflectionRequest", ".grpc.reflection.v1.ServerReflectionResponse")
        assert all(f.type_name.startswith(".grpc.reflection.v1.") for m in v1.message_type
                   for f in m.field if f.type_name)
