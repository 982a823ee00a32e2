"""The Gemini provider: the fake upstream checked against Google's own `google-genai` SDK
(so it speaks the real wire format), table-driven tests of the pure translate functions
(including the requests Gemini would reject), and end to end through the real gateway
with the `openai` SDK over REST and the generated stubs over gRPC."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import openai
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from switchboard.core.providers import PROVIDERS
from switchboard.core.providers.base import UpstreamError
from switchboard.core.providers.gemini import (
    SKIP_SIGNATURE,
    GeminiClient,
    Options,
    StreamTranslator,
    decode_tool_call_id,
    encode_tool_call_id,
    openapi_schema,
    params_to_wire,
    response_from_wire,
)
from switchboard.facade.openai_json import parse_chat
from switchboard.v1 import inference_pb2 as pb
from tests.fakes.gemini_upstream import FakeGemini, signature_for
from tests.harness import AUTH, TEST_KEY, Stack, channel_yaml, make_config, running_stack
from tests.openapi import validate

PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGA"
                       "hKmMIQAAAABJRU5ErkJggg==")
PNG_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()
WEATHER_SCHEMA = {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object",
                  "properties": {"city": {"type": "string"},
                                 "unit": {"type": ["string", "null"], "enum": ["c", "f", None]}},
                  "required": ["city"], "additionalProperties": False}
WEATHER_TOOL: Any = {"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                                 "parameters": WEATHER_SCHEMA, "strict": True}}
TIME_TOOL: Any = {"type": "function", "function": {"name": "get_time",
                                              "parameters": {"type": "object", "properties": {}}}}


def params(body: dict[str, Any]) -> pb.ChatCompletionParams:
    """Our request message from an OpenAI JSON body, through the façade's real parser."""
    p, _ = parse_chat({"model": "gemini-3-pro", **body})
    return p


def user(text: str) -> Any:
    return {"role": "user", "content": text}


@pytest.fixture
async def fake() -> AsyncIterator[FakeGemini]:
    f = FakeGemini()
    await f.start()
    yield f
    await f.close()


# ======================================================= the fake vs the SDK ====


@pytest.fixture
async def sdk() -> AsyncIterator[tuple[genai.Client, FakeGemini]]:
    f = FakeGemini()
    url = await f.start()
    client = genai.Client(api_key="sdk-key",
                          http_options=types.HttpOptions(base_url=url, api_version="v1beta"))
    yield client, f
    await f.close()


THOUGHTS = types.GenerateContentConfig(thinking_config=types.ThinkingConfig(include_thoughts=True))


async def test_sdk_parses_plain_reply(sdk: tuple[genai.Client, FakeGemini]) -> None:
    client, f = sdk
    r = await client.aio.models.generate_content(model="gemini-3-pro", contents="hello there")
    assert r.text == "You said: hello there"
    assert r.candidates and r.candidates[0].finish_reason == types.FinishReason.STOP
    u = r.usage_metadata
    assert u is not None
    assert (u.prompt_token_count, u.candidates_token_count, u.cached_content_token_count,
            u.total_token_count) == (11, 7, 3, 18)
    assert f.paths[-1] == "/v1beta/models/gemini-3-pro:generateContent"
    assert f.headers[-1]["x-goog-api-key"] == "sdk-key"


async def test_sdk_parses_thoughts_tool_calls_and_signatures(
        sdk: tuple[genai.Client, FakeGemini]) -> None:
    client, _ = sdk
    r = await client.aio.models.generate_content(
        model="gemini-3-pro", config=THOUGHTS,
        contents='THINK plan it\nTOOL get_weather {"city": "Paris"}\nTOOL get_time {}')
    assert r.candidates and r.candidates[0].content and r.candidates[0].content.parts
    parts = r.candidates[0].content.parts
    assert parts[0].thought is True and parts[0].text == "plan it"
    assert [(c.id, c.name, c.args) for c in r.function_calls or []] == [
        ("fc-0-get_weather", "get_weather", {"city": "Paris"}), ("fc-1-get_time", "get_time", {})]
    assert parts[1].thought_signature == b"sig-get_weather"  # bytes on the wire, base64 in JSON
    assert parts[2].thought_signature is None  # parallel calls: only the first carries one
    assert r.usage_metadata and r.usage_metadata.thoughts_token_count == 5


async def test_sdk_parses_candidates_block_and_safety(sdk: tuple[genai.Client, FakeGemini]) -> None:
    client, _ = sdk
    r = await client.aio.models.generate_content(
        model="m", contents="twice", config=types.GenerateContentConfig(candidate_count=2))
    assert [c.index for c in r.candidates or []] == [0, 1]
    blocked = await client.aio.models.generate_content(model="m", contents="BLOCK")
    assert not blocked.candidates
    assert blocked.prompt_feedback and blocked.prompt_feedback.block_reason == types.BlockedReason.SAFETY
    unsafe = await client.aio.models.generate_content(model="m", contents="SAFETY")
    assert unsafe.candidates and unsafe.candidates[0].finish_reason == types.FinishReason.SAFETY


async def test_sdk_parses_sse_stream(sdk: tuple[genai.Client, FakeGemini]) -> None:
    client, f = sdk
    chunks = [c async for c in await client.aio.models.generate_content_stream(
        model="m", contents="THINK hmm\nsay three words", config=THOUGHTS)]
    assert f.paths[-1] == "/v1beta/models/m:streamGenerateContent?alt=sse"
    assert len(chunks) >= 3
    first = chunks[0].candidates[0].content.parts[0]  # type: ignore[index, union-attr]
    assert first.thought and first.text == "hmm"
    text = "".join(c.text or "" for c in chunks[1:])
    assert text == "You said: THINK hmm\nsay three words"
    last = chunks[-1]
    assert last.candidates and last.candidates[0].finish_reason == types.FinishReason.STOP
    assert last.usage_metadata and last.usage_metadata.total_token_count == 18
    assert last.usage_metadata.thoughts_token_count == 5


async def test_sdk_stream_of_tool_calls(sdk: tuple[genai.Client, FakeGemini]) -> None:
    client, _ = sdk
    chunks = [c async for c in await client.aio.models.generate_content_stream(
        model="m", contents='TOOL get_weather {"city": "Oslo"}')]
    calls = [fc for c in chunks for fc in c.function_calls or []]
    assert [(fc.name, fc.args) for fc in calls] == [("get_weather", {"city": "Oslo"})]


async def test_fake_reads_the_sdks_mixed_spellings(sdk: tuple[genai.Client, FakeGemini]) -> None:
    """The SDK sends some fields snake_case (`mime_type`, `parameters_json_schema`); the real
    API takes both spellings, and so does the fake."""
    client, f = sdk
    cfg = types.GenerateContentConfig(
        system_instruction="sys", candidate_count=2, stop_sequences=["zzz"],
        response_mime_type="application/json", response_json_schema={"type": "object"},
        tools=[types.Tool(function_declarations=[types.FunctionDeclaration(
            name="f", parameters_json_schema=WEATHER_SCHEMA)])],
        thinking_config=types.ThinkingConfig(include_thoughts=True, thinking_level=types.ThinkingLevel.LOW))
    r = await client.aio.models.generate_content(model="m", config=cfg, contents=[types.Content(
        role="user", parts=[types.Part.from_bytes(data=PNG, mime_type="image/png"), types.Part(text="hi")])])
    assert len(r.candidates or []) == 2
    assert json.loads(r.text or "") == {"said": "hi"}
    assert "parameters_json_schema" in json.dumps(f.requests[-1])  # really sent snake_case


async def test_sdk_sees_google_error_bodies(sdk: tuple[genai.Client, FakeGemini]) -> None:
    client, _ = sdk
    with pytest.raises(genai_errors.ClientError) as info:
        await client.aio.models.generate_content(model="m", contents="ERROR 429")
    assert info.value.code == 429 and info.value.status == "RESOURCE_EXHAUSTED"
    with pytest.raises(genai_errors.ServerError) as server:
        await client.aio.models.generate_content(model="m", contents="ERROR 500")
    assert server.value.code == 500


async def test_sdk_round_trip_keeps_signature_and_fake_rejects_without(
        sdk: tuple[genai.Client, FakeGemini]) -> None:
    """What Gemini 3 does: the SDK echoes the signature and succeeds; the same history
    without it is a 400 INVALID_ARGUMENT."""
    client, _ = sdk
    first = await client.aio.models.generate_content(
        model="m", contents='TOOL get_weather {"city": "Rome"}')
    model_turn = first.candidates[0].content  # type: ignore[index]
    assert model_turn is not None
    answer = types.Content(role="user", parts=[types.Part.from_function_response(
        name="get_weather", response={"result": "sunny"})])
    answer.parts[0].function_response.id = "fc-0-get_weather"  # type: ignore[index, union-attr]
    history = [types.Content(role="user", parts=[types.Part(text="weather?")]), model_turn, answer]
    ok = await client.aio.models.generate_content(model="m", contents=history)
    assert ok.text == "Tool said: sunny"
    stripped = model_turn.model_copy(deep=True)
    stripped.parts[0].thought_signature = None  # type: ignore[index]
    with pytest.raises(genai_errors.ClientError) as info:
        await client.aio.models.generate_content(model="m", contents=[history[0], stripped, answer])
    assert info.value.code == 400 and "thought_signature" in (info.value.message or "")


async def raw(f: FakeGemini, body: dict[str, Any], key: str | None = "k") -> tuple[int, Any]:
    headers = {"x-goog-api-key": key} if key else {}
    async with aiohttp.ClientSession() as http, http.post(
            f"{f.url}/v1beta/models/m:generateContent", json=body, headers=headers) as r:
        return r.status, await r.json()


@pytest.mark.parametrize(("body", "needle"), [
    ({"contents": [{"role": "user", "parts": [{"text": "hi"}]}],
      "tools": [{"functionDeclarations": [{"name": "f", "parameters": WEATHER_SCHEMA}]}]},
     "Unknown name"),
    ({"contents": [{"role": "user", "parts": [{"text": "hi"}]}],
      "generationConfig": {"responseMimeType": "application/json",
                           "responseSchema": {"type": "object", "additionalProperties": False}}},
     "additionalProperties"),
    ({"contents": [{"role": "user", "parts": [{"text": "hi"}]},
                   {"role": "model", "parts": [{"functionCall": {"name": "f", "args": {}}}]},
                   {"role": "user", "parts": [{"functionResponse": {"name": "f", "response": {}}}]}]},
     "thought_signature"),
    ({"contents": [{"role": "user", "parts": [{"text": "hi"}]},
                   {"role": "model", "parts": [{"functionCall": {"name": "f", "args": {}},
                                                "thoughtSignature": signature_for("f")}]},
                   {"role": "user", "parts": [{"functionResponse": {"name": "g", "response": {}}}]}]},
     "matches no functionCall"),
    ({"contents": [{"role": "assistant", "parts": [{"text": "hi"}]}]}, "valid role"),
], ids=["additionalProperties-in-parameters", "additionalProperties-in-responseSchema",
        "missing-thought-signature", "function-response-name", "role"])
async def test_fake_rejects_what_gemini_rejects(fake: FakeGemini, body: dict[str, Any],
                                                needle: str) -> None:
    status, reply = await raw(fake, body)
    assert status == 400, reply
    assert reply["error"]["status"] == "INVALID_ARGUMENT" and needle in reply["error"]["message"]


async def test_fake_stream_endpoint_without_sse_returns_a_json_array(fake: FakeGemini) -> None:
    async with aiohttp.ClientSession() as http, http.post(
            f"{fake.url}/v1beta/models/m:streamGenerateContent", headers={"x-goog-api-key": "k"},
            json={"contents": [{"role": "user", "parts": [{"text": "two words"}]}]}) as r:
        events = await r.json()
    assert isinstance(events, list) and len(events) >= 2
    assert events[-1]["candidates"][0]["finishReason"] == "STOP"
    assert "".join(e["candidates"][0]["content"]["parts"][0]["text"] for e in events) == \
        "You said: two words"


async def test_fake_requires_an_api_key(fake: FakeGemini) -> None:
    status, reply = await raw(fake, {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]},
                              key=None)
    assert status == 403 and reply["error"]["status"] == "PERMISSION_DENIED"


# ====================================================== translate: requests ====


def wire(body: dict[str, Any], model: str = "gemini-3-pro", **options: Any) -> dict[str, Any]:
    return params_to_wire(params(body), model, Options.model_validate(options))


REQUEST_CASES: list[tuple[str, dict[str, Any], dict[str, Any], dict[str, Any]]] = [
    ("system and developer become systemInstruction; roles user/model",
     {"messages": [{"role": "system", "content": "be brief"}, {"role": "developer", "content": "no"},
                   user("hi"), {"role": "assistant", "content": "hello"}, user("bye")]},
     {}, {"systemInstruction": {"parts": [{"text": "be brief"}, {"text": "no"}]},
          "contents": [{"role": "user", "parts": [{"text": "hi"}]},
                       {"role": "model", "parts": [{"text": "hello"}]},
                       {"role": "user", "parts": [{"text": "bye"}]}]}),
    ("consecutive same-role turns are merged",
     {"messages": [user("a"), user("b")]}, {},
     {"contents": [{"role": "user", "parts": [{"text": "a"}, {"text": "b"}]}]}),
    ("images: data URL -> inlineData, https -> fileData with a guessed type",
     {"messages": [{"role": "user", "content": [
         {"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": PNG_URL}},
         {"type": "image_url", "image_url": {"url": "https://x.example/cat.webp?size=2"}},
         {"type": "image_url", "image_url": {"url": "gs://bucket/scan"}}]}]},
     {"file_mime_type": "image/png"},
     {"contents": [{"role": "user", "parts": [
         {"text": "look"},
         {"inlineData": {"mimeType": "image/png", "data": base64.b64encode(PNG).decode()}},
         {"fileData": {"mimeType": "image/webp", "fileUri": "https://x.example/cat.webp?size=2"}},
         {"fileData": {"mimeType": "image/png", "fileUri": "gs://bucket/scan"}}]}]}),
    ("tools keep their JSON Schema untouched in parametersJsonSchema",
     {"messages": [user("hi")], "tools": [WEATHER_TOOL]}, {},
     {"tools": [{"functionDeclarations": [{"name": "get_weather", "description": "Weather",
                                           "parametersJsonSchema": WEATHER_SCHEMA}]}]}),
    ("schema_field: parameters reduces the schema to Gemini's subset",
     {"messages": [user("hi")], "tools": [WEATHER_TOOL]}, {"schema_field": "parameters"},
     {"tools": [{"functionDeclarations": [{"name": "get_weather", "description": "Weather",
                                           "parameters": {
                                               "type": "object", "required": ["city"],
                                               "properties": {
                                                   "city": {"type": "string"},
                                                   "unit": {"type": "string", "nullable": True,
                                                            "enum": ["c", "f", None]}}}}]}]}),
    ("tool_choice required -> ANY", {"messages": [user("hi")], "tools": [WEATHER_TOOL],
                                     "tool_choice": "required"}, {},
     {"toolConfig": {"functionCallingConfig": {"mode": "ANY"}}}),
    ("tool_choice none -> NONE", {"messages": [user("hi")], "tools": [WEATHER_TOOL],
                                  "tool_choice": "none"}, {},
     {"toolConfig": {"functionCallingConfig": {"mode": "NONE"}}}),
    ("tool_choice auto -> AUTO", {"messages": [user("hi")], "tools": [WEATHER_TOOL],
                                  "tool_choice": "auto"}, {},
     {"toolConfig": {"functionCallingConfig": {"mode": "AUTO"}}}),
    ("named tool_choice -> ANY + allowedFunctionNames",
     {"messages": [user("hi")], "tools": [WEATHER_TOOL, TIME_TOOL],
      "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, {},
     {"toolConfig": {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_time"]}}}),
    ("generationConfig from sampling fields; max_completion_tokens wins",
     {"messages": [user("hi")], "temperature": 0.3, "top_p": 0.9, "max_tokens": 50,
      "max_completion_tokens": 60, "stop": ["END", "STOP"], "n": 2, "seed": 42,
      "presence_penalty": 0.5, "frequency_penalty": -0.5, "top_k": 40}, {"include_thoughts": False},
     {"generationConfig": {"temperature": 0.3, "topP": 0.9, "maxOutputTokens": 60,
                           "stopSequences": ["END", "STOP"], "candidateCount": 2, "seed": 42,
                           "presencePenalty": 0.5, "frequencyPenalty": -0.5, "topK": 40}}),
    ("max_tokens alone", {"messages": [user("hi")], "max_tokens": 5}, {"include_thoughts": False},
     {"generationConfig": {"maxOutputTokens": 5}}),
    ("json_object -> responseMimeType", {"messages": [user("hi")],
                                         "response_format": {"type": "json_object"}},
     {"include_thoughts": False}, {"generationConfig": {"responseMimeType": "application/json"}}),
    ("json_schema -> responseJsonSchema (full JSON Schema)",
     {"messages": [user("hi")], "response_format": {"type": "json_schema", "json_schema": {
         "name": "w", "schema": WEATHER_SCHEMA, "strict": True}}}, {"include_thoughts": False},
     {"generationConfig": {"responseMimeType": "application/json",
                           "responseJsonSchema": WEATHER_SCHEMA}}),
    ("reasoning_effort on Gemini 3 -> thinkingLevel + includeThoughts",
     {"messages": [user("hi")], "reasoning_effort": "medium"}, {},
     {"generationConfig": {"thinkingConfig": {"includeThoughts": True, "thinkingLevel": "medium"}}}),
    ("reasoning_effort none on Gemini 3 -> minimal (it cannot switch thinking off)",
     {"messages": [user("hi")], "reasoning_effort": "none"}, {"include_thoughts": False},
     {"generationConfig": {"thinkingConfig": {"thinkingLevel": "minimal"}}}),
    ("extra safetySettings / cachedContent are passed on",
     {"messages": [user("hi")], "safetySettings": [{"category": "HARM_CATEGORY_HARASSMENT",
                                                    "threshold": "BLOCK_NONE"}],
      "cachedContent": "cachedContents/abc"}, {},
     {"safetySettings": [{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_NONE"}],
      "cachedContent": "cachedContents/abc"}),
]


@pytest.mark.parametrize(("body", "options", "expected"), [c[1:] for c in REQUEST_CASES],
                         ids=[c[0] for c in REQUEST_CASES])
def test_params_to_wire(body: dict[str, Any], options: dict[str, Any],
                        expected: dict[str, Any]) -> None:
    out = wire(body, **options)
    for key, value in expected.items():
        assert out[key] == value, key


@pytest.mark.parametrize(("model", "effort", "budget"), [
    ("gemini-2.5-flash", "none", 0), ("gemini-2.5-flash", "low", 1024),
    ("gemini-2.5-pro", "high", 24576)])
def test_reasoning_effort_on_gemini_2_is_a_budget(model: str, effort: str, budget: int) -> None:
    out = wire({"messages": [user("hi")], "reasoning_effort": effort}, model=model)
    assert out["generationConfig"]["thinkingConfig"] == {"includeThoughts": True,
                                                         "thinkingBudget": budget}


def test_plain_request_has_no_model_field_and_thoughts_on() -> None:
    out = wire({"messages": [user("hi")]})
    assert "model" not in out
    assert out["generationConfig"] == {"thinkingConfig": {"includeThoughts": True}}


@pytest.mark.parametrize(("model", "options", "effort", "thinking"), [
    ("gemini-2.0-flash", {}, None, None),  # Gemini: 400 "thinking_config is not supported"
    ("gemini-1.5-pro", {}, None, None),
    ("gemini-2.5-flash-image", {}, None, None),
    ("gemma-3-27b-it", {}, None, None),
    ("gemini-2.5-flash", {}, None, {"includeThoughts": True}),
    ("gemini-3.5-flash", {}, None, {"includeThoughts": True}),
    ("gemini-3-pro", {"include_thoughts": False}, None, None),
    ("my-tuned-model", {"include_thoughts": True}, None, {"includeThoughts": True}),
    ("gemini-3-pro", {}, "xhigh", {"includeThoughts": True, "thinkingLevel": "high"}),
    ("gemini-3-pro", {}, "minimal", {"includeThoughts": True, "thinkingLevel": "minimal"}),
])
def test_thinking_config_only_where_the_model_thinks(model: str, options: dict[str, Any],
                                                     effort: str | None,
                                                     thinking: dict[str, Any] | None) -> None:
    body: dict[str, Any] = {"messages": [user("hi")]}
    if effort:
        body["reasoning_effort"] = effort
    out = wire(body, model=model, **options)
    assert (out.get("generationConfig") or {}).get("thinkingConfig") == thinking


def test_tool_choice_without_tools_sends_no_tool_config() -> None:
    assert "toolConfig" not in wire({"messages": [user("hi")], "tool_choice": "none"})


def test_schema_reduction_drops_every_keyword_gemini_rejects() -> None:
    nested = {"$schema": "x", "type": "object", "additionalProperties": False, "$defs": {},
              "properties": {"a": {"type": "array", "items": {"type": "object", "additionalProperties":
                                                              {"type": "string"}, "const": 3}},
                             "b": {"oneOf": [{"type": "string"}, {"type": "integer",
                                                                  "exclusiveMinimum": 0}]}}}
    assert openapi_schema(nested) == {
        "type": "object", "properties": {
            "a": {"type": "array", "items": {"type": "object", "enum": [3]}},
            "b": {"anyOf": [{"type": "string"}, {"type": "integer"}]}}}


def tool_round_trip_body(call_id: str, *, result: str = '{"temp": 21}',
                         extra_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    calls = [{"id": call_id, "type": "function",
              "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]
    calls += extra_calls or []
    msgs: list[dict[str, Any]] = [user("weather?"), {"role": "assistant", "content": None,
                                                     "tool_calls": calls},
                                  {"role": "tool", "tool_call_id": call_id, "content": result}]
    for c in extra_calls or []:
        msgs.append({"role": "tool", "tool_call_id": c["id"], "content": "noon"})
    return {"messages": msgs, "tools": [WEATHER_TOOL, TIME_TOOL]}


def test_tool_call_id_round_trips_signature_and_gemini_id() -> None:
    sig = base64.b64encode(bytes(range(256)) * 8).decode()  # real signatures are long base64
    tid = encode_tool_call_id(sig, "fc-7")
    assert tid.startswith("call_") and all(ch.isalnum() or ch in "_-" for ch in tid)
    assert decode_tool_call_id(tid) == (sig, "fc-7")
    assert encode_tool_call_id(sig, "fc-7") != tid  # unique even for the same call
    plain = encode_tool_call_id()
    assert len(plain) == len("call_") + 16 and decode_tool_call_id(plain) == (None, None)
    assert decode_tool_call_id("call_abc") == (None, None)
    assert decode_tool_call_id("toolu_01__ts__zzz") == (None, None)


def test_tool_round_trip_request_echoes_signature_and_ids() -> None:
    tid = encode_tool_call_id(signature_for("get_weather"), "fc-0-get_weather")
    t2 = encode_tool_call_id(None, "fc-1-get_time")
    out = wire(tool_round_trip_body(tid, extra_calls=[{
        "id": t2, "type": "function", "function": {"name": "get_time", "arguments": ""}}]))
    model_turn, answers = out["contents"][1], out["contents"][2]
    assert model_turn == {"role": "model", "parts": [
        {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}, "id": "fc-0-get_weather"},
         "thoughtSignature": signature_for("get_weather")},
        {"functionCall": {"name": "get_time", "args": {}, "id": "fc-1-get_time"}}]}
    # both tool results in one user turn; an object result is sent as is, text is wrapped
    assert answers == {"role": "user", "parts": [
        {"functionResponse": {"name": "get_weather", "response": {"temp": 21},
                              "id": "fc-0-get_weather"}},
        {"functionResponse": {"name": "get_time", "response": {"result": "noon"},
                              "id": "fc-1-get_time"}}]}


def test_foreign_tool_call_ids_get_the_documented_bypass_signature() -> None:
    out = wire(tool_round_trip_body("call_from_openai", result="21 degrees"))
    part = out["contents"][1]["parts"][0]
    assert part["thoughtSignature"] == SKIP_SIGNATURE and "id" not in part["functionCall"]
    assert out["contents"][2]["parts"][0]["functionResponse"] == {
        "name": "get_weather", "response": {"result": "21 degrees"}}
    off = wire(tool_round_trip_body("call_from_openai"), thought_signature_fallback=False)
    assert "thoughtSignature" not in off["contents"][1]["parts"][0]
    # an id we issued without a signature (e.g. Gemini 2.5, thinking off) is not foreign
    ours = wire(tool_round_trip_body(encode_tool_call_id()))
    assert "thoughtSignature" not in ours["contents"][1]["parts"][0]


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": [user("hi"), {"role": "tool", "tool_call_id": "nope", "content": "x"}]},
     "messages[1].tool_call_id"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{bad"}}]}]}, "messages"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}]}]}, "messages"),
    ({"messages": [{"role": "system", "content": "only system"}]}, "messages"),
    ({"messages": [user("hi")], "reasoning_effort": "ludicrous"}, "reasoning_effort"),
])
def test_untranslatable_requests_are_client_errors(body: dict[str, Any], param: str) -> None:
    with pytest.raises(UpstreamError) as info:
        wire(body)
    assert info.value.status == 400 and not info.value.retryable and info.value.param == param


# ===================================================== translate: replies ====


def reply(parts: list[dict[str, Any]], finish: str = "STOP", **extra: Any) -> dict[str, Any]:
    return {"candidates": [{"content": {"role": "model", "parts": parts}, "finishReason": finish,
                            "index": 0}], "modelVersion": "gemini-3-pro", "responseId": "r1", **extra}


REPLY_CASES: list[tuple[str, dict[str, Any], str | None, str | None, int]] = [
    ("text", reply([{"text": "Hel"}, {"text": "lo"}]), "Hello", None, pb.FINISH_REASON_STOP),
    ("thought parts -> reasoning_content",
     reply([{"text": "hmm", "thought": True}, {"text": "Hi"}]), "Hi", "hmm", pb.FINISH_REASON_STOP),
    ("MAX_TOKENS -> length", reply([{"text": "cut"}], "MAX_TOKENS"), "cut", None,
     pb.FINISH_REASON_LENGTH),
    ("SAFETY -> content_filter", {"candidates": [{"finishReason": "SAFETY", "index": 0}]}, "", None,
     pb.FINISH_REASON_CONTENT_FILTER),
    ("RECITATION -> content_filter", reply([{"text": "x"}], "RECITATION"), "x", None,
     pb.FINISH_REASON_CONTENT_FILTER),
    ("BLOCKLIST -> content_filter", reply([], "BLOCKLIST"), "", None, pb.FINISH_REASON_CONTENT_FILTER),
    ("PROHIBITED_CONTENT -> content_filter", reply([], "PROHIBITED_CONTENT"), "", None,
     pb.FINISH_REASON_CONTENT_FILTER),
    ("SPII -> content_filter", reply([], "SPII"), "", None, pb.FINISH_REASON_CONTENT_FILTER),
    ("blocked prompt -> one empty content_filter choice, not an error",
     {"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"}, "usageMetadata": {"promptTokenCount": 4}},
     "", None, pb.FINISH_REASON_CONTENT_FILTER),
]


@pytest.mark.parametrize(("data", "content", "reasoning", "finish"), [c[1:] for c in REPLY_CASES],
                         ids=[c[0] for c in REPLY_CASES])
def test_response_from_wire(data: dict[str, Any], content: str | None, reasoning: str | None,
                            finish: int) -> None:
    r = response_from_wire(data, "gemini-3-pro")
    m = r.choices[0].message
    assert r.choices[0].finish_reason == finish
    assert (m.content if m.HasField("content") else None) == content
    assert (m.reasoning_content if m.HasField("reasoning_content") else None) == reasoning


def test_response_function_calls_and_usage() -> None:
    data = reply([{"functionCall": {"id": "g1", "name": "get_weather", "args": {"city": "Paris", "n": 5}},
                   "thoughtSignature": "c2lnLXg="},
                  {"functionCall": {"name": "get_time", "args": {}}}],
                 usageMetadata={"promptTokenCount": 11, "candidatesTokenCount": 2,
                                "thoughtsTokenCount": 5, "cachedContentTokenCount": 3,
                                "totalTokenCount": 18})
    r = response_from_wire(data)
    ch = r.choices[0]
    assert ch.finish_reason == pb.FINISH_REASON_TOOL_CALLS and not ch.message.HasField("content")
    a, b = ch.message.tool_calls
    assert (a.function.name, json.loads(a.function.arguments)) == ("get_weather", {"city": "Paris", "n": 5})
    assert a.function.arguments == '{"city":"Paris","n":5}'
    assert decode_tool_call_id(a.id) == ("c2lnLXg=", "g1") and decode_tool_call_id(b.id) == (None, None)
    assert a.id != b.id and a.type == "function"
    u = r.usage
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (11, 7, 18)
    assert u.prompt_tokens_details.cached_tokens == 3 and u.completion_tokens_details.reasoning_tokens == 5
    assert r.model == "gemini-3-pro" and r.id == "chatcmpl-r1"


def test_response_candidates_become_choices() -> None:
    data = {"candidates": [{"content": {"parts": [{"text": "a"}]}, "finishReason": "STOP", "index": 0},
                           {"content": {"parts": [{"text": "b"}]}, "finishReason": "STOP", "index": 1}]}
    r = response_from_wire(data)
    assert [(c.index, c.message.content) for c in r.choices] == [(0, "a"), (1, "b")]


def test_malformed_reply_is_a_retryable_upstream_error() -> None:
    with pytest.raises(UpstreamError) as info:
        response_from_wire({"candidates": "nope"})
    assert info.value.retryable and info.value.kind == "malformed"
    with pytest.raises(UpstreamError):
        response_from_wire({})


# ====================================================== translate: streams ====


def ev(parts: list[dict[str, Any]] | None, finish: str | None = None, index: int = 0,
       usage: dict[str, Any] | None = None) -> dict[str, Any]:
    cand: dict[str, Any] = {"index": index}
    if parts is not None:
        cand["content"] = {"role": "model", "parts": parts}
    if finish:
        cand["finishReason"] = finish
    out: dict[str, Any] = {"candidates": [cand], "modelVersion": "gemini-3-pro"}
    if usage:
        out["usageMetadata"] = usage
    return out


RUNNING = {"promptTokenCount": 11, "totalTokenCount": 11}
FINAL = {"promptTokenCount": 11, "candidatesTokenCount": 2, "thoughtsTokenCount": 5,
         "cachedContentTokenCount": 3, "totalTokenCount": 18}


def test_stream_text_thoughts_finish_and_usage_once() -> None:
    tr = StreamTranslator("gemini-3-pro")
    chunks = [c for e in [ev([{"text": "hmm", "thought": True}], usage=RUNNING),
                          ev([{"text": "Hello "}], usage=RUNNING), ev([{"text": ""}], usage=RUNNING),
                          ev([{"text": "world"}], "STOP", usage=FINAL)] for c in tr.feed(e)]
    assert chunks[0].choices[0].delta.role == pb.ROLE_ASSISTANT
    assert chunks[0].choices[0].delta.reasoning_content == "hmm"
    assert "".join(c.choices[0].delta.content for c in chunks) == "Hello world"
    assert len(chunks) == 3  # the empty text event adds nothing
    assert [c.HasField("usage") for c in chunks] == [False, False, True]
    assert chunks[-1].choices[0].finish_reason == pb.FINISH_REASON_STOP
    u = chunks[-1].usage
    assert (u.prompt_tokens, u.completion_tokens, u.completion_tokens_details.reasoning_tokens,
            u.prompt_tokens_details.cached_tokens) == (11, 7, 5, 3)
    assert tr.close() == [] and tr.finished_any
    assert len({c.id for c in chunks}) == 1


def test_stream_whole_function_calls_are_indexed_per_choice() -> None:
    tr = StreamTranslator("m")
    a = tr.feed(ev([{"functionCall": {"name": "get_weather", "args": {"city": "Oslo"}},
                     "thoughtSignature": "c2ln"}]))
    b = tr.feed(ev([{"functionCall": {"id": "x", "name": "get_time", "args": {}}}]))
    end = tr.feed(ev([{"text": ""}], "STOP", usage=FINAL))
    d1, d2 = a[0].choices[0].delta.tool_calls[0], b[0].choices[0].delta.tool_calls[0]
    assert (d1.index, d1.function.name, d1.function.arguments, d1.type) == (
        0, "get_weather", '{"city":"Oslo"}', "function")
    assert decode_tool_call_id(d1.id) == ("c2ln", None)
    assert (d2.index, d2.function.name) == (1, "get_time") and decode_tool_call_id(d2.id) == (None, "x")
    assert end[-1].choices[0].finish_reason == pb.FINISH_REASON_TOOL_CALLS
    assert end[-1].HasField("usage")


def test_stream_usage_waits_for_every_candidate() -> None:
    tr = StreamTranslator("m", candidates=2)
    first = tr.feed({"candidates": [{"content": {"parts": [{"text": "a"}]}, "finishReason": "STOP",
                                     "index": 0}], "usageMetadata": RUNNING})
    assert not any(c.HasField("usage") for c in first)
    last = tr.feed({"candidates": [{"content": {"parts": [{"text": "b"}]}, "finishReason": "STOP",
                                    "index": 1}], "usageMetadata": FINAL})
    assert last[-1].choices[0].index == 1 and last[-1].usage.total_tokens == 18


def test_stream_usage_left_over_goes_in_a_trailing_chunk() -> None:
    tr = StreamTranslator("m", candidates=2)
    tr.feed(ev([{"text": "a"}], "STOP", usage=FINAL))
    tail = tr.close()
    assert len(tail) == 1 and not tail[0].choices and tail[0].usage.total_tokens == 18


def test_stream_blocked_prompt_and_errors() -> None:
    tr = StreamTranslator("m")
    out = tr.feed({"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": RUNNING})
    assert out[0].choices[0].finish_reason == pb.FINISH_REASON_CONTENT_FILTER
    assert out[-1].usage.prompt_tokens == 11
    with pytest.raises(UpstreamError) as info:
        StreamTranslator("m").feed({"error": {"code": 500, "message": "boom", "status": "INTERNAL"}})
    assert info.value.kind == "stream" and "boom" in info.value.message


def test_gemini_is_registered() -> None:
    assert PROVIDERS["gemini"] is GeminiClient


# ====================================================== end to end (gateway) ====


@pytest.fixture(params=[False, True], ids=["one-process", "split"])
async def stack(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Stack, FakeGemini]]:
    f = FakeGemini()
    url = await f.start()
    cfg = make_config("channels:\n"
                      + channel_yaml("gem", "gemini", url, ["gemini-3-pro"]) + "\n"
                      + channel_yaml("gem-strict", "gemini", url, ["gemini-strict"],
                                     options="{thought_signature_fallback: false}") + "\n"
                      + channel_yaml("invalid", "gemini", url, ["gemini-failover"], priority=1) + "\n"
                      + channel_yaml("gem-2", "gemini", url, ["gemini-failover"])
                      + "\nrouter: {backoff_ms: 0, max_attempts: 2, max_retry_after_s: 0}\n")
    async with running_stack(cfg, split=request.param) as s:
        yield s, f
    await f.close()


def oai(s: Stack) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=s.base_url, api_key=TEST_KEY, max_retries=0)


async def test_rest_plain_chat(stack: tuple[Stack, FakeGemini]) -> None:
    s, f = stack
    r = await oai(s).chat.completions.create(model="gemini-3-pro", messages=[
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}],
        temperature=0.2)
    validate("CreateChatCompletionResponse", r.model_dump(mode="json", exclude_unset=True))
    assert r.choices[0].message.content == "You said: hello"
    assert r.choices[0].finish_reason == "stop"
    assert f.paths[-1] == "/v1beta/models/gemini-3-pro:generateContent"
    assert f.headers[-1]["x-goog-api-key"] == "upstream-secret-gem"
    assert f.requests[-1]["systemInstruction"] == {"parts": [{"text": "be brief"}]}
    assert f.requests[-1]["generationConfig"]["temperature"] == 0.2


async def test_rest_usage_equals_what_gemini_reported(stack: tuple[Stack, FakeGemini]) -> None:
    s, f = stack
    r = await oai(s).chat.completions.create(
        model="gemini-3-pro", messages=[user("THINK consider\nhi")])
    assert r.choices[0].message.reasoning_content == "consider"  # type: ignore[attr-defined]
    u = r.usage
    assert u is not None and u.prompt_tokens_details and u.completion_tokens_details
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (
        f.last_usage["prompt_tokens"], f.last_usage["completion_tokens"], 18)
    assert u.completion_tokens_details.reasoning_tokens == f.last_usage["reasoning_tokens"] == 5
    assert u.prompt_tokens_details.cached_tokens == f.last_usage["cached_tokens"] == 3
    recorded = s.usage.records[-1]
    assert (recorded.prompt_tokens, recorded.completion_tokens, recorded.cached_tokens,
            recorded.reasoning_tokens) == (11, 7, 3, 5)


async def test_rest_stream(stack: tuple[Stack, FakeGemini]) -> None:
    s, f = stack
    stream = await oai(s).chat.completions.create(
        model="gemini-3-pro", messages=[user("THINK hmm\nsay a few words")], stream=True,
        stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert f.paths[-1] == "/v1beta/models/gemini-3-pro:streamGenerateContent?alt=sse"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "You said: THINK hmm\nsay a few words"
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 2
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or ""
                        for c in chunks if c.choices)
    assert reasoning == "hmm"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    usage = [c.usage for c in chunks if c.usage]
    assert len(usage) == 1 and usage[0].completion_tokens_details
    assert (usage[0].prompt_tokens, usage[0].completion_tokens,
            usage[0].completion_tokens_details.reasoning_tokens) == (11, 7, 5)


async def tool_round_trip_rest(s: Stack, f: FakeGemini, *, stream: bool) -> None:
    client = oai(s)
    msgs: list[Any] = [user('TOOL get_weather {"city": "Paris"}')]
    if stream:
        chunks = [c async for c in await client.chat.completions.create(
            model="gemini-3-pro", messages=msgs, tools=[WEATHER_TOOL], stream=True)]
        deltas = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
        assert len(deltas) == 1
        fn = deltas[0].function
        assert fn is not None
        call_id, name, args = deltas[0].id, fn.name, fn.arguments
        assert [c.choices[0].finish_reason for c in chunks
                if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    else:
        r = await client.chat.completions.create(model="gemini-3-pro", messages=msgs,
                                                 tools=[WEATHER_TOOL])
        assert r.choices[0].finish_reason == "tool_calls"
        tc = r.choices[0].message.tool_calls[0]  # type: ignore[index]
        call_id, name, args = tc.id, tc.function.name, tc.function.arguments  # type: ignore[union-attr]
    assert name == "get_weather" and json.loads(args or "") == {"city": "Paris"}
    assert f.requests[-1]["tools"][0]["functionDeclarations"][0]["parametersJsonSchema"] == WEATHER_SCHEMA
    msgs += [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}]},
        {"role": "tool", "tool_call_id": call_id, "content": "sunny, 21C"}]
    second = await client.chat.completions.create(model="gemini-3-pro", messages=msgs,
                                                  tools=[WEATHER_TOOL])
    assert second.choices[0].message.content == "Tool said: sunny, 21C"
    sent = f.requests[-1]["contents"]
    assert sent[1]["parts"][0]["thoughtSignature"] == signature_for("get_weather")
    assert sent[1]["parts"][0]["functionCall"]["id"] == "fc-0-get_weather"
    assert sent[2]["parts"][0]["functionResponse"] == {
        "name": "get_weather", "response": {"result": "sunny, 21C"}, "id": "fc-0-get_weather"}


async def test_rest_tool_round_trip_carries_thought_signature(stack: tuple[Stack, FakeGemini]) -> None:
    await tool_round_trip_rest(*stack, stream=False)


async def test_rest_streamed_tool_round_trip_carries_thought_signature(
        stack: tuple[Stack, FakeGemini]) -> None:
    await tool_round_trip_rest(*stack, stream=True)


async def test_rest_foreign_tool_history_without_fallback_is_rejected_like_gemini_3(
        stack: tuple[Stack, FakeGemini]) -> None:
    """A history whose tool call id we never issued: with the bypass signature (default)
    Gemini accepts it; with `thought_signature_fallback: false` Gemini 3 says 400."""
    s, _ = stack
    body = tool_round_trip_body("call_from_elsewhere", result="21 degrees")
    ok = await oai(s).chat.completions.create(model="gemini-3-pro", **body)
    assert ok.choices[0].message.content == "Tool said: 21 degrees"
    with pytest.raises(openai.BadRequestError) as info:
        await oai(s).chat.completions.create(model="gemini-strict", **body)
    assert "thought_signature" in info.value.message


async def test_rest_parallel_tool_calls(stack: tuple[Stack, FakeGemini]) -> None:
    s, f = stack
    client = oai(s)
    r = await client.chat.completions.create(
        model="gemini-3-pro", tools=[WEATHER_TOOL, TIME_TOOL],
        messages=[user('TOOL get_weather {"city": "Oslo"}\nTOOL get_time {}')])
    calls = r.choices[0].message.tool_calls or []
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [  # type: ignore[union-attr]
        ("get_weather", {"city": "Oslo"}), ("get_time", {})]
    assert len({c.id for c in calls}) == 2
    chunks = [c async for c in await client.chat.completions.create(
        model="gemini-3-pro", tools=[WEATHER_TOOL, TIME_TOOL], stream=True,
        messages=[user('TOOL get_weather {"city": "Oslo"}\nTOOL get_time {}')])]
    deltas = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert [(d.index, d.function.name) for d in deltas] == [(0, "get_weather"), (1, "get_time")]  # type: ignore[union-attr]
    # answer both: one model turn with both calls (signature on the first), one user turn
    msgs: list[Any] = [user('TOOL get_weather {"city": "Oslo"}\nTOOL get_time {}'),
                       r.choices[0].message.model_dump(exclude_none=True)]
    msgs += [{"role": "tool", "tool_call_id": c.id, "content": json.dumps({"n": i})}
             for i, c in enumerate(calls)]
    second = await client.chat.completions.create(model="gemini-3-pro", messages=msgs,
                                                  tools=[WEATHER_TOOL, TIME_TOOL])
    assert second.choices[0].message.content == 'Tool said: {"n": 1}'
    sent = f.requests[-1]["contents"]
    assert [p.get("thoughtSignature") for p in sent[1]["parts"]] == [signature_for("get_weather"), None]
    assert [p["functionResponse"]["response"] for p in sent[2]["parts"]] == [{"n": 0}, {"n": 1}]


async def test_rest_image_input(stack: tuple[Stack, FakeGemini]) -> None:
    s, f = stack
    r = await oai(s).chat.completions.create(model="gemini-3-pro", messages=[{"role": "user", "content": [
        {"type": "text", "text": "what is this"},
        {"type": "image_url", "image_url": {"url": PNG_URL}},
        {"type": "image_url", "image_url": {"url": "https://img.example/cat.png"}}]}])
    assert r.choices[0].message.content == (
        f"You said: what is this [image: base64 image/png {len(PNG)} bytes]"
        " [image: url https://img.example/cat.png]")
    assert f.requests[-1]["contents"][0]["parts"][2] == {
        "fileData": {"mimeType": "image/png", "fileUri": "https://img.example/cat.png"}}


async def test_rest_stop_sequences_n_and_json_mode(stack: tuple[Stack, FakeGemini]) -> None:
    s, f = stack
    client = oai(s)
    stopped = await client.chat.completions.create(model="gemini-3-pro", messages=[user("one two three")],
                                                   stop=["three"])
    assert stopped.choices[0].message.content == "You said: one two "
    assert stopped.choices[0].finish_reason == "stop"
    assert f.requests[-1]["generationConfig"]["stopSequences"] == ["three"]
    two = await client.chat.completions.create(model="gemini-3-pro", messages=[user("twins")], n=2)
    assert [(c.index, c.message.content) for c in two.choices] == [(0, "You said: twins"),
                                                                    (1, "You said: twins")]
    assert f.requests[-1]["generationConfig"]["candidateCount"] == 2
    streamed = [c async for c in await client.chat.completions.create(
        model="gemini-3-pro", messages=[user("twins again")], n=2, stream=True,
        stream_options={"include_usage": True})]
    for i in (0, 1):
        assert "".join(c.choices[0].delta.content or "" for c in streamed
                       if c.choices and c.choices[0].index == i) == "You said: twins again"
    assert sum(1 for c in streamed if c.usage) == 1
    js = await client.chat.completions.create(model="gemini-3-pro", messages=[user("data please")],
                                              response_format={"type": "json_object"})
    assert json.loads(js.choices[0].message.content or "") == {"said": "data please"}
    assert f.requests[-1]["generationConfig"]["responseMimeType"] == "application/json"


async def test_rest_length_and_content_filter(stack: tuple[Stack, FakeGemini]) -> None:
    s, _ = stack
    client = oai(s)
    cut = await client.chat.completions.create(model="gemini-3-pro", messages=[user("a b c d e f")],
                                               max_tokens=2)
    assert cut.choices[0].finish_reason == "length" and cut.choices[0].message.content == "You said: "
    blocked = await client.chat.completions.create(model="gemini-3-pro", messages=[user("BLOCK")])
    assert blocked.choices[0].finish_reason == "content_filter"
    assert blocked.choices[0].message.content == ""
    unsafe = await client.chat.completions.create(model="gemini-3-pro", messages=[user("SAFETY")])
    assert unsafe.choices[0].finish_reason == "content_filter"


@pytest.mark.parametrize(("status", "error"), [
    (429, openai.RateLimitError), (500, openai.APIStatusError), (400, openai.BadRequestError)])
async def test_rest_upstream_errors_map_to_openai_statuses(
        stack: tuple[Stack, FakeGemini], status: int, error: type[openai.APIStatusError]) -> None:
    s, _ = stack
    with pytest.raises(error) as info:
        await oai(s).chat.completions.create(model="gemini-3-pro", messages=[user(f"ERROR {status}")])
    expected = {429: 429, 500: 502, 400: 400}[status]
    assert info.value.status_code == expected
    assert "upstream-secret" not in str(info.value.body)


async def test_rest_untranslatable_request_is_a_400_naming_the_field(
        stack: tuple[Stack, FakeGemini]) -> None:
    s, f = stack
    sent = len(f.requests)
    with pytest.raises(openai.BadRequestError) as info:
        await oai(s).chat.completions.create(model="gemini-3-pro", messages=[
            user("hi"), {"role": "tool", "tool_call_id": "call_unknown", "content": "x"}])
    assert info.value.body["param"] == "messages[1].tool_call_id"  # type: ignore[index]
    assert len(f.requests) == sent  # never reached the upstream


async def test_rest_bad_api_key_fails_over_to_the_next_channel(stack: tuple[Stack, FakeGemini]) -> None:
    """Gemini says 400 for a bad key; that is the channel's fault, so the router moves on."""
    s, f = stack
    r = await oai(s).chat.completions.create(model="gemini-failover", messages=[user("hi")])
    assert r.choices[0].message.content == "You said: hi"
    assert [h["x-goog-api-key"] for h in f.headers[-2:]] == ["upstream-secret-invalid",
                                                             "upstream-secret-gem-2"]


async def test_rest_midstream_error_is_an_sse_error_event(stack: tuple[Stack, FakeGemini]) -> None:
    s, _ = stack
    async with aiohttp.ClientSession() as http, http.post(
            s.base_url + "/chat/completions", headers={"authorization": f"Bearer {TEST_KEY}"},
            json={"model": "gemini-3-pro", "stream": True,
                  "messages": [user("ERROR midstream")]}) as resp:
        assert resp.status == 200
        events = [line[6:] for line in (await resp.text()).splitlines() if line.startswith("data: ")]
    assert events[-1] != "[DONE]" and "[DONE]" not in events
    err = json.loads(events[-1])["error"]
    assert err["code"] == "upstream_error" and "fake midstream failure" in err["message"]
    assert "".join(json.loads(e)["choices"][0]["delta"].get("content") or ""
                   for e in events[:-1]) == "You said: "


async def test_rest_stream_that_never_finishes_is_an_error(stack: tuple[Stack, FakeGemini]) -> None:
    """A Gemini stream cut before any finishReason must not look like a clean end."""
    s, _ = stack
    async with aiohttp.ClientSession() as http, http.post(
            s.base_url + "/chat/completions", headers={"authorization": f"Bearer {TEST_KEY}"},
            json={"model": "gemini-3-pro", "stream": True, "messages": [user("CUT")]}) as resp:
        events = [line[6:] for line in (await resp.text()).splitlines() if line.startswith("data: ")]
    assert "[DONE]" not in events
    assert json.loads(events[0])["choices"][0]["delta"]["content"] == "You "
    assert "ended before it finished" in json.loads(events[-1])["error"]["message"]


# ------------------------------------------------------------------ gRPC ----


def grpc_params(messages: list[pb.Message], **kw: Any) -> pb.ChatCompletionParams:
    return pb.ChatCompletionParams(model="gemini-3-pro", messages=messages, **kw)


def grpc_user(text: str) -> pb.Message:
    return pb.Message(role=pb.ROLE_USER, text=text)


GRPC_WEATHER = pb.Tool(type="function", function=pb.FunctionDefinition(
    name="get_weather", parameters_json=json.dumps(WEATHER_SCHEMA)))


async def test_grpc_plain_and_usage(stack: tuple[Stack, FakeGemini]) -> None:
    s, _ = stack
    r = await s.stub.CreateChatCompletion(pb.CreateChatCompletionRequest(
        params=grpc_params([grpc_user("THINK deep\nhello")])), metadata=AUTH)
    assert r.choices[0].message.content == "You said: THINK deep\nhello"
    assert r.choices[0].message.reasoning_content == "deep"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (11, 7, 18)
    assert r.usage.prompt_tokens_details.cached_tokens == 3
    assert r.usage.completion_tokens_details.reasoning_tokens == 5


async def test_grpc_stream(stack: tuple[Stack, FakeGemini]) -> None:
    s, _ = stack
    msgs = [m async for m in s.stub.StreamChatCompletion(pb.StreamChatCompletionRequest(
        params=grpc_params([grpc_user("stream me please")], n=2)), metadata=AUTH)]
    for i in (0, 1):
        assert "".join(c.delta.content for m in msgs for c in m.choices if c.index == i) == \
            "You said: stream me please"
    assert msgs[-1].usage.total_tokens == 18
    assert sum(1 for m in msgs if m.HasField("usage")) == 1
    assert sorted(c.index for m in msgs for c in m.choices if c.finish_reason) == [0, 1]


async def test_grpc_tool_round_trip_image_stop_json(stack: tuple[Stack, FakeGemini]) -> None:
    s, f = stack
    ask = grpc_user('TOOL get_weather {"city": "Lima"}')
    first = await s.stub.CreateChatCompletion(pb.CreateChatCompletionRequest(
        params=grpc_params([ask], tools=[GRPC_WEATHER])), metadata=AUTH)
    assert first.choices[0].finish_reason == pb.FINISH_REASON_TOOL_CALLS
    call = first.choices[0].message.tool_calls[0]
    second = await s.stub.CreateChatCompletion(pb.CreateChatCompletionRequest(params=grpc_params([
        ask, pb.Message(role=pb.ROLE_ASSISTANT, tool_calls=[call]),
        pb.Message(role=pb.ROLE_TOOL, tool_call_id=call.id, text='{"temp": 25}')],
        tools=[GRPC_WEATHER])), metadata=AUTH)
    assert second.choices[0].message.content == 'Tool said: {"temp": 25}'
    assert f.requests[-1]["contents"][1]["parts"][0]["thoughtSignature"] == signature_for("get_weather")
    image = await s.stub.CreateChatCompletion(pb.CreateChatCompletionRequest(params=grpc_params([
        pb.Message(role=pb.ROLE_USER, parts=pb.ContentParts(parts=[
            pb.ContentPart(text="see"), pb.ContentPart(image_url=pb.ImageUrl(url=PNG_URL))]))])),
        metadata=AUTH)
    assert image.choices[0].message.content == f"You said: see [image: base64 image/png {len(PNG)} bytes]"
    stopped = await s.stub.CreateChatCompletion(pb.CreateChatCompletionRequest(
        params=grpc_params([grpc_user("alpha beta gamma")], stop=["gamma"])), metadata=AUTH)
    assert stopped.choices[0].message.content == "You said: alpha beta "
    js = await s.stub.CreateChatCompletion(pb.CreateChatCompletionRequest(params=grpc_params(
        [grpc_user("structured")], response_format=pb.ResponseFormat(
            json_object=pb.ResponseFormat.JsonObjectFormat()))), metadata=AUTH)
    assert json.loads(js.choices[0].message.content) == {"said": "structured"}


@pytest.mark.parametrize(("text", "code"), [
    ("ERROR 429", grpc.StatusCode.RESOURCE_EXHAUSTED), ("ERROR 500", grpc.StatusCode.UNAVAILABLE),
    ("ERROR 400", grpc.StatusCode.INVALID_ARGUMENT)])
async def test_grpc_upstream_errors(stack: tuple[Stack, FakeGemini], text: str,
                                    code: grpc.StatusCode) -> None:
    s, _ = stack
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await s.stub.CreateChatCompletion(pb.CreateChatCompletionRequest(
            params=grpc_params([grpc_user(text)])), metadata=AUTH)
    assert info.value.code() == code


async def test_grpc_midstream_error_ends_the_stream_with_a_status(
        stack: tuple[Stack, FakeGemini]) -> None:
    s, _ = stack
    got: list[pb.StreamChatCompletionResponse] = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for m in s.stub.StreamChatCompletion(pb.StreamChatCompletionRequest(
                params=grpc_params([grpc_user("ERROR midstream")])), metadata=AUTH):
            got.append(m)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert got and not any(c.finish_reason for m in got for c in m.choices)
