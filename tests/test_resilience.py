"""Failover, timeouts and the mid-stream failure contract, end to end.

The matrix: every fault the fake upstream can inject × streaming and non-streaming ×
REST (raw aiohttp, plus the openai SDK where its behaviour matters) and gRPC (stubs).
Each case asserts what the client got, that it got it within a generous bound, which
channels were tried in which order (the fakes' shared journal), and whether the
faulty upstream saw its connection closed by the gateway. docs/failure-contract.md is
the contract these tests hold the gateway to.

The helpers here (`Reply`, `ask`, `faulty_config`, …) are shared by the other
resilience test modules.
"""

from __future__ import annotations

import asyncio
import collections
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiohttp
import grpc
import openai
import pytest

from switchboard.core.config import Config
from switchboard.core.errors import GatewayError
from switchboard.v1 import inference_pb2 as pb
from tests.fakes.faulty_upstream import Fault, FaultyUpstream, Seen, closed_port_url
from tests.harness import AUTH, TEST_KEY, Stack, channel_yaml, make_config, running_stack

# Small per-channel timeouts so every fault settles fast; BOUND_S is the generous
# ceiling on how long any case may take to give the client its answer.
TIMEOUTS = "{connect: 1, first_token: 0.5, idle: 0.5, total: 1.5}"
BOUND_S = 6.0
ROUTER = "router: {max_attempts: 3, backoff_ms: 10, max_retry_after_s: 1}"


# ----------------------------------------------------------------- helpers ----

def faulty_config(channels: list[tuple[str, str, dict[str, object]]], *, extra: str = "",
                  router: str = ROUTER) -> Config:
    """channels: (name, base_url, extra channel settings); all serve model `m`."""
    text = "channels:\n" + "\n".join(
        channel_yaml(name, "openai", url, ["m"], **{"timeouts": TIMEOUTS, **more})
        for name, url, more in channels)
    return make_config(f"{router}\n{text}\n{extra}")


@dataclass
class Upstreams:
    """Fakes by channel name, with one journal showing the order they were called in."""

    fakes: dict[str, FaultyUpstream] = field(default_factory=dict)
    journal: list[Seen] = field(default_factory=list)
    urls: dict[str, str] = field(default_factory=dict)

    async def add(self, name: str, fault: Fault | None) -> str:
        """fault None = nothing listens (connection refused)."""
        if fault is None:
            self.urls[name] = closed_port_url()
        else:
            fake = FaultyUpstream(name, fault, journal=self.journal)
            self.fakes[name] = fake
            self.urls[name] = await fake.start()
        return self.urls[name]

    def order(self) -> list[str]:
        return [s.channel for s in self.journal]

    async def close(self) -> None:
        for fake in self.fakes.values():
            await fake.close()


@asynccontextmanager
async def upstreams() -> AsyncIterator[Upstreams]:
    ups = Upstreams()
    try:
        yield ups
    finally:
        await ups.close()


@dataclass
class Reply:
    """What a client got, surface-independent."""

    status: str                 # HTTP status ("200", "502", …) or gRPC status name
    text: str = ""              # the answer's text (assembled from a stream)
    last: str = ""              # stream: "done" ([DONE]), "error" (error event/status), "eof"
    error_code: str | None = None
    finish_reasons: list[str] = field(default_factory=list)
    elapsed: float = 0.0
    raw: str = ""
    retry_after: str | None = None

    @property
    def ok(self) -> bool:
        return self.status in ("200", "OK") and self.error_code is None


def _chat_body(stream: bool, model: str) -> dict[str, object]:
    body: dict[str, object] = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    if stream:
        body["stream"] = True
    return body


async def rest_chat(stack: Stack, stream: bool, *, model: str = "m",
                    timeout_header: float | None = None) -> Reply:
    headers = {"authorization": f"Bearer {TEST_KEY}"}
    if timeout_header is not None:
        headers["x-switchboard-timeout"] = str(timeout_header)
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with aiohttp.ClientSession() as http, http.post(
            f"{stack.base_url}/chat/completions", json=_chat_body(stream, model),
            headers=headers) as resp:
        reply = Reply(str(resp.status), retry_after=resp.headers.get("retry-after"))
        if resp.status != 200 or not stream:
            reply.raw = await resp.text()
            data = json.loads(reply.raw)
            if "error" in data:
                reply.error_code = data["error"]["code"]
            else:
                msg = data["choices"][0]
                reply.text = msg["message"]["content"] or ""
                reply.finish_reasons = [c["finish_reason"] for c in data["choices"]]
        else:
            reply.last = "eof"
            try:
                async for line in resp.content:
                    reply.raw += line.decode()
                    if not line.startswith(b"data: "):
                        continue
                    payload = line[6:].strip()
                    if payload == b"[DONE]":
                        reply.last = "done"
                        continue
                    event = json.loads(payload)
                    if "error" in event:
                        reply.last, reply.error_code = "error", event["error"]["code"]
                        continue
                    for c in event["choices"]:
                        reply.text += c["delta"].get("content") or ""
                        if c.get("finish_reason"):
                            reply.finish_reasons.append(c["finish_reason"])
            except aiohttp.ClientPayloadError:
                reply.last = "eof"
    reply.elapsed = loop.time() - started
    return reply


def _grpc_params(model: str) -> pb.ChatCompletionParams:
    return pb.ChatCompletionParams(model=model, messages=[pb.Message(role=pb.ROLE_USER, text="hi")])


async def grpc_chat(stack: Stack, stream: bool, *, model: str = "m",
                    deadline_s: float | None = None) -> Reply:
    loop = asyncio.get_running_loop()
    started = loop.time()
    reply = Reply("OK")
    try:
        if stream:
            call = stack.stub.StreamChatCompletion(
                pb.StreamChatCompletionRequest(params=_grpc_params(model)), metadata=AUTH,
                timeout=deadline_s)
            async for chunk in call:
                for c in chunk.choices:
                    reply.text += c.delta.content
                    if c.finish_reason:
                        reply.finish_reasons.append(pb.FinishReason.Name(c.finish_reason))
            reply.last = "done"
        else:
            resp = await stack.stub.CreateChatCompletion(
                pb.CreateChatCompletionRequest(params=_grpc_params(model)), metadata=AUTH,
                timeout=deadline_s)
            reply.text = resp.choices[0].message.content
            reply.finish_reasons = [pb.FinishReason.Name(c.finish_reason) for c in resp.choices]
    except grpc.aio.AioRpcError as err:
        reply.status, reply.last, reply.raw = err.code().name, "error", err.details() or ""
        reply.error_code = GatewayError.from_rpc_error(err).code
    reply.elapsed = loop.time() - started
    return reply


async def ask(surface: str, stack: Stack, stream: bool, **kw: object) -> Reply:
    if surface == "rest":
        return await rest_chat(stack, stream, **kw)  # type: ignore[arg-type]
    return await grpc_chat(stack, stream, **kw)  # type: ignore[arg-type]


async def wait_for(predicate: object, within: float = 2.0) -> bool:
    """Poll a condition (the fake sees a close one loop turn after the gateway closes)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + within
    while loop.time() < end:
        if predicate():  # type: ignore[operator]
            return True
        await asyncio.sleep(0.01)
    return bool(predicate())  # type: ignore[operator]


def assert_not_fake_complete(reply: Reply) -> None:
    """A broken answer must never look complete."""
    assert reply.last != "done", reply
    assert "stop" not in reply.finish_reasons and "FINISH_REASON_STOP" not in reply.finish_reasons


def assert_sane(reply: Reply) -> None:
    assert reply.elapsed < BOUND_S, f"took {reply.elapsed:.2f}s"
    assert reply.status not in ("500", "INTERNAL", "UNKNOWN"), reply
    assert "Traceback" not in reply.raw


# ------------------------------------------------------------------ matrix ----

@dataclass(frozen=True)
class Case:
    fault: Fault | None            # None: connection refused
    tried: tuple[str, ...]         # channels in the order the journal must show them
    bad_closed: bool = False       # the faulty upstream must see the gateway hang up
    midway: bool = False           # strikes after a stream's first chunk (streams only)
    answered_by: str = "good"


CASES: dict[str, Case] = {
    "429-short-retry-after": Case(Fault("status", 429, retry_after="0.2", times=1), ("bad", "bad"),
                                  answered_by="bad"),
    "429-long-retry-after": Case(Fault("status", 429, retry_after="30"), ("bad", "good")),
    "500": Case(Fault("status", 500), ("bad", "good")),
    "503": Case(Fault("status", 503), ("bad", "good")),
    "529": Case(Fault("status", 529), ("bad", "good")),
    "refused": Case(None, ("good",)),
    "slow-first-byte": Case(Fault("slow_first_byte", delay_s=3.0), ("bad", "good"), bad_closed=True),
    "hang": Case(Fault("hang"), ("bad", "good"), bad_closed=True),
    "stall-midway": Case(Fault("stall", chunks_before=2), ("bad", "good"), bad_closed=True,
                         midway=True),
    "cut-midway": Case(Fault("cut", chunks_before=2), ("bad", "good"), midway=True),
    "malformed-first": Case(Fault("malformed", chunks_before=0), ("bad", "good")),
    "malformed-midway": Case(Fault("malformed", chunks_before=2), ("bad", "good"), midway=True),
    "error-event-midway": Case(Fault("error_event", chunks_before=2), ("bad", "good"), midway=True),
    "error-event-first": Case(Fault("error_event", chunks_before=0), ("bad", "good")),
}


@pytest.mark.parametrize("surface", ["rest", "grpc"])
@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("case_id", list(CASES))
async def test_fault_matrix(case_id: str, stream: bool, surface: str) -> None:
    """Two channels for `m`: `bad` (priority 1, faulty) and `good` (priority 0)."""
    await _run_case(CASES[case_id], stream, surface, split=False)


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("case_id", list(CASES))
async def test_fault_matrix_split_deployment(case_id: str, stream: bool) -> None:
    """The same over REST when the façade reaches the core over gRPC (`switchboard
    facade` + `switchboard core`): errors cross the hop unchanged."""
    await _run_case(CASES[case_id], stream, "rest", split=True)


async def _run_case(case: Case, stream: bool, surface: str, *, split: bool) -> None:
    async with upstreams() as ups:
        await ups.add("bad", case.fault)
        await ups.add("good", Fault())
        cfg = faulty_config([("bad", ups.urls["bad"], {"priority": 1}),
                             ("good", ups.urls["good"], {"priority": 0})])
        async with running_stack(cfg, split=split) as stack:
            reply = await ask(surface, stack, stream)
            assert_sane(reply)
            bad = ups.fakes.get("bad")
            if stream and case.midway:
                # Something was relayed already: no failover, the stream ends in an error.
                assert ups.order() == ["bad"]
                assert reply.text.startswith("bad-word0"), reply
                assert reply.text != ups.fakes["good"].answer()
                assert_not_fake_complete(reply)
                if surface == "rest":
                    assert reply.status == "200" and reply.last == "error", reply
                    assert reply.error_code == "upstream_error"
                else:
                    assert reply.status == "UNAVAILABLE", reply
            else:
                assert reply.ok, reply
                assert reply.text == ups.fakes[case.answered_by].answer()
                assert ups.order() == list(case.tried)
                if stream and surface == "rest":
                    assert reply.last == "done"
            if case.bad_closed:
                assert bad is not None
                assert await wait_for(lambda: all(r.client_closed_at is not None
                                                  for r in bad.requests)), bad.requests
            rec = stack.usage.records[-1]
            assert rec.channel == ("bad" if stream and case.midway else case.answered_by)
            assert rec.status == ("UNAVAILABLE" if stream and case.midway else "OK")


SINGLE: dict[str, tuple[Fault | None, str, int]] = {
    # fault, gRPC status, how many attempts the fake sees
    "500": (Fault("status", 500), "UNAVAILABLE", 3),
    "529": (Fault("status", 529), "UNAVAILABLE", 3),
    "refused": (None, "UNAVAILABLE", 0),
    "hang": (Fault("hang"), "UNAVAILABLE", 1),
    "malformed": (Fault("malformed", chunks_before=0), "UNAVAILABLE", 3),
    "429-long-retry-after": (Fault("status", 429, retry_after="30"), "RESOURCE_EXHAUSTED", 1),
}
_HTTP = {"UNAVAILABLE": "502", "RESOURCE_EXHAUSTED": "429", "DEADLINE_EXCEEDED": "504"}


@pytest.mark.parametrize("surface", ["rest", "grpc"])
@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("case_id", list(SINGLE))
async def test_only_channel_faulty(case_id: str, stream: bool, surface: str) -> None:
    """With nowhere to fail over to, the client gets the error table's answer; fast
    failures are retried on the same channel (bounded, with backoff), timeouts are not."""
    fault, status, attempts = SINGLE[case_id]
    async with upstreams() as ups:
        await ups.add("bad", fault)
        async with running_stack(faulty_config([("bad", ups.urls["bad"], {})])) as stack:
            reply = await ask(surface, stack, stream)
            assert_sane(reply)
            assert_not_fake_complete(reply)
            assert reply.status == (_HTTP[status] if surface == "rest" else status), reply
            assert reply.text == ""
            assert len(ups.journal) == attempts
            if case_id.startswith("429") and surface == "rest":
                assert reply.retry_after == "30"
            if case_id == "hang":
                bad = ups.fakes["bad"]
                assert await wait_for(lambda: bad.requests[0].client_closed_at is not None)


@pytest.mark.parametrize("surface", ["rest", "grpc"])
@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
async def test_caller_deadline_wins(stream: bool, surface: str) -> None:
    """A caller deadline shorter than the channel's timeouts ends the call with
    DEADLINE_EXCEEDED (504) and hangs up on the upstream; REST uses X-Switchboard-Timeout."""
    async with upstreams() as ups:
        await ups.add("slow", Fault("hang"))
        slow_timeouts = "{connect: 5, first_token: 30, idle: 30, total: 60}"
        cfg = make_config(f"{ROUTER}\nchannels:\n" + channel_yaml(
            "slow", "openai", ups.urls["slow"], ["m"], timeouts=slow_timeouts))
        async with running_stack(cfg) as stack:
            if surface == "rest":
                reply = await rest_chat(stack, stream, timeout_header=0.4)
                assert reply.status == "504" and reply.error_code == "timeout", reply
            else:
                reply = await grpc_chat(stack, stream, deadline_s=0.4)
                assert reply.status == "DEADLINE_EXCEEDED", reply
            assert_sane(reply)
            assert 0.3 < reply.elapsed < 3.0
            seen = ups.fakes["slow"].requests[0]
            assert await wait_for(lambda: seen.client_closed_at is not None)


async def test_deadline_mid_stream_is_an_error_not_a_finish() -> None:
    """The deadline passing after the first token ends an SSE stream with a timeout
    error event (and gRPC with DEADLINE_EXCEEDED), never [DONE]."""
    async with upstreams() as ups:
        await ups.add("slowpoke", Fault(interval_s=0.3))
        cfg = make_config(f"{ROUTER}\nchannels:\n" + channel_yaml(
            "slowpoke", "openai", ups.urls["slowpoke"], ["m"],
            timeouts="{connect: 5, first_token: 30, idle: 30, total: 60}"))
        async with running_stack(cfg) as stack:
            rest = await rest_chat(stack, True, timeout_header=0.8)
            assert rest.status == "200" and rest.last == "error" and rest.error_code == "timeout"
            assert rest.text and rest.text != ups.fakes["slowpoke"].answer()
            assert_not_fake_complete(rest)
            g = await grpc_chat(stack, True, deadline_s=0.8)
            assert g.status == "DEADLINE_EXCEEDED"
            assert_not_fake_complete(g)


async def test_invalid_timeout_header_is_a_400() -> None:
    async with upstreams() as ups:
        await ups.add("good", Fault())
        async with running_stack(faulty_config([("good", ups.urls["good"], {})])) as stack:
            async with aiohttp.ClientSession() as http:
                for value in ("soon", "-1", "0"):
                    async with http.post(f"{stack.base_url}/chat/completions",
                                         json=_chat_body(False, "m"),
                                         headers={"authorization": f"Bearer {TEST_KEY}",
                                                  "x-switchboard-timeout": value}) as resp:
                        assert resp.status == 400
                        assert (await resp.json())["error"]["param"] == "x-switchboard-timeout"


# ------------------------------------------------------- the openai SDK view ----

async def test_sdk_sees_a_cut_stream_as_an_error() -> None:
    """What an application using the official SDK experiences: a stream cut mid-way
    raises, instead of ending like a complete answer."""
    async with upstreams() as ups:
        await ups.add("bad", Fault("cut", chunks_before=3))
        async with running_stack(faulty_config([("bad", ups.urls["bad"], {})])) as stack:
            client = openai.AsyncOpenAI(base_url=stack.base_url, api_key=TEST_KEY, max_retries=0)
            got = ""
            with pytest.raises(openai.APIError) as info:
                stream = await client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": "hi"}], stream=True)
                async for chunk in stream:
                    got += chunk.choices[0].delta.content or "" if chunk.choices else ""
                    assert not (chunk.choices and chunk.choices[0].finish_reason)
            assert "mid-stream" in str(info.value)
            assert got.startswith("bad-word0")
            await client.close()


async def test_sdk_failover_is_invisible() -> None:
    async with upstreams() as ups:
        await ups.add("bad", Fault("status", 503))
        await ups.add("good", Fault())
        cfg = faulty_config([("bad", ups.urls["bad"], {"priority": 1}),
                             ("good", ups.urls["good"], {})])
        async with running_stack(cfg) as stack:
            client = openai.AsyncOpenAI(base_url=stack.base_url, api_key=TEST_KEY, max_retries=0)
            r = await client.chat.completions.create(model="m", messages=[{"role": "user",
                                                                            "content": "hi"}])
            assert r.choices[0].message.content == ups.fakes["good"].answer()
            assert r.choices[0].finish_reason == "stop"
            await client.close()


# ------------------------------------------------------- balancing, routes ----

async def test_two_channels_keep_answering_while_one_is_dead() -> None:
    """Same tier, equal weights: the dead channel is drawn first about half the time,
    fails over every time, then its circuit opens and it stops being tried at all."""
    async with upstreams() as ups:
        await ups.add("dead", Fault("status", 503))
        await ups.add("alive", Fault())
        cfg = faulty_config([("dead", ups.urls["dead"], {}), ("alive", ups.urls["alive"], {})],
                            router="router: {max_attempts: 3, backoff_ms: 5, "
                                   "circuit: {min_requests: 3, window_s: 60, cooldown_s: 600}}")
        async with running_stack(cfg) as stack:
            for i in range(24):
                reply = await ask("rest" if i % 2 else "grpc", stack, bool(i % 3 == 0))
                assert reply.ok, reply
                assert reply.text == ups.fakes["alive"].answer()
            assert len(ups.fakes["dead"].requests) == 3  # min_requests (all failed), then never again
            assert len(ups.fakes["alive"].requests) == 24
            assert await stack.gateway.router.breaker.state("dead") == "open"


async def test_weighted_choice_and_priority_tiers() -> None:
    async with upstreams() as ups:
        for name in ("heavy", "light", "backup"):
            await ups.add(name, Fault())
        cfg = faulty_config([("heavy", ups.urls["heavy"], {"weight": 3, "priority": 5}),
                             ("light", ups.urls["light"], {"weight": 1, "priority": 5}),
                             ("backup", ups.urls["backup"], {"priority": 0})])
        async with running_stack(cfg) as stack:
            firsts: collections.Counter[str] = collections.Counter()
            for _ in range(2000):
                order = [c.channel.name for c in stack.gateway.router.candidates("m")]
                assert order[-1] == "backup" and sorted(order[:2]) == ["heavy", "light"]
                firsts[order[0]] += 1
            assert 0.68 < firsts["heavy"] / 2000 < 0.82, firsts
            for _ in range(40):
                assert (await rest_chat(stack, False)).ok
            assert len(ups.fakes["backup"].requests) == 0
            assert 20 <= len(ups.fakes["heavy"].requests) <= 39


async def test_route_fallback_chain_and_model_mapping() -> None:
    """Route `smart` → [big, small]: big's only channel is down, small answers. The
    public name `small` maps to the upstream name `small-2025`."""
    async with upstreams() as ups:
        await ups.add("bigco", Fault("status", 500))
        await ups.add("smallco", Fault())
        text = (f"{ROUTER}\nchannels:\n"
                + channel_yaml("bigco", "openai", ups.urls["bigco"], ["big"], timeouts=TIMEOUTS)
                + "\n" + channel_yaml("smallco", "openai", ups.urls["smallco"], ["other"],
                                      model_map="{small: small-2025}", timeouts=TIMEOUTS)
                + "\nroutes:\n  - {model: smart, targets: [big, small]}\n")
        async with running_stack(make_config(text)) as stack:
            for surface in ("rest", "grpc"):
                for stream in (False, True):
                    reply = await ask(surface, stack, stream, model="smart")
                    assert reply.ok, reply
                    assert reply.text == ups.fakes["smallco"].answer()
            assert ups.order()[:2] == ["bigco", "smallco"]
            assert {s.body["model"] for s in ups.fakes["smallco"].requests} == {"small-2025"}


async def test_client_errors_are_not_retried() -> None:
    """An upstream 400 is the client's fault: returned at once, no other channel tried."""
    async with upstreams() as ups:
        await ups.add("picky", Fault("status", 400))
        await ups.add("other", Fault())
        cfg = faulty_config([("picky", ups.urls["picky"], {"priority": 1}),
                             ("other", ups.urls["other"], {})])
        async with running_stack(cfg) as stack:
            for surface in ("rest", "grpc"):
                reply = await ask(surface, stack, False)
                assert reply.status == ("400" if surface == "rest" else "INVALID_ARGUMENT")
            assert ups.order() == ["picky", "picky"]


async def test_retry_after_longer_than_the_deadline_is_not_waited_out() -> None:
    """A short Retry-After is waited out only when it fits the caller's deadline."""
    async with upstreams() as ups:
        await ups.add("busy", Fault("status", 429, retry_after="0.8"))
        async with running_stack(faulty_config([("busy", ups.urls["busy"], {})])) as stack:
            reply = await rest_chat(stack, False, timeout_header=0.5)
            assert reply.status == "429" and reply.retry_after == "1", reply
            assert reply.elapsed < 0.5
            assert len(ups.journal) == 1
            waited = await rest_chat(stack, False)  # no deadline: waited out, up to max_attempts
            assert waited.status == "429" and waited.elapsed >= 1.6
            assert len(ups.journal) == 1 + 3


async def test_repeat_attempts_back_off_with_jitter() -> None:
    """Retrying the same channel waits backoff_ms × 2^(round-1) × [0.5, 1.5)."""
    async with upstreams() as ups:
        await ups.add("flaky", Fault("status", 502))
        cfg = faulty_config([("flaky", ups.urls["flaky"], {})],
                            router="router: {max_attempts: 3, backoff_ms: 100}")
        async with running_stack(cfg) as stack:
            reply = await grpc_chat(stack, False)
            assert reply.status == "UNAVAILABLE"
            t = [s.started for s in ups.journal]
            assert len(t) == 3
            assert 0.05 <= t[1] - t[0] < 1.0
            assert 0.1 <= t[2] - t[1] < 1.0
