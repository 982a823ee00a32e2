"""The one stream driver (ProviderClient.stream in core/providers/base.py), run through
every provider's client against a loopback upstream that sends that provider's real
frames: an in-stream error never carries the channel's key to the caller, a body that
ends without its terminal frame is an error, and the driver stops at the terminal frame
and closes the connection without waiting for the upstream to end the body."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
from aiohttp import web

from switchboard.core.config import ChannelConfig
from switchboard.core.providers import PROVIDERS
from switchboard.core.providers.base import HttpPool, UpstreamError
from switchboard.v1 import inference_pb2 as pb

KEY = "sk-channel-secret-123"


def sse(obj: object, event: str = "") -> bytes:
    return (f"event: {event}\n" if event else "").encode() + b"data: " + json.dumps(obj).encode() + b"\n\n"


@dataclass(frozen=True)
class Wire:
    provider: str
    hello: bytes      # frames with the content "Hi" (no terminal frame)
    terminal: bytes   # what ends the stream (b"" for Gemini: its finish is in `hello`)
    error: bytes      # an in-stream error whose message echoes the key


_OPENAI = Wire("openai", sse({"id": "c", "choices": [{"index": 0, "delta": {"content": "Hi"},
                                                      "finish_reason": None}]}),
               sse({"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
               + b"data: [DONE]\n\n",
               sse({"error": {"message": f"invalid key {KEY}"}}))
WIRES = [
    _OPENAI,
    Wire("azure", _OPENAI.hello, _OPENAI.terminal, _OPENAI.error),
    Wire("anthropic",
         sse({"type": "message_start", "message": {"id": "m", "model": "c"}}, "message_start")
         + sse({"type": "content_block_start", "index": 0,
                "content_block": {"type": "text", "text": ""}}, "content_block_start")
         + sse({"type": "content_block_delta", "index": 0,
                "delta": {"type": "text_delta", "text": "Hi"}}, "content_block_delta"),
         sse({"type": "message_delta", "delta": {"stop_reason": "end_turn"}}, "message_delta")
         + sse({"type": "message_stop"}, "message_stop"),
         sse({"type": "error", "error": {"type": "api_error", "message": f"key {KEY}"}}, "error")),
    Wire("gemini", sse({"candidates": [{"content": {"parts": [{"text": "Hi"}]}}]}), b"",
         sse({"error": {"code": 500, "status": "INTERNAL", "message": f"key {KEY}"}})),
    Wire("ollama", b'{"message": {"role": "assistant", "content": "Hi"}, "done": false}\n',
         b'{"message": {"role": "assistant", "content": ""}, "done": true, "done_reason": "stop"}\n',
         json.dumps({"error": f"key {KEY}"}).encode() + b"\n"),
]
PARAMS = pb.ChatCompletionParams(model="m", messages=[pb.Message(role=pb.ROLE_USER, text="hi")])


@dataclass
class Upstream:
    body: bytes = b""
    hang_after: bool = False   # keep the body open after sending it
    closed_at: float | None = None


@asynccontextmanager
async def client_for(provider: str, up: Upstream) -> AsyncIterator[object]:
    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(up.body)
        try:
            while up.hang_after:
                await asyncio.sleep(0.01)
                await resp.write(b"\n" if provider == "ollama" else b": keep-alive\n\n")
        except (ConnectionError, asyncio.CancelledError):
            up.closed_at = time.monotonic()
            raise
        return resp

    app = web.Application()
    app.router.add_post("/{tail:.*}", handler)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    http = HttpPool()
    try:
        yield PROVIDERS[provider](ChannelConfig(name="c", provider=provider, api_key=KEY,
                                                base_url=f"http://127.0.0.1:{port}"), http)
    finally:
        await http.close()
        await runner.cleanup()


async def texts(client: object) -> list[str]:
    return [c.delta.content async for chunk in client.stream(PARAMS, "m")  # type: ignore[attr-defined]
            for c in chunk.choices if c.delta.content]


@pytest.mark.parametrize("wire", WIRES, ids=[w.provider for w in WIRES])
async def test_a_whole_stream(wire: Wire) -> None:
    body = wire.hello + wire.terminal
    if wire.provider == "gemini":
        body = sse({"candidates": [{"content": {"parts": [{"text": "Hi"}]}, "finishReason": "STOP"}]})
    async with client_for(wire.provider, Upstream(body)) as client:
        assert await texts(client) == ["Hi"]


@pytest.mark.parametrize("wire", WIRES, ids=[w.provider for w in WIRES])
async def test_in_stream_error_never_carries_the_key(wire: Wire) -> None:
    async with client_for(wire.provider, Upstream(wire.hello + wire.error)) as client:
        with pytest.raises(UpstreamError) as err:
            await texts(client)
    assert err.value.kind == "stream" and err.value.retryable
    assert KEY not in err.value.message and "[redacted]" in err.value.message


@pytest.mark.parametrize("wire", WIRES, ids=[w.provider for w in WIRES])
async def test_a_body_without_its_terminal_frame_is_an_error(wire: Wire) -> None:
    got: list[str] = []
    async with client_for(wire.provider, Upstream(wire.hello)) as client:
        with pytest.raises(UpstreamError) as err:
            async for chunk in client.stream(PARAMS, "m"):  # type: ignore[attr-defined]
                got.extend(c.delta.content for c in chunk.choices if c.delta.content)
    assert err.value.kind == "stream" and err.value.retryable
    assert got == ["Hi"]  # what came before the cut was relayed


@pytest.mark.parametrize("wire", [w for w in WIRES if w.terminal], ids=lambda w: w.provider)
async def test_terminal_frame_ends_the_stream_and_closes_the_connection(wire: Wire) -> None:
    up = Upstream(wire.hello + wire.terminal, hang_after=True)
    async with client_for(wire.provider, up) as client:
        ended = time.monotonic()
        assert await asyncio.wait_for(texts(client), 10) == ["Hi"]
        ended = time.monotonic()
        for _ in range(500):
            if up.closed_at is not None:
                break
            await asyncio.sleep(0.01)
    assert up.closed_at is not None and up.closed_at - ended < 5
