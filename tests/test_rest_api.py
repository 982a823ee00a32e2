"""The OpenAI REST surface end to end: the official `openai` SDK (async and sync) against
the real façade and core, an OpenAI-wire fake upstream behind them, and every reply
checked against the `openai` SDK's response types, strictly (tests/openapi.py). Runs in
both deployments (one process; façade and core apart over gRPC)."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest

from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import TEST_KEY, Stack, channel_yaml, make_config, running_stack
from tests.openapi import validate

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"], "additionalProperties": False}}}


@pytest.fixture(params=[False, True], ids=["one-process", "split"])
async def stack(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Stack, FakeOpenAI]]:
    fake = FakeOpenAI()
    url = await fake.start()
    cfg = make_config(f"""
channels:
{channel_yaml("oa", "openai", url, ["gpt-4o", "dall-e-3"])}
  - {{name: dead, provider: openai, base_url: "http://127.0.0.1:9", models: [dead-model],
      timeouts: {{connect: 1}}}}
  - {{name: echo, provider: echo, models: [slow-echo], options: {{delay_ms: 300}}}}
keys:
  - {{name: test, key: {TEST_KEY}}}
  - {{name: narrow, key: sk-narrow-key-000, models: ["gpt-4o-mini*"]}}
router: {{backoff_ms: 0}}
max_body_bytes: 200000
""")
    async with running_stack(cfg, split=request.param) as s:
        yield s, fake
    await fake.close()


def client(s: Stack, key: str = TEST_KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=s.base_url, api_key=key, max_retries=0)


async def raw_post(s: Stack, path: str, body: bytes | str, key: str | None = TEST_KEY,
                   headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    h = {"content-type": "application/json", **(headers or {})}
    if key is not None:
        h["authorization"] = f"Bearer {key}"
    async with aiohttp.ClientSession() as http, http.post(s.http_url + path, data=body,
                                                          headers=h) as r:
        return r.status, {k.lower(): v for k, v in r.headers.items()}, await r.json(content_type=None)


# ------------------------------------------------------------------ chat ----


async def test_chat_non_stream_matches_spec(stack: tuple[Stack, FakeOpenAI]) -> None:
    s, fake = stack
    status, headers, body = await raw_post(s, "/v1/chat/completions", json.dumps(
        {"model": "gpt-4o", "messages": [{"role": "system", "content": "be brief"},
                                         {"role": "user", "content": "hello"}],
         "temperature": 0.5, "seed": 7, "stop": "zzz", "some_future_field": {"a": 5}}))
    assert status == 200, body
    validate("CreateChatCompletionResponse", body)
    assert body["choices"][0]["message"]["content"] == "You said: hello"
    assert body["usage"]["prompt_tokens"] == fake.USAGE["prompt_tokens"]
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == fake.USAGE["cached_tokens"]
    assert headers["x-request-id"].startswith("req_")
    sent = fake.requests[-1]
    assert sent["stop"] == ["zzz"] and sent["seed"] == 7 and sent["temperature"] == 0.5
    # unknown fields reach OpenAI-compatible upstreams untouched (5 stays 5, not 5.0)
    assert sent["some_future_field"] == {"a": 5}
    assert fake.headers[-1]["authorization"] == "Bearer upstream-secret-oa"


async def test_chat_stream_chunks_match_spec_and_end_with_done(
        stack: tuple[Stack, FakeOpenAI]) -> None:
    s, fake = stack
    async with aiohttp.ClientSession() as http, http.post(
            s.http_url + "/v1/chat/completions",
            headers={"authorization": f"Bearer {TEST_KEY}"},
            json={"model": "gpt-4o", "stream": True, "stream_options": {"include_usage": True},
                  "messages": [{"role": "user", "content": "one two three"}]}) as r:
        assert r.status == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in (await r.text()).split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    for c in chunks:
        validate("CreateChatCompletionStreamResponse", c)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "You said: one two three"
    assert len([c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]) >= 3
    # usage comes once, last, in a chunk with no choices; every other chunk has usage null
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 7
    assert all(c["usage"] is None for c in chunks[:-1])
    # the gateway always asked the upstream for usage
    assert fake.requests[-1]["stream_options"] == {"include_usage": True}


async def test_stream_without_include_usage_sends_no_usage_chunk(
        stack: tuple[Stack, FakeOpenAI]) -> None:
    s, fake = stack
    c = client(s)
    chunks = [ch async for ch in await c.chat.completions.create(
        model="gpt-4o", stream=True, messages=[{"role": "user", "content": "hi there"}])]
    assert all(ch.choices for ch in chunks) and all(ch.usage is None for ch in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert fake.requests[-1]["stream_options"] == {"include_usage": True}
    # ...yet the usage record has the upstream's real figures
    rec = s.usage.records[-1]
    assert (rec.prompt_tokens, rec.completion_tokens, rec.stream) == (11, 7, True)


async def test_tool_call_round_trip_streamed(stack: tuple[Stack, FakeOpenAI]) -> None:
    s, fake = stack
    c = client(s)
    args = {"city": "Paris", "units": "metric"}
    messages: list[Any] = [{"role": "user", "content": f"TOOL get_weather {json.dumps(args)}\n"
                                                       f"TOOL get_time {json.dumps({'tz': 'CET'})}"}]
    calls: dict[int, dict[str, str]] = {}
    finish = None
    async for ch in await c.chat.completions.create(model="gpt-4o", messages=messages,
                                                    tools=[WEATHER_TOOL], stream=True):
        for d in ch.choices[0].delta.tool_calls or []:
            slot = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
            slot["id"] += d.id or ""
            slot["name"] += (d.function.name or "") if d.function else ""
            slot["arguments"] += (d.function.arguments or "") if d.function else ""
        finish = ch.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert [calls[i]["name"] for i in sorted(calls)] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["arguments"]) == args
    assert fake.requests[-1]["tools"][0]["function"]["parameters"] == WEATHER_TOOL["function"]["parameters"]
    # second turn: the tool result goes back and the model answers
    messages.append({"role": "assistant", "content": None, "tool_calls": [
        {"id": calls[i]["id"], "type": "function",
         "function": {"name": calls[i]["name"], "arguments": calls[i]["arguments"]}}
        for i in sorted(calls)]})
    messages.append({"role": "tool", "tool_call_id": calls[0]["id"], "content": "sunny, 21C"})
    r = await c.chat.completions.create(model="gpt-4o", messages=messages, tools=[WEATHER_TOOL])
    assert r.choices[0].message.content == "Tool said: sunny, 21C"
    sent = fake.requests[-1]["messages"]
    assert sent[1]["tool_calls"][0]["function"]["arguments"] == json.dumps(args)
    assert sent[2] == {"role": "tool", "tool_call_id": calls[0]["id"], "content": "sunny, 21C"}


async def test_tool_call_non_stream_and_tool_choice(stack: tuple[Stack, FakeOpenAI]) -> None:
    s, fake = stack
    r = await client(s).chat.completions.create(
        model="gpt-4o", tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        messages=[{"role": "user", "content": 'TOOL get_weather {"city": "Oslo"}'}])
    assert r.choices[0].finish_reason == "tool_calls"
    assert json.loads(r.choices[0].message.tool_calls[0].function.arguments) == {"city": "Oslo"}
    assert fake.requests[-1]["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}


async def test_image_parts_and_json_mode(stack: tuple[Stack, FakeOpenAI]) -> None:
    s, fake = stack
    png = base64.b64encode(b"\x89PNG fake image bytes").decode()
    r = await client(s).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": [
        {"type": "text", "text": "what is this"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}", "detail": "low"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}}]}])
    assert r.choices[0].message.content == ("You said: what is this [image: base64 image/png 21 bytes]"
                                            " [image: url https://example.com/cat.jpg]")
    assert fake.requests[-1]["messages"][0]["content"][1]["image_url"]["detail"] == "low"
    r = await client(s).chat.completions.create(
        model="gpt-4o", response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "ping"}])
    assert json.loads(r.choices[0].message.content or "") == {"said": "ping"}
    schema_fmt = {"type": "json_schema", "json_schema": {
        "name": "x", "strict": True, "schema": {"type": "object", "properties": {"said": {"type": "string"}}}}}
    await client(s).chat.completions.create(model="gpt-4o", response_format=schema_fmt,  # type: ignore[arg-type]
                                            messages=[{"role": "user", "content": "ping"}])
    assert fake.requests[-1]["response_format"] == schema_fmt


async def test_sync_sdk_works_too(stack: tuple[Stack, FakeOpenAI]) -> None:
    s, _ = stack

    def run() -> tuple[str, str]:
        sync = openai.OpenAI(base_url=s.base_url, api_key=TEST_KEY, max_retries=0)
        r = sync.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "sync"}])
        streamed = "".join(ch.choices[0].delta.content or "" for ch in sync.chat.completions.create(
            model="gpt-4o", stream=True, messages=[{"role": "user", "content": "sync stream"}]))
        return r.choices[0].message.content or "", streamed

    assert await asyncio.to_thread(run) == ("You said: sync", "You said: sync stream")


async def test_n_and_models_and_images(stack: tuple[Stack, FakeOpenAI]) -> None:
    s, _fake = stack
    c = client(s)
    r = await c.chat.completions.create(model="gpt-4o", n=2, messages=[{"role": "user", "content": "x"}])
    assert [ch.index for ch in r.choices] == [0, 1]
    status, _, _models = await raw_post(s, "/v1/models", b"", headers={})  # wrong method
    assert status == 405
    async with aiohttp.ClientSession(headers={"authorization": f"Bearer {TEST_KEY}"}) as http:
        async with http.get(s.http_url + "/v1/models") as resp:
            listing = await resp.json()
        async with http.get(s.http_url + "/v1/models/gpt-4o") as resp:
            one = await resp.json()
    validate("ListModelsResponse", listing)
    validate("Model", one)
    assert {m["id"] for m in listing["data"]} >= {"gpt-4o", "dall-e-3", "slow-echo"}
    assert one["owned_by"] == "openai"
    img = await c.images.generate(model="dall-e-3", prompt="a cat", n=2, response_format="b64_json")
    validate("ImagesResponse", img.model_dump(exclude_none=True))
    assert [d.b64_json for d in img.data or []] == ["aGVsbG8=", "aGVsbG8="]
    img = await c.images.generate(model="dall-e-3", prompt="a cat")
    assert (img.data or [])[0].url == "https://images.example/0.png"


# ---------------------------------------------------------------- errors ----


async def _error(s: Stack, body: Any, key: str | None = TEST_KEY, raw: bytes | None = None,
                 headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], dict[str, Any]]:
    status, h, payload = await raw_post(s, "/v1/chat/completions",
                                        raw if raw is not None else json.dumps(body), key, headers)
    validate("ErrorResponse", payload)
    assert h.get("x-request-id")
    return status, h, payload["error"]


MSG = [{"role": "user", "content": "hi"}]


async def test_error_messages_read_as_written(stack: tuple[Stack, FakeOpenAI]) -> None:
    """Issue 10 item 6: the redactor leaves our own `Bearer <key>` hint alone, and a 502
    names each failed channel once with an accurate connect error."""
    s, _ = stack
    st, _, e = await _error(s, {"model": "gpt-4o", "messages": MSG}, key=None)
    assert st == 401 and "Send it as `Authorization: Bearer <key>`." in e["message"], e
    st, _, e = await _error(s, {"model": "dead-model", "messages": MSG})
    assert st == 502, e
    assert e["message"].count("dead:") == 1, e  # once, however many attempts it had
    assert "cannot connect to 127.0.0.1:9: Connection refused" in e["message"], e
    assert "ssl:default" not in e["message"], e


async def test_error_table_rows(stack: tuple[Stack, FakeOpenAI]) -> None:
    s, _ = stack
    st, _, e = await _error(s, None, raw=b'{"model": "gpt-4o", "messages": [')
    assert (st, e["type"], e["code"]) == (400, "invalid_request_error", "invalid_json")
    st, _, e = await _error(s, {"model": "gpt-4o", "messages": MSG, "temperature": "hot"})
    assert (st, e["param"]) == (400, "temperature")
    st, _, e = await _error(s, {"model": "gpt-4o", "messages": [{"role": "wizard", "content": "x"}]})
    assert (st, e["param"]) == (400, "messages[0].role")
    st, _, e = await _error(s, {"model": "gpt-4o", "messages": MSG, "n": 0})
    assert (st, e["param"]) == (400, "n")
    st, _, e = await _error(s, {"model": "gpt-4o", "messages": MSG}, key=None)
    assert (st, e["code"]) == (401, "invalid_api_key")
    st, _, e = await _error(s, {"model": "gpt-4o", "messages": MSG}, key="sk-wrong-key-999")
    assert (st, e["code"]) == (401, "invalid_api_key") and "sk-wrong-key-999" not in e["message"]
    st, _, e = await _error(s, {"model": "gpt-4o", "messages": MSG}, key="sk-narrow-key-000")
    assert (st, e["code"]) == (403, "model_not_allowed")
    st, _, e = await _error(s, {"model": "no-such-model", "messages": MSG})
    assert (st, e["code"], e["param"]) == (404, "model_not_found", "model")
    assert "no-such-model" in e["message"]
    st, _, e = await _error(s, {"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * 300000}]})
    assert st == 413
    st, h, e = await _error(s, {"model": "gpt-4o", "messages": [{"role": "user", "content": "ERROR 429"}]})
    assert (st, e["code"]) == (429, "rate_limit_exceeded") and h["retry-after"] == "1"
    st, _, e = await _error(s, {"model": "dead-model", "messages": MSG})
    assert (st, e["type"]) == (502, "upstream_error") and "dead" in e["message"]
    assert "upstream-secret" not in e["message"]
    st, _, e = await _error(s, {"model": "gpt-4o", "messages": [{"role": "user", "content": "ERROR 400"}]})
    assert st == 400  # a client-caused upstream 4xx is not retried and not masked as 502
    st, _, e = await _error(s, {"model": "slow-echo", "stream": True, "messages": MSG},
                            headers={"x-switchboard-timeout": "0.1"})
    assert (st, e["type"]) == (504, "timeout")
    status, _, body = await raw_post(s, "/v1/nowhere", b"{}")
    assert status == 404 and body["error"]["type"] == "invalid_request_error"


async def test_internal_error_is_500_without_stack(stack: tuple[Stack, FakeOpenAI],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug in our code (simulated by a translate function that raises) must come out as
    a 500 naming the request id, with no exception text or stack."""
    s, _ = stack
    import switchboard.core.providers.openai as provider

    def broken(_: Any) -> Any:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(provider, "response_from_wire", broken)
    st, h, e = await _error(s, {"model": "gpt-4o", "messages": MSG})
    assert (st, e["type"]) == (500, "server_error")
    assert h["x-request-id"] in e["message"] and "secret internals" not in e["message"]


async def test_midstream_failure_is_an_error_event_not_done(stack: tuple[Stack, FakeOpenAI]) -> None:
    s, _ = stack
    async with aiohttp.ClientSession() as http, http.post(
            s.http_url + "/v1/chat/completions", headers={"authorization": f"Bearer {TEST_KEY}"},
            json={"model": "gpt-4o", "stream": True,
                  "messages": [{"role": "user", "content": "ERROR midstream\nsome words here"}]}) as r:
        assert r.status == 200
        events = [line[6:] for line in (await r.text()).split("\n") if line.startswith("data: ")]
    assert "[DONE]" not in events
    last = json.loads(events[-1])
    validate("ErrorResponse", last)
    assert last["error"]["type"] == "upstream_error"
    assert not any(json.loads(e)["choices"][0]["finish_reason"] for e in events[:-1])


async def test_client_disconnect_cancels_upstream(stack: tuple[Stack, FakeOpenAI]) -> None:
    s, fake = stack
    async with aiohttp.ClientSession() as http, http.post(
            s.http_url + "/v1/chat/completions", headers={"authorization": f"Bearer {TEST_KEY}"},
            json={"model": "gpt-4o", "stream": True,
                  "messages": [{"role": "user", "content": "SLOW 200\na b c d e f g h"}]}) as r:
        await r.content.readline()  # the first event arrived; now vanish
    for _ in range(100):
        if fake.disconnects:
            break
        await asyncio.sleep(0.01)
    assert fake.disconnects == 1
    await asyncio.sleep(0.05)
    assert s.usage.records[-1].status == "CANCELLED"
