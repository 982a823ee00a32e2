"""iter_sse / iter_lines (core/providers/base.py) against a real loopback server that sends
its body in awkward pieces: lines and events split across reads, CRLF, multi-line data,
comments, event names, and a body that ends without its final newline."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
from aiohttp import web

from switchboard.core.providers.base import iter_lines, iter_sse


@asynccontextmanager
async def serving(pieces: list[bytes]) -> AsyncIterator[str]:
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for piece in pieces:
            await resp.write(piece)
            await asyncio.sleep(0.005)  # separate reads on the client side
        return resp

    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        await runner.cleanup()


async def read_events(pieces: list[bytes]) -> list[tuple[str, bytes]]:
    async with serving(pieces) as url, aiohttp.ClientSession() as session:
        async with session.get(url) as resp:
            return [ev async for ev in iter_sse(resp)]


async def test_events_split_across_reads() -> None:
    events = await read_events([b'data: {"a"', b":1}\n", b"\n", b"data: [DO", b"NE]\n\n"])
    assert events == [("", b'{"a":1}'), ("", b"[DONE]")]


async def test_crlf_comments_names_and_multiline_data() -> None:
    events = await read_events([
        b": keep-alive\r\n\r\n",
        b"event: message_start\r\ndata: one\r\n\r\n",
        b"data:two\ndata: three\n\n",
        b"id: 7\nretry: 10\nevent: ping\ndata: {}\n\n",
    ])
    assert events == [("message_start", b"one"), ("", b"two\nthree"), ("ping", b"{}")]


async def test_last_event_without_blank_line_or_newline() -> None:
    assert await read_events([b"data: a\n\n", b"data: b\n"]) == [("", b"a"), ("", b"b")]
    assert await read_events([b"data: a\n\n", b"data: c"]) == [("", b"a"), ("", b"c")]


async def test_many_events_in_one_read() -> None:
    body = b"".join(b"data: %d\n\n" % i for i in range(500))
    events = await read_events([body])
    assert [int(d) for _, d in events] == list(range(500))


async def test_iter_lines_pieces() -> None:
    async with serving([b'{"a":1}\r\n{"b"', b':2}\n\n{"c":3}']) as url, \
            aiohttp.ClientSession() as session:
        async with session.get(url) as resp:
            lines = [line async for line in iter_lines(resp)]
    assert lines == [b'{"a":1}', b'{"b":2}', b"", b'{"c":3}']
