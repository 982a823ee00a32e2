"""One conformance suite for every provider kind: the same OpenAI-format scenarios, sent
through the façade (official `openai` SDK) and through gRPC (committed stubs), against a
fake upstream speaking each provider's real wire format (tests/fakes/, decided by the
shared scenario language). The answers must be equivalent whatever is behind the model,
and the usage must match what the upstream reported.

Provider differences the suite states rather than hides: Anthropic and Ollama have no
`n` (a clear 400 naming `n`); Ollama reports no cached tokens.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import grpc
import openai
import pytest

from switchboard.v1 import inference_pb2 as pb
from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.fakes.gemini_upstream import FakeGemini
from tests.fakes.ollama_upstream import FakeOllama
from tests.fakes.openai_upstream import FakeAzureOpenAI, FakeOpenAI
from tests.harness import AUTH, TEST_KEY, Stack, channel_yaml, make_config, running_stack


@dataclass(frozen=True)
class Kind:
    provider: str
    fake: type
    supports_n: bool
    reports_cached: bool


KINDS = [Kind("openai", FakeOpenAI, True, True), Kind("anthropic", FakeAnthropic, False, True),
         Kind("gemini", FakeGemini, True, True), Kind("ollama", FakeOllama, False, False),
         Kind("azure", FakeAzureOpenAI, True, True)]
MODEL = "the-model"
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"tz": {"type": "string"}}}}}]


@dataclass
class Env:
    kind: Kind
    fake: Any
    stack: Stack
    sdk: openai.AsyncOpenAI


@pytest.fixture(params=KINDS, ids=[k.provider for k in KINDS])
async def env(request: pytest.FixtureRequest) -> AsyncIterator[Env]:
    kind: Kind = request.param
    fake = kind.fake()
    url = await fake.start()
    cfg = make_config("channels:\n" + channel_yaml("up", kind.provider, url, [MODEL])
                      + "\nrouter: {backoff_ms: 0, max_attempts: 1}\n")
    async with running_stack(cfg) as stack:
        sdk = openai.AsyncOpenAI(base_url=stack.base_url, api_key=TEST_KEY, max_retries=0)
        yield Env(kind, fake, stack, sdk)
        await sdk.close()
    await fake.close()


# --------------------------------------------------------- two surfaces ----


@dataclass
class Answer:
    """What a client got, surface-neutral."""

    texts: list[str]                   # per choice
    tool_calls: list[tuple[str, str, str]]  # (id, name, arguments) of choice 0
    finish: str | None
    usage: dict[str, int]
    content_chunks: int = 0


_FINISH = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length",
           pb.FINISH_REASON_TOOL_CALLS: "tool_calls", pb.FINISH_REASON_CONTENT_FILTER: "content_filter"}


async def ask_rest(e: Env, messages: list[Any], stream: bool, **kw: Any) -> Answer:
    if not stream:
        r = await e.sdk.chat.completions.create(model=MODEL, messages=messages, **kw)
        m = r.choices[0].message
        assert r.usage is not None
        return Answer(
            texts=[c.message.content or "" for c in r.choices],
            tool_calls=[(t.id, t.function.name, t.function.arguments) for t in m.tool_calls or []],  # type: ignore[union-attr]
            finish=r.choices[0].finish_reason, usage=_usage_rest(r.usage))
    texts: dict[int, str] = {}
    calls: dict[int, list[str]] = {}
    finish = None
    usage: dict[str, int] = {}
    chunks = 0
    async for ch in await e.sdk.chat.completions.create(
            model=MODEL, messages=messages, stream=True, stream_options={"include_usage": True}, **kw):
        if ch.usage:
            usage = _usage_rest(ch.usage)
        for c in ch.choices:
            if c.delta.content:
                texts[c.index] = texts.get(c.index, "") + c.delta.content
                chunks += c.index == 0
            for t in c.delta.tool_calls or []:
                slot = calls.setdefault(t.index, ["", "", ""])
                slot[0] += t.id or ""
                if t.function:
                    slot[1] += t.function.name or ""
                    slot[2] += t.function.arguments or ""
            if c.index == 0 and c.finish_reason:
                finish = c.finish_reason
    return Answer([texts[i] for i in sorted(texts)] or [""],
                  [tuple(calls[i]) for i in sorted(calls)], finish, usage, chunks)  # type: ignore[misc]


def _usage_rest(u: Any) -> dict[str, int]:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "cached_tokens": (u.prompt_tokens_details.cached_tokens or 0) if u.prompt_tokens_details else 0,
            "reasoning_tokens": (u.completion_tokens_details.reasoning_tokens or 0)
            if u.completion_tokens_details else 0}


def _usage_pb(u: pb.Usage) -> dict[str, int]:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "cached_tokens": u.prompt_tokens_details.cached_tokens,
            "reasoning_tokens": u.completion_tokens_details.reasoning_tokens}


def to_params(messages: list[Any], **kw: Any) -> pb.ChatCompletionParams:
    """The same request as a gRPC client would build it by hand."""
    p = pb.ChatCompletionParams(model=MODEL)
    roles = {"system": pb.ROLE_SYSTEM, "user": pb.ROLE_USER, "assistant": pb.ROLE_ASSISTANT,
             "tool": pb.ROLE_TOOL}
    for m in messages:
        msg = p.messages.add(role=roles[m["role"]])
        if isinstance(m.get("content"), str):
            msg.text = m["content"]
        elif isinstance(m.get("content"), list):
            for part in m["content"]:
                if part["type"] == "text":
                    msg.parts.parts.add(text=part["text"])
                else:
                    msg.parts.parts.add(image_url=pb.ImageUrl(url=part["image_url"]["url"]))
        for tc in m.get("tool_calls") or []:
            msg.tool_calls.add(id=tc["id"], type="function", function=pb.FunctionCall(
                name=tc["function"]["name"], arguments=tc["function"]["arguments"]))
        if m.get("tool_call_id"):
            msg.tool_call_id = m["tool_call_id"]
    for t in kw.get("tools", []):
        p.tools.add(type="function", function=pb.FunctionDefinition(
            name=t["function"]["name"], description=t["function"].get("description", ""),
            parameters_json=json.dumps(t["function"]["parameters"])))
    if "stop" in kw:
        p.stop.extend(kw["stop"])
    if "n" in kw:
        p.n = kw["n"]
    if kw.get("response_format") == {"type": "json_object"}:
        p.response_format.json_object.SetInParent()
    return p


async def ask_grpc(e: Env, messages: list[Any], stream: bool, **kw: Any) -> Answer:
    params = to_params(messages, **kw)
    if not stream:
        r = await e.stack.stub.CreateChatCompletion(pb.CreateChatCompletionRequest(params=params),
                                                    metadata=AUTH)
        return Answer([c.message.content for c in r.choices],
                      [(t.id, t.function.name, t.function.arguments) for t in r.choices[0].message.tool_calls],
                      _FINISH.get(r.choices[0].finish_reason), _usage_pb(r.usage))
    texts: dict[int, str] = {}
    calls: dict[int, list[str]] = {}
    finish = None
    usage: dict[str, int] = {}
    chunks = 0
    async for m in e.stack.stub.StreamChatCompletion(pb.StreamChatCompletionRequest(params=params),
                                                     metadata=AUTH):
        if m.HasField("usage"):
            usage = _usage_pb(m.usage)
        for c in m.choices:
            if c.delta.content:
                texts[c.index] = texts.get(c.index, "") + c.delta.content
                chunks += c.index == 0
            for t in c.delta.tool_calls:
                slot = calls.setdefault(t.index, ["", "", ""])
                slot[0] += t.id
                slot[1] += t.function.name
                slot[2] += t.function.arguments
            if c.index == 0 and c.finish_reason:
                finish = _FINISH.get(c.finish_reason)
    return Answer([texts[i] for i in sorted(texts)] or [""],
                  [tuple(calls[i]) for i in sorted(calls)], finish, usage, chunks)  # type: ignore[misc]


SURFACES = [pytest.param(ask_rest, id="rest"), pytest.param(ask_grpc, id="grpc")]
MODES = [pytest.param(False, id="whole"), pytest.param(True, id="stream")]


def user(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


# ------------------------------------------------------------ scenarios ----


@pytest.mark.parametrize("stream", MODES)
@pytest.mark.parametrize("ask", SURFACES)
async def test_plain_answer_and_usage(env: Env, ask: Any, stream: bool) -> None:
    a = await ask(env, [{"role": "system", "content": "be brief"}, *user("hello there world")], stream)
    assert a.texts == ["You said: hello there world"]
    assert a.finish == "stop"
    expected = dict(env.fake.USAGE)
    if not env.kind.reports_cached:
        expected["cached_tokens"] = 0
    assert a.usage == expected
    if stream:
        assert a.content_chunks >= 2  # relayed as it came, not buffered into one


@pytest.mark.parametrize("stream", MODES)
@pytest.mark.parametrize("ask", SURFACES)
async def test_tool_round_trip(env: Env, ask: Any, stream: bool) -> None:
    args = {"city": "Paris", "when": {"day": 1}}
    messages = user(f"TOOL get_weather {json.dumps(args)}")
    a = await ask(env, messages, stream, tools=TOOLS)
    assert a.finish == "tool_calls"
    assert len(a.tool_calls) == 1
    call_id, name, arguments = a.tool_calls[0]
    assert name == "get_weather" and json.loads(arguments) == args and call_id
    messages = [*messages, {"role": "assistant", "content": None, "tool_calls": [{"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]}, {"role": "tool", "tool_call_id": call_id, "content": "sunny and 21C"}]
    b = await ask(env, messages, stream, tools=TOOLS)
    assert b.texts == ["Tool said: sunny and 21C"]


@pytest.mark.parametrize("ask", SURFACES)
async def test_parallel_tool_calls_streamed(env: Env, ask: Any) -> None:
    a = await ask(env, user('TOOL get_weather {"city": "Oslo"}\nTOOL get_time {"tz": "CET"}'), True,
                  tools=TOOLS)
    assert [(n, json.loads(x)) for _, n, x in a.tool_calls] == [
        ("get_weather", {"city": "Oslo"}), ("get_time", {"tz": "CET"})]
    assert len({i for i, _, _ in a.tool_calls}) == 2


@pytest.mark.parametrize("ask", SURFACES)
async def test_image_input(env: Env, ask: Any) -> None:
    raw = b"\x89PNG\r\n\x1a\n not really a png"
    url = "data:image/png;base64," + base64.b64encode(raw).decode()
    a = await ask(env, [{"role": "user", "content": [
        {"type": "text", "text": "describe"}, {"type": "image_url", "image_url": {"url": url}}]}], False)
    assert a.texts == [f"You said: describe [image: base64 image/png {len(raw)} bytes]"]


@pytest.mark.parametrize("ask", SURFACES)
async def test_stop_sequences(env: Env, ask: Any) -> None:
    a = await ask(env, user("alpha beta gamma"), True, stop=["gamma"])
    assert a.texts == ["You said: alpha beta "]
    assert a.finish == "stop"


@pytest.mark.parametrize("ask", SURFACES)
async def test_json_mode(env: Env, ask: Any) -> None:
    a = await ask(env, user("ping"), False, response_format={"type": "json_object"})
    assert json.loads(a.texts[0]) == {"said": "ping"}


async def test_n(env: Env) -> None:
    if env.kind.supports_n:
        a = await ask_rest(env, user("twice"), False, n=2)
        assert a.texts == ["You said: twice"] * 2
        return
    with pytest.raises(openai.BadRequestError) as exc:
        await ask_rest(env, user("twice"), False, n=2)
    assert exc.value.body["param"] == "n"  # type: ignore[index]


@pytest.mark.parametrize(("command", "status", "code"), [
    ("ERROR 429", 429, grpc.StatusCode.RESOURCE_EXHAUSTED),
    ("ERROR 500", 502, grpc.StatusCode.UNAVAILABLE),
    ("ERROR 400", 400, grpc.StatusCode.INVALID_ARGUMENT),
])
async def test_upstream_errors_map_to_the_table(env: Env, command: str, status: int,
                                                code: grpc.StatusCode) -> None:
    with pytest.raises(openai.APIStatusError) as exc:
        await ask_rest(env, user(command), False)
    assert exc.value.status_code == status
    with pytest.raises(grpc.aio.AioRpcError) as rpc:
        await ask_grpc(env, user(command), True)
    assert rpc.value.code() == code


async def test_midstream_error_is_an_error_event(env: Env) -> None:
    async with aiohttp.ClientSession() as http, http.post(
            env.stack.http_url + "/v1/chat/completions", headers={"authorization": f"Bearer {TEST_KEY}"},
            json={"model": MODEL, "stream": True,
                  "messages": user("ERROR midstream\nsome words then trouble")}) as r:
        events = [ln[6:] for ln in (await r.text()).split("\n") if ln.startswith("data: ")]
    assert "[DONE]" not in events
    assert "error" in json.loads(events[-1])
    assert not any(c.get("choices") and c["choices"][0].get("finish_reason")
                   for c in map(json.loads, events[:-1]))
    with pytest.raises(grpc.aio.AioRpcError) as rpc:
        await ask_grpc(env, user("ERROR midstream\nsome words then trouble"), True)
    assert rpc.value.code() == grpc.StatusCode.UNAVAILABLE
