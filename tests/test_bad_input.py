"""Bad input gets a 4xx in the caller's format, never a 500 (issue 10, item 4): numbers
outside the contract's proto types, JSON nested past the one depth limit, wrong types
inside nested objects, broken body encodings, bad timeout headers, requests aiohttp's
HTTP parser refuses (answered with raw sockets), and gRPC bytes that do not decode or
JSON text fields that are not JSON. Real gateway stacks over loopback, both deployments
for REST (one process; façade apart as a gRPC client of the core)."""

from __future__ import annotations

import asyncio
import gzip
import zlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import orjson
import pytest

from switchboard.core.bounds import MAX_JSON_DEPTH
from switchboard.v1 import inference_pb2 as pb
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import AUTH, TEST_KEY, Stack, channel_yaml, make_config, running_stack
from tests.test_grpc_api import error_info

CHAT = "/v1/chat/completions"
BASE: dict[str, Any] = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(params=[False, True], ids=["one-process", "split"])
async def stack(request: pytest.FixtureRequest) -> AsyncIterator[Stack]:
    fake = FakeOpenAI()
    url = await fake.start()
    cfg = make_config(f"""
admin_key: sk-admin-key-0123456789
channels:
{channel_yaml("oa", "openai", url, ["gpt-4o", "dall-e-3"])}
""")
    async with running_stack(cfg, split=request.param) as s:
        yield s
    await fake.close()


async def post(s: Stack, path: str, body: Any, headers: dict[str, str] | None = None,
               key: str = TEST_KEY) -> tuple[int, dict[str, str], Any]:
    data = body if isinstance(body, (bytes, str)) else orjson.dumps(body)
    h = {"authorization": f"Bearer {key}", "content-type": "application/json", **(headers or {})}
    # A fresh connection per request: a refused body may leave the connection closed.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http, \
            http.post(s.http_url + path, data=data, headers=h) as r:
        return r.status, dict(r.headers), await r.json(content_type=None)


def assert_openai_error(body: Any, param: str | None = "<any>") -> dict[str, Any]:
    assert isinstance(body, dict) and set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    assert "Traceback" not in err["message"] and "<class" not in err["message"], err
    if param != "<any>":
        assert err["param"] == param, err
    return err  # type: ignore[no-any-return]


# ---------------------------------------------------------------- numbers ----

OUT_OF_RANGE = [2**31, 2**63, 2**64 - 1, -(2**31) - 1]


async def test_integers_outside_the_proto_range_are_400_naming_the_param(stack: Stack) -> None:
    for name in ("max_tokens", "max_completion_tokens", "n", "top_logprobs", "seed"):
        for value in OUT_OF_RANGE:
            if name == "seed" and -(2**63) <= value < 2**63:
                continue  # seed is int64: 2^31 and -2^31-1 are valid seeds
            status, _, body = await post(stack, CHAT, {**BASE, name: value})
            assert status == 400, (name, value, body)
            assert_openai_error(body, name)
    # seed's own edges: int64 holds ±2^31 (served), 2^63 does not (400)
    status, _, body = await post(stack, CHAT, {**BASE, "seed": 2**31})
    assert status == 200, body


async def test_logit_bias_values_outside_int32_are_400(stack: Stack) -> None:
    for value in (1e300, 2**64 - 1, -1e20):
        status, _, body = await post(stack, CHAT, {**BASE, "logit_bias": {"50256": value}})
        assert status == 400, (value, body)
        assert_openai_error(body, "logit_bias.50256")
    status, _, body = await post(stack, CHAT, {**BASE, "logit_bias": {"50256": -100}})
    assert status == 200, body


async def test_images_n_outside_int32_is_400(stack: Stack) -> None:
    status, _, body = await post(stack, "/v1/images/generations",
                                 {"model": "dall-e-3", "prompt": "a cat", "n": 2**40})
    assert status == 400, body
    assert_openai_error(body, "n")


# ------------------------------------------------------------------ depth ----

def nested(depth: int) -> Any:
    """A JSON value `depth` arrays/objects deep."""
    value: Any = []
    for i in range(depth - 1):
        value = [value] if i % 2 else {"k": value}
    return value


async def test_one_json_depth_limit_on_every_body(stack: Stack) -> None:
    # Body depth = 1 (the body object) + the field's own depth.
    ok = nested(MAX_JSON_DEPTH - 1)
    too_deep = nested(MAX_JSON_DEPTH)
    status, _, body = await post(stack, CHAT, {**BASE, "some_future_field": ok})
    assert status == 200, body
    for depth in (MAX_JSON_DEPTH, 300, 10_000):
        raw = b'{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"zz":' + \
            b"[" * depth + b"]" * depth + b"}"
        status, _, body = await post(stack, CHAT, raw)
        assert status == 400, (depth, body)
        err = assert_openai_error(body)
        if depth < 1000:  # orjson itself stops at 1024 levels, before our check
            assert err["param"] == "zz" and err["code"] == "json_too_deep", err
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                           "x": too_deep}}}
    status, _, body = await post(stack, CHAT, {**BASE, "tools": [tool]})
    assert status == 400, body
    assert_openai_error(body, "tools")
    status, _, body = await post(stack, "/v1/images/generations",
                                 {"model": "dall-e-3", "prompt": "a cat", "style": too_deep})
    assert status == 400, body
    assert_openai_error(body, "style")
    status, _, body = await post(stack, "/admin/v1/keys", {"name": "x", "metadata": too_deep},
                                 key="sk-admin-key-0123456789")
    assert status == 400, body
    assert_openai_error(body, "metadata")


# ----------------------------------------------------------- nested types ----

async def test_wrong_types_inside_nested_objects_are_400(stack: Stack) -> None:
    fn = {"name": "f", "arguments": "{}"}
    cases: list[tuple[dict[str, Any], str]] = [
        ({"tools": [{"type": [None, None], "function": {"name": "f"}}]}, "tools[0].type"),
        ({"tools": [{"type": 5, "function": {"name": "f"}}]}, "tools[0].type"),
        ({"tools": [{"type": "function", "function": {"name": ["f"]}}]}, "tools[0].function.name"),
        ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": ["function"], "function": fn}]}]},
         "messages[0].tool_calls[0].type"),
        ({"messages": [{"role": "assistant", "tool_calls": [
            {"id": {"a": 1}, "type": "function", "function": fn}]}]}, "messages[0].tool_calls[0].id"),
        ({"messages": [{"role": ["user"], "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
         "messages[0].content[0].text"),
        ({"temperature": "hot"}, "temperature"),
        ({"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": 1}}},
         "response_format.json_schema.name"),
    ]
    for patch, param in cases:
        status, _, body = await post(stack, CHAT, {**BASE, **patch})
        assert status == 400, (patch, body)
        assert_openai_error(body, param)


# ----------------------------------------------------- encodings, headers ----

async def test_content_encoding_that_does_not_match_the_body_is_400(stack: Stack) -> None:
    status, _, body = await post(stack, CHAT, orjson.dumps(BASE), {"content-encoding": "gzip"})
    assert status == 400, body
    assert "gzip" in assert_openai_error(body, None)["message"]
    # a real gzip or deflate body is read as usual
    status, _, body = await post(stack, CHAT, gzip.compress(orjson.dumps(BASE)),
                                 {"content-encoding": "gzip"})
    assert status == 200, body
    status, _, body = await post(stack, CHAT, zlib.compress(orjson.dumps(BASE)),
                                 {"content-encoding": "deflate"})
    assert status == 200, body
    status, _, body = await post(stack, CHAT, orjson.dumps(BASE), {"content-encoding": "br"})
    assert status == 400, body
    assert_openai_error(body, "content-encoding")
    # a compressed bomb: 25 MB of zeros in ~25 KB, past max_body_bytes once inflated
    bomb = gzip.compress(b'{"model": "gpt-4o", "x": "' + b"0" * 25_000_000 + b'"}')
    assert len(bomb) < 100_000
    status, _, body = await post(stack, CHAT, bomb, {"content-encoding": "gzip"})
    assert status == 413, body
    assert_openai_error(body, None)


async def test_a_cut_deflate_body_after_the_headers_is_400_not_a_hang(stack: Stack) -> None:
    """aiohttp's own decoder left such a request waiting forever: the headers start the
    handler, and the body's decode error went to the parser instead of to the handler."""
    host, port = stack.http_url.removeprefix("http://").rsplit(":", 1)
    for body in (b"\x04", b"x\x9c", zlib.compress(orjson.dumps(BASE))[:-6]):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     + TEST_KEY.encode() + b"\r\nContent-Encoding: deflate\r\n"
                     + b"Content-Length: %d\r\n\r\n" % len(body))
        await writer.drain()
        await asyncio.sleep(0.1)  # the body arrives on its own, after the handler started
        writer.write(body)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        writer.close()
        assert head.startswith(b"HTTP/1.1 400"), (body, head)


async def test_timeout_header_must_be_finite_and_positive(stack: Stack) -> None:
    for value in ("nan", "inf", "-inf", "1e309", "-1", "0", "1e300", "soon"):
        status, _, body = await post(stack, CHAT, BASE, {"x-switchboard-timeout": value})
        assert status == 400, (value, body)
        assert_openai_error(body, "x-switchboard-timeout")
    status, _, body = await post(stack, CHAT, BASE, {"x-switchboard-timeout": "30"})
    assert status == 200, body


# ---------------------------------------------------- the HTTP parser itself ----

async def raw_exchange(s: Stack, data: bytes) -> tuple[int, dict[str, str], bytes]:
    host, port = s.http_url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 10)
        return status, headers, body
    finally:
        writer.close()


async def test_http_parser_errors_are_openai_json(stack: Stack) -> None:
    auth = f"Authorization: Bearer {TEST_KEY}\r\n".encode()
    requests = {
        "url over 8 KiB": b"GET /v1/models?" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        "too many headers": b"GET /v1/models HTTP/1.1\r\nHost: x\r\n"
                            + b"".join(b"X-H%d: y\r\n" % i for i in range(200)) + b"\r\n",
        "header over 8 KiB": b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 9000
                             + b"\r\n\r\n",
        "bad chunk size": b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + auth
                          + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
        "unknown method": b"FOO( /v1/models HTTP/1.1\r\nHost: x\r\n\r\n",
        "not http": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
    }
    for what, data in requests.items():
        status, headers, body = await raw_exchange(stack, data)
        assert 400 <= status < 500, (what, status, body)
        assert headers["content-type"].startswith("application/json"), (what, headers)
        assert_openai_error(orjson.loads(body), None)
    # and the server still answers
    status, _, body = await post(stack, CHAT, BASE)
    assert status == 200, body


# ------------------------------------------------------------------- gRPC ----

@pytest.mark.parametrize("path", [f"/switchboard.v1.InferenceService/{m}" for m in (
    "CreateChatCompletion", "StreamChatCompletion", "CreateImage", "ListModels")] + [
    "/switchboard.v1.AdminService/CreateKey", "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch"])
async def test_grpc_bytes_that_do_not_decode_are_invalid_argument(stack: Stack, path: str) -> None:
    ident = lambda b: b  # noqa: E731 - send and receive raw bytes
    streaming = "/Stream" in path or path.endswith("/Watch")
    call_type = stack.channel.unary_stream if streaming else stack.channel.unary_unary
    call = call_type(path, request_serializer=ident, response_deserializer=ident)
    for garbage in (b"\xff\xff\xff\xff", b"\x0a\x05ab", b"\x08" + b"\x80" * 11):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            if streaming:
                async for _ in call(garbage, metadata=AUTH, timeout=10):
                    pass
            else:
                await call(garbage, metadata=AUTH, timeout=10)
        err = info.value
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (garbage, err)
        assert "<class" not in (err.details() or "") and "Error" not in (err.details() or "")
        assert error_info(err).reason == "invalid_message"
    # the server still answers
    models = await stack.stub.ListModels(pb.ListModelsRequest(), metadata=AUTH, timeout=10)
    assert models.models


async def test_grpc_json_text_fields_must_be_json(stack: Stack) -> None:
    def params() -> pb.ChatCompletionParams:
        return pb.ChatCompletionParams(model="gpt-4o", messages=[pb.Message(role=pb.ROLE_USER,
                                                                            text="hi")])
    p1 = params()
    p1.extra["foo"] = "not json{"
    p2 = params()
    p2.tools.add(type="function", function=pb.FunctionDefinition(name="f", parameters_json="{bad"))
    p3 = params()
    p3.extra["deep"] = "[" * 300 + "]" * 300
    p4 = params()
    p4.messages[0].extra["x"] = "nope"
    cases = [(p1, "params.extra.foo"), (p2, "params.tools[0].function.parameters_json"),
             (p3, "params.extra.deep"), (p4, "params.messages[0].extra.x")]
    for p, param in cases:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stack.stub.CreateChatCompletion(pb.CreateChatCompletionRequest(params=p),
                                                  metadata=AUTH, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
        assert error_info(info.value).metadata["param"] == param
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in stack.stub.StreamChatCompletion(
                    pb.StreamChatCompletionRequest(params=p), metadata=AUTH, timeout=10):
                pass
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
    img = pb.CreateImageRequest(model="dall-e-3", prompt="a cat")
    img.extra["style"] = "{"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stack.stub.CreateImage(img, metadata=AUTH, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(info.value).metadata["param"] == "extra.style"
    good = params()
    good.extra["foo"] = '{"a": 1}'
    r = await stack.stub.CreateChatCompletion(pb.CreateChatCompletionRequest(params=good),
                                              metadata=AUTH, timeout=10)
    assert r.choices
