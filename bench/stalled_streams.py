"""Memory of a real gateway process under streams whose clients stopped reading.

Starts an endless fast upstream (OpenAI SSE wire format, 16 KiB of content per chunk, as
fast as the gateway takes it), runs `switchboard serve` as a child process against it,
then opens N chat streams from clients with a small receive buffer that never read a
byte. With backpressure the gateway stops reading each upstream once the client's socket
is full; without it, every stalled stream buffers the upstream's output in the gateway.
Reports the gateway's RSS before, with the stalled streams and after they closed, and
how much each upstream stream managed to send.

    python -m bench.stalled_streams --streams 200

tests/test_slow_clients.py runs the same with fewer streams and a generous bound.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from aiohttp import web

KEY = "sk-stalled-0123456789"
CHUNK_TEXT = "x" * 16384


@dataclass
class EndlessUpstream:
    """Streams chat chunks until the reader goes away; counts what it managed to send."""

    url: str = ""
    sent: dict[int, int] = field(default_factory=dict)  # stream number -> bytes written
    # Send one chunk and then nothing: what an open stream costs when nothing is buffered.
    idle: bool = False
    _runner: web.AppRunner | None = None

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/v1"
        return self.url

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        n = len(self.sent)
        self.sent[n] = 0
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        chunk = b"data: " + orjson.dumps({
            "id": "chatcmpl-stalled", "object": "chat.completion.chunk", "created": 0,
            "model": body.get("model", ""),
            "choices": [{"index": 0, "delta": {"content": CHUNK_TEXT}, "finish_reason": None}],
        }) + b"\n\n"
        try:
            while True:  # write() waits for the gateway to drain: backpressure, end to end
                await resp.write(chunk)
                self.sent[n] += len(chunk)
                if self.idle:
                    await asyncio.Event().wait()
        except (ConnectionError, asyncio.CancelledError):
            pass
        return resp


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@asynccontextmanager
async def gateway_process(config_text: str) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """`switchboard serve` as a child process; yields it and its HTTP host:port."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sb.yaml"
        path.write_text(config_text)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "switchboard.core.cli", "serve", "--config", str(path),
            "--http", "127.0.0.1:0", "--grpc", "127.0.0.1:0", cwd=tmp,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        if not line.startswith("switchboard: ready"):
            proc.kill()
            raise RuntimeError(f"gateway did not start: {line!r}")
        addrs = dict(part.split("=", 1) for part in line.split()[2:])
        try:
            yield proc, addrs["http"]
        finally:
            if proc.returncode is None:
                proc.terminate()
                await asyncio.wait_for(proc.wait(), 30)


def config_for(upstream_url: str) -> str:
    return (f'store: "sqlite://:memory:"\nshutdown_grace_s: 1\n'
            f"observability: {{access_log: false, log_level: warning}}\n"
            f"keys: [{{name: stalled, key: {KEY}}}]\n"
            f"channels:\n  - {{name: fast, provider: openai, base_url: {upstream_url}, "
            f"api_key: upstream-key, models: [fast], "
            f"timeouts: {{first_token: 600, idle: 600, total: 3600}}}}\n")


async def open_stalled_stream(http: str, rcvbuf: int = 4096) -> socket.socket:
    """A client that asks for a stream, reads nothing, and keeps its socket open."""
    host, port = http.rsplit(":", 1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # Before connect, so the window the client advertises stays small.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    body = orjson.dumps({"model": "fast", "stream": True,
                         "messages": [{"role": "user", "content": "go"}]})
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {http}\r\n"
            f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    await asyncio.get_running_loop().sock_sendall(sock, head + body)
    return sock


async def wait_for_upstream_stall(upstream: EndlessUpstream, streams: int,
                                  within_s: float = 60.0) -> None:
    """Until every upstream stream has started and none has sent anything for 1 s."""
    deadline = time.monotonic() + within_s
    last: dict[int, int] = {}
    while time.monotonic() < deadline:
        await asyncio.sleep(1.0)
        now = dict(upstream.sent)
        if len(now) >= streams and now == last:
            return
        last = now
    raise TimeoutError(f"upstreams still sending after {within_s:g}s: backpressure does not hold")


@dataclass
class Figures:
    streams: int
    rss_before_kib: int
    rss_stalled_kib: int
    rss_after_kib: int
    upstream_sent_max: int
    upstream_sent_total: int

    @property
    def per_stream_kib(self) -> float:
        return (self.rss_stalled_kib - self.rss_before_kib) / self.streams


async def measure(streams: int, *, warmup: int = 20, idle: bool = False) -> Figures:
    upstream = EndlessUpstream(idle=idle)
    await upstream.start()
    try:
        async with gateway_process(config_for(upstream.url)) as (proc, http):
            # Warm up the code paths (imports, pools, allocator arenas) with a few streams
            # so "before" is a serving process, not a freshly started one.
            warm = [await open_stalled_stream(http) for _ in range(warmup)]
            await wait_for_upstream_stall(upstream, warmup)
            for s in warm:
                s.close()
            await asyncio.sleep(2.0)
            upstream.sent.clear()
            before = rss_kib(proc.pid)
            socks = []
            for _ in range(streams):
                socks.append(await open_stalled_stream(http))
            await wait_for_upstream_stall(upstream, streams)
            stalled = rss_kib(proc.pid)
            sent = list(upstream.sent.values())
            for s in socks:
                s.close()
            await asyncio.sleep(3.0)
            after = rss_kib(proc.pid)
            return Figures(streams, before, stalled, after, max(sent), sum(sent))
    finally:
        await upstream.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--idle", action="store_true",
                        help="the upstream sends one chunk and then nothing: the cost of an "
                             "open stream with nothing to buffer, for comparison")
    args = parser.parse_args()
    f = asyncio.run(measure(args.streams, idle=args.idle))
    print(f"{'idle' if args.idle else 'stalled'} streams: {f.streams}")
    print(f"gateway RSS before:        {f.rss_before_kib / 1024:8.1f} MiB")
    print(f"gateway RSS while stalled: {f.rss_stalled_kib / 1024:8.1f} MiB "
          f"(+{f.per_stream_kib:.0f} KiB per stream)")
    print(f"gateway RSS after close:   {f.rss_after_kib / 1024:8.1f} MiB")
    print(f"upstream bytes sent per stream before it stalled: max {f.upstream_sent_max / 1024:.0f} KiB, "
          f"mean {f.upstream_sent_total / f.streams / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
