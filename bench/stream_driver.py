"""CPU per relayed chunk on the provider stream path: request out, frames in, translated
chunks out — the part of the streaming hot path that core/providers/ owns.

    python -m bench.stream_driver                    # every provider, paced and burst
    python -m bench.stream_driver --only openai --rounds 5

A fake upstream runs in a child process (its CPU is not counted) and answers each
provider's streaming endpoint with prebuilt frames in that provider's real wire format:
`paced` writes one frame per 1 ms (each read carries one frame, as with a real model),
`burst` writes the whole stream at once (parsing and translation dominate). `inproc`
has no socket at all: the client's `post` is replaced by a response object that hands
the driver one frame per read from memory, so the figure is the driver, frame reader
and translator alone, without the event loop and aiohttp noise of a shared machine. This process
drives the provider clients themselves (`ProviderClient.stream`) on uvloop, CONCURRENCY
streams at a time, and reports process CPU time (user+system) divided by the chunks
received. Compare runs made on the same machine at about the same time: the figure
includes the event loop and aiohttp's reader, and the machine may be shared.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import uvloop
from aiohttp import web

from switchboard.core.config import ChannelConfig
from switchboard.core.providers import PROVIDERS
from switchboard.core.providers.base import HttpPool
from switchboard.v1 import inference_pb2 as pb

CHUNKS = 200          # content frames per stream
CONCURRENCY = 25
WORD = "lorem "


def _sse(obj: object, event: str = "") -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + orjson.dumps(obj) + b"\n\n"


def openai_frames() -> list[bytes]:
    base = {"id": "chatcmpl-b", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    out = [_sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})]
    out += [_sse({**base, "choices": [{"index": 0, "delta": {"content": WORD}}]})] * CHUNKS
    out.append(_sse({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
    out.append(_sse({**base, "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": CHUNKS,
                                                       "total_tokens": CHUNKS + 5}}))
    return [*out, b"data: [DONE]\n\n"]


def anthropic_frames() -> list[bytes]:
    out = [_sse({"type": "message_start", "message": {"id": "msg_b", "model": "m",
                                                       "usage": {"input_tokens": 5}}}, "message_start"),
           _sse({"type": "content_block_start", "index": 0,
                 "content_block": {"type": "text", "text": ""}}, "content_block_start")]
    out += [_sse({"type": "content_block_delta", "index": 0,
                  "delta": {"type": "text_delta", "text": WORD}}, "content_block_delta")] * CHUNKS
    out += [_sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
            _sse({"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                  "usage": {"output_tokens": CHUNKS}}, "message_delta"),
            _sse({"type": "message_stop"}, "message_stop")]
    return out


def gemini_frames() -> list[bytes]:
    def ev(text: str, finish: str | None = None) -> bytes:
        cand: dict[str, object] = {"content": {"role": "model", "parts": [{"text": text}]}, "index": 0}
        if finish:
            cand["finishReason"] = finish
        return _sse({"candidates": [cand], "modelVersion": "m", "responseId": "r",
                     "usageMetadata": {"promptTokenCount": 5, "totalTokenCount": 5}})
    return [ev(WORD)] * CHUNKS + [ev("", "STOP")]


def ollama_frames() -> list[bytes]:
    line = orjson.dumps({"model": "m", "created_at": "2026-01-01T00:00:00.000000000Z",
                         "message": {"role": "assistant", "content": WORD}, "done": False}) + b"\n"
    last = orjson.dumps({"model": "m", "created_at": "2026-01-01T00:00:00.000000000Z",
                         "message": {"role": "assistant", "content": ""}, "done": True,
                         "done_reason": "stop", "prompt_eval_count": 5,
                         "eval_count": CHUNKS}) + b"\n"
    return [line] * CHUNKS + [last]


# provider -> (base_url path suffix, route, frames, content type)
UPSTREAMS: dict[str, tuple[str, str, Callable[[], list[bytes]], str]] = {
    "openai": ("/v1", "/v1/chat/completions", openai_frames, "text/event-stream"),
    "anthropic": ("", "/v1/messages", anthropic_frames, "text/event-stream"),
    "gemini": ("", "/v1beta/models/{m}", gemini_frames, "text/event-stream"),
    "ollama": ("", "/api/chat", ollama_frames, "application/x-ndjson"),
}


def serve() -> None:
    """The child process: every provider's streaming endpoint, paced or burst by header."""
    async def main() -> None:
        app = web.Application()
        for _, route, frames_of, ctype in UPSTREAMS.values():
            frames = frames_of()
            whole = b"".join(frames)

            async def handler(request: web.Request, frames: list[bytes] = frames,
                              whole: bytes = whole, ctype: str = ctype) -> web.StreamResponse:
                await request.read()
                resp = web.StreamResponse(headers={"content-type": ctype})
                await resp.prepare(request)
                if request.headers.get("x-bench-mode") == "burst":
                    await resp.write(whole)
                else:
                    for f in frames:
                        await resp.write(f)
                        await asyncio.sleep(0.001)
                try:
                    await resp.write_eof()
                except ConnectionError:
                    pass  # the client closes as soon as it has the terminal frame
                return resp
            app.router.add_post(route, handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        print(port, flush=True)  # the parent reads it from our stdout
        await asyncio.Event().wait()
    uvloop.run(main())


class _MemoryBody:
    """Stands in for aiohttp's response in `inproc` mode: one frame per read."""

    def __init__(self, frames: list[bytes]) -> None:
        self.content = self
        self._frames = frames

    async def iter_chunked(self, n: int) -> AsyncIterator[bytes]:
        for f in self._frames:
            yield f

    def iter_any(self) -> AsyncIterator[bytes]:  # what the driver read with before
        return self.iter_chunked(0)

    def close(self) -> None:
        pass


async def measure(provider: str, port: int, mode: str, rounds: int) -> list[float]:
    """µs of CPU per chunk, one figure per round."""
    suffix = UPSTREAMS[provider][0]
    http = HttpPool()
    client = PROVIDERS[provider](ChannelConfig(
        name="b", provider=provider, base_url=f"http://127.0.0.1:{port}{suffix}", api_key="sk-b",
        headers={"x-bench-mode": mode}), http)
    if mode == "inproc":
        frames = UPSTREAMS[provider][2]()

        async def from_memory(*_: Any) -> Any:
            return _MemoryBody(frames)
        client.post = from_memory  # type: ignore[method-assign]
    params = pb.ChatCompletionParams(model="m", messages=[pb.Message(role=pb.ROLE_USER, text="hi")])

    async def one() -> int:
        n = 0
        async for _chunk in client.stream(params, "m"):
            n += 1
        return n

    await asyncio.gather(*(one() for _ in range(CONCURRENCY)))  # warm the pool and caches
    figures = []
    for _ in range(rounds):
        t0 = time.process_time()
        counts = await asyncio.gather(*(one() for _ in range(CONCURRENCY)))
        figures.append((time.process_time() - t0) / sum(counts) * 1e6)
    await http.close()
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=",".join(UPSTREAMS), help="providers, comma-separated")
    ap.add_argument("--modes", default="paced,burst,inproc")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve()
        return
    child = subprocess.Popen([sys.executable, "-m", "bench.stream_driver", "--serve"],
                             stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline())
        print(f"{CONCURRENCY} concurrent streams of {CHUNKS}+ chunks; µs CPU per chunk "
              f"(median of {args.rounds} rounds, min–max)")
        for provider in args.only.split(","):
            for mode in args.modes.split(","):
                figs = uvloop.run(measure(provider, port, mode, args.rounds))
                print(f"{provider:10} {mode:6} {statistics.median(figs):7.2f}  "
                      f"({min(figs):.2f}–{max(figs):.2f})", flush=True)
    finally:
        child.terminate()
        child.wait()


if __name__ == "__main__":
    main()
