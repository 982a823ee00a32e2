"""A fault-injecting fake OpenAI Chat Completions upstream on loopback.

Written on raw asyncio streams rather than aiohttp's server so each fault is exact at
the byte level (a body cut short, a chunked stream that never terminates) and so the
moment the *client* closes its connection is seen precisely: after reading a request
the fake keeps a read pending on the socket, which completes when the client's FIN or
RST arrives. Every request is recorded (`Seen`) with its arrival time, when the client
closed the connection (if it did before the fake finished), and when the fake finished.
Several fakes can share one `journal` list to show the order channels were tried in.

Every response carries `Connection: close`, so one connection is one request and a
closed connection always means "this request was abandoned".

Faults (`Fault.kind`):
  ok               a normal answer (`interval_s` paces a stream's chunks)
  status           HTTP `status` with an OpenAI error body (and `retry_after` for 429)
  slow_first_byte  wait `delay_s` before the response headers, then answer normally
  hang             accept the request and never answer
  stall            send headers and `chunks_before` chunks (non-stream: half the body),
                   then go silent
  cut              same, then cut the connection (RST) mid-body
  malformed        200 whose body (non-stream) is not JSON; stream: `chunks_before`
                   chunks, then an event that is not JSON
  error_event      stream: `chunks_before` chunks, then `data: {"error": …}` and a clean
                   end of body; non-stream: a 200 whose body is an error object
`times` limits the fault to the first N requests; later ones get `ok`.
For "connection refused", point a channel at `closed_port_url()`.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from dataclasses import dataclass, field
from typing import Any

ANSWER_WORDS = 6


@dataclass
class Fault:
    kind: str = "ok"
    status: int = 500
    retry_after: str | None = None
    delay_s: float = 0.0
    chunks_before: int = 2
    times: int | None = None
    interval_s: float = 0.0


@dataclass
class Seen:
    """One request as the fake saw it (times are event-loop times)."""

    channel: str
    body: dict[str, Any]
    fault: str
    started: float
    client_closed_at: float | None = None  # the client closed before the fake finished
    finished_at: float | None = None

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))


@dataclass
class FaultyUpstream:
    name: str
    fault: Fault = field(default_factory=Fault)
    journal: list[Seen] | None = None
    requests: list[Seen] = field(default_factory=list)
    _server: asyncio.Server | None = None
    _conns: set[asyncio.Task[Any]] = field(default_factory=set)

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/v1"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._conns):
            task.cancel()
        if self._conns:
            await asyncio.wait(list(self._conns))
        if self._server is not None:
            await self._server.wait_closed()

    def answer(self) -> str:
        return " ".join(f"{self.name}-word{i}" for i in range(ANSWER_WORDS))

    # ------------------------------------------------------------ server ----

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(self._connection(reader, writer))
        self._conns.add(task)
        task.add_done_callback(self._conns.discard)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.decode("latin-1").split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            body = json.loads(await reader.readexactly(length)) if length else {}
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        fault = self.fault
        if fault.times is not None and len(self.requests) >= fault.times:
            fault = Fault(interval_s=fault.interval_s)
        seen = Seen(self.name, body, fault.kind, loop.time())
        self.requests.append(seen)
        if self.journal is not None:
            self.journal.append(seen)
        # A read that ends when the client closes its side: the cancellation detector.
        eof = asyncio.ensure_future(reader.read(1))

        def on_eof(_: asyncio.Future[bytes]) -> None:
            if seen.finished_at is None and seen.client_closed_at is None:
                seen.client_closed_at = loop.time()

        eof.add_done_callback(on_eof)
        try:
            await self._serve(fault, seen, writer, eof)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            if seen.finished_at is None and seen.client_closed_at is None:
                seen.finished_at = loop.time()
            eof.cancel()
            writer.close()

    async def _serve(self, fault: Fault, seen: Seen, w: asyncio.StreamWriter,
                     eof: asyncio.Future[bytes]) -> None:
        stream = seen.stream
        kind = fault.kind
        if kind == "slow_first_byte":
            await asyncio.wait([eof], timeout=fault.delay_s)
            if eof.done():
                return
        if kind == "hang":
            await asyncio.wait([eof], timeout=120)
            return
        if kind == "status":
            await self._error(w, fault.status, fault.retry_after)
        elif kind == "malformed" and not stream:
            await self._json(w, 200, b'{"id": "chatcmpl-broken", "choices": [{"mess')
        elif kind == "error_event" and not stream:
            await self._json(w, 200, json.dumps({"error": {"message": "overloaded",
                                                           "type": "server_error"}}).encode())
        elif stream:
            await self._stream(fault, seen, w, eof)
        else:
            await self._complete(fault, seen, w, eof)
        # Marked done before yielding to the loop: the client may close right after.
        seen.finished_at = asyncio.get_running_loop().time()
        await w.drain()

    # ---------------------------------------------------------- replies ----

    async def _error(self, w: asyncio.StreamWriter, status: int, retry_after: str | None) -> None:
        body = json.dumps({"error": {"message": f"fake upstream error {status}",
                                     "type": "server_error", "param": None, "code": None}}).encode()
        extra = f"retry-after: {retry_after}\r\n" if retry_after is not None else ""
        w.write(f"HTTP/1.1 {status} Error\r\ncontent-type: application/json\r\n{extra}"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode() + body)

    async def _json(self, w: asyncio.StreamWriter, status: int, body: bytes) -> None:
        w.write(f"HTTP/1.1 {status} OK\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode() + body)

    def _completion(self, model: str) -> bytes:
        return json.dumps({
            "id": f"chatcmpl-{self.name}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": [{"index": 0, "message": {"role": "assistant",
                                                                "content": self.answer()},
                                         "logprobs": None, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": ANSWER_WORDS, "total_tokens": 11}},
        ).encode()

    async def _complete(self, fault: Fault, seen: Seen, w: asyncio.StreamWriter,
                        eof: asyncio.Future[bytes]) -> None:
        body = self._completion(seen.body.get("model", ""))
        if fault.kind not in ("stall", "cut"):
            await self._json(w, 200, body)
            return
        w.write(f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
                + body[: len(body) // 2])
        await w.drain()
        await self._break(fault, seen, w, eof)

    async def _break(self, fault: Fault, seen: Seen, w: asyncio.StreamWriter,
                     eof: asyncio.Future[bytes]) -> None:
        if fault.kind == "cut":
            await asyncio.sleep(0.01)  # let what was written go out first
            seen.finished_at = asyncio.get_running_loop().time()  # we cut it, not the client
            w.transport.abort()
            raise ConnectionResetError("fault: cut")
        await asyncio.wait([eof], timeout=120)  # stall until the client gives up
        raise ConnectionResetError("fault: stalled")

    async def _sse_head(self, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
                b"transfer-encoding: chunked\r\nconnection: close\r\n\r\n")
        await w.drain()

    async def _event(self, w: asyncio.StreamWriter, data: bytes) -> None:
        w.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        await w.drain()

    async def _end(self, w: asyncio.StreamWriter) -> None:
        w.write(b"0\r\n\r\n")

    async def _stream(self, fault: Fault, seen: Seen, w: asyncio.StreamWriter,
                      eof: asyncio.Future[bytes]) -> None:
        model = seen.body.get("model", "")
        base = {"id": f"chatcmpl-{self.name}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": model}

        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
            obj = {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                        "finish_reason": finish}], **extra}
            return b"data: " + json.dumps(obj).encode() + b"\n\n"

        events = [chunk({"role": "assistant", "content": ""})]
        events += [chunk({"content": (" " if i else "") + word})
                   for i, word in enumerate(self.answer().split())]
        events.append(chunk({}, "stop"))
        if (seen.body.get("stream_options") or {}).get("include_usage"):
            events.append(b"data: " + json.dumps({**base, "choices": [], "usage": {
                "prompt_tokens": 5, "completion_tokens": ANSWER_WORDS, "total_tokens": 11}}).encode()
                + b"\n\n")
        events.append(b"data: [DONE]\n\n")
        midway = fault.kind in ("stall", "cut", "error_event", "malformed")
        await self._sse_head(w)
        for i, ev in enumerate(events):
            if midway and i == fault.chunks_before:
                if fault.kind == "malformed":
                    await self._event(w, b"data: {not json at all\n\n")
                    await self._end(w)
                    return
                if fault.kind == "error_event":
                    await self._event(w, b'data: {"error": {"message": "fake midstream failure", '
                                         b'"type": "server_error"}}\n\n')
                    await self._end(w)
                    return
                await self._break(fault, seen, w, eof)
            await self._event(w, ev)
            if fault.interval_s and i < len(events) - 1:
                await asyncio.wait([eof], timeout=fault.interval_s)
                if eof.done():
                    raise ConnectionResetError("client went away")
        await self._end(w)


def closed_port_url() -> str:
    """A base URL on a loopback port nothing listens on (connection refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"
