"""GET /metrics: requests by model/channel/surface/status, latency and TTFT histograms,
token counters, upstream errors, circuit state, in-flight gauges, limiter rejections —
all observed on the real stack over loopback, both surfaces."""

from __future__ import annotations

import asyncio

import aiohttp
import grpc
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from switchboard.v1 import inference_pb2 as pb
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import AUTH, TEST_KEY, Stack, channel_yaml, make_config, running_stack


async def scrape(stack: Stack) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """sample name -> {sorted labels: value}"""
    async with aiohttp.ClientSession() as s, s.get(stack.http_url + "/metrics") as r:
        assert r.status == 200
        assert r.headers["content-type"].startswith("text/plain")
        text = await r.text()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def value(m: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str, **labels: str) -> float:
    want = tuple(sorted(labels.items()))
    return m.get(name, {}).get(want, 0.0)


def user_msg(text: str) -> pb.Message:
    return pb.Message(role=pb.ROLE_USER, text=text)


async def test_requests_tokens_and_latency_by_surface() -> None:
    fake = FakeOpenAI()
    url = await fake.start()
    cfg = make_config("channels:\n" + channel_yaml("oa", "openai", url, ["gpt-4o"]))
    async with running_stack(cfg) as stack:
        client = openai.AsyncOpenAI(base_url=stack.base_url, api_key=TEST_KEY)
        await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        stream = await client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi there"}], stream=True,
            stream_options={"include_usage": True})
        async for _ in stream:
            pass
        await client.close()
        await stack.stub.CreateChatCompletion(pb.CreateChatCompletionRequest(
            params=pb.ChatCompletionParams(model="gpt-4o", messages=[user_msg("hello")])), metadata=AUTH)
        with pytest.raises(grpc.aio.AioRpcError):
            await stack.stub.CreateChatCompletion(pb.CreateChatCompletionRequest(
                params=pb.ChatCompletionParams(model="no-such-model", messages=[user_msg("x")])),
                metadata=AUTH)
        m = await scrape(stack)
    ok_rest = {"model": "gpt-4o", "channel": "oa", "surface": "rest", "status": "OK"}
    assert value(m, "switchboard_requests_total", **ok_rest) == 2
    assert value(m, "switchboard_requests_total", model="gpt-4o", channel="oa", surface="grpc",
                 status="OK") == 1
    # An unknown model is counted, but under one label value: callers cannot add series.
    assert value(m, "switchboard_requests_total", model="(unknown)", channel="", surface="grpc",
                 status="NOT_FOUND") == 1
    assert value(m, "gen_ai_server_request_duration_seconds_count", **ok_rest) == 2
    assert value(m, "gen_ai_server_time_to_first_token_seconds_count", model="gpt-4o", channel="oa",
                 surface="rest") == 2
    # The fake reports 11 prompt and 7 completion tokens per request; three succeeded.
    assert value(m, "switchboard_tokens_total", model="gpt-4o", channel="oa", type="input") == 33
    assert value(m, "switchboard_tokens_total", model="gpt-4o", channel="oa", type="output") == 21
    assert value(m, "switchboard_in_flight_requests", surface="rest") == 0
    assert value(m, "switchboard_circuit_state", channel="oa") == 0
    # process metrics come along
    assert "process_resident_memory_bytes" in m
    await fake.close()


async def test_upstream_error_reasons_and_open_circuit() -> None:
    bad = FakeOpenAI()
    bad_url = await bad.start()
    cfg = make_config(
        "router: {backoff_ms: 0, max_attempts: 1, circuit: {min_requests: 2, window_s: 60, cooldown_s: 60}}\n"
        "channels:\n" + channel_yaml("bad", "openai", bad_url, ["gpt-4o"]))
    async with running_stack(cfg) as stack:
        client = openai.AsyncOpenAI(base_url=stack.base_url, api_key=TEST_KEY, max_retries=0)
        for _ in range(2):
            with pytest.raises(openai.APIStatusError) as exc:
                await client.chat.completions.create(
                    model="gpt-4o", messages=[{"role": "user", "content": "ERROR 503"}])
            assert exc.value.status_code == 502
        await client.close()
        m = await scrape(stack)
    await bad.close()
    assert value(m, "switchboard_upstream_errors_total", channel="bad", reason="http_503") == 2
    assert value(m, "switchboard_requests_total", model="gpt-4o", channel="", surface="rest",
                 status="UNAVAILABLE") == 2
    assert value(m, "switchboard_circuit_state", channel="bad") == 2  # open


async def test_in_flight_streams_gauge() -> None:
    cfg = make_config("channels:\n  - {name: slow, provider: echo, models: [echo], "
                      "options: {delay_ms: 150}}")
    async with running_stack(cfg) as stack:
        call = stack.stub.StreamChatCompletion(pb.StreamChatCompletionRequest(
            params=pb.ChatCompletionParams(model="echo", messages=[user_msg("a b c d")])),
            metadata=AUTH)
        await call.read()  # first chunk: the stream is open
        during = await scrape(stack)
        while await call.read() is not grpc.aio.EOF:
            pass
        after = await scrape(stack)
    assert value(during, "switchboard_in_flight_streams", surface="grpc") == 1
    assert value(during, "switchboard_in_flight_requests", surface="grpc") == 1
    assert value(after, "switchboard_in_flight_streams", surface="grpc") == 0
    assert value(after, "switchboard_in_flight_requests", surface="grpc") == 0
    assert value(after, "switchboard_requests_total", model="echo", channel="slow", surface="grpc",
                 status="OK") == 1


async def test_client_cancel_is_counted_as_cancelled() -> None:
    cfg = make_config("channels:\n  - {name: slow, provider: echo, models: [echo], "
                      "options: {delay_ms: 200}}")
    async with running_stack(cfg) as stack:
        call = stack.stub.StreamChatCompletion(pb.StreamChatCompletionRequest(
            params=pb.ChatCompletionParams(model="echo", messages=[user_msg("a b c d e f")])),
            metadata=AUTH)
        await call.read()
        call.cancel()
        for _ in range(50):
            m = await scrape(stack)
            if value(m, "switchboard_in_flight_streams", surface="grpc") == 0:
                break
            await asyncio.sleep(0.05)
    assert value(m, "switchboard_in_flight_streams", surface="grpc") == 0
    assert value(m, "switchboard_requests_total", model="echo", channel="slow", surface="grpc",
                 status="CANCELLED") == 1


async def test_limiter_rejections() -> None:
    cfg = make_config(f"keys: [{{name: tight, key: {TEST_KEY}, rpm: 1}}]\n"
                      "channels:\n  - {name: e, provider: echo, models: [echo]}")
    async with running_stack(cfg) as stack:
        client = openai.AsyncOpenAI(base_url=stack.base_url, api_key=TEST_KEY, max_retries=0)
        await client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "1"}])
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "2"}])
        await client.close()
        m = await scrape(stack)
    assert value(m, "switchboard_limiter_rejections_total", reason="rate_limit_exceeded") == 1
    assert value(m, "switchboard_requests_total", model="echo", channel="", surface="rest",
                 status="RESOURCE_EXHAUSTED") == 1


async def test_split_deployment_counts_rest_requests_in_the_core() -> None:
    """`switchboard core --http` + `switchboard facade`: the core owns the request metrics
    (labelled surface=rest for what came through the façade); the façade has only its
    process metrics."""
    cfg = make_config("channels:\n  - {name: e, provider: echo, models: [echo]}")
    async with running_stack(cfg, split=True) as stack:
        client = openai.AsyncOpenAI(base_url=stack.base_url, api_key=TEST_KEY)
        await client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "x"}])
        await client.close()
        core_stack = Stack(**{**stack.__dict__, "http_url": stack.runtime.http_url})
        core = await scrape(core_stack)
        facade = await scrape(stack)
    assert value(core, "switchboard_requests_total", model="echo", channel="e", surface="rest",
                 status="OK") == 1
    assert not facade.get("switchboard_requests_total")
    assert "process_resident_memory_bytes" in facade
