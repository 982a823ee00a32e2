"""Tracing: a SERVER span per request whose parent comes from `traceparent` (REST header,
gRPC metadata, and through the façade→core hop when split), a CLIENT child span per
upstream attempt, real OTLP/HTTP export to a collector on loopback, and a gateway that
runs without OpenTelemetry installed."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path

import openai
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from switchboard.core.tracing import Tracing
from switchboard.v1 import inference_pb2 as pb
from tests.fakes.faulty_upstream import Fault, FaultyUpstream
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import AUTH, TEST_KEY, channel_yaml, make_config, running_stack

ROOT = Path(__file__).resolve().parent.parent
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT}-01"


@pytest.mark.parametrize("split", [False, True], ids=["one-process", "split"])
async def test_request_span_with_attempt_children_from_traceparent(split: bool) -> None:
    bad, good = FaultyUpstream("bad", Fault(kind="status", status=503)), FakeOpenAI()
    bad_url, good_url = await bad.start(), await good.start()
    cfg = make_config("router: {backoff_ms: 0}\nchannels:\n"
                      + channel_yaml("bad", "openai", bad_url, ["gpt-4o"], priority=1)
                      + "\n" + channel_yaml("good", "openai", good_url, ["gpt-4o"]))
    exporter = InMemorySpanExporter()
    async with running_stack(cfg, split=split) as stack:
        stack.gateway.observer.tracing = Tracing.build(cfg.observability,
                                                       processor=SimpleSpanProcessor(exporter))
        client = openai.AsyncOpenAI(base_url=stack.base_url, api_key=TEST_KEY, max_retries=0)
        await client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}],
            extra_headers={"traceparent": TRACEPARENT, "x-request-id": "req-traced"})
        await client.close()
        await stack.stub.CreateChatCompletion(pb.CreateChatCompletionRequest(
            params=pb.ChatCompletionParams(model="gpt-4o", messages=[
                pb.Message(role=pb.ROLE_USER, text="hi")])),
            metadata=(*AUTH, ("traceparent", f"00-{'a' * 32}-{'b' * 16}-01")))
    await bad.close()
    await good.close()
    spans = exporter.get_finished_spans()
    servers = [s for s in spans if s.kind == SpanKind.SERVER]
    assert len(servers) == 2
    rest = next(s for s in servers if s.attributes["switchboard.request_id"] == "req-traced")
    assert rest.name == "chat gpt-4o"
    assert format(rest.context.trace_id, "032x") == TRACE_ID
    assert format(rest.parent.span_id, "016x") == PARENT
    assert rest.attributes["gen_ai.request.model"] == "gpt-4o"
    assert rest.attributes["switchboard.channel"] == "good"
    assert rest.attributes["switchboard.key_name"] == "test"
    assert rest.attributes["gen_ai.usage.input_tokens"] == 11
    assert rest.attributes["gen_ai.usage.output_tokens"] == 7
    attempts = [s for s in spans if s.parent is not None and s.parent.span_id == rest.context.span_id]
    assert [a.attributes["switchboard.channel"] for a in attempts] == ["bad", "good"]
    assert all(a.kind == SpanKind.CLIENT for a in attempts)
    assert attempts[0].status.status_code == StatusCode.ERROR
    assert attempts[0].attributes["error.type"] == "http_503"
    assert attempts[1].status.status_code == StatusCode.UNSET
    grpc_span = next(s for s in servers if s is not rest)
    assert format(grpc_span.context.trace_id, "032x") == "a" * 32
    assert grpc_span.attributes["switchboard.surface"] == "grpc"


async def test_failed_request_span_is_an_error() -> None:
    exporter = InMemorySpanExporter()
    cfg = make_config("channels:\n  - {name: e, provider: echo, models: [echo]}")
    async with running_stack(cfg) as stack:
        stack.gateway.observer.tracing = Tracing.build(cfg.observability,
                                                       processor=SimpleSpanProcessor(exporter))
        client = openai.AsyncOpenAI(base_url=stack.base_url, api_key=TEST_KEY, max_retries=0)
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
        await client.close()
    (span,) = exporter.get_finished_spans()
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes["error.type"] == "model_not_found"
    assert span.parent is None  # no traceparent: a new trace


async def test_otlp_export_to_a_collector() -> None:
    received: list[ExportTraceServiceRequest] = []

    async def traces(request: web.Request) -> web.Response:
        received.append(ExportTraceServiceRequest.FromString(await request.read()))
        return web.Response(status=200, content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    cfg = make_config("channels:\n  - {name: e, provider: echo, models: [echo]}\n"
                      f"observability: {{otel_endpoint: 'http://127.0.0.1:{port}', "
                      "service_name: sb-test}\n")
    async with running_stack(cfg) as stack:
        assert stack.gateway.observer.tracing.enabled
        client = openai.AsyncOpenAI(base_url=stack.base_url, api_key=TEST_KEY)
        await client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "x"}],
                                             extra_headers={"traceparent": TRACEPARENT})
        await client.close()
    # Stopping the stack shuts the provider down, which flushes the batch.
    for _ in range(100):
        if received:
            break
        await asyncio.sleep(0.05)
    await runner.cleanup()
    spans = [s for req in received for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans]
    service = {a.value.string_value for req in received for rs in req.resource_spans
               for a in rs.resource.attributes if a.key == "service.name"}
    assert service == {"sb-test"}
    names = {s.name for s in spans}
    assert "chat echo" in names
    assert {s.trace_id.hex() for s in spans} == {TRACE_ID}


def test_runs_without_opentelemetry_installed() -> None:
    script = textwrap.dedent("""
        import asyncio, importlib.abc, logging, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "opentelemetry" or name.startswith("opentelemetry."):
                    raise ImportError(f"blocked {name}")
                return None

        sys.meta_path.insert(0, Block())
        logging.basicConfig(level=logging.WARNING)
        from switchboard.core import tracing
        assert not tracing.HAVE_OTEL
        from switchboard.core.gateway import CallContext, Gateway
        from tests.harness import TEST_KEY, make_config
        from switchboard.v1 import inference_pb2 as pb

        async def main():
            cfg = make_config("channels: [{name: e, provider: echo, models: [echo]}]\\n"
                              "observability: {otel_endpoint: 'http://127.0.0.1:9'}\\n")
            gw = Gateway(cfg)
            assert not gw.observer.tracing.enabled
            req = pb.CreateChatCompletionRequest(params=pb.ChatCompletionParams(
                model="echo", messages=[pb.Message(role=pb.ROLE_USER, text="works")]))
            resp = await gw.chat(req, CallContext(api_key=TEST_KEY, request_id="r1", surface="grpc",
                                                   traceparent="00-" + "1" * 32 + "-" + "2" * 16 + "-01"))
            print(resp.choices[0].message.content)
            await gw.close()
            assert "opentelemetry" not in sys.modules

        asyncio.run(main())
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                         cwd=str(ROOT))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "works"
    assert "OpenTelemetry is not installed" in out.stderr
