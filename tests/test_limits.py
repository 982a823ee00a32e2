"""Limits: RPM/TPM sliding windows, concurrency and budgets on the memory backend and on
a real Redis (atomic Lua); reservation before and settlement after every call, streams
included; 429s with Retry-After and x-ratelimit-* on REST, RESOURCE_EXHAUSTED with
RetryInfo and QuotaFailure on gRPC; fail-closed / fail-open when Redis is unreachable."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import httpx
import pytest
from google.rpc import error_details_pb2, status_pb2

from switchboard.core.config import LimitSettings, Price
from switchboard.core.errors import GatewayError
from switchboard.core.keys import KeyRecord
from switchboard.core.ledger import PriceTable
from switchboard.core.limits import (
    Backend,
    Limits,
    MemoryBackend,
    RedisBackend,
    estimate_prompt_tokens,
)
from switchboard.core.usage import UsageRecord
from switchboard.v1 import inference_pb2 as pb
from tests.conftest import REDIS_URL
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import TEST_KEY, channel_yaml, make_config, running_stack


@pytest.fixture(params=["memory", "redis"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    if request.param == "memory":
        yield MemoryBackend()
        return
    prefix = request.getfixturevalue("redis_prefix")
    b = RedisBackend(REDIS_URL, prefix, 2.0)
    yield b
    await b.close()


def _limits(backend: Backend, spent: object = None, **settings: object) -> Limits:
    return Limits(backend, LimitSettings(**settings), PriceTable(  # type: ignore[arg-type]
        (("priced", Price(prompt=1_000_000, completion=1_000_000)),)), spent=spent)  # type: ignore[arg-type]


def _key(name: str = "k", **kw: object) -> KeyRecord:
    return KeyRecord(name=name, key_hash="h" + name, key_id=f"key_{name}", **kw)  # type: ignore[arg-type]


def _params(max_tokens: int = 20, text: str = "hello there", model: str = "m"
            ) -> pb.ChatCompletionParams:
    return pb.ChatCompletionParams(model=model, max_tokens=max_tokens,
                                   messages=[pb.Message(role=pb.ROLE_USER, text=text)])


def _finish(limits: Limits, ticket: object, prompt: int, completion: int, status: str = "OK"
            ) -> UsageRecord:
    rec = UsageRecord(request_id="r", key_name="k", model="m", surface="rest", status=status)
    usage = pb.Usage(prompt_tokens=prompt, completion_tokens=completion)
    limits.finish(ticket, rec, usage)  # type: ignore[arg-type]
    return rec


def test_prompt_estimate() -> None:
    p = _params(text="x" * 40)
    assert estimate_prompt_tokens(p) == 3 + 4 + 10
    p.messages.add(role=pb.ROLE_USER).parts.parts.add().image_url.url = "data:image/png;base64,AAAA"
    assert estimate_prompt_tokens(p) == 3 + 8 + 10 + 765


async def test_rpm_is_exact_under_a_concurrent_burst(backend: Backend) -> None:
    limits = _limits(backend)
    key = _key(rpm=10)
    results = await asyncio.gather(*(limits.reserve_chat(key, _params(), f"r{i}")
                                     for i in range(40)), return_exceptions=True)
    ok = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, GatewayError)]
    assert len(ok) == 10 and len(refused) == 30
    err = refused[0]
    assert err.status == grpc.StatusCode.RESOURCE_EXHAUSTED and err.code == "rate_limit_exceeded"
    assert err.headers["x-ratelimit-limit-requests"] == "10"
    assert err.headers["x-ratelimit-remaining-requests"] == "0"
    assert err.headers["x-ratelimit-reset-requests"].endswith("s")
    assert err.retry_after is not None and 0 < err.retry_after <= 60


async def test_tpm_reserves_then_settles_to_real_usage(backend: Backend) -> None:
    limits = _limits(backend)
    key = _key(tpm=100)
    reserve = estimate_prompt_tokens(_params()) + 20  # 10 + 20 = 30 per request
    assert reserve == 30
    tickets = [await limits.reserve_chat(key, _params(), f"r{i}") for i in range(3)]
    with pytest.raises(GatewayError) as err:
        await limits.reserve_chat(key, _params(), "r4")
    assert err.value.headers["x-ratelimit-limit-tokens"] == "100"
    assert err.value.headers["x-ratelimit-remaining-tokens"] == "10"
    # Settling to the real (smaller) usage frees the difference in the window.
    _finish(limits, tickets[0], 2, 3)
    await limits.wait_settled()
    await limits.reserve_chat(key, _params(), "r5")  # 5 + 30 + 30 + 30 = 95 <= 100
    with pytest.raises(GatewayError):
        await limits.reserve_chat(key, _params(), "r6")


async def test_concurrency_slots_are_released_on_settle(backend: Backend) -> None:
    limits = _limits(backend)
    key = _key(max_concurrent=2)
    a = await limits.reserve_chat(key, _params(), "a")
    await limits.reserve_chat(key, _params(), "b")
    with pytest.raises(GatewayError, match="concurrent"):
        await limits.reserve_chat(key, _params(), "c")
    _finish(limits, a, 1, 1, status="CANCELLED")
    await limits.wait_settled()
    await limits.reserve_chat(key, _params(), "d")


async def test_token_budget_is_seeded_from_the_ledger_and_never_overspent(backend: Backend) -> None:
    seen: list[tuple[str, float | None, str]] = []

    async def spent(key_id: str, since: float | None, unit: str) -> float:
        seen.append((key_id, since, unit))
        return 50.0

    limits = _limits(backend, spent=spent)
    key = _key(budget=100, budget_period="day")
    t = await limits.reserve_chat(key, _params(), "a")  # 50 + 30 = 80
    with pytest.raises(GatewayError) as err:
        await limits.reserve_chat(key, _params(), "b")  # 110 > 100
    assert err.value.code == "insufficient_quota" and err.value.type == "insufficient_quota"
    assert err.value.retry_after is not None  # a day budget resets
    assert len(seen) == 1 and seen[0][0] == "key_k" and seen[0][1] is not None
    _finish(limits, t, 5, 5)  # 50 + 10 = 60
    await limits.wait_settled()
    await limits.reserve_chat(key, _params(), "c")  # 90
    with pytest.raises(GatewayError):
        await limits.reserve_chat(key, _params(), "d")


async def test_usd_budget_uses_the_price_table(backend: Backend) -> None:
    limits = _limits(backend)
    # $1 per token for model "priced": a reservation of 30 tokens costs $30.
    key = _key(budget=70, budget_unit="usd", budget_period="total")
    await limits.reserve_chat(key, _params(model="priced"), "a")
    await limits.reserve_chat(key, _params(model="priced"), "b")
    with pytest.raises(GatewayError) as err:
        await limits.reserve_chat(key, _params(model="priced"), "c")
    assert err.value.code == "insufficient_quota" and err.value.retry_after is None


async def test_unlimited_keys_skip_the_backend() -> None:
    limits = _limits(RedisBackend("redis://127.0.0.1:1/0", "x", 0.2))
    t = await limits.reserve_chat(_key(), _params(), "a")
    assert t.spec is None
    rec = _finish(limits, t, 3, 4)
    assert (rec.prompt_tokens, rec.completion_tokens, rec.estimated) == (3, 4, False)
    await limits.close()


async def test_sliding_window_slides() -> None:
    clock = [1000.0]
    limits = _limits(MemoryBackend(clock=lambda: clock[0]))
    key = _key(rpm=2)
    await limits.reserve_chat(key, _params(), "a")
    clock[0] += 30
    await limits.reserve_chat(key, _params(), "b")
    with pytest.raises(GatewayError) as err:
        await limits.reserve_chat(key, _params(), "c")
    assert err.value.retry_after == pytest.approx(30, abs=0.01)
    clock[0] += 30.001  # the first request left the window; the second is still in it
    await limits.reserve_chat(key, _params(), "d")
    with pytest.raises(GatewayError):
        await limits.reserve_chat(key, _params(), "e")


@pytest.mark.parametrize("mode", ["closed", "open"])
async def test_unreachable_redis_fails_closed_or_open(mode: str) -> None:
    limits = _limits(RedisBackend("redis://127.0.0.1:1/0", "x", 0.2), on_error=mode)
    key = _key(rpm=1)
    if mode == "closed":
        with pytest.raises(GatewayError) as err:
            await limits.reserve_chat(key, _params(), "a")
        assert err.value.status == grpc.StatusCode.UNAVAILABLE
        assert err.value.code == "limits_unavailable"
    else:
        for rid in "abc":  # admitted without limits
            t = await limits.reserve_chat(key, _params(), rid)
            assert t.spec is None
    await limits.close()


async def test_usage_is_estimated_when_the_upstream_reports_none() -> None:
    limits = _limits(MemoryBackend())
    t = await limits.reserve_chat(_key(tpm=1000), _params(text="x" * 40), "a")
    chunk = pb.StreamChatCompletionResponse()
    chunk.choices.add().delta.content = "y" * 20
    t.observe(chunk)
    rec = UsageRecord(request_id="r", key_name="k", model="m", surface="grpc", status="CANCELLED")
    limits.finish(t, rec, None)
    assert (rec.prompt_tokens, rec.completion_tokens, rec.estimated) == (17, 5, True)
    limits.finish(t, rec, None)  # settling twice is harmless
    await limits.wait_settled()


# ----------------------------------------------------------- through the gateway ----

async def test_429_over_rest_and_grpc_carries_retry_and_ratelimit_headers() -> None:
    config = make_config(f"""
channels:
  - {{name: echo, provider: echo, models: [echo]}}
keys: [{{name: test, key: {TEST_KEY}, rpm: 2, tpm: 100000}}]
""")
    body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    async with running_stack(config) as stack, httpx.AsyncClient(base_url=stack.base_url) as http:
        auth = {"authorization": f"Bearer {TEST_KEY}"}
        codes = [(await http.post("/chat/completions", json=body, headers=auth)).status_code
                 for _ in range(2)]
        assert codes == [200, 200]
        r = await http.post("/chat/completions", json=body, headers=auth)
        assert r.status_code == 429
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
        assert int(r.headers["retry-after"]) >= 1
        assert r.headers["x-ratelimit-limit-requests"] == "2"
        assert r.headers["x-ratelimit-remaining-requests"] == "0"
        assert r.headers["x-ratelimit-limit-tokens"] == "100000"
        for h in ("x-ratelimit-reset-requests", "x-ratelimit-remaining-tokens",
                  "x-ratelimit-reset-tokens"):
            assert h in r.headers
        req = pb.CreateChatCompletionRequest(params=pb.ChatCompletionParams(
            model="echo", messages=[pb.Message(role=pb.ROLE_USER, text="hi")]))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stack.stub.CreateChatCompletion(
                req, metadata=(("authorization", f"Bearer {TEST_KEY}"),))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        trailers = dict(err.value.trailing_metadata() or ())
        assert trailers["x-ratelimit-limit-requests"] == "2"
        status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
        kinds = {d.type_url.rsplit("/", 1)[-1] for d in status.details}
        assert "google.rpc.RetryInfo" in kinds
        retry = error_details_pb2.RetryInfo()
        next(d for d in status.details if d.Is(retry.DESCRIPTOR)).Unpack(retry)
        assert retry.retry_delay.seconds + retry.retry_delay.nanos > 0
        quota = error_details_pb2.QuotaFailure()
        next(d for d in status.details if d.Is(quota.DESCRIPTOR)).Unpack(quota)
        assert [(v.subject, v.description) for v in quota.violations] == [
            ("key:test", "2 requests per minute")]
        # 2 OK + 2 refused requests: every one has its usage record
        assert [r.status for r in stack.usage.records] == [
            "OK", "OK", "RESOURCE_EXHAUSTED", "RESOURCE_EXHAUSTED"]


async def test_streams_settle_when_they_finish_fail_or_are_cancelled() -> None:
    fake = FakeOpenAI()
    base = await fake.start()
    config = make_config(f"""
channels:
{channel_yaml("oa", "openai", base, ["gpt-x"])}
keys: [{{name: test, key: {TEST_KEY}, max_concurrent: 1, tpm: 100000}}]
""")
    auth = {"authorization": f"Bearer {TEST_KEY}"}

    def body(text: str) -> dict[str, object]:
        return {"model": "gpt-x", "stream": True, "max_tokens": 50,
                "messages": [{"role": "user", "content": text}]}

    try:
        async with running_stack(config) as stack, httpx.AsyncClient(base_url=stack.base_url,
                                                                      timeout=10) as http:
            limits = stack.gateway.limits
            # finishes: real usage from the upstream
            async with http.stream("POST", "/chat/completions", json=body("one two"),
                                   headers=auth) as r:
                assert r.status_code == 200
                _ = [line async for line in r.aiter_lines()]
            # fails mid-stream: the slot is released, usage estimated from what was sent
            async with http.stream("POST", "/chat/completions", json=body("ERROR midstream"),
                                   headers=auth) as r:
                assert r.status_code == 200
                text = "".join([line async for line in r.aiter_lines()])
                assert "error" in text
            # cancelled by the client after the first chunk
            async with http.stream("POST", "/chat/completions",
                                   json=body("SLOW 200\n" + "w " * 50), headers=auth) as r:
                assert r.status_code == 200
                async for _line in r.aiter_lines():
                    break
            for _ in range(100):
                if len(stack.usage.records) == 3:
                    break
                await asyncio.sleep(0.05)
            await limits.wait_settled()
            # max_concurrent=1: the slot is free again after all three
            async with http.stream("POST", "/chat/completions", json=body("again"),
                                   headers=auth) as r:
                assert r.status_code == 200
                _ = [line async for line in r.aiter_lines()]
            recs = list(stack.usage.records)
            finished, failed, cancelled = recs[:3]
            assert not finished.estimated and finished.prompt_tokens == fake.USAGE["prompt_tokens"]
            assert failed.status != "OK" and failed.estimated and failed.completion_tokens > 0
            assert cancelled.status == "CANCELLED" and cancelled.estimated
    finally:
        await fake.close()
