"""x-ratelimit-* headers (issue 10, item 3): on every 429 — RPM, TPM and concurrency —
and, as OpenAI does, on admitted responses (REST headers, gRPC initial metadata),
streaming or not, in one process and with the façade apart; only for keys with limits.
Also the backends' figures behind them, on memory and on a real Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import httpx
import pytest

from switchboard.core.config import LimitSettings
from switchboard.core.errors import GatewayError
from switchboard.core.keys import KeyRecord
from switchboard.core.ledger import PriceTable
from switchboard.core.limits import Backend, Limits, MemoryBackend, RedisBackend
from switchboard.v1 import inference_pb2 as pb
from tests.conftest import REDIS_URL
from tests.harness import make_config, running_stack

ALL = "sk-all-limits-0123456789"     # rpm 3, tpm 10000, max_concurrent 2
NONE = "sk-no-limits-0123456789"
CONC = "sk-conc-only-0123456789"     # max_concurrent 1
TPM = "sk-tiny-tpm-0123456789"       # tpm 20

CONFIG = f"""
channels:
  - {{name: echo, provider: echo, models: [echo], options: {{delay_ms: 150}}}}
keys:
  - {{name: all, key: {ALL}, rpm: 3, tpm: 10000, max_concurrent: 2}}
  - {{name: none, key: {NONE}}}
  - {{name: conc, key: {CONC}, max_concurrent: 1}}
  - {{name: tpm, key: {TPM}, tpm: 20}}
"""
BODY = {"model": "echo", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
RESERVE = 8 + 10  # prompt estimate for "hi" + max_tokens


def _auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def _md(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def _limit_headers(headers: object) -> dict[str, str]:
    """x-ratelimit-* from httpx headers or gRPC metadata (an iterable of pairs)."""
    pairs = headers.items() if isinstance(headers, httpx.Headers) else headers
    return {k.lower(): v for k, v in pairs  # type: ignore[attr-defined]
            if k.lower().startswith("x-ratelimit-")}


def _req() -> pb.CreateChatCompletionRequest:
    return pb.CreateChatCompletionRequest(params=pb.ChatCompletionParams(
        model="echo", max_tokens=10, messages=[pb.Message(role=pb.ROLE_USER, text="hi")]))


@pytest.mark.parametrize("split", [False, True], ids=["one-process", "split"])
async def test_admitted_rest_responses_carry_the_limits_of_the_key(split: bool) -> None:
    async with running_stack(make_config(CONFIG), split=split) as stack, \
            httpx.AsyncClient(base_url=stack.base_url, timeout=10) as http:
        r = await http.post("/chat/completions", json=BODY, headers=_auth(ALL))
        assert r.status_code == 200
        assert _limit_headers(r.headers) == {
            "x-ratelimit-limit-requests": "3", "x-ratelimit-remaining-requests": "2",
            "x-ratelimit-reset-requests": "1m0s",  # this request leaves the window in 60 s
            "x-ratelimit-limit-tokens": "10000",
            "x-ratelimit-remaining-tokens": str(10000 - RESERVE),
            "x-ratelimit-reset-tokens": "1m0s",
            "x-ratelimit-limit-concurrency": "2", "x-ratelimit-remaining-concurrency": "1"}
        async with http.stream("POST", "/chat/completions", json={**BODY, "stream": True},
                               headers=_auth(ALL)) as s:
            assert s.status_code == 200
            h = _limit_headers(s.headers)
            assert h["x-ratelimit-remaining-requests"] == "1"
            assert h["x-ratelimit-limit-tokens"] == "10000"
            assert h["x-ratelimit-remaining-concurrency"] == "1"
            assert [line async for line in s.aiter_lines() if line][-1] == "data: [DONE]"
        # A key without limits: no headers (and nothing computed for them).
        r = await http.post("/chat/completions", json=BODY, headers=_auth(NONE))
        assert r.status_code == 200 and _limit_headers(r.headers) == {}
        # The third request of an rpm-3 key: 0 left, then the 429 says the same.
        r = await http.post("/chat/completions", json=BODY, headers=_auth(ALL))
        assert r.headers["x-ratelimit-remaining-requests"] == "0"
        r = await http.post("/chat/completions", json=BODY, headers=_auth(ALL))
        assert r.status_code == 429
        h = _limit_headers(r.headers)
        assert h["x-ratelimit-limit-requests"] == "3" and h["x-ratelimit-remaining-requests"] == "0"
        assert h["x-ratelimit-limit-concurrency"] == "2"
        assert {"x-ratelimit-limit-tokens", "x-ratelimit-reset-requests"} <= set(h)


async def test_admitted_grpc_calls_carry_the_limits_as_initial_metadata() -> None:
    async with running_stack(make_config(CONFIG)) as stack:
        call = stack.stub.CreateChatCompletion(_req(), metadata=_md(ALL), timeout=10)
        await call
        h = _limit_headers(await call.initial_metadata())
        assert h["x-ratelimit-limit-requests"] == "3" and h["x-ratelimit-remaining-requests"] == "2"
        assert h["x-ratelimit-remaining-tokens"] == str(10000 - RESERVE)
        assert h["x-ratelimit-limit-concurrency"] == "2"
        stream = stack.stub.StreamChatCompletion(
            pb.StreamChatCompletionRequest(params=_req().params), metadata=_md(ALL), timeout=10)
        chunks = [c async for c in stream]
        assert chunks
        h = _limit_headers(await stream.initial_metadata())
        assert h["x-ratelimit-remaining-requests"] == "1"
        call = stack.stub.CreateChatCompletion(_req(), metadata=_md(NONE), timeout=10)
        await call
        assert _limit_headers(await call.initial_metadata()) == {}


@pytest.mark.parametrize("split", [False, True], ids=["one-process", "split"])
async def test_a_concurrency_429_says_which_limit_and_when_to_retry(split: bool) -> None:
    async with running_stack(make_config(CONFIG), split=split) as stack, \
            httpx.AsyncClient(base_url=stack.base_url, timeout=10) as http:
        long = {**BODY, "stream": True, "messages": [{"role": "user", "content": "a b c d e f"}]}
        async with http.stream("POST", "/chat/completions", json=long, headers=_auth(CONC)) as s:
            assert s.status_code == 200
            assert s.headers["x-ratelimit-limit-concurrency"] == "1"
            assert s.headers["x-ratelimit-remaining-concurrency"] == "0"
            lines = s.aiter_lines()
            await anext(lines)  # the slot is held while the stream runs
            r = await http.post("/chat/completions", json=BODY, headers=_auth(CONC))
            assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
            assert int(r.headers["retry-after"]) >= 1
            # Only the limit the key has: no requests/tokens figures it does not have.
            assert _limit_headers(r.headers) == {"x-ratelimit-limit-concurrency": "1",
                                                 "x-ratelimit-remaining-concurrency": "0"}
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stack.stub.CreateChatCompletion(_req(), metadata=_md(CONC), timeout=10)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert _limit_headers(err.value.trailing_metadata() or ()) == {
                "x-ratelimit-limit-concurrency": "1", "x-ratelimit-remaining-concurrency": "0"}
            async for _ in lines:
                pass


async def test_a_tpm_429_carries_the_token_headers() -> None:
    async with running_stack(make_config(CONFIG)) as stack, \
            httpx.AsyncClient(base_url=stack.base_url, timeout=10) as http:
        r = await http.post("/chat/completions", json=BODY, headers=_auth(TPM))
        assert r.status_code == 200 and r.headers["x-ratelimit-remaining-tokens"] == "2"
        # 8 + 100 tokens to reserve cannot fit a 20-token window.
        r = await http.post("/chat/completions", json={**BODY, "max_tokens": 100},
                            headers=_auth(TPM))
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
        h = _limit_headers(r.headers)
        assert h["x-ratelimit-limit-tokens"] == "20"
        assert h["x-ratelimit-reset-tokens"].endswith("s") and "retry-after" in r.headers
        assert "x-ratelimit-limit-requests" not in h
        big = _req()
        big.params.max_tokens = 100
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stack.stub.CreateChatCompletion(big, metadata=_md(TPM), timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert _limit_headers(err.value.trailing_metadata() or ())["x-ratelimit-limit-tokens"] == "20"


# ------------------------------------------------------------ the backends ----

@pytest.fixture(params=["memory", "redis"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    if request.param == "memory":
        yield MemoryBackend()
        return
    b = RedisBackend(REDIS_URL, request.getfixturevalue("redis_prefix"), 2.0)
    yield b
    await b.close()


async def test_backends_report_remaining_requests_tokens_and_slots(backend: Backend) -> None:
    limits = Limits(backend, LimitSettings(), PriceTable(()))
    key = KeyRecord(name="k", key_hash="h", key_id="key_k", rpm=5, tpm=100, max_concurrent=2)
    params = pb.ChatCompletionParams(model="m", max_tokens=10,
                                     messages=[pb.Message(role=pb.ROLE_USER, text="hi")])
    a = await limits.reserve_chat(key, params, "a")
    assert a.headers is not None
    assert a.headers["x-ratelimit-remaining-requests"] == "4"
    assert a.headers["x-ratelimit-remaining-tokens"] == str(100 - RESERVE)
    assert a.headers["x-ratelimit-remaining-concurrency"] == "1"
    assert a.headers["x-ratelimit-reset-requests"] == "1m0s"
    await asyncio.sleep(0.05)
    b = await limits.reserve_chat(key, params, "b")
    assert b.headers is not None and b.headers["x-ratelimit-remaining-concurrency"] == "0"
    # The oldest entry (a's) now leaves the window a little under 60 s from now.
    assert b.headers["x-ratelimit-reset-requests"].endswith("s")
    assert b.headers["x-ratelimit-reset-requests"] != "1m0s"
    with pytest.raises(GatewayError) as err:
        await limits.reserve_chat(key, params, "c")
    assert err.value.headers["x-ratelimit-limit-concurrency"] == "2"
    assert err.value.headers["x-ratelimit-remaining-concurrency"] == "0"
    assert err.value.headers["x-ratelimit-remaining-requests"] == "3"
    unlimited = await limits.reserve_chat(KeyRecord(name="u", key_hash="u"), params, "d")
    assert unlimited.headers is None
    await limits.close()
