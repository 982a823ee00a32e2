"""The OpenAI wire schema (core/schema/openai.py) round-trips every field the contract
carries, in both directions: a client's request JSON → params → the upstream request
JSON, and an upstream reply/chunk JSON → proto → the client's JSON, each equal to the
input except the normalisations the module documents (tested one by one below).

Coverage is decided from the contract, not from a hand list: the descriptors of
ChatCompletionParams, CreateChatCompletionResponse and StreamChatCompletionResponse are
walked, and every field of every message type reachable from them must be set by at
least one sample after parsing. A field added to the proto without a JSON mapping (or
without a sample here) fails `test_samples_cover_every_contract_field`; a mapping that
reads a field but does not write it back fails the round trip. The same holds for the
Role and FinishReason enums. The same samples also go through a real gateway over
loopback (a scripted OpenAI upstream), so the façade and the provider agree end to end.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from google.protobuf.message import Message

from switchboard.core.providers.base import UpstreamError
from switchboard.core.providers.openai import chunk_from_wire, response_from_wire
from switchboard.core.schema import openai as s
from switchboard.v1 import inference_pb2 as pb
from tests.fakes.base import LoopbackFake
from tests.harness import AUTH, Stack, channel_yaml, make_config, running_stack

# ------------------------------------------------------------- samples ----
# Written in canonical form (what the schema writes), so each must come back unchanged.

REQUESTS: list[dict[str, Any]] = [
    {
        "model": "gpt-4o",
        "messages": [
            {"role": "developer", "content": "be brief", "name": "ops"},
            {"role": "system", "content": "you are terse"},
            {"role": "user", "x_client_tag": {"a": [1, 2]}, "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png",
                                                    "detail": "high"}},
                {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
                {"type": "file", "file": {"file_id": "file-abc"}},
            ]},
            {"role": "assistant", "content": None, "refusal": "no", "reasoning_content": "hm",
             "tool_calls": [{"id": "call_1", "type": "function",
                             "function": {"name": "lookup", "arguments": "{\"q\":1}"}}]},
            {"role": "assistant", "content": [{"type": "refusal", "refusal": "I can't"}]},
            {"role": "tool", "content": "42", "tool_call_id": "call_1"},
        ],
        "temperature": 0.5, "top_p": 0.9, "n": 2, "max_tokens": 100,
        "max_completion_tokens": 200, "presence_penalty": 0.25, "frequency_penalty": -0.5,
        "logprobs": True, "top_logprobs": 3, "seed": 2**40, "user": "u-1",
        "parallel_tool_calls": False, "reasoning_effort": "low",
        "stop": ["END", "STOP"], "logit_bias": {"50256": -100}, "metadata": {"team": "x"},
        "tools": [{"type": "function", "function": {
            "name": "lookup", "description": "find a thing", "strict": True,
            "parameters": {"type": "object", "properties": {"q": {"type": "integer"}}}}}],
        "tool_choice": "required",
        "response_format": {"type": "json_schema", "json_schema": {
            "name": "answer", "description": "the shape", "strict": True,
            "schema": {"type": "object"}}},
        "stream": True, "stream_options": {"include_usage": True},
        "service_tier": "flex", "prediction": {"type": "content", "content": "x"},
    },
    {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}],
     "tool_choice": {"type": "function", "function": {"name": "lookup"}},
     "response_format": {"type": "text"}},
    {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}],
     "response_format": {"type": "json_object"}},
]

USAGE: dict[str, Any] = {
    "prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19,
    "prompt_tokens_details": {"cached_tokens": 4, "audio_tokens": 1},
    "completion_tokens_details": {"reasoning_tokens": 3, "audio_tokens": 2,
                                  "accepted_prediction_tokens": 1,
                                  "rejected_prediction_tokens": 5}}

REPLIES: list[dict[str, Any]] = [{
    "id": "chatcmpl-1", "object": "chat.completion", "created": 1733300000, "model": "gpt-4o",
    "system_fingerprint": "fp_1", "service_tier": "default", "usage": USAGE,
    "choices": [
        {"index": 0, "finish_reason": "stop",
         "logprobs": {"content": [{"token": "hi", "logprob": -0.1, "bytes": [104, 105],
                                   "top_logprobs": []}], "refusal": None},
         "message": {"role": "assistant", "content": "hi", "refusal": None,
                     "reasoning_content": "greet", "annotations": [
                         {"type": "url_citation", "url_citation": {"url": "https://e.x"}}]}},
        {"index": 1, "finish_reason": "tool_calls", "logprobs": None,
         "message": {"role": "assistant", "content": None, "refusal": "no",
                     "tool_calls": [{"id": "call_1", "type": "function",
                                     "function": {"name": "lookup", "arguments": "{}"}}]}},
    ]}]

_HEAD = {"id": "chatcmpl-2", "object": "chat.completion.chunk", "created": 1733300000,
         "model": "gpt-4o", "system_fingerprint": "fp_1"}
CHUNKS: list[dict[str, Any]] = [
    {**_HEAD, "usage": None, "choices": [{"index": 0, "finish_reason": None, "delta": {
        "role": "assistant", "content": "", "refusal": "r", "reasoning_content": "t"},
        "logprobs": {"content": [], "refusal": None}}]},
    {**_HEAD, "usage": None, "choices": [{"index": 1, "finish_reason": None, "delta": {
        "tool_calls": [{"index": 1, "id": "call_1", "type": "function",
                        "function": {"name": "lookup", "arguments": ""}}]}}]},
    {**_HEAD, "usage": None, "choices": [{"index": 1, "finish_reason": None, "delta": {
        "tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]}}]},
    {**_HEAD, "usage": None, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
    {**_HEAD, "service_tier": "default", "choices": [], "usage": USAGE},
]


# --------------------------------------------------------- round trips ----


def request_round_trip(body: dict[str, Any]) -> dict[str, Any]:
    params, stream = s.parse_chat(copy.deepcopy(body))
    return s.params_to_json(params, body["model"], stream=stream)


def chunk_round_trip(d: dict[str, Any]) -> dict[str, Any]:
    # As the SSE relay does: a usage-only chunk is written by usage_chunk_to_json.
    r = s.chunk_from_json(d)
    return s.chunk_to_json(r, True) if r.choices else s.usage_chunk_to_json(r)


@pytest.mark.parametrize("body", REQUESTS)
def test_request_round_trip(body: dict[str, Any]) -> None:
    assert request_round_trip(body) == body


@pytest.mark.parametrize("reply", REPLIES)
def test_reply_round_trip(reply: dict[str, Any]) -> None:
    assert s.reply_to_json(s.reply_from_json(reply)) == reply


@pytest.mark.parametrize("chunk", CHUNKS)
def test_chunk_round_trip(chunk: dict[str, Any]) -> None:
    assert chunk_round_trip(chunk) == chunk


def _reachable_fields(desc: Any) -> set[str]:
    """"Type.field" for every field of every message type reachable from `desc` (map
    entries are leaves: their keys and values are JSON text or scalars)."""
    out: set[str] = set()
    seen: set[str] = set()
    stack = [desc]
    while stack:
        d = stack.pop()
        if d.full_name in seen:
            continue
        seen.add(d.full_name)
        for f in d.fields:
            out.add(f"{d.name}.{f.name}")
            if f.message_type is not None and not f.message_type.GetOptions().map_entry:
                stack.append(f.message_type)
    return out


def _set_fields(msg: Message, out: set[str]) -> set[str]:
    for f, value in msg.ListFields():
        out.add(f"{msg.DESCRIPTOR.name}.{f.name}")
        if f.message_type is not None and not f.message_type.GetOptions().map_entry:
            for item in value if f.is_repeated else [value]:
                _set_fields(item, out)
    return out


@pytest.mark.parametrize(("root", "samples"), [
    (pb.ChatCompletionParams, [s.parse_chat(copy.deepcopy(b))[0] for b in REQUESTS]),
    (pb.CreateChatCompletionResponse, [s.reply_from_json(r) for r in REPLIES]),
    (pb.StreamChatCompletionResponse, [s.chunk_from_json(c) for c in CHUNKS]),
], ids=["request", "reply", "chunk"])
def test_samples_cover_every_contract_field(root: Any, samples: list[Message]) -> None:
    covered: set[str] = set()
    for m in samples:
        _set_fields(m, covered)
    missing = _reachable_fields(root.DESCRIPTOR) - covered
    assert not missing, (f"contract fields no sample sets (map them in core/schema/openai.py, "
                         f"then add them to a sample here): {sorted(missing)}")


@pytest.mark.parametrize("value", [v.number for v in pb.Role.DESCRIPTOR.values if v.number])
def test_every_role_maps_both_ways(value: int) -> None:
    name = s.ROLE_TO_JSON[value]
    assert s.ROLE_FROM_JSON[name] == value
    body = {"model": "m", "messages": [{"role": name, "content": "x"}]}
    assert request_round_trip(body) == body


@pytest.mark.parametrize("value", [v.number for v in pb.FinishReason.DESCRIPTOR.values
                                   if v.number])
def test_every_finish_reason_maps_both_ways(value: int) -> None:
    name = s.FINISH_TO_JSON[value]
    assert name is not None and s.FINISH_FROM_JSON[name] == value
    chunk = {**CHUNKS[3], "choices": [{"index": 0, "delta": {}, "finish_reason": name}]}
    assert chunk_round_trip(chunk) == chunk
    reply = copy.deepcopy(REPLIES[0])
    reply["choices"][0]["finish_reason"] = name
    assert s.reply_to_json(s.reply_from_json(reply)) == reply


def test_schema_is_a_leaf() -> None:
    # Both the façade and the provider depend on it, so it may load nothing of theirs
    # (nor the router or gateway): the contract, core.errors and core.bounds only.
    code = ("import sys, switchboard.core.schema.openai; "
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('switchboard'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert set(out.stdout.split()) == {
        "switchboard", "switchboard.v1", "switchboard.v1.inference_pb2", "switchboard.core",
        "switchboard.core.errors", "switchboard.core.bounds", "switchboard.core.schema",
        "switchboard.core.schema.check", "switchboard.core.schema.openai"}


# ------------------------------------------------------ normalisations ----
# Each documented normalisation: (what comes in, what goes out).

_M = [{"role": "user", "content": "hi"}]
_CALL = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}

REQUEST_NORMALISATIONS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("stop string", {"model": "m", "messages": _M, "stop": "x"},
     {"model": "m", "messages": _M, "stop": ["x"]}),
    ("image_url string",
     {"model": "m", "messages": [{"role": "user", "content": [
         {"type": "image_url", "image_url": "https://e.x/a.png"}]}]},
     {"model": "m", "messages": [{"role": "user", "content": [
         {"type": "image_url", "image_url": {"url": "https://e.x/a.png"}}]}]}),
    ("arguments object, type missing",
     {"model": "m", "messages": [{"role": "assistant", "content": None, "tool_calls": [
         {"id": "c", "function": {"name": "f", "arguments": {"a": 1}}}]}]},
     {"model": "m", "messages": [{"role": "assistant", "content": None,
                                  "tool_calls": [_CALL]}]}),
    ("tool type missing",
     {"model": "m", "messages": _M, "tools": [{"function": {"name": "f"}}]},
     {"model": "m", "messages": _M, "tools": [{"type": "function", "function": {"name": "f"}}]}),
    ("tool_choice without type",
     {"model": "m", "messages": _M, "tool_choice": {"function": {"name": "f"}}},
     {"model": "m", "messages": _M,
      "tool_choice": {"type": "function", "function": {"name": "f"}}}),
    ("content missing", {"model": "m", "messages": [{"role": "assistant"}]},
     {"model": "m", "messages": [{"role": "assistant", "content": None}]}),
    ("logit_bias float", {"model": "m", "messages": _M, "logit_bias": {"1": 5.0}},
     {"model": "m", "messages": _M, "logit_bias": {"1": 5}}),
    ("stream usage is the provider's", {"model": "m", "messages": _M, "stream": True,
                                        "stream_options": {"include_usage": False}},
     {"model": "m", "messages": _M, "stream": True, "stream_options": {"include_usage": True}}),
    ("not streamed", {"model": "m", "messages": _M, "stream": False,
                      "stream_options": {"include_usage": True}},
     {"model": "m", "messages": _M}),
]


@pytest.mark.parametrize(("body", "want"), [(b, w) for _, b, w in REQUEST_NORMALISATIONS],
                         ids=[n for n, _, _ in REQUEST_NORMALISATIONS])
def test_request_normalisations(body: dict[str, Any], want: dict[str, Any]) -> None:
    assert request_round_trip(body) == want


def test_request_upstream_model_and_stream_usage_option() -> None:
    params, _ = s.parse_chat({"model": "public", "messages": _M, "stream": True})
    assert s.params_to_json(params, "upstream-name", stream=True, stream_usage=False) == {
        "model": "upstream-name", "messages": _M, "stream": True}


_R = {"id": "x", "object": "chat.completion", "created": 1, "model": "m"}
_MSG = {"role": "assistant", "content": "hi", "refusal": None}

REPLY_NORMALISATIONS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("reasoning alias",
     {**_R, "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                         "message": {**_MSG, "reasoning": "because"}}]},
     {**_R, "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                         "message": {**_MSG, "reasoning_content": "because"}}]}),
    ("absent content, refusal, logprobs; null extra; empty fingerprint",
     {**_R, "system_fingerprint": None, "service_tier": "",
      "choices": [{"finish_reason": "stop", "message": {"audio": None}}]},
     {**_R, "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                         "message": {"role": "assistant", "content": None, "refusal": None}}]}),
    ("unknown finish reason",
     {**_R, "choices": [{"index": 0, "finish_reason": "eos", "logprobs": None, "message": _MSG}]},
     {**_R, "choices": [{"index": 0, "finish_reason": None, "logprobs": None, "message": _MSG}]}),
    ("usage total missing",
     {**_R, "choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 3}},
     {**_R, "choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 3,
                                     "total_tokens": 5}}),
]


@pytest.mark.parametrize(("reply", "want"), [(r, w) for _, r, w in REPLY_NORMALISATIONS],
                         ids=[n for n, _, _ in REPLY_NORMALISATIONS])
def test_reply_normalisations(reply: dict[str, Any], want: dict[str, Any]) -> None:
    assert s.reply_to_json(s.reply_from_json(reply)) == want


def test_chunk_normalisations() -> None:
    head = {k: v for k, v in _HEAD.items() if k != "system_fingerprint"}
    got = chunk_round_trip({**head, "service_tier": "default", "system_fingerprint": "",
                            "choices": [{"delta": {"role": "user", "reasoning": "t"},
                                         "logprobs": None}]})
    assert got == {**head, "usage": None, "choices": [
        {"index": 0, "finish_reason": None, "delta": {"reasoning_content": "t"}}]}


def test_unreadable_upstream_json_is_the_providers_retryable_error() -> None:
    for fn, bad in ((response_from_wire, {"id": "x"}), (chunk_from_wire, {"choices": [1]})):
        with pytest.raises(UpstreamError) as info:
            fn(bad)
        assert info.value.retryable and info.value.kind == "malformed"


# ---------------------------------------------- the same, end to end ----


class ScriptedOpenAI(LoopbackFake):
    """An OpenAI upstream that answers with the samples above, as they are."""
    base_path = "/v1"

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self._chat)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.log(request, body)
        if not body.get("stream"):
            return web.json_response(REPLIES[0])
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for c in CHUNKS:  # as OpenAI does, every chunk names the tier (relayed on the last)
            await resp.write(b"data: " + json.dumps({**c, "service_tier": "default"}).encode()
                             + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp


@pytest.fixture
async def stack() -> AsyncIterator[tuple[Stack, ScriptedOpenAI]]:
    fake = ScriptedOpenAI()
    url = await fake.start()
    cfg = make_config(f"channels:\n{channel_yaml('oa', 'openai', url, ['gpt-4o'])}\n")
    async with running_stack(cfg) as st:
        yield st, fake
    await fake.close()


async def test_round_trip_through_the_gateway(stack: tuple[Stack, ScriptedOpenAI]) -> None:
    st, fake = stack
    async with aiohttp.ClientSession(headers=AUTH) as http:
        async with http.post(f"{st.http_url}/v1/chat/completions", json=REQUESTS[0]) as r:
            assert r.status == 200, await r.text()
            events = [line[6:] async for line in r.content if line.startswith(b"data: ")]
        assert fake.requests[-1] == REQUESTS[0]
        assert [orjson.loads(e) for e in events[:-1]] == CHUNKS and events[-1] == b"[DONE]\n"
        plain = {k: v for k, v in REQUESTS[0].items() if k not in ("stream", "stream_options")}
        async with http.post(f"{st.http_url}/v1/chat/completions", json=plain) as r:
            assert r.status == 200, await r.text()
            assert await r.json() == REPLIES[0]
        assert fake.requests[-1] == plain
