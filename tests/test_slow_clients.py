"""Slow and hostile clients cost bounded resources (issue 10, item 5; README "Slow clients").

Raw sockets against the real listeners: clients that trickle headers or bodies get a
408 and lose their connection; a listener at `server.max_connections` answers 503 and
closes; the gRPC listener drops connections that never finish the HTTP/2 handshake;
and a real gateway process stays small while clients hold streams they never read.
"""

from __future__ import annotations

import asyncio
import socket
import time

import orjson

from bench.stalled_streams import measure
from switchboard.v1 import inference_pb2 as pb
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import AUTH, TEST_KEY, channel_yaml, make_config, running_stack


async def _connect(addr: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = addr.removeprefix("http://").rsplit(":", 1)
    return await asyncio.open_connection(host, int(port))


async def _read_all(reader: asyncio.StreamReader, within: float) -> bytes:
    """Everything the server sends until it closes the connection (or `within` passes)."""
    data = b""
    try:
        async with asyncio.timeout(within):
            while chunk := await reader.read(65536):
                data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data


def _status_and_error(raw: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, orjson.loads(body)["error"]


def _config(url: str, server: str) -> str:
    return (f"server: {server}\nchannels:\n{channel_yaml('up', 'openai', url, ['gpt-4o'])}\n")


_CHAT = orjson.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hello"}]})


def _request(body: bytes = _CHAT) -> bytes:
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\n"
            b"Authorization: Bearer " + TEST_KEY.encode() + b"\r\n"
            b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode()
            + b"\r\n\r\n" + body)


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    return int(head.split(b" ", 2)[1]), await reader.readexactly(length)


async def test_trickled_headers_get_408_and_lose_their_connection() -> None:
    up = FakeOpenAI()
    url = await up.start()
    config = make_config(_config(url, "{header_timeout_s: 1, body_timeout_s: 30}"))
    async with running_stack(config) as stack:
        conns = [await _connect(stack.http_url) for _ in range(100)]

        async def trickle(writer: asyncio.StreamWriter) -> None:
            try:
                writer.write(b"POST /v1/chat/completions HTTP/1.1\r\n")
                for i in range(100):  # one header every 0.2 s: would take 20 s
                    await asyncio.sleep(0.2)
                    writer.write(b"X-Slow-%d: 1\r\n" % i)
                    await writer.drain()
            except ConnectionError:
                pass

        started = time.monotonic()
        tricklers = [asyncio.create_task(trickle(w)) for _, w in conns]
        replies = await asyncio.gather(*(_read_all(r, 15) for r, _ in conns))
        elapsed = time.monotonic() - started
        for t in tricklers:
            t.cancel()
        for raw in replies:
            status, error = _status_and_error(raw)
            assert status == 408
            assert error["code"] == "request_timeout" and error["type"] == "invalid_request_error"
        assert elapsed < 12, f"closing 100 slowloris connections took {elapsed:.1f}s"
        for _, w in conns:
            w.close()
        await asyncio.sleep(0.2)
        assert stack.runtime.runner is not None
        assert stack.runtime.runner.guard.open == 0  # type: ignore[attr-defined]
        # The listener still serves.
        reader, writer = await _connect(stack.http_url)
        writer.write(_request())
        status, _ = await _read_response(reader)
        assert status == 200
        writer.close()
    await up.close()


async def test_silent_connection_and_trickled_body_are_closed() -> None:
    up = FakeOpenAI()
    url = await up.start()
    config = make_config(_config(url, "{header_timeout_s: 1, body_timeout_s: 1}"))
    async with running_stack(config) as stack:
        silent_r, silent_w = await _connect(stack.http_url)
        body_r, body_w = await _connect(stack.http_url)
        head, _, body = _request().partition(b"\r\n\r\n")
        body_w.write(head + b"\r\n\r\n" + body[:5])  # headers complete, body never finishes
        silent, slow_body = await asyncio.gather(_read_all(silent_r, 10), _read_all(body_r, 10))
        assert _status_and_error(silent)[0] == 408
        status, error = _status_and_error(slow_body)
        assert status == 408 and error["code"] == "request_timeout"
        assert up.requests == []  # nothing half-read reached the upstream
        silent_w.close()
        body_w.close()
    await up.close()


async def test_keep_alive_connection_outlives_the_header_timeout_between_requests() -> None:
    """The header deadline runs from a request's first byte, not from the last response:
    an idle keep-alive connection is governed by idle_timeout_s."""
    up = FakeOpenAI()
    url = await up.start()
    config = make_config(_config(url, "{header_timeout_s: 0.5, idle_timeout_s: 30}"))
    async with running_stack(config) as stack:
        reader, writer = await _connect(stack.http_url)
        for _ in range(2):
            writer.write(_request())
            status, body = await _read_response(reader)
            assert status == 200, body
            await asyncio.sleep(1.5)  # idle three header timeouts long
        writer.close()
    await up.close()


async def test_connection_cap_answers_503_and_frees_slots() -> None:
    up = FakeOpenAI()
    url = await up.start()
    config = make_config(_config(url, "{max_connections: 5, header_timeout_s: 30}"))
    async with running_stack(config) as stack:
        held = [await _connect(stack.http_url) for _ in range(5)]
        await asyncio.sleep(0.1)
        reader, writer = await _connect(stack.http_url)
        started = time.monotonic()
        status, error = _status_and_error(await _read_all(reader, 5))
        assert status == 503 and error["code"] == "too_many_connections"
        assert time.monotonic() - started < 2  # refused at once, not left waiting
        writer.close()
        for _, w in held[:2]:
            w.close()
        await asyncio.sleep(0.2)
        reader, writer = await _connect(stack.http_url)
        writer.write(_request())
        status, _ = await _read_response(reader)
        assert status == 200
        writer.close()
        for _, w in held[2:]:
            w.close()
    await up.close()


async def test_grpc_listener_drops_connections_that_never_handshake() -> None:
    up = FakeOpenAI()
    url = await up.start()
    config = make_config(_config(url, "{header_timeout_s: 1}"))
    async with running_stack(config) as stack:
        host, port = stack.grpc_target.rsplit(":", 1)
        socks = []
        for _ in range(20):
            s = socket.socket()
            s.setblocking(False)
            await asyncio.get_running_loop().sock_connect(s, (host, int(port)))
            socks.append(s)
        started = time.monotonic()

        async def closed(s: socket.socket) -> bool:
            try:
                async with asyncio.timeout(10):
                    while await asyncio.get_running_loop().sock_recv(s, 4096):
                        pass
            except TimeoutError:
                return False
            except ConnectionResetError:
                pass
            return True

        assert all(await asyncio.gather(*(closed(s) for s in socks)))
        assert time.monotonic() - started < 8
        for s in socks:
            s.close()
    await up.close()


async def test_stalled_streams_cost_bounded_memory_in_a_real_process() -> None:
    """50 clients that never read a stream from an upstream that writes as fast as it
    can: the gateway stops reading the upstreams and its RSS stays small. Before
    backpressure this measured ~1.2 MiB per stream; the bound is generous."""
    figures = await measure(50)
    assert figures.per_stream_kib < 512, figures
    assert figures.rss_after_kib <= figures.rss_stalled_kib + 8 * 1024, figures


async def test_grpc_listener_refuses_connections_over_the_cap() -> None:
    up = FakeOpenAI()
    url = await up.start()
    config = make_config(_config(url, "{max_connections: 3, header_timeout_s: 30}"))
    async with running_stack(config) as stack:
        host, port = stack.grpc_target.rsplit(":", 1)
        loop = asyncio.get_running_loop()
        socks = []
        for _ in range(5):
            s = socket.socket()
            s.setblocking(False)
            await loop.sock_connect(s, (host, int(port)))
            # HTTP/2 client preface and an empty SETTINGS frame
            await loop.sock_sendall(s, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000"))
            socks.append(s)
        replies = []
        for s in socks:
            try:
                async with asyncio.timeout(5):
                    replies.append(await loop.sock_recv(s, 4096))
            except ConnectionResetError:
                replies.append(b"")
        assert [bool(r) for r in replies] == [True, True, True, False, False]  # SETTINGS, or closed
        for s in socks:
            s.close()
        await asyncio.sleep(0.5)
        resp = await stack.stub.ListModels(pb.ListModelsRequest(), metadata=AUTH, timeout=10)
        assert resp.models
    await up.close()
