"""The gRPC surface with the committed stubs against a real in-process grpc.aio server:
unary and streaming chat, models, images, errors with machine-readable reasons,
deadlines and cancellation reaching the upstream, and parity with REST."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import openai
import pytest
from google.rpc import error_details_pb2, status_pb2

from switchboard.v1 import inference_pb2 as pb
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import AUTH, TEST_KEY, Stack, channel_yaml, make_config, running_stack


@pytest.fixture
async def stack() -> AsyncIterator[tuple[Stack, FakeOpenAI]]:
    fake = FakeOpenAI()
    url = await fake.start()
    cfg = make_config("channels:\n" + channel_yaml("oa", "openai", url, ["gpt-4o", "dall-e-3"]))
    async with running_stack(cfg) as s:
        yield s, fake
    await fake.close()


def chat(text: str, **kw: object) -> pb.ChatCompletionParams:
    return pb.ChatCompletionParams(model="gpt-4o", messages=[pb.Message(role=pb.ROLE_USER, text=text)],
                                   **kw)  # type: ignore[arg-type]


def error_info(err: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info
    raise AssertionError("no ErrorInfo in the status details")


async def test_unary_chat(stack: tuple[Stack, FakeOpenAI]) -> None:
    s, _fake = stack
    call = s.stub.CreateChatCompletion(pb.CreateChatCompletionRequest(params=chat("hello")),
                                       metadata=AUTH)
    r = await call
    assert r.choices[0].message.content == "You said: hello"
    assert r.choices[0].finish_reason == pb.FINISH_REASON_STOP
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (11, 7)
    assert r.usage.prompt_tokens_details.cached_tokens == 3
    trailers = dict(await call.trailing_metadata())
    assert trailers["x-request-id"].startswith("req_")


async def test_stream_last_message_carries_finish_and_usage(stack: tuple[Stack, FakeOpenAI]) -> None:
    s, _ = stack
    msgs = [m async for m in s.stub.StreamChatCompletion(
        pb.StreamChatCompletionRequest(params=chat("one two three")), metadata=AUTH)]
    assert "".join(m.choices[0].delta.content for m in msgs if m.choices) == "You said: one two three"
    assert len(msgs) >= 4
    last = msgs[-1]
    assert last.choices[0].finish_reason == pb.FINISH_REASON_STOP
    assert last.HasField("usage") and last.usage.completion_tokens == 7
    assert not any(m.HasField("usage") for m in msgs[:-1])


async def test_tool_call_arguments_are_exact_json_text(stack: tuple[Stack, FakeOpenAI]) -> None:
    s, _ = stack
    params = chat('TOOL lookup {"id": 5, "ratio": 0.5}')
    params.tools.add(type="function", function=pb.FunctionDefinition(
        name="lookup", parameters_json='{"type":"object","properties":{"id":{"type":"integer"}}}'))
    args = ""
    async for m in s.stub.StreamChatCompletion(pb.StreamChatCompletionRequest(params=params),
                                               metadata=AUTH):
        for c in m.choices:
            for tc in c.delta.tool_calls:
                args += tc.function.arguments
    assert args == '{"id": 5, "ratio": 0.5}'  # 5 stays 5: no Struct round trip


async def test_errors_carry_reason(stack: tuple[Stack, FakeOpenAI]) -> None:
    s, _ = stack
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await s.stub.CreateChatCompletion(pb.CreateChatCompletionRequest(params=chat("x")))
    assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_info(exc.value).reason == "invalid_api_key"
    assert "`Authorization: Bearer <key>`" in (exc.value.details() or "")  # not redacted away
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await s.stub.CreateChatCompletion(pb.CreateChatCompletionRequest(params=chat("x")),
                                          metadata=(("authorization", "Bearer sk-bad-key-1234"),))
    assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
    bad_model = chat("x")
    bad_model.model = "nope"
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await s.stub.CreateChatCompletion(pb.CreateChatCompletionRequest(params=bad_model),
                                          metadata=AUTH)
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND
    info = error_info(exc.value)
    assert (info.reason, info.metadata["param"]) == ("model_not_found", "model")
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await s.stub.CreateChatCompletion(pb.CreateChatCompletionRequest(params=chat("x", n=500)),
                                          metadata=AUTH)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(exc.value).metadata["param"] == "n"
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await s.stub.CreateChatCompletion(pb.CreateChatCompletionRequest(params=chat("ERROR 429")),
                                          metadata=AUTH)
    assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_cancel_mid_stream_reaches_upstream(stack: tuple[Stack, FakeOpenAI]) -> None:
    s, fake = stack
    call = s.stub.StreamChatCompletion(
        pb.StreamChatCompletionRequest(params=chat("SLOW 200\na b c d e f g")), metadata=AUTH)
    await call.read()
    call.cancel()
    for _ in range(100):
        if fake.disconnects:
            break
        await asyncio.sleep(0.01)
    assert fake.disconnects == 1


@pytest.mark.parametrize("stream", [False, True])
async def test_deadline_exceeded_cancels_upstream(stack: tuple[Stack, FakeOpenAI], stream: bool) -> None:
    s, fake = stack
    params = chat("SLOW 1000\nslow reply")
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        if stream:
            async for _ in s.stub.StreamChatCompletion(
                    pb.StreamChatCompletionRequest(params=params), metadata=AUTH, timeout=0.3):
                pass
        else:
            await s.stub.CreateChatCompletion(pb.CreateChatCompletionRequest(params=params),
                                              metadata=AUTH, timeout=0.3)
    assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    for _ in range(100):
        if fake.disconnects:
            break
        await asyncio.sleep(0.01)
    assert fake.disconnects == 1


async def test_models_and_images(stack: tuple[Stack, FakeOpenAI]) -> None:
    s, _ = stack
    listing = await s.stub.ListModels(pb.ListModelsRequest(), metadata=AUTH)
    assert [m.id for m in listing.models] == ["dall-e-3", "gpt-4o"]
    one = await s.stub.GetModel(pb.GetModelRequest(model="gpt-4o"), metadata=AUTH)
    assert one.model.owned_by == "openai"
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await s.stub.GetModel(pb.GetModelRequest(model="nope"), metadata=AUTH)
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND
    img = await s.stub.CreateImage(pb.CreateImageRequest(model="dall-e-3", prompt="cat",
                                                         response_format="b64_json"), metadata=AUTH)
    assert img.data[0].b64_json == "aGVsbG8="


async def test_rest_and_grpc_give_the_same_answer_and_usage(stack: tuple[Stack, FakeOpenAI]) -> None:
    s, _ = stack
    client = openai.AsyncOpenAI(base_url=s.base_url, api_key=TEST_KEY, max_retries=0)
    rest = await client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "same question"}])
    rpc = await s.stub.CreateChatCompletion(
        pb.CreateChatCompletionRequest(params=chat("same question")), metadata=AUTH)
    assert rest.choices[0].message.content == rpc.choices[0].message.content
    assert rest.usage is not None
    assert (rest.usage.prompt_tokens, rest.usage.completion_tokens) == (
        rpc.usage.prompt_tokens, rpc.usage.completion_tokens)
    rest_rec, grpc_rec = list(s.usage.records)[-2:]
    assert (rest_rec.surface, grpc_rec.surface) == ("rest", "grpc")
    for field in ("key_name", "model", "channel", "prompt_tokens", "completion_tokens",
                  "cached_tokens", "status"):
        assert getattr(rest_rec, field) == getattr(grpc_rec, field), field
    with pytest.raises(openai.NotFoundError) as rest_err:
        await client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    bad = chat("x")
    bad.model = "nope"
    with pytest.raises(grpc.aio.AioRpcError) as rpc_err:
        await s.stub.CreateChatCompletion(pb.CreateChatCompletionRequest(params=bad), metadata=AUTH)
    assert rest_err.value.body["message"] == rpc_err.value.details()  # type: ignore[index]
    await client.close()
