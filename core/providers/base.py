"""What every provider client shares: the upstream error type, the pooled aiohttp
session, and readers for SSE and NDJSON bodies. No provider-specific knowledge here.

Upstream calls go through aiohttp's client (docs/design.md, "Performance": httpx costs
10–15× more CPU per request on this path).
"""

from __future__ import annotations

import os
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import aiohttp
import orjson
from yarl import URL

from switchboard.core.config import ChannelConfig
from switchboard.v1 import inference_pb2 as pb


def message_text(m: pb.Message, sep: str = " ") -> str:
    """The text of one of our messages: its string content, or its text parts joined by
    `sep` (each provider picks the joint its wire format reads best)."""
    kind = m.WhichOneof("content")
    if kind == "text":
        return m.text
    if kind == "parts":
        return sep.join(p.text for p in m.parts.parts if p.WhichOneof("part") == "text")
    return ""


class UpstreamError(Exception):
    """An upstream call that failed.

    `retryable` says whether another channel may succeed (connect errors, 429, 5xx,
    timeouts, malformed replies); a non-retryable error is the client's fault (a
    4xx the client caused) and goes straight back to it. `status` is the upstream
    HTTP status when there was one.
    """

    def __init__(self, message: str, *, retryable: bool, status: int | None = None,
                 retry_after: float | None = None, param: str | None = None,
                 kind: str = "error") -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.status = status
        self.retry_after = retry_after
        self.param = param
        # connect | timeout | http | malformed | stream | unsupported | error
        self.kind = kind


def retryable_status(status: int) -> bool:
    """429, 5xx (incl. Anthropic's 529), and 401/403/404 that mean a channel is misconfigured
    are worth trying elsewhere; other 4xx are the client's."""
    return status == 429 or status >= 500 or status in (401, 403, 408, 409)


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # HTTP-date form: treat as unknown


def error_message(body: bytes, fallback: str) -> tuple[str, str | None]:
    """Message and param from a JSON error body, whatever its provider's shape:
    {"error": {"message": …}}, {"error": "…"}, {"message": …}."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        text = body.decode("utf-8", "replace").strip()
        return (text[:500] or fallback), None
    if isinstance(data, list) and data:
        data = data[0]  # Gemini's streaming endpoint wraps errors in a list
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, str):
            return err, None
        if isinstance(err, dict):
            msg = err.get("message") or err.get("error") or fallback
            param = err.get("param")
            return str(msg), (param if isinstance(param, str) else None)
    return fallback, None


# Backpressure (README "Slow clients"): a streamed upstream body is read at most this
# much at a time, and aiohttp stops reading the upstream socket once twice
# `_READ_BUFSIZE` is buffered (plus the last socket read, at most 256 KiB). So a client
# that stops reading holds its upstream in the kernel's socket buffers, not in this
# process (iter_any() used to hand over everything buffered at once: ~1.8 MiB per
# stalled stream measured, bench/stalled_streams.py).
_READ_BUFSIZE = 8 * 1024
_READ_PIECE = 8 * 1024


class HttpPool:
    """One pooled keep-alive aiohttp session per event loop, shared by all channels."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=60)
            self._session = aiohttp.ClientSession(
                connector=connector,
                # Upstream APIs authenticate by header; a cookie jar would only cost a
                # filter and an update on every request.
                cookie_jar=aiohttp.DummyCookieJar(),
                json_serialize=lambda o: orjson.dumps(o).decode(),
                auto_decompress=True,
                skip_auto_headers=("User-Agent",),
                read_bufsize=_READ_BUFSIZE,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class ProviderClient:
    """Base for a channel's client. Subclasses implement the calls they support."""

    supports_images = False

    def __init__(self, channel: ChannelConfig, http: HttpPool) -> None:
        self.channel = channel
        self.http = http
        self.timeout = aiohttp.ClientTimeout(
            total=None, connect=channel.timeouts.connect or None,
            sock_connect=channel.timeouts.connect or None,
        )
        self._urls: dict[str, URL] = {}  # parsed once: yarl parsing is per-request work

    def _url_of(self, url: str) -> URL | str:
        parsed = self._urls.get(url)
        if parsed is None:
            try:
                parsed = URL(url)  # as aiohttp would parse it
            except ValueError:
                return url  # aiohttp raises its own InvalidUrlClientError for it
            if len(self._urls) >= 256:  # URLs vary only by model; bound it anyway
                self._urls.clear()
            self._urls[url] = parsed
        return parsed

    async def chat(self, params: pb.ChatCompletionParams,
                   model: str) -> pb.CreateChatCompletionResponse:
        raise NotImplementedError

    def stream(self, params: pb.ChatCompletionParams,
               model: str) -> AsyncGenerator[pb.StreamChatCompletionResponse, None]:
        # A generator, not just an iterator: the router aclose()s a stream it abandons
        # (failover, hedging, a cancelled caller), which releases the upstream connection.
        raise NotImplementedError

    async def create_image(self, req: pb.CreateImageRequest, model: str) -> pb.CreateImageResponse:
        raise UpstreamError(
            f"model `{req.model}` is served by a {self.channel.provider} channel, which does "
            "not support image generation", retryable=False, status=400, param="model",
            kind="unsupported")

    # ---- helpers for subclasses --------------------------------------------

    def redact(self, text: str) -> str:
        key = self.channel.api_key
        return text.replace(key, "[redacted]") if key and len(key) >= 4 else text

    async def post(self, url: str, body: dict[str, Any], headers: dict[str, str]
                   ) -> aiohttp.ClientResponse:
        """POST JSON; returns a 2xx response (caller must close it) or raises UpstreamError.

        A cancelled caller closes the connection, so the upstream sees the abort at once.
        """
        try:
            resp = await self.http.session().post(
                self._url_of(url), data=orjson.dumps(body),
                headers={**headers, **self.channel.headers} if self.channel.headers else headers,
                timeout=self.timeout)
        except TimeoutError:
            raise UpstreamError(f"connect timeout after {self.channel.timeouts.connect:g}s",
                                retryable=True, kind="connect") from None
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"connect error: {self.redact(connect_error_text(exc))}",
                                retryable=True, kind="connect") from None
        if resp.status < 300:
            return resp
        try:
            body_bytes = await resp.read()
        except aiohttp.ClientError:
            body_bytes = b""
        finally:
            resp.close()
        raise self.http_error(resp.status, resp.reason or "error",
                              resp.headers.get("retry-after"), body_bytes)

    def http_error(self, status: int, reason: str, retry_after: str | None,
                   body: bytes) -> UpstreamError:
        """The UpstreamError for a non-2xx reply. A provider whose error bodies carry
        structured reasons overrides it to read them (gemini.py) instead of the text."""
        msg, param = error_message(body, reason)
        return UpstreamError(
            f"HTTP {status}: {self.redact(msg)}", retryable=retryable_status(status),
            status=status, retry_after=parse_retry_after(retry_after), param=param, kind="http")

    async def post_json(self, url: str, body: dict[str, Any],
                        headers: dict[str, str]) -> Any:
        resp = await self.post(url, body, headers)
        try:
            raw = await resp.read()
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"connection lost reading the reply: {type(exc).__name__}",
                                retryable=True, kind="connect") from None
        finally:
            resp.close()
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise UpstreamError("malformed JSON in the upstream reply", retryable=True,
                                kind="malformed") from None


def connect_error_text(exc: aiohttp.ClientError) -> str:
    """What went wrong reaching the upstream, in our words. aiohttp's own text says
    `ssl:default` even for http:// URLs (it prints its ssl argument, not the scheme)."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        os_error = exc.os_error
        why = (os.strerror(os_error.errno) if isinstance(os_error.errno, int) and os_error.errno > 0
               else str(os_error) or type(os_error).__name__)
        if isinstance(exc, (aiohttp.ClientConnectorSSLError,
                            aiohttp.ClientConnectorCertificateError)):
            why = f"TLS handshake failed ({why})"
        return f"cannot connect to {exc.host}:{exc.port}: {why}"
    return str(exc) or type(exc).__name__


def stream_broken(exc: aiohttp.ClientError) -> UpstreamError:
    """A streamed body that could not be read to its end (cut, reset, bad framing)."""
    what = "broke" if isinstance(exc, aiohttp.ClientPayloadError) else "connection lost"
    return UpstreamError(f"upstream stream {what}: {type(exc).__name__}", retryable=True,
                         kind="stream")


async def iter_lines(resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """Lines of a streamed body (without the newline), as they arrive."""
    try:
        buf = b""
        async for data in resp.content.iter_chunked(_READ_PIECE):
            buf = buf + data if buf else data
            start = 0
            while True:  # index, not re-slice: a burst of lines stays linear
                nl = buf.find(b"\n", start)
                if nl < 0:
                    break
                yield buf[start:nl].rstrip(b"\r")
                start = nl + 1
            buf = buf[start:]
        if buf:
            yield buf
    except aiohttp.ClientError as exc:
        raise stream_broken(exc) from None


async def iter_sse(resp: aiohttp.ClientResponse) -> AsyncIterator[tuple[str, bytes]]:
    """Server-sent events as (event name, data) pairs; comments and keep-alives skipped.

    Parses lines straight off the body rather than through `iter_lines`: one async
    generator hop per event instead of one per line (two lines per event) plus one.
    """
    event = ""
    data: list[bytes] = []
    rest = b""
    try:
        async for received in resp.content.iter_chunked(_READ_PIECE):
            buf = rest + received if rest else received
            start = 0
            while True:
                nl = buf.find(b"\n", start)
                if nl < 0:
                    break
                line = buf[start:nl]
                start = nl + 1
                if line.endswith(b"\r"):
                    line = line[:-1]
                if not line:
                    if data:
                        yield event, data[0] if len(data) == 1 else b"\n".join(data)
                    event, data = "", []
                elif line.startswith(b"data:"):
                    data.append(line[6:] if line[5:6] == b" " else line[5:])
                elif line.startswith(b"event:"):
                    event = line[6:].strip().decode()
                # ':' comments, id:, retry: are ignored
            rest = buf[start:]
    except aiohttp.ClientError as exc:
        raise stream_broken(exc) from None
    if rest.endswith(b"\r"):
        rest = rest[:-1]
    if rest.startswith(b"data:"):  # a last line without its newline
        data.append(rest[6:] if rest[5:6] == b" " else rest[5:])
    if data:
        yield event, b"\n".join(data)


def loads_event(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        raise UpstreamError("malformed JSON in an upstream stream event", retryable=True,
                            kind="malformed") from None
