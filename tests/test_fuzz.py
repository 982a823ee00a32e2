"""Property-based fuzzing of both surfaces (issue 10, item 4) with Hypothesis, against a
real in-process gateway over loopback (echo, an OpenAI-wire fake and an Anthropic-wire
fake behind it, so the provider translations see the input too).

Properties, for every generated request:
- REST: never a 500; every error is an OpenAI error object
  `{"error": {"message", "type", "param", "code"}}`; a 200 is a chat completion / image
  reply, or an SSE stream that never carries a `server_error` event;
- gRPC (arbitrary bytes as a request): never UNKNOWN or INTERNAL, never a Python class
  name in the status message;
- afterwards the gateway still answers a plain request.

Bodies are OpenAI-shaped with any field liable to hold any JSON value (wrong types,
out-of-range numbers, deep nesting, unknown fields), plus raw bytes with hostile headers.

Bounded for CI: a fixed number of examples per property, derandomized (the same
examples every run, so a red run is reproducible), no example database written to the
working tree; the whole module takes well under 30 s. To explore further, run it with
FUZZ_EXAMPLES=2000 FUZZ_RANDOM=1 (random examples each run).
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from switchboard.core.bounds import MAX_JSON_DEPTH
from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import AUTH, TEST_KEY, Stack, channel_yaml, make_config, running_stack

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "120"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                derandomize=not os.environ.get("FUZZ_RANDOM"),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


class ThreadedGateway:
    """The gateway on its own event loop in a thread, so Hypothesis (synchronous) can
    drive it with plain blocking clients."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.stack: Stack | None = None

    def _run(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self) -> Stack:
        self.openai, self.anthropic = FakeOpenAI(), FakeAnthropic()
        oa, an = await self.openai.start(), await self.anthropic.start()
        cfg = make_config(f"""
admin_key: sk-admin-fuzz-0123456789
channels:
  - {{name: echo, provider: echo, models: [echo, dall-e-2]}}
{channel_yaml("oa", "openai", oa, ["gpt-4o", "dall-e-3"])}
{channel_yaml("an", "anthropic", an, ["claude"])}
router: {{backoff_ms: 0}}
max_body_bytes: 300000
""")
        self._cm = running_stack(cfg)
        return await self._cm.__aenter__()  # type: ignore[no-any-return]

    async def _stop(self) -> None:
        await self._cm.__aexit__(None, None, None)
        await self.openai.close()
        await self.anthropic.close()

    def __enter__(self) -> ThreadedGateway:
        self.thread.start()
        self.stack = self._run(self._start())
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._run(self._stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


@pytest.fixture(scope="module")
def gateway() -> Iterator[ThreadedGateway]:
    with ThreadedGateway() as g:
        yield g


@pytest.fixture(scope="module")
def http(gateway: ThreadedGateway) -> Iterator[httpx.Client]:
    assert gateway.stack is not None
    with httpx.Client(base_url=gateway.stack.http_url, timeout=30,
                      headers={"authorization": f"Bearer {TEST_KEY}"}) as client:
        yield client


# ------------------------------------------------------------- strategies ----

BIG_INTS = st.sampled_from([2**31 - 1, 2**31, 2**53, 2**63 - 1, 2**63, 2**64 - 1,
                            -(2**31) - 1, -(2**63)])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**64) + 1, 2**64 - 1), BIG_INTS,
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
JSON = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)


def deep(depth: int) -> Any:
    value: Any = 0
    for i in range(depth):
        value = [value] if i % 2 else {"d": value}
    return value


DEEP = st.sampled_from([MAX_JSON_DEPTH - 2, MAX_JSON_DEPTH, MAX_JSON_DEPTH + 1, 300]).map(deep)
ANY = st.one_of(JSON, DEEP)


def maybe(typed: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly a plausible value, sometimes anything at all."""
    return st.one_of(typed, typed, ANY)


TOOL_CALL = st.fixed_dictionaries(
    {"id": maybe(st.text(max_size=8)), "type": maybe(st.just("function")),
     "function": maybe(st.fixed_dictionaries({"name": maybe(st.text(min_size=1, max_size=8)),
                                              "arguments": maybe(st.just("{}"))}))})
PART = maybe(st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": maybe(st.text(max_size=20))}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": maybe(
        st.fixed_dictionaries({"url": maybe(st.just("data:image/png;base64,iVBORw0KGgo="))}))}),
))
MESSAGE = maybe(st.fixed_dictionaries(
    {"role": maybe(st.sampled_from(["system", "developer", "user", "assistant", "tool"])),
     "content": maybe(st.one_of(st.text(max_size=30), st.lists(PART, max_size=3)))},
    optional={"tool_calls": maybe(st.lists(TOOL_CALL, max_size=2)),
              "tool_call_id": maybe(st.text(max_size=8)), "name": ANY,
              "unknown_message_field": ANY}))
TOOL = maybe(st.fixed_dictionaries(
    {"type": maybe(st.just("function")),
     "function": maybe(st.fixed_dictionaries(
         {"name": maybe(st.text(min_size=1, max_size=8))},
         optional={"parameters": maybe(st.just({"type": "object", "properties": {}})),
                   "description": ANY, "strict": ANY}))}))
INT = st.one_of(st.integers(-5, 300), BIG_INTS)
NUM = st.one_of(st.floats(-3, 3, allow_nan=False), BIG_INTS)
CHAT = st.fixed_dictionaries(
    {"model": maybe(st.sampled_from(["echo", "gpt-4o", "claude", "missing-model"])),
     "messages": maybe(st.lists(MESSAGE, min_size=1, max_size=3))},
    optional={**{k: maybe(INT) for k in ("max_tokens", "max_completion_tokens", "n",
                                          "top_logprobs", "seed")},
              **{k: maybe(NUM) for k in ("temperature", "top_p", "presence_penalty",
                                         "frequency_penalty")},
              "logit_bias": maybe(st.dictionaries(st.text(max_size=5), NUM, max_size=3)),
              "stop": maybe(st.one_of(st.text(max_size=5), st.lists(st.text(max_size=5),
                                                                      max_size=3))),
              "stream": maybe(st.booleans()),
              "stream_options": maybe(st.fixed_dictionaries({"include_usage": maybe(st.booleans())})),
              "tools": maybe(st.lists(TOOL, max_size=2)),
              "tool_choice": maybe(st.one_of(st.sampled_from(["none", "auto", "required"]),
                                             st.fixed_dictionaries({"type": st.just("function"),
                                                                    "function": maybe(st.fixed_dictionaries({"name": st.text(max_size=5)}))}))),
              "response_format": maybe(st.fixed_dictionaries({"type": maybe(st.sampled_from(
                  ["text", "json_object", "json_schema"]))}, optional={"json_schema": ANY})),
              "metadata": maybe(st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3)),
              "reasoning_effort": maybe(st.sampled_from(["low", "medium", "high"])),
              "user": ANY, "logprobs": ANY, "parallel_tool_calls": ANY,
              "some_future_field": ANY})
IMAGE = st.fixed_dictionaries(
    {"prompt": maybe(st.text(min_size=1, max_size=20)),
     "model": maybe(st.sampled_from(["dall-e-2", "dall-e-3", "nope"]))},
    optional={"n": maybe(INT), "size": maybe(st.sampled_from(["256x256", "1024x1024"])),
              "response_format": maybe(st.sampled_from(["url", "b64_json"])), "quality": ANY,
              "style": ANY, "user": ANY, "unknown": ANY})


# ------------------------------------------------------------- properties ----

def check_reply(r: httpx.Response) -> None:
    assert r.status_code != 500, r.text[:500]
    assert r.status_code < 500 or r.status_code in (502, 503, 504), (r.status_code, r.text[:500])
    if r.status_code >= 400:
        body = orjson.loads(r.content)
        assert isinstance(body, dict) and set(body) == {"error"}, body
        err = body["error"]
        assert set(err) == {"message", "type", "param", "code"}, err
        assert isinstance(err["message"], str) and err["message"], err
        assert err["param"] is None or isinstance(err["param"], str), err
        assert "<class" not in err["message"] and "Traceback" not in err["message"], err
        assert err["type"] != "server_error", err
    elif r.headers.get("content-type", "").startswith("text/event-stream"):
        assert b"server_error" not in r.content, r.text[:500]
        assert r.content.rstrip().endswith(b"data: [DONE]") or b'"error"' in r.content
    else:
        assert isinstance(orjson.loads(r.content), dict)


@FUZZ
@given(body=CHAT)
def test_fuzz_chat_bodies(http: httpx.Client, body: dict[str, Any]) -> None:
    check_reply(http.post("/v1/chat/completions", content=_stdlib(body)))


@settings(FUZZ, max_examples=max(EXAMPLES // 3, 10))
@given(body=IMAGE)
def test_fuzz_image_bodies(http: httpx.Client, body: dict[str, Any]) -> None:
    check_reply(http.post("/v1/images/generations", content=_stdlib(body)))


RAW_HEADERS = st.fixed_dictionaries({}, optional={
    "content-encoding": st.sampled_from(["gzip", "deflate", "br", "identity", "x-nope"]),
    "x-switchboard-timeout": st.one_of(st.sampled_from(["nan", "inf", "-1", "0", "1e309", "0.5"]),
                                       st.text(max_size=8)),
    "content-type": st.sampled_from(["application/json", "text/plain", "multipart/form-data"]),
})


@settings(FUZZ, max_examples=max(EXAMPLES // 3, 10))
@given(raw=st.one_of(st.binary(max_size=200), CHAT.map(lambda b: _stdlib(b)[:-3])),
       headers=RAW_HEADERS,
       path=st.sampled_from(["/v1/chat/completions", "/v1/images/generations", "/admin/v1/keys"]))
def test_fuzz_raw_bodies_and_headers(http: httpx.Client, raw: bytes, headers: dict[str, str],
                                     path: str) -> None:
    safe = {k: v for k, v in headers.items() if v.isascii() and v.isprintable()}
    check_reply(http.post(path, content=raw, headers=safe))


GRPC_METHODS = ["/switchboard.v1.InferenceService/CreateChatCompletion",
                "/switchboard.v1.InferenceService/CreateImage",
                "/switchboard.v1.InferenceService/GetModel",
                "/switchboard.v1.AdminService/CreateKey",
                "/grpc.health.v1.Health/Check"]


@pytest.fixture(scope="module")
def grpc_channel(gateway: ThreadedGateway) -> Iterator[grpc.Channel]:
    assert gateway.stack is not None
    with grpc.insecure_channel(gateway.stack.grpc_target) as channel:
        yield channel


@settings(FUZZ, max_examples=max(EXAMPLES // 2, 10))
@given(raw=st.one_of(st.binary(max_size=120),
                     # well-formed wire bytes with odd values: field 1 (params/prompt/…)
                     st.binary(max_size=60).map(lambda b: b"\x0a" + bytes([len(b)]) + b)),
       method=st.sampled_from(GRPC_METHODS), streaming=st.booleans())
def test_fuzz_grpc_request_bytes(grpc_channel: grpc.Channel, raw: bytes, method: str,
                                 streaming: bool) -> None:
    ident = lambda b: b  # noqa: E731 - raw bytes both ways
    try:
        if streaming:
            call = grpc_channel.unary_stream("/switchboard.v1.InferenceService/StreamChatCompletion",
                                             request_serializer=ident, response_deserializer=ident)
            for _ in call(raw, metadata=AUTH, timeout=20):
                pass
        else:
            grpc_channel.unary_unary(method, request_serializer=ident,
                                     response_deserializer=ident)(raw, metadata=AUTH, timeout=20)
    except grpc.RpcError as err:
        code, details = err.code(), err.details() or ""  # type: ignore[attr-defined]
        assert code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), (code, details)
        assert "<class" not in details and "Traceback" not in details, details


def test_still_answers_after_fuzzing(http: httpx.Client, grpc_channel: grpc.Channel) -> None:
    """Runs last in this module (pytest keeps file order): the same gateway that took
    every example above still serves a plain request on both surfaces."""
    r = http.post("/v1/chat/completions", json={"model": "echo", "messages": [
        {"role": "user", "content": "still here"}]})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "still here"
    from switchboard.v1 import inference_pb2 as pb
    from switchboard.v1 import inference_pb2_grpc as pb_grpc

    reply = pb_grpc.InferenceServiceStub(grpc_channel).ListModels(pb.ListModelsRequest(),
                                                                  metadata=AUTH, timeout=10)
    assert {m.id for m in reply.models} >= {"echo", "gpt-4o", "claude"}


def _stdlib(body: Any) -> bytes:
    # the standard library's encoder: it writes what orjson will not (ints past 64 bits)
    return json.dumps(body).encode()
