"""The Ollama native provider (core/providers/ollama.py) and its fake upstream.

1. The official `ollama` SDK parses the fake's replies and streams: the fake is faithful.
2. Table-driven tests of the pure translate functions, including the request the real
   server rejects (tool-call arguments as a string) and proof that ours never sends it.
3. End to end through the real gateway in-process (REST with the `openai` SDK, gRPC
   with the generated stubs) against an ollama channel pointing at the fake.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import grpc
import ollama
import openai
import orjson
import pytest
from aiohttp import web
from google.protobuf import json_format

from switchboard.core.config import ChannelConfig
from switchboard.core.providers.base import HttpPool, UpstreamError
from switchboard.core.providers.ollama import (
    OllamaClient,
    Options,
    StreamTranslator,
    params_to_wire,
    response_from_wire,
)
from switchboard.facade.openai_json import parse_chat
from switchboard.v1 import inference_pb2 as pb
from tests.fakes.ollama_upstream import FakeOllama
from tests.harness import AUTH, TEST_KEY, Stack, channel_yaml, make_config, running_stack

PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGA"
                       "hKmMIQAAAABJRU5ErkJggg==")
PNG_B64 = base64.b64encode(PNG).decode()
PNG_URL = f"data:image/png;base64,{PNG_B64}"
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeOllama, str]]:
    f = FakeOllama()
    url = await f.start()
    yield f, url
    await f.close()


# =============================================== 1. the fake vs the official SDK ====


async def test_sdk_plain_reply(fake: tuple[FakeOllama, str]) -> None:
    f, url = fake
    client = ollama.AsyncClient(host=url)
    r = await client.chat(model="llama3", messages=[{"role": "user", "content": "hello"}],
                          stream=False)
    assert r.message.role == "assistant" and r.message.content == "You said: hello"
    assert r.done and r.done_reason == "stop"
    assert (r.prompt_eval_count, r.eval_count) == (11, 7)
    assert r.total_duration and r.eval_duration and r.created_at
    assert f.requests[0]["stream"] is False


async def test_sdk_stream_text_thinking_and_options(fake: tuple[FakeOllama, str]) -> None:
    f, url = fake
    client = ollama.AsyncClient(host=url)
    parts = [p async for p in await client.chat(
        model="llama3", messages=[{"role": "user", "content": "THINK deep thought\nhello world"}],
        stream=True, think=True, options={"temperature": 0.2, "stop": ["zzz"]})]
    assert [p.done for p in parts].count(True) == 1 and parts[-1].done
    assert parts[-1].done_reason == "stop" and parts[-1].eval_count == 7
    thinking = "".join(p.message.thinking or "" for p in parts)
    content = "".join(p.message.content or "" for p in parts)
    assert thinking == "deep thought"
    assert content == "You said: THINK deep thought\nhello world"
    assert sum(1 for p in parts if p.message.content) >= 2  # word-sized deltas
    assert f.requests[0]["think"] is True and f.requests[0]["options"]["temperature"] == 0.2


async def test_sdk_tool_calls_whole_and_streamed(fake: tuple[FakeOllama, str]) -> None:
    _, url = fake
    client = ollama.AsyncClient(host=url)
    msgs = [{"role": "user", "content": 'TOOL get_weather {"city": "Paris"}\nTOOL get_time {}'}]
    r = await client.chat(model="llama3", messages=msgs, tools=[WEATHER_TOOL, TIME_TOOL],
                          stream=False)
    calls = r.message.tool_calls or []
    assert [(c.function.name, dict(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {})]
    parts = [p async for p in await client.chat(model="llama3", messages=msgs,
                                                 tools=[WEATHER_TOOL, TIME_TOOL], stream=True)]
    streamed = [c.function.name for p in parts for c in (p.message.tool_calls or [])]
    assert streamed == ["get_weather", "get_time"]
    # the SDK itself can send the tool result back, arguments as an object
    follow: list[Any] = [*msgs, {"role": "assistant", "content": "", "tool_calls": calls},
                         {"role": "tool", "content": "22C", "tool_name": "get_weather"}]
    r2 = await client.chat(model="llama3", messages=follow, stream=False)
    assert r2.message.content == "Tool said: 22C"


async def test_sdk_image_input(fake: tuple[FakeOllama, str]) -> None:
    _, url = fake
    client = ollama.AsyncClient(host=url)
    r = await client.chat(model="llava", messages=[{"role": "user", "content": "look",
                                                    "images": [PNG]}], stream=False)
    assert r.message.content == f"You said: look [image: base64 image/png {len(PNG)} bytes]"


async def test_sdk_json_format(fake: tuple[FakeOllama, str]) -> None:
    _, url = fake
    client = ollama.AsyncClient(host=url)
    r = await client.chat(model="llama3", messages=[{"role": "user", "content": "hi"}],
                          format="json", stream=False)
    assert json.loads(r.message.content or "") == {"said": "hi"}


@pytest.mark.parametrize("status", [404, 400, 500, 503])
async def test_sdk_sees_real_error_shapes(fake: tuple[FakeOllama, str], status: int) -> None:
    _, url = fake
    client = ollama.AsyncClient(host=url)
    with pytest.raises(ollama.ResponseError) as exc:
        await client.chat(model="llama3", messages=[{"role": "user", "content": f"ERROR {status}"}],
                          stream=False)
    assert exc.value.status_code == status
    if status == 404:
        assert exc.value.error == 'model "llama3" not found, try pulling it first'


async def test_sdk_midstream_error(fake: tuple[FakeOllama, str]) -> None:
    _, url = fake
    client = ollama.AsyncClient(host=url)
    got: list[str] = []
    with pytest.raises(ollama.ResponseError) as exc:
        async for p in await client.chat(
                model="llama3", messages=[{"role": "user", "content": "ERROR midstream\nsay more"}],
                stream=True):
            got.append(p.message.content or "")
    assert len(got) == 2 and "fake midstream failure" in exc.value.error


async def test_fake_streams_ndjson_by_default_and_rejects_string_arguments(
        fake: tuple[FakeOllama, str]) -> None:
    _, url = fake
    async with aiohttp.ClientSession() as s:
        # no "stream" field: the real server streams NDJSON
        async with s.post(f"{url}/api/chat", json={
                "model": "llama3", "messages": [{"role": "user", "content": "hi there"}]}) as r:
            assert r.headers["content-type"].startswith("application/x-ndjson")
            lines = [json.loads(x) for x in (await r.text()).splitlines()]
        assert lines[-1]["done"] is True and all(not x["done"] for x in lines[:-1])
        assert lines[-1]["prompt_eval_count"] == 11 and lines[-1]["eval_duration"] > 1000
        bad = {"model": "llama3", "stream": False, "messages": [
            {"role": "user", "content": "x"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "content": "22C"}]}
        async with s.post(f"{url}/api/chat", json=bad) as r:
            assert r.status == 400
            assert "cannot unmarshal string" in (await r.json())["error"]
        # a data: URL where bare base64 belongs is refused too
        async with s.post(f"{url}/api/chat", json={"model": "llava", "stream": False, "messages": [
                {"role": "user", "content": "x", "images": [PNG_URL]}]}) as r:
            assert r.status == 400 and "base64" in (await r.json())["error"]


# ================================================ 2. pure translate functions ====


def wire(body: dict[str, Any], *, stream: bool = False, **kw: Any) -> dict[str, Any]:
    params, _ = parse_chat({"model": "public-name", **body})
    if "channel_options" in kw:  # as the config validates a channel's options
        kw["channel_options"] = Options.model_validate(kw["channel_options"])
    return params_to_wire(params, "llama3", stream=stream, **kw)


TOOL_TURN: list[dict[str, Any]] = [
    {"role": "user", "content": "weather?"},
    {"role": "assistant", "content": None, "reasoning_content": "need a tool",
     "tool_calls": [{"id": "call_a", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris", "n": 5}'}},
                    {"id": "call_b", "type": "function",
                     "function": {"name": "get_time", "arguments": ""}}]},
    {"role": "tool", "tool_call_id": "call_b", "content": "noon"},
    {"role": "tool", "tool_call_id": "call_a", "content": "22C"},
]

REQUEST_CASES: list[tuple[str, dict[str, Any], dict[str, Any], dict[str, Any]]] = [
    ("roles", {"messages": [{"role": "developer", "content": "be brief"},
                            {"role": "system", "content": "sys"},
                            {"role": "user", "content": "hi"},
                            {"role": "assistant", "content": "hello"}]}, {},
     {"messages": [{"role": "system", "content": "be brief"}, {"role": "system", "content": "sys"},
                   {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
      "stream": False}),
    ("text parts joined", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "one"}, {"type": "text", "text": "two"}]}]}, {},
     {"messages": [{"role": "user", "content": "one\ntwo"}]}),
    ("data url image -> bare base64", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": PNG_URL}}]}]}, {},
     {"messages": [{"role": "user", "content": "look", "images": [PNG_B64]}]}),
    ("non-base64 data url", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:text/plain,hi%20there"}}]}]}, {},
     {"messages": [{"role": "user", "content": "",
                    "images": [base64.b64encode(b"hi there").decode()]}]}),
    ("tool calls: object arguments, tool_name, thinking", {"messages": TOOL_TURN}, {},
     {"messages": [
         {"role": "user", "content": "weather?"},
         {"role": "assistant", "content": "", "thinking": "need a tool", "tool_calls": [
             {"function": {"name": "get_weather", "arguments": {"city": "Paris", "n": 5}}},
             {"function": {"name": "get_time", "arguments": {}}}]},
         {"role": "tool", "content": "noon", "tool_name": "get_time"},
         {"role": "tool", "content": "22C", "tool_name": "get_weather"}]}),
    ("tools, no parameters gets an empty schema", {"messages": [{"role": "user", "content": "x"}],
                                                   "tools": [WEATHER_TOOL, {"type": "function", "function": {"name": "noop", "strict": True}}]},
     {}, {"tools": [WEATHER_TOOL, {"type": "function", "function": {
         "name": "noop", "parameters": {"type": "object", "properties": {}}}}]}),
    ("tool_choice none sends no tools", {"messages": [{"role": "user", "content": "x"}],
                                         "tools": [WEATHER_TOOL], "tool_choice": "none"}, {},
     {"tools": None}),
    ("tool_choice named narrows tools", {"messages": [{"role": "user", "content": "x"}],
                                         "tools": [WEATHER_TOOL, TIME_TOOL],
                                         "tool_choice": {"type": "function", "function": {"name": "get_time"}}},
     {}, {"tools": [TIME_TOOL]}),
    ("json_object -> format json", {"messages": [{"role": "user", "content": "x"}],
                                    "response_format": {"type": "json_object"}}, {}, {"format": "json"}),
    ("json_schema -> format schema", {"messages": [{"role": "user", "content": "x"}],
                                      "response_format": {"type": "json_schema", "json_schema": {
                                          "name": "s", "schema": {"type": "object", "properties": {"a": {"type": "integer"}}}}}},
     {}, {"format": {"type": "object", "properties": {"a": {"type": "integer"}}}}),
    ("text format sends none", {"messages": [{"role": "user", "content": "x"}],
                                "response_format": {"type": "text"}}, {}, {"format": None}),
    ("options", {"messages": [{"role": "user", "content": "x"}], "temperature": 0.5, "top_p": 0.9,
                 "max_tokens": 50, "stop": "END", "seed": 7, "presence_penalty": 0.1,
                 "frequency_penalty": 0.2}, {},
     {"options": {"temperature": 0.5, "top_p": 0.9, "num_predict": 50, "stop": ["END"], "seed": 7,
                  "presence_penalty": 0.1, "frequency_penalty": 0.2}}),
    ("max_completion_tokens wins", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 50,
                                    "max_completion_tokens": 20}, {}, {"options": {"num_predict": 20}}),
    ("no options object when none given", {"messages": [{"role": "user", "content": "x"}]}, {},
     {"options": None, "think": None, "format": None, "tools": None}),
    ("reasoning none -> think false", {"messages": [{"role": "user", "content": "x"}],
                                       "reasoning_effort": "none"}, {}, {"think": False}),
    ("reasoning high -> think true", {"messages": [{"role": "user", "content": "x"}],
                                      "reasoning_effort": "high"}, {}, {"think": True}),
    ("think levels channel option", {"messages": [{"role": "user", "content": "x"}],
                                     "reasoning_effort": "minimal"},
     {"channel_options": {"think_levels": True}}, {"think": "low"}),
    ("extra ollama fields pass, others do not", {"messages": [{"role": "user", "content": "x"}],
                                                 "temperature": 0.3, "keep_alive": "10m",
                                                 "options": {"num_ctx": 8192, "temperature": 1.5},
                                                 "some_openai_thing": True}, {},
     {"keep_alive": "10m", "options": {"num_ctx": 8192, "temperature": 0.3},
      "some_openai_thing": None}),
    ("channel defaults", {"messages": [{"role": "user", "content": "x"}]},
     {"channel_options": {"keep_alive": -1, "options": {"num_ctx": 4096}}},
     {"keep_alive": -1, "options": {"num_ctx": 4096}}),
    ("stream always explicit", {"messages": [{"role": "user", "content": "x"}]}, {"stream": True},
     {"stream": True, "model": "llama3"}),
]


@pytest.mark.parametrize(("body", "kw", "expect"), [c[1:] for c in REQUEST_CASES],
                         ids=[c[0] for c in REQUEST_CASES])
def test_params_to_wire(body: dict[str, Any], kw: dict[str, Any], expect: dict[str, Any]) -> None:
    out = wire(body, **kw)
    for key, value in expect.items():
        assert out.get(key) == value, key
    assert isinstance(out["stream"], bool)


REJECT_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("n > 1", {"messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
    ("https image url", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "look"},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]},
     "messages[0].content[1].image_url.url"),
    ("arguments not JSON", {"messages": [
        {"role": "user", "content": "x"},
        {"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                              "function": {"name": "f", "arguments": "{city: Paris"}}]}]},
     "messages[1].tool_calls[0].function.arguments"),
    ("arguments JSON but not an object", {"messages": [
        {"role": "user", "content": "x"},
        {"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                              "function": {"name": "f", "arguments": "[1, 2]"}}]}]},
     "messages[1].tool_calls[0].function.arguments"),
    ("audio input", {"messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]},
     "messages[0].content[0]"),
    ("tool_choice names a missing tool", {"messages": [{"role": "user", "content": "x"}],
                                          "tools": [WEATHER_TOOL],
                                          "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
]


@pytest.mark.parametrize(("body", "param"), [c[1:] for c in REJECT_CASES],
                         ids=[c[0] for c in REJECT_CASES])
def test_params_to_wire_rejects(body: dict[str, Any], param: str) -> None:
    with pytest.raises(UpstreamError) as exc:
        wire(body)
    assert exc.value.param == param and exc.value.status == 400
    assert not exc.value.retryable


async def test_ours_never_sends_what_the_real_server_rejects(fake: tuple[FakeOllama, str]) -> None:
    """The OpenAI-style turn (arguments as JSON text) naively relayed is a 400 at Ollama;
    our translation of the same turn is accepted."""
    _, url = fake
    naive = {"model": "llama3", "stream": False, "messages": [
        {"role": m["role"], "content": m.get("content") or "",
         **({"tool_calls": [{"function": tc["function"]} for tc in m["tool_calls"]]}
            if m.get("tool_calls") else {})} for m in TOOL_TURN]}
    ours = wire({"messages": TOOL_TURN})
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{url}/api/chat", json=naive) as r:
            assert r.status == 400
        async with s.post(f"{url}/api/chat", data=orjson.dumps(ours)) as r:
            assert r.status == 200
            assert (await r.json())["message"]["content"] == "Tool said: 22C"


RESPONSE_CASES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("plain", {"model": "llama3", "created_at": "2024-01-01T00:00:00.123456789Z",
               "message": {"role": "assistant", "content": "hi"}, "done": True, "done_reason": "stop",
               "prompt_eval_count": 11, "eval_count": 7},
     {"content": "hi", "finish": pb.FINISH_REASON_STOP, "usage": (11, 7, 18), "created": 1704067200,
      "model": "llama3"}),
    ("length", {"message": {"role": "assistant", "content": "cut"}, "done": True,
                "done_reason": "length", "eval_count": 3},
     {"content": "cut", "finish": pb.FINISH_REASON_LENGTH, "usage": (0, 3, 3)}),
    ("thinking", {"message": {"role": "assistant", "content": "42", "thinking": "hmm"}, "done": True,
                  "done_reason": "stop"},
     {"content": "42", "reasoning": "hmm", "finish": pb.FINISH_REASON_STOP}),
    ("tool calls", {"message": {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"index": 0, "name": "get_weather", "arguments": {"city": "Paris", "n": 5}}},
        {"function": {"index": 1, "name": "get_time", "arguments": {}}}]},
        "done": True, "done_reason": "stop"},
     {"content": None, "finish": pb.FINISH_REASON_TOOL_CALLS,
      "calls": [("get_weather", '{"city":"Paris","n":5}'), ("get_time", "{}")]}),
    ("upstream tool-call id kept", {"message": {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_xyz", "function": {"name": "f", "arguments": {}}}]}, "done": True},
     {"ids": ["call_xyz"]}),
]


@pytest.mark.parametrize(("data", "expect"), [c[1:] for c in RESPONSE_CASES],
                         ids=[c[0] for c in RESPONSE_CASES])
def test_response_from_wire(data: dict[str, Any], expect: dict[str, Any]) -> None:
    r = response_from_wire(data)
    m, ch = r.choices[0].message, r.choices[0]
    if "content" in expect:
        assert (m.content if m.HasField("content") else None) == expect["content"]
    if "reasoning" in expect:
        assert m.reasoning_content == expect["reasoning"]
    if "finish" in expect:
        assert ch.finish_reason == expect["finish"]
    if "usage" in expect:
        assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == expect["usage"]
    if "created" in expect:
        assert r.created == expect["created"]
    if "model" in expect:
        assert r.model == expect["model"]
    if "calls" in expect:
        assert [(t.function.name, t.function.arguments) for t in m.tool_calls] == expect["calls"]
        ids = [t.id for t in m.tool_calls]
        assert len(set(ids)) == len(ids) and all(i.startswith("call_") for i in ids)
        assert all(t.type == "function" for t in m.tool_calls)
    if "ids" in expect:
        assert [t.id for t in m.tool_calls] == expect["ids"]
    assert r.id.startswith("chatcmpl-")


def test_generated_tool_call_ids_are_unique_across_replies() -> None:
    data = {"message": {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "f", "arguments": {}}}]}, "done": True}
    assert response_from_wire(data).choices[0].message.tool_calls[0].id != \
        response_from_wire(data).choices[0].message.tool_calls[0].id


def test_response_error_object_raises() -> None:
    with pytest.raises(UpstreamError):
        response_from_wire({"error": "model runner crashed"})


def test_stream_translator() -> None:
    tr = StreamTranslator("llama3")
    lines: list[dict[str, Any]] = [
        {"model": "llama3", "created_at": "2024-01-01T00:00:00Z",
         "message": {"role": "assistant", "content": "", "thinking": "hm"}, "done": False},
        {"message": {"role": "assistant", "content": ""}, "done": False},  # nothing to say
        {"message": {"role": "assistant", "content": "Hi "}, "done": False},
        {"message": {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "a", "arguments": {"x": 1}}}]}, "done": False},
        {"message": {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "b", "arguments": {}}}, {"function": {"name": "c", "arguments": {}}}]},
         "done": False},
        {"message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "stop",
         "prompt_eval_count": 11, "eval_count": 7, "total_duration": 5},
    ]
    chunks = [c for line in lines for c in tr.feed(line)]
    assert tr.done and len(chunks) == 5
    assert chunks[0].choices[0].delta.role == pb.ROLE_ASSISTANT
    assert all(c.choices[0].delta.role == pb.ROLE_UNSPECIFIED for c in chunks[1:])
    assert chunks[0].choices[0].delta.reasoning_content == "hm" and chunks[0].created == 1704067200
    assert chunks[1].choices[0].delta.content == "Hi "
    calls = [t for c in chunks for t in c.choices[0].delta.tool_calls]
    assert [(t.index, t.function.name, t.function.arguments) for t in calls] == [
        (0, "a", '{"x":1}'), (1, "b", "{}"), (2, "c", "{}")]
    assert len({t.id for t in calls}) == 3
    last = chunks[-1]
    assert last.choices[0].finish_reason == pb.FINISH_REASON_TOOL_CALLS
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (11, 7, 18)
    assert all(not c.HasField("usage") for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1
    assert tr.feed({"message": {"content": "late"}, "done": False}) == []


def test_stream_translator_error_line() -> None:
    tr = StreamTranslator("llama3")
    tr.feed({"message": {"role": "assistant", "content": "a"}, "done": False})
    with pytest.raises(UpstreamError) as exc:
        tr.feed({"error": "an error was encountered while running the model"})
    assert exc.value.kind == "stream" and "running the model" in exc.value.message


async def test_client_stream_without_done_line_is_an_error() -> None:
    """A server that closes the NDJSON stream before `done: true` cut the reply."""
    async def cut(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "application/x-ndjson"})
        await resp.prepare(request)
        await resp.write(b'{"model":"m","created_at":"2024-01-01T00:00:00Z",'
                         b'"message":{"role":"assistant","content":"Hel"},"done":false}\n')
        return resp

    app = web.Application()
    app.router.add_post("/api/chat", cut)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    http = HttpPool()
    client = OllamaClient(ChannelConfig(name="c", provider="ollama",
                                        base_url=f"http://127.0.0.1:{port}", models={"m": "m"}), http)
    params, _ = parse_chat({"model": "m", "messages": [{"role": "user", "content": "x"}]})
    got: list[pb.StreamChatCompletionResponse] = []
    try:
        with pytest.raises(UpstreamError) as exc:
            async for chunk in client.stream(params, "m"):
                got.append(chunk)
        assert exc.value.kind == "stream" and exc.value.retryable
        assert len(got) == 1 and got[0].choices[0].delta.content == "Hel"
    finally:
        await http.close()
        await runner.cleanup()


# ========================================= 3. end to end through the gateway ====


@pytest.fixture
async def stack(fake: tuple[FakeOllama, str]) -> AsyncIterator[Stack]:
    _, url = fake
    cfg = make_config("channels:\n" + channel_yaml("local", "ollama", url, ["llama3"]))
    async with running_stack(cfg) as s:
        yield s


@dataclass
class Reply:
    content: str | None = None
    reasoning: str | None = None
    calls: list[tuple[int, str, str, str]] = field(default_factory=list)  # index, id, name, args
    finish: str = ""
    usage: tuple[int, int, int] | None = None
    deltas: int = 0


def to_proto(body: dict[str, Any]) -> pb.ChatCompletionParams:
    """OpenAI-style test input → proto JSON, written independently of the façade."""
    roles = {"system": "ROLE_SYSTEM", "developer": "ROLE_DEVELOPER", "user": "ROLE_USER",
             "assistant": "ROLE_ASSISTANT", "tool": "ROLE_TOOL"}
    msgs = []
    for m in body["messages"]:
        pm: dict[str, Any] = {"role": roles[m["role"]]}
        c = m.get("content")
        if isinstance(c, str):
            pm["text"] = c
        elif isinstance(c, list):
            pm["parts"] = {"parts": [{"text": p["text"]} if p["type"] == "text"
                                     else {"imageUrl": {"url": p["image_url"]["url"]}} for p in c]}
        if m.get("tool_calls"):
            pm["toolCalls"] = m["tool_calls"]
        if m.get("tool_call_id"):
            pm["toolCallId"] = m["tool_call_id"]
        msgs.append(pm)
    d: dict[str, Any] = {"model": body.get("model", "llama3"), "messages": msgs}
    if body.get("tools"):
        d["tools"] = [{"type": "function", "function": {
            "name": t["function"]["name"],
            "parametersJson": json.dumps(t["function"].get("parameters", {}))}} for t in body["tools"]]
    if "stop" in body:
        d["stop"] = [body["stop"]] if isinstance(body["stop"], str) else body["stop"]
    for k in ("n", "temperature"):
        if k in body:
            d[k] = body[k]
    rf = (body.get("response_format") or {}).get("type")
    if rf == "json_object":
        d["responseFormat"] = {"jsonObject": {}}
    return json_format.ParseDict(d, pb.ChatCompletionParams())


FINISH_NAMES = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length",
                pb.FINISH_REASON_TOOL_CALLS: "tool_calls", pb.FINISH_REASON_UNSPECIFIED: ""}


async def call_rest(stack: Stack, body: dict[str, Any], stream: bool) -> Reply:
    client = openai.AsyncOpenAI(base_url=stack.base_url, api_key=TEST_KEY, max_retries=0)
    kw = {"model": "llama3", **body}
    try:
        if not stream:
            r = await client.chat.completions.create(**kw)
            m = r.choices[0].message
            return Reply(content=m.content, reasoning=getattr(m, "reasoning_content", None),
                         calls=[(i, t.id, t.function.name, t.function.arguments)
                                for i, t in enumerate(m.tool_calls or [])],
                         finish=r.choices[0].finish_reason,
                         usage=(r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens)
                         if r.usage else None)
        out = Reply(content="", reasoning="")
        calls: dict[int, list[Any]] = {}
        async for chunk in await client.chat.completions.create(
                **kw, stream=True, stream_options={"include_usage": True}):
            if chunk.usage:
                out.usage = (chunk.usage.prompt_tokens, chunk.usage.completion_tokens,
                             chunk.usage.total_tokens)
            for c in chunk.choices:
                if c.delta.content:
                    out.content = (out.content or "") + c.delta.content
                    out.deltas += 1
                rc = getattr(c.delta, "reasoning_content", None)
                if rc:
                    out.reasoning = (out.reasoning or "") + rc
                for t in c.delta.tool_calls or []:
                    cur = calls.setdefault(t.index, [t.index, "", "", ""])
                    cur[1] += t.id or ""
                    cur[2] += (t.function.name or "") if t.function else ""
                    cur[3] += (t.function.arguments or "") if t.function else ""
                if c.finish_reason:
                    out.finish = c.finish_reason
        out.calls = [(v[0], v[1], v[2], v[3]) for _, v in sorted(calls.items())]
        return out
    finally:
        await client.close()


async def call_grpc(stack: Stack, body: dict[str, Any], stream: bool) -> Reply:
    p = to_proto(body)
    if not stream:
        r = await stack.stub.CreateChatCompletion(pb.CreateChatCompletionRequest(params=p), metadata=AUTH)
        m = r.choices[0].message
        return Reply(content=m.content if m.HasField("content") else None,
                     reasoning=m.reasoning_content if m.HasField("reasoning_content") else None,
                     calls=[(i, t.id, t.function.name, t.function.arguments)
                            for i, t in enumerate(m.tool_calls)],
                     finish=FINISH_NAMES[r.choices[0].finish_reason],
                     usage=(r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens))
    out = Reply(content="", reasoning="")
    calls: dict[int, list[Any]] = {}
    async for chunk in stack.stub.StreamChatCompletion(pb.StreamChatCompletionRequest(params=p),
                                                       metadata=AUTH):
        if chunk.HasField("usage"):
            out.usage = (chunk.usage.prompt_tokens, chunk.usage.completion_tokens,
                         chunk.usage.total_tokens)
        for c in chunk.choices:
            if c.delta.content:
                out.content = (out.content or "") + c.delta.content
                out.deltas += 1
            if c.delta.reasoning_content:
                out.reasoning = (out.reasoning or "") + c.delta.reasoning_content
            for t in c.delta.tool_calls:
                cur = calls.setdefault(t.index, [t.index, "", "", ""])
                cur[1] += t.id
                cur[2] += t.function.name
                cur[3] += t.function.arguments
            if c.finish_reason:
                out.finish = FINISH_NAMES[c.finish_reason]
    out.calls = [(v[0], v[1], v[2], v[3]) for _, v in sorted(calls.items())]
    return out


SURFACES = {"rest": call_rest, "grpc": call_grpc}
MODES = [(s, st) for s in SURFACES for st in (False, True)]
MODE_IDS = [f"{s}-{'stream' if st else 'unary'}" for s, st in MODES]


async def call(stack: Stack, surface: str, body: dict[str, Any], stream: bool) -> Reply:
    return await SURFACES[surface](stack, body, stream)


@pytest.mark.parametrize(("surface", "stream"), MODES, ids=MODE_IDS)
async def test_e2e_plain(stack: Stack, fake: tuple[FakeOllama, str], surface: str, stream: bool) -> None:
    f, _ = fake
    r = await call(stack, surface, {"messages": [{"role": "developer", "content": "be brief"},
                                                 {"role": "user", "content": "hello there friend"}]},
                   stream)
    assert r.content == "You said: hello there friend"
    assert r.finish == "stop" and not r.calls
    assert r.usage == (f.USAGE["prompt_tokens"], f.USAGE["completion_tokens"],
                       f.USAGE["prompt_tokens"] + f.USAGE["completion_tokens"])
    if stream:
        assert r.deltas >= 2
    sent = f.requests[-1]
    assert sent["stream"] is stream and sent["model"] == "llama3"
    assert [m["role"] for m in sent["messages"]] == ["system", "user"]
    assert f.headers[-1]["authorization"] == "Bearer upstream-secret-local"


@pytest.mark.parametrize(("surface", "stream"), MODES, ids=MODE_IDS)
async def test_e2e_thinking(stack: Stack, surface: str, stream: bool) -> None:
    r = await call(stack, surface, {"messages": [{"role": "user", "content": "THINK weighing it\nhi"}]},
                   stream)
    assert r.reasoning == "weighing it"
    assert r.content == "You said: THINK weighing it\nhi"


@pytest.mark.parametrize(("surface", "stream"), MODES, ids=MODE_IDS)
async def test_e2e_tool_round_trip(stack: Stack, fake: tuple[FakeOllama, str], surface: str,
                                   stream: bool) -> None:
    f, _ = fake
    ask = [{"role": "user", "content": 'TOOL get_weather {"city": "Paris", "days": 3}'}]
    r = await call(stack, surface, {"messages": ask, "tools": [WEATHER_TOOL]}, stream)
    assert r.finish == "tool_calls" and len(r.calls) == 1
    _, call_id, name, args = r.calls[0]
    assert name == "get_weather" and json.loads(args) == {"city": "Paris", "days": 3}
    assert call_id.startswith("call_")
    assert f.requests[-1]["tools"][0]["function"]["name"] == "get_weather"
    follow = [
        *ask,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}]},
        {"role": "tool", "tool_call_id": call_id, "content": "22C and sunny"}]
    r2 = await call(stack, surface, {"messages": follow, "tools": [WEATHER_TOOL]}, stream)
    assert r2.content == "Tool said: 22C and sunny" and r2.finish == "stop"
    sent = f.requests[-1]["messages"]
    assert sent[1]["tool_calls"] == [{"function": {"name": "get_weather",
                                                   "arguments": {"city": "Paris", "days": 3}}}]
    assert sent[2] == {"role": "tool", "content": "22C and sunny", "tool_name": "get_weather"}


@pytest.mark.parametrize(("surface", "stream"), MODES, ids=MODE_IDS)
async def test_e2e_parallel_tool_calls(stack: Stack, surface: str, stream: bool) -> None:
    r = await call(stack, surface, {
        "messages": [{"role": "user", "content":
                      'TOOL get_weather {"city": "Paris"}\nTOOL get_weather {"city": "Oslo"}\nTOOL get_time {}'}],
        "tools": [WEATHER_TOOL, TIME_TOOL]}, stream)
    assert r.finish == "tool_calls"
    assert [(i, n, json.loads(a)) for i, _, n, a in r.calls] == [
        (0, "get_weather", {"city": "Paris"}), (1, "get_weather", {"city": "Oslo"}), (2, "get_time", {})]
    ids = [c[1] for c in r.calls]
    assert len(set(ids)) == 3 and all(ids)


@pytest.mark.parametrize(("surface", "stream"), MODES, ids=MODE_IDS)
async def test_e2e_image_data_url(stack: Stack, fake: tuple[FakeOllama, str], surface: str,
                                  stream: bool) -> None:
    f, _ = fake
    r = await call(stack, surface, {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this"},
        {"type": "image_url", "image_url": {"url": PNG_URL}}]}]}, stream)
    assert r.content == f"You said: what is this [image: base64 image/png {len(PNG)} bytes]"
    assert f.requests[-1]["messages"][0]["images"] == [PNG_B64]


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
async def test_e2e_https_image_is_a_clear_400(stack: Stack, fake: tuple[FakeOllama, str],
                                             stream: bool) -> None:
    f, _ = fake
    body = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this"},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]}
    with pytest.raises(openai.BadRequestError) as exc:
        await call_rest(stack, body, stream)
    err = exc.value.body
    assert isinstance(err, dict) and err["param"] == "messages[0].content[1].image_url.url"
    assert "data: URL" in err["message"]
    with pytest.raises(grpc.aio.AioRpcError) as gexc:
        await call_grpc(stack, body, stream)
    assert gexc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not f.requests  # nothing was sent upstream, and nothing was fetched


@pytest.mark.parametrize(("surface", "stream"), MODES, ids=MODE_IDS)
async def test_e2e_stop_sequences(stack: Stack, fake: tuple[FakeOllama, str], surface: str,
                                  stream: bool) -> None:
    f, _ = fake
    r = await call(stack, surface, {"messages": [{"role": "user", "content": "alpha beta gamma"}],
                                    "stop": ["gamma", "zeta"]}, stream)
    assert r.content == "You said: alpha beta " and r.finish == "stop"
    assert f.requests[-1]["options"]["stop"] == ["gamma", "zeta"]


@pytest.mark.parametrize(("surface", "stream"), MODES, ids=MODE_IDS)
async def test_e2e_json_mode(stack: Stack, fake: tuple[FakeOllama, str], surface: str,
                             stream: bool) -> None:
    f, _ = fake
    r = await call(stack, surface, {"messages": [{"role": "user", "content": "hello"}],
                                    "response_format": {"type": "json_object"}}, stream)
    assert json.loads(r.content or "") == {"said": "hello"}
    assert f.requests[-1]["format"] == "json"


async def test_e2e_json_schema_over_rest(stack: Stack, fake: tuple[FakeOllama, str]) -> None:
    f, _ = fake
    schema = {"type": "object", "properties": {"said": {"type": "string"}}, "required": ["said"]}
    r = await call_rest(stack, {"messages": [{"role": "user", "content": "yo"}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "echo", "schema": schema}}}, False)
    assert json.loads(r.content or "") == {"said": "yo"}
    assert f.requests[-1]["format"] == schema


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
async def test_e2e_n_above_one_is_rejected(stack: Stack, stream: bool) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "n": 2}
    with pytest.raises(openai.BadRequestError) as exc:
        await call_rest(stack, body, stream)
    assert isinstance(exc.value.body, dict) and exc.value.body["param"] == "n"
    with pytest.raises(grpc.aio.AioRpcError) as gexc:
        await call_grpc(stack, body, stream)
    assert gexc.value.code() == grpc.StatusCode.INVALID_ARGUMENT


ERRORS = [(500, 502, grpc.StatusCode.UNAVAILABLE), (404, 404, grpc.StatusCode.NOT_FOUND),
          (400, 400, grpc.StatusCode.INVALID_ARGUMENT)]


@pytest.mark.parametrize(("upstream", "http", "code"), ERRORS, ids=[str(e[0]) for e in ERRORS])
@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
async def test_e2e_error_mapping(stack: Stack, upstream: int, http: int, code: grpc.StatusCode,
                                 stream: bool) -> None:
    body = {"messages": [{"role": "user", "content": f"ERROR {upstream}"}]}
    with pytest.raises(openai.APIStatusError) as exc:
        await call_rest(stack, body, stream)
    assert exc.value.status_code == http
    with pytest.raises(grpc.aio.AioRpcError) as gexc:
        await call_grpc(stack, body, stream)
    assert gexc.value.code() == code
    if upstream == 404:
        assert "not found" in (gexc.value.details() or "")


async def test_e2e_midstream_error_is_an_sse_error_event(stack: Stack) -> None:
    body = {"model": "llama3", "stream": True,
            "messages": [{"role": "user", "content": "ERROR midstream\nthen more words"}]}
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{stack.base_url}/chat/completions", json=body,
                          headers={"authorization": f"Bearer {TEST_KEY}"}) as r:
            assert r.status == 200
            events = [ln[6:] for ln in (await r.text()).splitlines() if ln.startswith("data: ")]
    assert b"[DONE]" not in [e.encode() for e in events]
    last = json.loads(events[-1])
    assert "error" in last and last["error"]["code"] == "upstream_error"
    texts = [json.loads(e)["choices"][0]["delta"].get("content") for e in events[:-1]]
    assert "".join(t or "" for t in texts) == "You said: "  # the two deltas before the failure
    # the openai SDK surfaces the same event as an error, not a normal end
    with pytest.raises(openai.APIError):
        await call_rest(stack, {"messages": body["messages"]}, True)


async def test_e2e_midstream_error_over_grpc(stack: Stack) -> None:
    got: list[pb.StreamChatCompletionResponse] = []
    p = to_proto({"messages": [{"role": "user", "content": "ERROR midstream\nthen more"}]})
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        async for chunk in stack.stub.StreamChatCompletion(pb.StreamChatCompletionRequest(params=p),
                                                           metadata=AUTH):
            got.append(chunk)
    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(got) == 2 and not any(c.choices and c.choices[0].finish_reason for c in got)


async def test_e2e_usage_is_recorded_as_the_upstream_reported(stack: Stack,
                                                             fake: tuple[FakeOllama, str]) -> None:
    f, _ = fake
    await call_rest(stack, {"messages": [{"role": "user", "content": "count me"}]}, True)
    await call_grpc(stack, {"messages": [{"role": "user", "content": "count me"}]}, False)
    records = list(stack.usage.records)
    assert [(r.surface, r.stream, r.channel, r.status) for r in records] == [
        ("rest", True, "local", "OK"), ("grpc", False, "local", "OK")]
    for rec in records:
        assert (rec.prompt_tokens, rec.completion_tokens) == (f.USAGE["prompt_tokens"],
                                                              f.USAGE["completion_tokens"])
        assert not rec.estimated


async def test_e2e_split_deployment(fake: tuple[FakeOllama, str]) -> None:
    """Façade and core as two runtimes (façade → real gRPC → core → Ollama)."""
    f, url = fake
    cfg = make_config("channels:\n" + channel_yaml("local", "ollama", url, ["llama3"]))
    async with running_stack(cfg, split=True) as s:
        r = await call_rest(s, {"messages": [{"role": "user", "content": "hello split"}]}, True)
        assert r.content == "You said: hello split" and r.usage == (11, 7, 18)
        t = await call_rest(s, {"messages": [{"role": "user", "content": 'TOOL get_time {"tz": "UTC"}'}],
                                "tools": [TIME_TOOL]}, False)
        assert [(n, json.loads(a)) for _, _, n, a in t.calls] == [("get_time", {"tz": "UTC"})]
    assert [r["stream"] for r in f.requests] == [True, False]


async def test_e2e_upstream_429_is_a_rate_limit_with_retry_after(fake: tuple[FakeOllama, str]) -> None:
    f, url = fake
    cfg = make_config("router: {max_attempts: 1}\nchannels:\n"
                      + channel_yaml("local", "ollama", url, ["llama3"]))
    async with running_stack(cfg) as s:
        with pytest.raises(openai.RateLimitError) as exc:
            await call_rest(s, {"messages": [{"role": "user", "content": "ERROR 429"}]}, False)
        assert exc.value.response.headers.get("retry-after") == "1"
        with pytest.raises(grpc.aio.AioRpcError) as gexc:
            await call_grpc(s, {"messages": [{"role": "user", "content": "ERROR 429"}]}, True)
        assert gexc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(f.requests) == 2
