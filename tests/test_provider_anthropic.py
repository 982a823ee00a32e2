"""The Anthropic Messages provider: the fake is faithful (the official `anthropic` SDK
parses it), the pure translate functions are right (tables, incl. the requests the
real API rejects), and the real gateway serves OpenAI clients from an Anthropic
channel over REST (the `openai` SDK) and gRPC (the stubs)."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import anthropic
import grpc
import openai
import pytest

from switchboard.core.providers.anthropic import (
    JSON_TOOL,
    Options,
    StreamTranslator,
    decode_tool_call_id,
    encode_tool_call_id,
    params_to_wire,
    response_from_wire,
)
from switchboard.core.providers.base import UpstreamError
from switchboard.facade.openai_json import parse_chat
from switchboard.v1 import inference_pb2 as pb
from tests.fakes.anthropic_upstream import FakeAnthropic, Invalid, signature_for, validate
from tests.harness import AUTH, TEST_KEY, Stack, channel_yaml, make_config, running_stack

PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGA"
                       "hKmMIQAAAABJRU5ErkJggg==")
PNG_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()
WEATHER_TOOL: dict[str, Any] = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}


def params(**body: Any) -> pb.ChatCompletionParams:
    """OpenAI JSON -> our params, through the façade's real parser."""
    p, _ = parse_chat({"model": "claude-test", **body})
    return p


def user(text: str) -> Any:
    return {"role": "user", "content": text}


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeAnthropic, str]]:
    f = FakeAnthropic()
    url = await f.start()
    yield f, url
    await f.close()


# ============================================================ the fake vs the SDK ====


async def test_sdk_parses_plain_reply(fake: tuple[FakeAnthropic, str]) -> None:
    _, url = fake
    async with anthropic.AsyncAnthropic(base_url=url, api_key="k", max_retries=0) as c:
        r = await c.messages.create(model="claude-x", max_tokens=64, messages=[user("hello")])
    assert r.content[0].type == "text" and r.content[0].text == "You said: hello"
    assert r.stop_reason == "end_turn"
    assert (r.usage.input_tokens, r.usage.cache_read_input_tokens, r.usage.output_tokens) == (8, 3, 7)


async def test_sdk_parses_text_stream(fake: tuple[FakeAnthropic, str]) -> None:
    _, url = fake
    async with anthropic.AsyncAnthropic(base_url=url, api_key="k", max_retries=0) as c:
        async with c.messages.stream(model="claude-x", max_tokens=64,
                                     messages=[user("one two three")]) as s:
            pieces = [t async for t in s.text_stream]
            final = await s.get_final_message()
    assert len(pieces) >= 2 and "".join(pieces) == "You said: one two three"
    assert final.content[0].text == "You said: one two three"  # type: ignore[union-attr]
    assert (final.usage.input_tokens, final.usage.output_tokens) == (8, 7)


async def test_sdk_parses_streamed_tool_calls(fake: tuple[FakeAnthropic, str]) -> None:
    _, url = fake
    text = 'TOOL get_weather {"city": "Paris"}\nTOOL get_time {"zone": "CET", "n": [1, 2]}'
    async with anthropic.AsyncAnthropic(base_url=url, api_key="k", max_retries=0) as c:
        async with c.messages.stream(model="claude-x", max_tokens=64, messages=[user(text)]) as s:
            deltas = [e async for e in s if e.type == "input_json"]
            final = await s.get_final_message()
    assert len(deltas) >= 4  # each call's input in at least two fragments
    calls = [(b.name, b.input) for b in final.content if b.type == "tool_use"]
    assert calls == [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET", "n": [1, 2]})]
    assert final.stop_reason == "tool_use"


async def test_sdk_parses_thinking_stream(fake: tuple[FakeAnthropic, str]) -> None:
    _, url = fake
    async with anthropic.AsyncAnthropic(base_url=url, api_key="k", max_retries=0) as c:
        async with c.messages.stream(model="claude-x", max_tokens=2048,
                                     thinking={"type": "enabled", "budget_tokens": 1024},
                                     messages=[user("THINK deep thought\nhi")]) as s:
            final = await s.get_final_message()
    thinking = final.content[0]
    assert thinking.type == "thinking" and thinking.thinking == "deep thought"
    assert thinking.signature == signature_for("deep thought")
    assert final.usage.output_tokens_details is not None
    assert final.usage.output_tokens_details.thinking_tokens == 5


async def test_sdk_sees_error_shapes(fake: tuple[FakeAnthropic, str]) -> None:
    _, url = fake
    async with anthropic.AsyncAnthropic(base_url=url, api_key="k", max_retries=0) as c:
        with pytest.raises(anthropic.APIStatusError) as over:
            await c.messages.create(model="claude-x", max_tokens=64, messages=[user("ERROR 529")])
        with pytest.raises(anthropic.RateLimitError) as limited:
            await c.messages.create(model="claude-x", max_tokens=64, messages=[user("ERROR 429")])
        got: list[str] = []
        with pytest.raises(anthropic.APIStatusError) as mid:
            async with c.messages.stream(model="claude-x", max_tokens=64,
                                         messages=[user("ERROR midstream")]) as s:
                async for t in s.text_stream:
                    got.append(t)
    assert over.value.status_code == 529
    assert over.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
    assert limited.value.response.headers["retry-after"] == "1"
    assert mid.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
    assert got == ["You ", "said: "]  # two deltas, then the error event


async def test_fake_rejects_what_the_real_api_rejects(fake: tuple[FakeAnthropic, str]) -> None:
    _, url = fake
    async with anthropic.AsyncAnthropic(base_url=url, api_key="k", max_retries=0) as c:
        with pytest.raises(anthropic.BadRequestError, match="alternate"):
            await c.messages.create(model="claude-x", max_tokens=64,
                                    messages=[user("a"), user("b")])
        with pytest.raises(anthropic.BadRequestError, match="Extra inputs"):
            await c.messages.create(model="claude-x", max_tokens=64, messages=[user("a")],
                                    extra_body={"n": 2})
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}/v1/messages", json={"model": "m", "messages": [user("a")]},
                             headers={"x-api-key": "k", "anthropic-version": "2023-06-01"}) as r:
            body = await r.json()
    assert r.status == 400 and body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in body["error"]["message"]


# ============================================================ request -> wire ====

SYSTEM_TEXT = "You are terse."
SIGNED = {"type": "thinking", "thinking": "need the tool", "signature": signature_for("need the tool")}
CARRIED_ID = encode_tool_call_id("toolu_1", [SIGNED])
REQUEST_CASES: list[tuple[str, dict[str, Any], dict[str, Any], dict[str, Any]]] = [
    ("system-hoisted-turns-merged",
     {"messages": [{"role": "system", "content": SYSTEM_TEXT}, user("a"),
                   {"role": "developer", "content": "Be kind."},
                   {"role": "user", "content": [{"type": "text", "text": "b"}]}]},
     {},
     {"model": "claude-up", "max_tokens": 4096, "system": f"{SYSTEM_TEXT}\n\nBe kind.",
      "messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                {"type": "text", "text": "b"}]}]}),
    ("max-completion-tokens-wins-sampling-stop-user",
     {"messages": [user("a")], "max_tokens": 50, "max_completion_tokens": 70, "temperature": 1.5,
      "top_p": 0.5, "stop": "END", "user": "u-1"},
     {},
     {"model": "claude-up", "max_tokens": 70, "temperature": 1.0, "top_p": 0.5,
      "stop_sequences": ["END"], "metadata": {"user_id": "u-1"},
      "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]}),
    ("default-max-tokens-option-per-model",
     {"messages": [user("a")], "stream": True},
     {"default_max_tokens": {"claude-up": 777, "*": 5}},
     {"model": "claude-up", "max_tokens": 777, "stream": True,
      "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]}),
    ("unknown-and-unsupported-fields-not-sent",
     {"messages": [user("a")], "seed": 7, "logit_bias": {"1": 2}, "presence_penalty": 0.5,
      "metadata": {"k": "v"}, "frobnicate": True, "n": 1},
     {"default_max_tokens": 100},
     {"model": "claude-up", "max_tokens": 100,
      "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]}),
    ("tools-required-parallel-off",
     {"messages": [user("a")], "tools": [WEATHER_TOOL, {"type": "function", "function": {"name": "now"}}],
      "tool_choice": "required", "parallel_tool_calls": False},
     {},
     {"model": "claude-up", "max_tokens": 4096,
      "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}],
      "tools": [{"name": "get_weather", "description": "Weather for a city",
                 "input_schema": WEATHER_TOOL["function"]["parameters"]},
                {"name": "now", "input_schema": {"type": "object", "properties": {}}}],
      "tool_choice": {"type": "any", "disable_parallel_tool_use": True}}),
    ("tool-choice-named",
     {"messages": [user("a")], "tools": [WEATHER_TOOL],
      "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
     {},
     {"model": "claude-up", "max_tokens": 4096,
      "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}],
      "tools": [{"name": "get_weather", "description": "Weather for a city",
                 "input_schema": WEATHER_TOOL["function"]["parameters"]}],
      "tool_choice": {"type": "tool", "name": "get_weather"}}),
    ("tool-choice-none",
     {"messages": [user("a")], "tools": [WEATHER_TOOL], "tool_choice": "none",
      "parallel_tool_calls": False},
     {},
     {"model": "claude-up", "max_tokens": 4096,
      "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}],
      "tools": [{"name": "get_weather", "description": "Weather for a city",
                 "input_schema": WEATHER_TOOL["function"]["parameters"]}],
      "tool_choice": {"type": "none"}}),
    ("tool-calls-and-results",
     {"messages": [user("weather?"),
                   {"role": "assistant", "content": "Checking.", "tool_calls": [
                       {"id": "t1", "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                       {"id": "t2", "type": "function",
                        "function": {"name": "now", "arguments": ""}}]},
                   {"role": "tool", "tool_call_id": "t1", "content": "sunny"},
                   {"role": "tool", "tool_call_id": "t2",
                    "content": [{"type": "text", "text": "noon"}]},
                   user("thanks")]},
     {},
     {"model": "claude-up", "max_tokens": 4096, "messages": [
         {"role": "user", "content": [{"type": "text", "text": "weather?"}]},
         {"role": "assistant", "content": [
             {"type": "text", "text": "Checking."},
             {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"city": "Paris"}},
             {"type": "tool_use", "id": "t2", "name": "now", "input": {}}]},
         {"role": "user", "content": [
             {"type": "tool_result", "tool_use_id": "t1", "content": "sunny"},
             {"type": "tool_result", "tool_use_id": "t2",
              "content": [{"type": "text", "text": "noon"}]},
             {"type": "text", "text": "thanks"}]}]}),
    ("foreign-tool-ids-fitted-empty-assistant-dropped",
     {"messages": [user("a"), {"role": "assistant", "content": ""}, user("b"),
                   {"role": "assistant", "tool_calls": [
                       {"id": "fc:gemini/1", "type": "function",
                        "function": {"name": "f", "arguments": "{}"}}]},
                   {"role": "tool", "tool_call_id": "fc:gemini/1", "content": "ok"}],
      "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}},
                {"type": "function", "function": {"name": "g", "parameters": {
                    "properties": {"x": {"type": "integer"}}}}}]},
     {},
     {"model": "claude-up", "max_tokens": 4096, "messages": [
         {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
         {"role": "assistant", "content": [
             {"type": "tool_use", "id": "fc_gemini_1", "name": "f", "input": {}}]},
         {"role": "user", "content": [
             {"type": "tool_result", "tool_use_id": "fc_gemini_1", "content": "ok"}]}],
      "tools": [{"name": "f", "input_schema": {"type": "object", "properties": {}}},
                {"name": "g", "input_schema": {"type": "object",
                                               "properties": {"x": {"type": "integer"}}}}],
      "tool_choice": {"type": "auto"}}),
    ("thinking-carried-in-tool-call-id",
     {"messages": [user("a"), {"role": "assistant", "content": "Let me look.", "tool_calls": [
         {"id": CARRIED_ID, "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
         {"role": "tool", "tool_call_id": CARRIED_ID, "content": "ok"}],
      "reasoning_effort": "low"},
     {},
     {"model": "claude-up", "max_tokens": 4096 + 2048,
      "thinking": {"type": "enabled", "budget_tokens": 2048}, "messages": [
          {"role": "user", "content": [{"type": "text", "text": "a"}]},
          {"role": "assistant", "content": [
              SIGNED, {"type": "text", "text": "Let me look."},
              {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}]},
          {"role": "user", "content": [
              {"type": "tool_result", "tool_use_id": "toolu_1", "content": "ok"}]}]}),
    ("carried-thinking-dropped-when-thinking-off",
     {"messages": [user("a"), {"role": "assistant", "tool_calls": [
         {"id": CARRIED_ID, "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
         {"role": "tool", "tool_call_id": CARRIED_ID, "content": "ok"}]},
     {},
     {"model": "claude-up", "max_tokens": 4096, "messages": [
         {"role": "user", "content": [{"type": "text", "text": "a"}]},
         {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "f",
                                            "input": {}}]},
         {"role": "user", "content": [
             {"type": "tool_result", "tool_use_id": "toolu_1", "content": "ok"}]}]}),
    ("thinking-off-for-a-tool-loop-without-signed-thinking",
     {"messages": [user("a"), {"role": "assistant", "tool_calls": [
         {"id": "call_x", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
         {"role": "tool", "tool_call_id": "call_x", "content": "ok"}],
      "reasoning_effort": "high", "temperature": 0.2},
     {},
     {"model": "claude-up", "max_tokens": 4096, "temperature": 0.2, "messages": [
         {"role": "user", "content": [{"type": "text", "text": "a"}]},
         {"role": "assistant", "content": [{"type": "tool_use", "id": "call_x", "name": "f",
                                            "input": {}}]},
         {"role": "user", "content": [
             {"type": "tool_result", "tool_use_id": "call_x", "content": "ok"}]}]}),
    ("images-data-and-url",
     {"messages": [{"role": "user", "content": [
         {"type": "text", "text": "look"},
         {"type": "image_url", "image_url": {"url": PNG_URL}},
         {"type": "image_url", "image_url": {"url": "https://img.example/cat.jpg", "detail": "low"}}]}]},
     {},
     {"model": "claude-up", "max_tokens": 4096, "messages": [{"role": "user", "content": [
         {"type": "text", "text": "look"},
         {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                      "data": PNG_URL.split(",", 1)[1]}},
         {"type": "image", "source": {"type": "url", "url": "https://img.example/cat.jpg"}}]}]}),
    ("reasoning-effort-no-cap",
     {"messages": [user("a")], "reasoning_effort": "medium", "temperature": 0.3},
     {},
     {"model": "claude-up", "max_tokens": 4096 + 8192,
      "thinking": {"type": "enabled", "budget_tokens": 8192},
      "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]}),
    ("reasoning-effort-capped",
     {"messages": [user("a")], "reasoning_effort": "high", "max_completion_tokens": 3000},
     {},
     {"model": "claude-up", "max_tokens": 3000,
      "thinking": {"type": "enabled", "budget_tokens": 2999},
      "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]}),
    ("reasoning-effort-none",
     {"messages": [user("a")], "reasoning_effort": "none"},
     {},
     {"model": "claude-up", "max_tokens": 4096,
      "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]}),
    ("json-object-forced-tool",
     {"messages": [user("a")], "response_format": {"type": "json_object"}},
     {},
     {"model": "claude-up", "max_tokens": 4096,
      "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}],
      "tools": [{"name": JSON_TOOL, "description": "Respond with a JSON object.",
                 "input_schema": {"type": "object"}}],
      "tool_choice": {"type": "tool", "name": JSON_TOOL}}),
    ("json-schema-with-client-tools",
     {"messages": [user("a")], "tools": [WEATHER_TOOL],
      "response_format": {"type": "json_schema", "json_schema": {
          "name": "said", "schema": {"type": "object", "properties": {"said": {"type": "string"}}}}}},
     {},
     {"model": "claude-up", "max_tokens": 4096,
      "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}],
      "tools": [{"name": "get_weather", "description": "Weather for a city",
                 "input_schema": WEATHER_TOOL["function"]["parameters"]},
                {"name": JSON_TOOL, "description": "Respond with `said` JSON.",
                 "input_schema": {"type": "object", "properties": {"said": {"type": "string"}}}}],
      "tool_choice": {"type": "any"}}),
    ("json-mode-while-thinking",
     {"messages": [user("a")], "response_format": {"type": "json_object"}, "reasoning_effort": "low"},
     {},
     {"model": "claude-up", "max_tokens": 4096 + 2048,
      "thinking": {"type": "enabled", "budget_tokens": 2048},
      "system": f"Give your final answer by calling the `{JSON_TOOL}` tool.",
      "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}],
      "tools": [{"name": JSON_TOOL, "description": "Respond with a JSON object.",
                 "input_schema": {"type": "object"}}],
      "tool_choice": {"type": "auto"}}),
]


@pytest.mark.parametrize(("body", "options", "wire"), [c[1:] for c in REQUEST_CASES],
                         ids=[c[0] for c in REQUEST_CASES])
def test_params_to_wire(body: dict[str, Any], options: dict[str, Any], wire: dict[str, Any]) -> None:
    got = params_to_wire(params(**body), "claude-up", stream=bool(body.get("stream")),
                         options=Options.model_validate(options))
    assert got == wire
    validate(got)  # and the real API's rules (as the fake enforces them) accept it


def _naive(body: dict[str, Any]) -> dict[str, Any]:
    """What a careless translator sends: OpenAI messages as they are, no max_tokens."""
    return {"model": "claude-up", "messages": [
        {"role": m["role"], "content": m["content"]} for m in body["messages"]]}


def test_requests_the_real_api_rejects_are_not_what_we_send() -> None:
    body = {"messages": [user("a"), user("b")], "seed": 3}
    with pytest.raises(Invalid, match="max_tokens"):
        validate(_naive(body))
    with pytest.raises(Invalid, match="alternate"):
        validate({**_naive(body), "max_tokens": 10})
    with pytest.raises(Invalid, match="Extra inputs"):
        validate({**_naive({"messages": [user("a")]}), "max_tokens": 10, "seed": 3})
    validate(params_to_wire(params(**body), "claude-up", stream=False, options=Options()))


ERROR_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("n-above-1", {"messages": [user("a")], "n": 2}, "n"),
    ("bad-tool-arguments",
     {"messages": [user("a"), {"role": "assistant", "tool_calls": [
         {"id": "t", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]},
     "messages[1].tool_calls[0].function.arguments"),
    ("array-tool-arguments",
     {"messages": [user("a"), {"role": "assistant", "tool_calls": [
         {"id": "t", "type": "function", "function": {"name": "f", "arguments": "[1]"}}]}]},
     "messages[1].tool_calls[0].function.arguments"),
    ("audio-input",
     {"messages": [{"role": "user", "content": [
         {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]},
     "messages[0].content[0]"),
    ("image-bad-scheme",
     {"messages": [{"role": "user", "content": [
         {"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}]}]},
     "messages[0].content[0].image_url.url"),
    ("cap-too-small-for-thinking",
     {"messages": [user("a")], "reasoning_effort": "low", "max_tokens": 500}, "max_tokens"),
    ("unknown-reasoning-effort", {"messages": [user("a")], "reasoning_effort": "huge"},
     "reasoning_effort"),
    ("json-schema-array-root",
     {"messages": [user("a")], "response_format": {"type": "json_schema", "json_schema": {
         "name": "x", "schema": {"type": "array"}}}}, "response_format.json_schema.schema"),
    ("reserved-tool-name",
     {"messages": [user("a")], "response_format": {"type": "json_object"},
      "tools": [{"type": "function", "function": {"name": JSON_TOOL}}]}, "tools"),
    ("only-system", {"messages": [{"role": "system", "content": "s"}]}, "messages"),
]


@pytest.mark.parametrize(("body", "param"), [c[1:] for c in ERROR_CASES],
                         ids=[c[0] for c in ERROR_CASES])
def test_params_to_wire_refuses(body: dict[str, Any], param: str) -> None:
    with pytest.raises(UpstreamError) as err:
        params_to_wire(params(**body), "claude-up", stream=False, options=Options())
    assert (err.value.status, err.value.retryable, err.value.param) == (400, False, param)


# ============================================================ wire -> reply ====

USAGE_WIRE = {"input_tokens": 8, "cache_read_input_tokens": 3, "cache_creation_input_tokens": 2,
              "output_tokens": 7}


def _msg(content: list[dict[str, Any]], stop: str, **usage: Any) -> dict[str, Any]:
    return {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-up",
            "content": content, "stop_reason": stop, "stop_sequence": None,
            "usage": {**USAGE_WIRE, **usage}}


RESPONSE_CASES: list[tuple[str, dict[str, Any], bool, dict[str, Any]]] = [
    ("text-end-turn", _msg([{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}],
                           "end_turn"), False,
     {"content": "Hi there", "finish": pb.FINISH_REASON_STOP}),
    ("tool-use", _msg([{"type": "text", "text": "Let me check."},
                       {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                        "input": {"city": "Paris", "n": 5}}], "tool_use"), False,
     {"content": "Let me check.", "finish": pb.FINISH_REASON_TOOL_CALLS,
      "tools": [("toolu_1", "get_weather", {"city": "Paris", "n": 5})]}),
    ("tool-only-content-null", _msg([{"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}],
                                    "tool_use"), False,
     {"content": None, "finish": pb.FINISH_REASON_TOOL_CALLS, "tools": [("toolu_1", "f", {})]}),
    ("thinking", _msg([{"type": "thinking", "thinking": "hmm", "signature": "s"},
                       {"type": "redacted_thinking", "data": "xx"},
                       {"type": "text", "text": "ok"}], "end_turn",
                      output_tokens_details={"thinking_tokens": 5}), False,
     {"content": "ok", "reasoning": "hmm", "finish": pb.FINISH_REASON_STOP, "reasoning_tokens": 5}),
    ("max-tokens", _msg([{"type": "text", "text": "cut"}], "max_tokens"), False,
     {"content": "cut", "finish": pb.FINISH_REASON_LENGTH}),
    ("stop-sequence", _msg([{"type": "text", "text": "a"}], "stop_sequence"), False,
     {"content": "a", "finish": pb.FINISH_REASON_STOP}),
    ("refusal", _msg([], "refusal"), False,
     {"content": "", "finish": pb.FINISH_REASON_CONTENT_FILTER}),
    ("json-mode-tool-becomes-content",
     _msg([{"type": "text", "text": "Here:"},
           {"type": "tool_use", "id": "toolu_1", "name": JSON_TOOL, "input": {"said": "hi"}}],
          "tool_use"), True,
     {"content": '{"said":"hi"}', "finish": pb.FINISH_REASON_STOP}),
]


@pytest.mark.parametrize(("data", "json_mode", "want"), [c[1:] for c in RESPONSE_CASES],
                         ids=[c[0] for c in RESPONSE_CASES])
def test_response_from_wire(data: dict[str, Any], json_mode: bool, want: dict[str, Any]) -> None:
    r = response_from_wire(data, json_mode=json_mode)
    (choice,) = r.choices
    m = choice.message
    assert (m.content if m.HasField("content") else None) == want["content"]
    assert (m.reasoning_content if m.HasField("reasoning_content") else None) == want.get("reasoning")
    assert [(t.id, t.function.name, json.loads(t.function.arguments)) for t in m.tool_calls] == \
        want.get("tools", [])
    assert all(t.type == "function" for t in m.tool_calls)
    assert choice.finish_reason == want["finish"]
    assert (r.id, r.model) == ("msg_1", "claude-up")
    u = r.usage
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (13, 7, 20)
    assert u.prompt_tokens_details.cached_tokens == 3
    assert u.completion_tokens_details.reasoning_tokens == want.get("reasoning_tokens", 0)


def test_response_from_wire_malformed_is_retryable() -> None:
    with pytest.raises(UpstreamError) as err:
        response_from_wire({"id": "x"})
    assert err.value.retryable and err.value.kind == "malformed"


# ============================================================ stream -> chunks ====


def ev(name: str, **data: Any) -> tuple[str, dict[str, Any]]:
    return name, {"type": name, **data}


def start(input_tokens: int = 8, cache_read: int = 3) -> tuple[str, dict[str, Any]]:
    return ev("message_start", message={
        "id": "msg_s", "type": "message", "role": "assistant", "model": "claude-up", "content": [],
        "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": input_tokens, "cache_read_input_tokens": cache_read,
                  "cache_creation_input_tokens": 0, "output_tokens": 1}})


def block_start(i: int, block: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return ev("content_block_start", index=i, content_block=block)


def delta(i: int, **d: Any) -> tuple[str, dict[str, Any]]:
    return ev("content_block_delta", index=i, delta=d)


def end(stop: str, **usage: Any) -> list[tuple[str, dict[str, Any]]]:
    return [ev("message_delta", delta={"stop_reason": stop, "stop_sequence": None},
               usage={"output_tokens": 7, **usage}), ev("message_stop")]


@dataclass
class Assembled:
    chunks: list[pb.StreamChatCompletionResponse]
    content: str = ""
    reasoning: str = ""
    tools: dict[int, dict[str, Any]] = field(default_factory=dict)


def run(events: list[tuple[str, dict[str, Any]]], json_mode: bool = False) -> Assembled:
    t = StreamTranslator(json_mode=json_mode)
    out = Assembled([c for name, data in events for c in t.feed(name, data)])
    for c in out.chunks:
        assert c.id == "msg_s" and c.model == "claude-up" and len(c.choices) == 1
        d = c.choices[0].delta
        out.content += d.content
        out.reasoning += d.reasoning_content
        for tc in d.tool_calls:
            slot = out.tools.setdefault(tc.index, {"id": None, "name": None, "args": "", "frags": 0})
            if tc.HasField("id"):
                assert slot["id"] is None, "id sent twice"
                slot["id"], slot["name"], slot["type"] = tc.id, tc.function.name, tc.type
                assert tc.function.arguments == ""
            elif tc.function.arguments:
                slot["frags"] += 1
            slot["args"] += tc.function.arguments
    assert t.done
    assert out.chunks[0].choices[0].delta.role == pb.ROLE_ASSISTANT
    assert all(c.choices[0].delta.role == pb.ROLE_UNSPECIFIED for c in out.chunks[1:])
    assert all(not c.choices[0].finish_reason for c in out.chunks[:-1])
    assert all(not c.HasField("usage") for c in out.chunks[:-1])
    return out


def test_stream_text_with_pings_and_usage() -> None:
    out = run([start(), ev("ping"), block_start(0, {"type": "text", "text": ""}),
               delta(0, type="text_delta", text="Hello "), ev("ping"),
               delta(0, type="text_delta", text="world"), ev("content_block_stop", index=0),
               *end("end_turn")])
    assert out.content == "Hello world"
    last = out.chunks[-1]
    assert last.choices[0].finish_reason == pb.FINISH_REASON_STOP
    u = last.usage
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens, u.prompt_tokens_details.cached_tokens) \
        == (11, 7, 18, 3)


def test_stream_tool_calls_are_indexed_by_call_not_block() -> None:
    out = run([start(), block_start(0, {"type": "thinking", "thinking": "", "signature": ""}),
               delta(0, type="thinking_delta", thinking="plan"), delta(0, type="signature_delta",
                                                                       signature="sig"),
               ev("content_block_stop", index=0),
               block_start(1, {"type": "text", "text": ""}), delta(1, type="text_delta", text="Sure."),
               ev("content_block_stop", index=1),
               block_start(2, {"type": "tool_use", "id": "toolu_a", "name": "get_weather", "input": {}}),
               delta(2, type="input_json_delta", partial_json=""),
               delta(2, type="input_json_delta", partial_json='{"city": "Pa'),
               delta(2, type="input_json_delta", partial_json='ris"}'),
               ev("content_block_stop", index=2),
               block_start(3, {"type": "tool_use", "id": "toolu_b", "name": "now", "input": {}}),
               ev("content_block_stop", index=3),
               *end("tool_use")])
    assert (out.reasoning, out.content) == ("plan", "Sure.")
    assert sorted(out.tools) == [0, 1]
    carried_id = out.tools[0].pop("id")
    assert out.tools[0] == {"name": "get_weather", "type": "function",
                            "args": '{"city": "Paris"}', "frags": 2}
    # The signed thinking before the call rides in its id; the next call had none.
    assert decode_tool_call_id(carried_id) == (
        "toolu_a", [{"type": "thinking", "thinking": "plan", "signature": "sig"}])
    assert out.tools[1]["id"] == "toolu_b" and out.tools[1]["args"] == "{}"
    assert out.chunks[-1].choices[0].finish_reason == pb.FINISH_REASON_TOOL_CALLS


def test_stream_usage_is_cumulative_and_keeps_input_tokens() -> None:
    body = [block_start(0, {"type": "text", "text": ""}), delta(0, type="text_delta", text="x")]
    only_output = run([start(input_tokens=20, cache_read=0), *body, *end("max_tokens")])
    u = only_output.chunks[-1].usage
    assert (u.prompt_tokens, u.completion_tokens) == (20, 7)
    assert only_output.chunks[-1].choices[0].finish_reason == pb.FINISH_REASON_LENGTH
    # Newer servers repeat (cumulative) input counts in message_delta: they replace, never add.
    repeated = run([start(input_tokens=20, cache_read=0), *body,
                    *end("end_turn", input_tokens=25, cache_read_input_tokens=4,
                         output_tokens_details={"thinking_tokens": 2})])
    u = repeated.chunks[-1].usage
    assert (u.prompt_tokens, u.completion_tokens, u.prompt_tokens_details.cached_tokens,
            u.completion_tokens_details.reasoning_tokens) == (29, 7, 4, 2)


def test_stream_json_mode_streams_tool_input_as_content() -> None:
    out = run([start(), block_start(0, {"type": "text", "text": ""}),
               delta(0, type="text_delta", text="Here you go:"), ev("content_block_stop", index=0),
               block_start(1, {"type": "tool_use", "id": "toolu_j", "name": JSON_TOOL, "input": {}}),
               delta(1, type="input_json_delta", partial_json='{"said": '),
               delta(1, type="input_json_delta", partial_json='"hi"}'),
               ev("content_block_stop", index=1), *end("tool_use")], json_mode=True)
    assert json.loads(out.content) == {"said": "hi"} and out.tools == {}
    assert out.chunks[-1].choices[0].finish_reason == pb.FINISH_REASON_STOP


def test_stream_json_mode_without_the_tool_flushes_held_text() -> None:
    out = run([start(), block_start(0, {"type": "text", "text": ""}),
               delta(0, type="text_delta", text='{"a": 1}'), ev("content_block_stop", index=0),
               *end("end_turn")], json_mode=True)
    assert out.content == '{"a": 1}'


@pytest.mark.parametrize(("etype", "retryable", "status"),
                         [("overloaded_error", True, 529), ("api_error", True, 500),
                          ("invalid_request_error", False, 400)])
def test_stream_error_event_raises(etype: str, retryable: bool, status: int) -> None:
    t = StreamTranslator()
    t.feed(*start())
    t.feed(*block_start(0, {"type": "text", "text": ""}))
    assert t.feed(*delta(0, type="text_delta", text="Hi"))
    with pytest.raises(UpstreamError) as err:
        t.feed("error", {"type": "error", "error": {"type": etype, "message": "boom"}})
    assert (err.value.kind, err.value.retryable, err.value.status) == ("stream", retryable, status)
    assert etype in err.value.message and "boom" in err.value.message


def test_stream_nothing_emitted_before_content() -> None:
    t = StreamTranslator()
    assert t.feed(*start()) == [] and t.feed(*ev("ping")) == []
    assert t.feed(*block_start(0, {"type": "text", "text": ""})) == []


# ============================================================ through the gateway ====

MODEL = "claude-test"


@pytest.fixture
async def stack(fake: tuple[FakeAnthropic, str]) -> AsyncIterator[tuple[Stack, FakeAnthropic]]:
    f, url = fake
    cfg = make_config("router: {max_retry_after_s: 0, backoff_ms: 0}\nchannels:\n"
                      + channel_yaml("claude", "anthropic", url, [MODEL],
                                     options="{version: '2023-06-01', default_max_tokens: 256}"))
    async with running_stack(cfg) as s:
        yield s, f


@dataclass
class Reply:
    content: str | None
    reasoning: str | None
    tool_calls: list[tuple[str, str, str]]    # (id, name, arguments)
    finish: str
    usage: dict[str, int]
    arg_fragments: dict[int, int] = field(default_factory=dict)


FINISH = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length",
          pb.FINISH_REASON_TOOL_CALLS: "tool_calls", pb.FINISH_REASON_CONTENT_FILTER: "content_filter"}


def _usage_dict(prompt: int, completion: int, total: int, cached: int) -> dict[str, int]:
    return {"prompt": prompt, "completion": completion, "total": total, "cached": cached}


class Surface:
    """One OpenAI-format request, over REST (openai SDK) or gRPC (stubs)."""

    def __init__(self, kind: str, stack: Stack) -> None:
        self.kind = kind
        self.stack = stack
        self.oa = openai.AsyncOpenAI(base_url=stack.base_url, api_key=TEST_KEY, max_retries=0)

    async def chat(self, **body: Any) -> Reply:
        if self.kind == "rest":
            r = await self.oa.chat.completions.create(model=MODEL, **body)
            m = r.choices[0].message
            u = r.usage
            assert u is not None and u.prompt_tokens_details is not None
            return Reply(m.content, (m.model_extra or {}).get("reasoning_content"),
                         [(t.id, t.function.name, t.function.arguments)
                          for t in m.tool_calls or []],
                         r.choices[0].finish_reason,
                         _usage_dict(u.prompt_tokens, u.completion_tokens, u.total_tokens,
                                     u.prompt_tokens_details.cached_tokens or 0))
        g = await self.stack.stub.CreateChatCompletion(
            pb.CreateChatCompletionRequest(params=params(model=MODEL, **body)), metadata=AUTH)
        m2 = g.choices[0].message
        return Reply(m2.content if m2.HasField("content") else None,
                     m2.reasoning_content if m2.HasField("reasoning_content") else None,
                     [(t.id, t.function.name, t.function.arguments) for t in m2.tool_calls],
                     FINISH[g.choices[0].finish_reason],
                     _usage_dict(g.usage.prompt_tokens, g.usage.completion_tokens,
                                 g.usage.total_tokens, g.usage.prompt_tokens_details.cached_tokens))

    async def stream(self, **body: Any) -> tuple[Reply, int]:
        """The reassembled reply and the number of content deltas."""
        content, reasoning, finish = "", "", ""
        calls: dict[int, list[str]] = {}
        frags: dict[int, int] = {}
        deltas = 0
        usage: dict[str, int] = {}

        def on_call(index: int, cid: str | None, name: str | None, args: str | None) -> None:
            slot = calls.setdefault(index, ["", "", ""])
            if cid:
                slot[0], slot[1] = cid, name or ""
            if args:
                slot[2] += args
                frags[index] = frags.get(index, 0) + 1

        if self.kind == "rest":
            s = await self.oa.chat.completions.create(model=MODEL, stream=True,
                                                      stream_options={"include_usage": True}, **body)
            async for c in s:
                if c.usage is not None:
                    ptd = c.usage.prompt_tokens_details
                    usage = _usage_dict(c.usage.prompt_tokens, c.usage.completion_tokens,
                                        c.usage.total_tokens, (ptd.cached_tokens or 0) if ptd else 0)
                for ch in c.choices:
                    if ch.delta.content:
                        content += ch.delta.content
                        deltas += 1
                    reasoning += (ch.delta.model_extra or {}).get("reasoning_content") or ""
                    for tc in ch.delta.tool_calls or []:
                        fn = tc.function
                        on_call(tc.index, tc.id, fn.name if fn else None, fn.arguments if fn else None)
                    finish = ch.finish_reason or finish
        else:
            req = pb.StreamChatCompletionRequest(params=params(model=MODEL, **body))
            async for g in self.stack.stub.StreamChatCompletion(req, metadata=AUTH):
                if g.HasField("usage"):
                    usage = _usage_dict(g.usage.prompt_tokens, g.usage.completion_tokens,
                                        g.usage.total_tokens, g.usage.prompt_tokens_details.cached_tokens)
                for gc in g.choices:
                    if gc.delta.content:
                        content += gc.delta.content
                        deltas += 1
                    reasoning += gc.delta.reasoning_content
                    for gt in gc.delta.tool_calls:
                        on_call(gt.index, gt.id if gt.HasField("id") else None,
                                gt.function.name if gt.function.HasField("name") else None,
                                gt.function.arguments)
                    finish = FINISH.get(gc.finish_reason, finish)
        return Reply(content or None, reasoning or None,
                     [tuple(calls[i]) for i in sorted(calls)],  # type: ignore[misc]
                     finish, usage, frags), deltas

    async def close(self) -> None:
        await self.oa.close()


@pytest.fixture(params=["rest", "grpc"])
async def surface(request: pytest.FixtureRequest,
                  stack: tuple[Stack, FakeAnthropic]) -> AsyncIterator[tuple[Surface, FakeAnthropic]]:
    s = Surface(request.param, stack[0])
    yield s, stack[1]
    await s.close()


FAKE_USAGE = _usage_dict(11, 7, 18, 3)


async def test_plain(surface: tuple[Surface, FakeAnthropic]) -> None:
    s, f = surface
    r = await s.chat(messages=[{"role": "system", "content": "Be brief."}, user("hello")])
    assert (r.content, r.finish, r.tool_calls) == ("You said: hello", "stop", [])
    assert r.usage == FAKE_USAGE
    assert f.requests[-1]["system"] == "Be brief." and f.requests[-1]["max_tokens"] == 256
    h = f.headers[-1]
    assert h["x-api-key"] == "upstream-secret-claude" and h["anthropic-version"] == "2023-06-01"


async def test_streamed(surface: tuple[Surface, FakeAnthropic]) -> None:
    s, f = surface
    r, deltas = await s.stream(messages=[user("one two three four")])
    assert (r.content, r.finish) == ("You said: one two three four", "stop")
    assert deltas >= 2
    assert r.usage == FAKE_USAGE
    assert f.requests[-1]["stream"] is True


async def test_thinking(surface: tuple[Surface, FakeAnthropic]) -> None:
    s, f = surface
    r = await s.chat(messages=[user("THINK pondering\nhi")], reasoning_effort="low")
    assert r.reasoning == "pondering" and r.content == "You said: THINK pondering\nhi"
    assert f.requests[-1]["thinking"] == {"type": "enabled", "budget_tokens": 2048}
    streamed, _ = await s.stream(messages=[user("THINK pondering\nhi")], reasoning_effort="low")
    assert streamed.reasoning == "pondering" and streamed.content == r.content


async def test_tool_round_trip_streamed(surface: tuple[Surface, FakeAnthropic]) -> None:
    s, f = surface
    args = {"city": "Paris", "days": [1, 2], "units": {"temp": "C"}}
    ask = user(f"TOOL get_weather {json.dumps(args)}")
    r, _ = await s.stream(messages=[ask], tools=[WEATHER_TOOL])
    assert r.finish == "tool_calls" and r.content is None
    ((call_id, name, arguments),) = r.tool_calls
    assert name == "get_weather" and call_id.startswith("toolu_")
    assert arguments == json.dumps(args)          # every fragment arrived, in order
    assert r.arg_fragments[0] >= 2
    assert r.usage == FAKE_USAGE
    follow = [ask, {"role": "assistant", "content": None, "tool_calls": [
        {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": call_id, "content": "sunny, 21C"}]
    done, _ = await s.stream(messages=follow, tools=[WEATHER_TOOL])
    assert (done.content, done.finish) == ("Tool said: sunny, 21C", "stop")
    sent = f.requests[-1]["messages"]
    assert sent[1]["content"] == [{"type": "tool_use", "id": call_id, "name": name, "input": args}]
    assert sent[2] == {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": call_id, "content": "sunny, 21C"}]}


async def test_parallel_tool_calls(surface: tuple[Surface, FakeAnthropic]) -> None:
    s, f = surface
    ask = user('TOOL get_weather {"city": "Paris"}\nTOOL get_weather {"city": "Rome"}')
    whole = await s.chat(messages=[ask], tools=[WEATHER_TOOL])
    streamed, _ = await s.stream(messages=[ask], tools=[WEATHER_TOOL])
    for r in (whole, streamed):
        assert r.finish == "tool_calls"
        assert [(n, json.loads(a)) for _, n, a in r.tool_calls] == [
            ("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]
        assert len({i for i, _, _ in r.tool_calls}) == 2
    assert all(n >= 2 for n in streamed.arg_fragments.values()) and len(streamed.arg_fragments) == 2
    follow = [ask, {"role": "assistant", "tool_calls": [
        {"id": i, "type": "function", "function": {"name": n, "arguments": a}}
        for i, n, a in streamed.tool_calls]}] + [
        {"role": "tool", "tool_call_id": i, "content": f"w{k}"}
        for k, (i, _, _) in enumerate(streamed.tool_calls)]
    done = await s.chat(messages=follow, tools=[WEATHER_TOOL])
    assert done.content == "Tool said: w1"
    (results_turn,) = f.requests[-1]["messages"][2:]  # both results in one user turn
    assert [b["type"] for b in results_turn["content"]] == ["tool_result", "tool_result"]


async def test_image_input(surface: tuple[Surface, FakeAnthropic]) -> None:
    s, _ = surface
    msg = {"role": "user", "content": [
        {"type": "text", "text": "what is this"},
        {"type": "image_url", "image_url": {"url": PNG_URL}},
        {"type": "image_url", "image_url": {"url": "https://img.example/cat.jpg"}}]}
    r = await s.chat(messages=[msg])
    assert r.content == (f"You said: what is this [image: base64 image/png {len(PNG)} bytes]"
                         " [image: url https://img.example/cat.jpg]")
    streamed, _ = await s.stream(messages=[msg])
    assert streamed.content == r.content


async def test_stop_sequences(surface: tuple[Surface, FakeAnthropic]) -> None:
    s, f = surface
    r = await s.chat(messages=[user("alpha beta gamma")], stop=["gamma"])
    assert (r.content, r.finish) == ("You said: alpha beta ", "stop")
    assert f.requests[-1]["stop_sequences"] == ["gamma"]
    streamed, _ = await s.stream(messages=[user("alpha beta gamma")], stop="beta")
    assert (streamed.content, streamed.finish) == ("You said: alpha ", "stop")


async def test_json_mode(surface: tuple[Surface, FakeAnthropic]) -> None:
    s, _ = surface
    for fmt in ({"type": "json_object"},
                {"type": "json_schema", "json_schema": {"name": "said", "schema": {
                    "type": "object", "properties": {"said": {"type": "string"}}}}}):
        r = await s.chat(messages=[user("hi there")], response_format=fmt)
        assert json.loads(r.content or "") == {"said": "hi there"}
        assert (r.finish, r.tool_calls) == ("stop", [])
        streamed, _ = await s.stream(messages=[user("hi there")], response_format=fmt)
        assert json.loads(streamed.content or "") == {"said": "hi there"}
        assert (streamed.finish, streamed.tool_calls) == ("stop", [])


async def test_n_above_one_is_a_clear_400(surface: tuple[Surface, FakeAnthropic]) -> None:
    s, f = surface
    before = len(f.requests)
    await _expect_error(s, 400, grpc.StatusCode.INVALID_ARGUMENT, messages=[user("hi")], n=2)
    assert len(f.requests) == before  # refused before any network call


async def _expect_error(s: Surface, http: int, code: grpc.StatusCode, stream: bool = False,
                        **body: Any) -> str:
    if s.kind == "rest":
        with pytest.raises(openai.APIStatusError) as err:
            if stream:
                await s.stream(**body)
            else:
                await s.chat(**body)
        assert err.value.status_code == http
        return str(err.value.message)
    with pytest.raises(grpc.aio.AioRpcError) as gerr:
        if stream:
            await s.stream(**body)
        else:
            await s.chat(**body)
    assert gerr.value.code() == code
    return gerr.value.details() or ""


@pytest.mark.parametrize(("status", "http", "code"), [
    (529, 502, grpc.StatusCode.UNAVAILABLE),
    (500, 502, grpc.StatusCode.UNAVAILABLE),
    (429, 429, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (400, 400, grpc.StatusCode.INVALID_ARGUMENT),
])
async def test_upstream_error_mapping(surface: tuple[Surface, FakeAnthropic], status: int, http: int,
                                      code: grpc.StatusCode) -> None:
    s, _ = surface
    for stream in (False, True):
        msg = await _expect_error(s, http, code, stream=stream, messages=[user(f"ERROR {status}")])
        assert "upstream-secret" not in msg


async def test_midstream_error_over_grpc(stack: tuple[Stack, FakeAnthropic]) -> None:
    st, _ = stack
    got: list[str] = []
    req = pb.StreamChatCompletionRequest(params=params(model=MODEL, messages=[user("ERROR midstream")]))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for g in st.stub.StreamChatCompletion(req, metadata=AUTH):
            got.extend(c.delta.content for c in g.choices)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "overloaded_error" in (err.value.details() or "")
    assert "".join(got) == "You said: "


async def test_midstream_error_over_rest_is_an_sse_error_event(stack: tuple[Stack, FakeAnthropic]) -> None:
    st, _ = stack
    body = {"model": MODEL, "stream": True, "messages": [user("ERROR midstream")]}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{st.base_url}/chat/completions", json=body,
                             headers={"authorization": f"Bearer {TEST_KEY}"}) as r:
            assert r.status == 200
            raw = (await r.read()).decode()
    events = [line[6:] for line in raw.split("\n") if line.startswith("data: ")]
    assert "[DONE]" not in events
    last = json.loads(events[-1])
    assert last["error"]["code"] == "upstream_error" and "overloaded_error" in last["error"]["message"]
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1])
    assert text == "You said: "
    oa = openai.AsyncOpenAI(base_url=st.base_url, api_key=TEST_KEY, max_retries=0)
    with pytest.raises(openai.APIError):
        chunks = await oa.chat.completions.create(model=MODEL, stream=True,
                                                  messages=[user("ERROR midstream")])
        async for _ in chunks:
            pass
    await oa.close()


async def test_usage_ledger_matches_upstream(stack: tuple[Stack, FakeAnthropic]) -> None:
    st, _ = stack
    s = Surface("rest", st)
    await s.chat(messages=[user("count me")])
    await s.stream(messages=[user("count me too")])
    await s.close()
    recs = [r for r in st.usage.records if r.channel == "claude"]
    assert len(recs) == 2
    for rec in recs:
        assert (rec.prompt_tokens, rec.completion_tokens, rec.cached_tokens) == (11, 7, 3)


async def test_split_deployment_streams_tools_and_errors(fake: tuple[FakeAnthropic, str]) -> None:
    """Façade and core as two runtimes (a real gRPC hop): same answers, same errors."""
    _, url = fake
    cfg = make_config("router: {max_retry_after_s: 0, backoff_ms: 0}\nchannels:\n"
                      + channel_yaml("claude", "anthropic", url, [MODEL]))
    async with running_stack(cfg, split=True) as st:
        s = Surface("rest", st)
        r, _ = await s.stream(messages=[user('TOOL get_weather {"city": "Oslo"}')], tools=[WEATHER_TOOL])
        assert [(n, a) for _, n, a in r.tool_calls] == [("get_weather", '{"city": "Oslo"}')]
        assert r.usage == FAKE_USAGE
        await _expect_error(s, 502, grpc.StatusCode.UNAVAILABLE, messages=[user("ERROR 529")])
        with pytest.raises(openai.APIError):
            await s.stream(messages=[user("ERROR midstream")])
        await s.close()


async def test_stream_cut_before_message_stop_is_an_error() -> None:
    """An upstream that closes mid-answer must not look like a finished reply."""
    from aiohttp import web

    from switchboard.core.config import ChannelConfig
    from switchboard.core.providers.anthropic import AnthropicClient
    from switchboard.core.providers.base import HttpPool

    async def truncated(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for name, data in [start(), block_start(0, {"type": "text", "text": ""}),
                           delta(0, type="text_delta", text="Hel")]:
            await resp.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
        return resp  # no message_delta, no message_stop

    app = web.Application()
    app.router.add_post("/v1/messages", truncated)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    http = HttpPool()
    client = AnthropicClient(ChannelConfig(name="c", provider="anthropic", api_key="k",
                                           base_url=f"http://127.0.0.1:{port}/v1"), http)
    got: list[str] = []
    with pytest.raises(UpstreamError) as err:
        async for chunk in client.stream(params(messages=[user("hi")]), "claude-up"):
            got.extend(c.delta.content for c in chunk.choices)
    assert err.value.kind == "stream" and "message_stop" in err.value.message
    assert got == ["Hel"]
    await http.close()
    await runner.cleanup()


async def test_thinking_survives_a_tool_loop(surface: tuple[Surface, FakeAnthropic]) -> None:
    """Anthropic wants the signed thinking that preceded a tool call back on the next turn;
    OpenAI clients only echo the tool-call id, which therefore carries it."""
    s, f = surface
    ask = user('THINK I need the weather\nTOOL get_weather {"city": "Paris"}')
    whole = await s.chat(messages=[ask], tools=[WEATHER_TOOL], reasoning_effort="low")
    streamed, _ = await s.stream(messages=[ask], tools=[WEATHER_TOOL], reasoning_effort="low")
    for r in (whole, streamed):
        assert r.reasoning == "I need the weather" and r.finish == "tool_calls"
        ((call_id, name, arguments),) = r.tool_calls
        follow = [ask, {"role": "assistant", "content": None, "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": call_id, "content": "rain"}]
        done = await s.chat(messages=follow, tools=[WEATHER_TOOL], reasoning_effort="low")
        assert done.content == "Tool said: rain"
        sent = f.requests[-1]
        assert sent["thinking"]["type"] == "enabled"
        assert sent["messages"][1]["content"][0] == {
            "type": "thinking", "thinking": "I need the weather",
            "signature": signature_for("I need the weather")}
        assert sent["messages"][2]["content"][0]["tool_use_id"] == decode_tool_call_id(call_id)[0]
