"""What a slow or hostile client may cost the REST listener (README "Slow clients").

aiohttp's server has no deadline for receiving a request — a client that trickles its
headers a byte at a time keeps its connection, a task and its buffers until the
keep-alive timeout (an hour by default) — and no cap on open connections. So the
listener runs a `GuardedRunner`, whose connections are `GuardedHandler`s:

- a request's line and headers must arrive within `server.header_timeout_s` of the
  connection opening (or, on a keep-alive connection, of the request's first byte), and
  its body within `server.body_timeout_s` after the headers; otherwise the client gets a
  408 with an OpenAI error body and the connection is closed;
- a keep-alive connection without a request is closed after `server.idle_timeout_s`;
- beyond `server.max_connections` open connections, a new one gets a 503 with an OpenAI
  error body and is closed at once: it never gets a task or a parser;
- each connection's write buffer stops taking data at `WRITE_HIGH_WATER` bytes, so a
  client that stops reading an SSE stream stops the relay (and, through it, the upstream
  read) instead of collecting the stream in this process.

The handler subclasses aiohttp's RequestHandler and reads a few of its attributes
(`_request_count`, `_messages`, `_waiter`, `_current_request`); tests/test_slow_clients.py
holds the behaviour against the aiohttp version installed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson
from aiohttp import web
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler

from switchboard.core.config import ServerSettings
from switchboard.facade.app import JsonErrorProtocol, JsonErrorRunner

log = logging.getLogger("switchboard.facade")

# Bytes a connection's transport buffers before a write waits for the client to read.
# aiohttp checks it every 64 KiB written, so one stalled SSE stream holds at most ~80 KiB
# here; the kernel's socket buffer holds the rest.
WRITE_HIGH_WATER = 16 * 1024


def _raw_response(status: int, reason: str, message: str, err_type: str, code: str,
                  extra_headers: str = "") -> bytes:
    """A complete HTTP/1.1 response with an OpenAI error body, for a connection that
    is closed right after it (no request object exists to answer through)."""
    body = orjson.dumps({"error": {"message": message, "type": err_type, "param": None,
                                   "code": code}})
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n{extra_headers}connection: close\r\n\r\n"
            ).encode() + body


class ConnectionGuard:
    """One listener's connection count and settings, shared by its handlers."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.open = 0
        self.refused = 0    # connections answered 503 (over max_connections)
        self.timed_out = 0  # connections answered 408 (headers or body too slow)
        self._warned_at = 0.0
        self._timeout_reply = _raw_response(
            408, "Request Timeout",
            f"The request was not received in time (headers within "
            f"{settings.header_timeout_s:g}s, body within {settings.body_timeout_s:g}s).",
            "invalid_request_error", "request_timeout")
        self._refuse_reply = _raw_response(
            503, "Service Unavailable",
            f"The server has {settings.max_connections} open connections, its limit; retry "
            "shortly.", "server_error", "too_many_connections", "retry-after: 1\r\n")

    def warn(self, what: str) -> None:
        now = time.monotonic()
        if now - self._warned_at >= 10.0:  # one line per episode, not one per connection
            self._warned_at = now
            log.warning("REST listener: %s (so far: %d refused over max_connections=%d, "
                        "%d timed out)", what, self.refused, self.settings.max_connections,
                        self.timed_out)


class GuardedHandler(JsonErrorProtocol):
    """aiohttp's per-connection protocol, answering its own errors as OpenAI JSON
    (facade/app.py), plus the deadlines and the cap above."""

    __slots__ = ("_counted", "_guard", "_refused", "_timer")

    def __init__(self, manager: web.Server, *, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = guard
        self._timer: asyncio.TimerHandle | None = None
        self._counted = False
        self._refused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        g = self._guard
        limit = g.settings.max_connections
        if limit and g.open >= limit:
            # Refused before aiohttp sees it: no task, no parser, no registration.
            self._refused = True
            g.refused += 1
            t: Any = transport
            t.write(g._refuse_reply)
            t.close()
            g.warn(f"{limit} connections open; refusing new ones")
            return
        g.open += 1
        self._counted = True
        super().connection_made(transport)
        set_limits = getattr(transport, "set_write_buffer_limits", None)
        if set_limits is not None:
            set_limits(high=WRITE_HIGH_WATER)
        self._arm(g.settings.header_timeout_s, None)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        if self._counted:
            self._counted = False
            self._guard.open -= 1
        if self._refused:
            return  # aiohttp never knew this connection
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        before = self._request_count
        super().data_received(data)
        if self._request_count != before:
            # A request's head arrived: its body (if any) now has body_timeout_s.
            self._disarm()
            payload = self._messages[-1][1] if self._messages else None
            if isinstance(payload, StreamReader) and not payload.is_eof():
                if self._arm(self._guard.settings.body_timeout_s, payload):
                    payload.on_eof(self._disarm)
        elif self._timer is None and self._waiter is not None:
            # The first bytes of the next request on a keep-alive connection.
            self._arm(self._guard.settings.header_timeout_s, None)

    def _arm(self, seconds: float, payload: StreamReader | None) -> bool:
        self._disarm()
        if seconds <= 0:
            return False
        self._timer = self._loop.call_later(seconds, self._expired, payload)
        return True

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self, payload: StreamReader | None) -> None:
        self._timer = None
        if payload is not None and payload.is_eof():
            return  # the body arrived in time
        transport: Any = self.transport
        if transport is None or transport.is_closing():
            return
        g = self._guard
        g.timed_out += 1
        request = self._current_request
        if request is None or request.writer.output_size == 0:
            transport.write(g._timeout_reply)  # unless a response is already on its way
        g.warn("closed a connection whose request did not arrive in time")
        self.force_close()


class _GuardedServer(web.Server):
    """aiohttp's server (connection registry, shutdown) making GuardedHandlers."""

    def __init__(self, base: web.Server, guard: ConnectionGuard) -> None:
        super().__init__(base.request_handler, request_factory=base.request_factory,
                         handler_cancellation=base.handler_cancellation,
                         loop=asyncio.get_running_loop(), **base._kwargs)
        self.guard = guard

    def __call__(self) -> RequestHandler:
        return GuardedHandler(self, loop=self._loop, guard=self.guard, **self._kwargs)


class GuardedRunner(JsonErrorRunner):
    """The façade's runner (JSON parser errors, our own body decoding) whose listeners
    guard every connection with `settings`."""

    def __init__(self, app: web.Application, *, settings: ServerSettings, **kwargs: Any) -> None:
        if settings.idle_timeout_s > 0:
            kwargs.setdefault("keepalive_timeout", settings.idle_timeout_s)
        super().__init__(app, **kwargs)
        self.guard = ConnectionGuard(settings)

    async def _make_server(self) -> web.Server:
        return _GuardedServer(await super()._make_server(), self.guard)
