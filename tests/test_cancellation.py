"""A client that goes away takes its upstream request with it.

REST: the client closes its connection (aiohttp's handler_cancellation cancels the
handler); gRPC: the client cancels the call, or its deadline passes. In every case,
streaming and non-streaming, before and after the first token, the fake upstream must
see its connection closed promptly. The target is 100 ms; the assertion allows
`PROMPT_S` so a loaded CI machine does not flake, and the measured delay is printed.
The split deployment (façade → gRPC → core) is covered too: the façade's cancel has to
cross the gRPC hop.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from switchboard.v1 import inference_pb2 as pb
from tests.fakes.faulty_upstream import Fault, FaultyUpstream
from tests.harness import AUTH, TEST_KEY, Stack, running_stack
from tests.test_resilience import faulty_config, wait_for

PROMPT_S = 0.5
# A non-streaming reply has no middle: it is cancelled before its (only) answer.
PHASES = [("before-first-token", False), ("before-first-token", True), ("mid-stream", True)]
PHASE_IDS = ["unary", "stream-before-first-token", "stream-mid-stream"]


def _faults() -> dict[str, Fault]:
    return {
        # nothing sent yet: the upstream never answers
        "before-first-token": Fault("hang"),
        # mid-answer: the upstream trickles tokens
        "mid-stream": Fault(interval_s=0.5),
    }


async def _one_channel(fault: Fault, split: bool = False) -> tuple[FaultyUpstream, Stack, object]:
    fake = FaultyUpstream("up", fault)
    url = await fake.start()
    ctx = running_stack(faulty_config([("up", url, {"timeouts": "{first_token: 30, idle: 30, "
                                                                "total: 60}"})]), split=split)
    stack = await ctx.__aenter__()
    return fake, stack, ctx


async def _closed_within(fake: FaultyUpstream, since: float) -> float:
    assert await wait_for(lambda: bool(fake.requests) and fake.requests[0].client_closed_at
                          is not None, within=3.0), "the upstream never saw its connection closed"
    delay = fake.requests[0].client_closed_at - since  # type: ignore[operator]
    print(f"upstream saw the close {delay * 1000:.1f} ms after the client left")
    assert delay < PROMPT_S
    return delay


async def _raw_rest_request(stack: Stack, stream: bool) -> tuple[asyncio.StreamReader,
                                                                 asyncio.StreamWriter]:
    host, port = stack.http_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    body = json.dumps({"model": "m", "stream": stream,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
                 b"authorization: Bearer " + TEST_KEY.encode() + b"\r\n"
                 b"content-type: application/json\r\ncontent-length: "
                 + str(len(body)).encode() + b"\r\n\r\n" + body)
    await writer.drain()
    return reader, writer


@pytest.mark.parametrize("split", [False, True], ids=["one-process", "split"])
@pytest.mark.parametrize(("phase", "stream"), PHASES, ids=PHASE_IDS)
async def test_rest_disconnect_cancels_upstream(phase: str, stream: bool, split: bool) -> None:
    fake, stack, ctx = await _one_channel(_faults()[phase], split)
    try:
        reader, writer = await _raw_rest_request(stack, stream)
        if phase == "mid-stream":
            head = await asyncio.wait_for(reader.readuntil(b"data: "), 5)
            assert b"200 OK" in head
        else:
            assert await wait_for(lambda: len(fake.requests) == 1)
            await asyncio.sleep(0.05)  # the gateway is now waiting on the upstream
        left = asyncio.get_running_loop().time()
        writer.transport.abort()
        await _closed_within(fake, left)
        if not split:
            assert await wait_for(lambda: len(stack.usage.records) == 1)
            assert stack.usage.records[0].status == "CANCELLED"
    finally:
        await ctx.__aexit__(None, None, None)  # type: ignore[attr-defined]
        await fake.close()


@pytest.mark.parametrize(("phase", "stream"), PHASES, ids=PHASE_IDS)
async def test_grpc_cancel_cancels_upstream(phase: str, stream: bool) -> None:
    fake, stack, ctx = await _one_channel(_faults()[phase])
    params = pb.ChatCompletionParams(model="m", messages=[pb.Message(role=pb.ROLE_USER, text="hi")])
    try:
        if stream:
            call = stack.stub.StreamChatCompletion(pb.StreamChatCompletionRequest(params=params),
                                                   metadata=AUTH)
            if phase == "mid-stream":
                first = await asyncio.wait_for(call.read(), 5)
                assert first.choices
            else:
                assert await wait_for(lambda: len(fake.requests) == 1)
        else:
            call = stack.stub.CreateChatCompletion(pb.CreateChatCompletionRequest(params=params),
                                                   metadata=AUTH)
            assert await wait_for(lambda: len(fake.requests) == 1)
        await asyncio.sleep(0.05)
        left = asyncio.get_running_loop().time()
        call.cancel()
        await _closed_within(fake, left)
        assert await wait_for(lambda: len(stack.usage.records) == 1)
        assert stack.usage.records[0].status == "CANCELLED"
    finally:
        await ctx.__aexit__(None, None, None)  # type: ignore[attr-defined]
        await fake.close()


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
async def test_grpc_deadline_cancels_upstream(stream: bool) -> None:
    fake, stack, ctx = await _one_channel(Fault("hang"))
    params = pb.ChatCompletionParams(model="m", messages=[pb.Message(role=pb.ROLE_USER, text="hi")])
    loop = asyncio.get_running_loop()
    try:
        started = loop.time()
        if stream:
            call = stack.stub.StreamChatCompletion(pb.StreamChatCompletionRequest(params=params),
                                                   metadata=AUTH, timeout=0.3)
            with pytest.raises(Exception) as info:
                async for _ in call:
                    pass
        else:
            with pytest.raises(Exception) as info:
                await stack.stub.CreateChatCompletion(
                    pb.CreateChatCompletionRequest(params=params), metadata=AUTH, timeout=0.3)
        assert info.value.code().name == "DEADLINE_EXCEEDED"  # type: ignore[attr-defined]
        await _closed_within(fake, started + 0.3)
    finally:
        await ctx.__aexit__(None, None, None)  # type: ignore[attr-defined]
        await fake.close()
