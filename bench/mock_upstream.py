"""A mock OpenAI-wire upstream for the benchmark, fast enough never to be the bottleneck.

A raw asyncio protocol on uvloop: it finds the end of each HTTP/1.1 request, looks at
the body only for `"stream"` and the model name, and answers with prebuilt bytes
(keep-alive, no per-request JSON encoding). One core serves tens of thousands of
requests a second, several times what any gateway under test reaches.

Streams: the model name chooses their shape, `…-s<chunks>x<ms>ms` (e.g.
`bench-s100x50ms`: 100 content chunks, 50 ms apart); anything else gets 20 chunks at
once. Every stream is `role` chunk, content chunks, a finish chunk, a usage chunk when
`stream_options.include_usage` is asked, then `data: [DONE]`, sent chunked.

    python -m bench.mock_upstream --port 9100
"""

from __future__ import annotations

import argparse
import asyncio
import re
import time
from typing import ClassVar

import orjson

_MODEL = re.compile(rb'"model"\s*:\s*"([^"]*)"')
_SHAPE = re.compile(rb"-s(\d+)x(\d+)ms$")
_STREAM = re.compile(rb'"stream"\s*:\s*true')
_USAGE = re.compile(rb'"include_usage"\s*:\s*true')

USAGE = {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21}


def _completion(model: str) -> bytes:
    body = orjson.dumps({
        "id": "chatcmpl-bench", "object": "chat.completion", "created": int(time.time()),
        "model": model, "system_fingerprint": "fp_bench",
        "choices": [{"index": 0, "message": {"role": "assistant",
                                             "content": "Hello! How can I help you today?",
                                             "refusal": None},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": USAGE,
    })
    return (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)


def _event(obj: object) -> bytes:
    data = b"data: " + orjson.dumps(obj) + b"\n\n"
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


class _StreamShape:
    """Prebuilt chunks of one stream shape."""

    def __init__(self, model: str, chunks: int, delay_ms: int) -> None:
        base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": model, "system_fingerprint": "fp_bench"}
        self.delay = delay_ms / 1000.0
        self.first = _event({**base, "choices": [{"index": 0, "delta": {"role": "assistant",
                                                                         "content": ""},
                                                  "logprobs": None, "finish_reason": None}]})
        self.token = _event({**base, "choices": [{"index": 0, "delta": {"content": "tok "},
                                                  "logprobs": None, "finish_reason": None}]})
        self.count = chunks
        self.finish = _event({**base, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                                   "finish_reason": "stop"}]})
        self.usage = _event({**base, "choices": [], "usage": USAGE})
        done = b"data: [DONE]\n\n"
        self.done = f"{len(done):x}\r\n".encode() + done + b"\r\n0\r\n\r\n"


_HEAD_STREAM = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n")


class Upstream(asyncio.Protocol):
    completions: ClassVar[dict[bytes, bytes]] = {}  # prebuilt replies, shared
    shapes: ClassVar[dict[bytes, _StreamShape]] = {}

    def __init__(self) -> None:
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].lower()
            i = head.find(b"content-length:")
            length = int(head[i + 15:head.find(b"\r\n", i) if head.find(b"\r\n", i) > 0
                              else len(head)]) if i >= 0 else 0
            if len(self.buf) < end + 4 + length:
                return
            body = self.buf[end + 4:end + 4 + length]
            self.buf = self.buf[end + 4 + length:]
            self.answer(body)

    def answer(self, body: bytes) -> None:
        m = _MODEL.search(body)
        model = m.group(1) if m else b"bench"
        assert self.transport is not None
        if _STREAM.search(body):
            shape = self.shapes.get(model)
            if shape is None:
                s = _SHAPE.search(model)
                shape = _StreamShape(model.decode(), int(s.group(1)) if s else 20,
                                     int(s.group(2)) if s else 0)
                self.shapes[model] = shape
            self.stream(shape, bool(_USAGE.search(body)))
            return
        reply = self.completions.get(model)
        if reply is None:
            reply = self.completions[model] = _completion(model.decode())
        self.transport.write(reply)

    def stream(self, shape: _StreamShape, usage: bool) -> None:
        assert self.transport is not None
        tail = shape.finish + (shape.usage if usage else b"") + shape.done
        if not shape.delay:
            self.transport.write(_HEAD_STREAM + shape.first + shape.token * shape.count + tail)
            return
        self.transport.write(_HEAD_STREAM + shape.first)
        loop = asyncio.get_running_loop()
        left = shape.count

        def tick() -> None:
            nonlocal left
            if self.transport is None:
                return
            left -= 1
            if left > 0:
                self.transport.write(shape.token)
                self.timer = loop.call_later(shape.delay, tick)
            else:
                self.timer = None
                self.transport.write(shape.token + tail)

        self.timer = loop.call_later(shape.delay, tick)


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Upstream, host, port, backlog=4096)
    print(f"mock-upstream: ready {host}:{server.sockets[0].getsockname()[1]}", flush=True)
    await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    args = parser.parse_args()
    import uvloop
    uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
