"""What every provider client shares: the upstream error type, the pooled aiohttp
session, readers for SSE and NDJSON bodies, and the one driver of an upstream call. No
provider-specific knowledge here.

The provider contract: a provider module's client says what to send (`request`: URL,
headers, JSON body), how its stream is framed (`frames`: SSE or NDJSON), how to read a
whole reply (`reply`) and gives a `StreamTranslator` per stream (frame -> zero or more
of our chunks, plus what an end without a terminal frame means). `ProviderClient.chat`
and `ProviderClient.stream` do the rest, the same way for every provider: post, map
HTTP and connection errors, read frames, feed the translator, redact the channel's key
from error messages, detect a stream that ended early, close the connection.

Upstream calls go through aiohttp's client (docs/design.md, "Performance": httpx costs
10–15× more CPU per request on this path).
"""

from __future__ import annotations

import os
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol, TypeVar

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


def bad_request(message: str, param: str | None = None) -> UpstreamError:
    """A request this provider cannot serve as asked (found while translating it, before
    any network call): the client's fault, so no other channel is tried."""
    return UpstreamError(message, retryable=False, status=400, param=param, kind="unsupported")


def stream_error(err: Any) -> UpstreamError:
    """The value of the `"error"` key OpenAI-style and Ollama streams send in place of a
    chunk (`"…"` or `{"message": …}`), as a retryable stream failure. Callers test
    `isinstance(obj, dict) and (err := obj.get("error"))` inline: it runs per chunk."""
    msg = err.get("message") if isinstance(err, dict) else err
    return UpstreamError(f"upstream stream error: {msg}", retryable=True, kind="stream")


def function_to_wire(t: pb.Tool, schema_key: str = "parameters", *,
                     default_schema: Any = None) -> dict[str, Any]:
    """A tool's function as most wire formats declare one: `name`, `description` when
    set, and the parameters JSON Schema (parsed) under `schema_key`; `default_schema`
    when the tool has none (None: the key is left out). What differs per provider (the
    wrapper, `strict`, schema rewrites) stays in the provider's own `tool_to_wire`."""
    f = t.function
    d: dict[str, Any] = {"name": f.name}
    if f.HasField("description"):
        d["description"] = f.description
    if f.parameters_json:
        d[schema_key] = orjson.loads(f.parameters_json)
    elif default_schema is not None:
        d[schema_key] = default_schema
    return d


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


Frames = Literal["sse", "ndjson"]
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    """What a provider sends for one call: where, with which headers, which JSON body."""

    url: str
    headers: dict[str, str]
    body: dict[str, Any]


class StreamTranslator(Protocol):
    """One upstream stream's frames -> our chunks (one object per stream: it may keep
    state across frames, e.g. tool-call indexes or held usage)."""

    #: Set once the terminal frame was seen: the driver stops reading and closes.
    done: bool

    def frame(self, event: str, data: bytes) -> Sequence[pb.StreamChatCompletionResponse]:
        """One frame (SSE: event name and data; NDJSON: "" and the line) -> zero or more
        chunks, or UpstreamError (an in-stream error, a malformed frame)."""
        ...

    def end(self) -> Sequence[pb.StreamChatCompletionResponse]:
        """The body ended and `done` never turned true: the chunks still owed (e.g. held
        usage), or UpstreamError(kind="stream") when that means the stream was cut."""
        ...


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
    """Base for a channel's client and owner of the upstream call (see the module doc).

    A provider implements `request`, `reply` and `translator` and sets `frames`; one with
    no upstream (echo) overrides `chat` and `stream` instead.
    """

    supports_images = False
    frames: ClassVar[Frames] = "sse"

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

    # ---- what a provider supplies ------------------------------------------

    def request(self, params: pb.ChatCompletionParams, model: str, *,
                stream: bool) -> UpstreamRequest:
        """The chat call for `model` (the upstream name); UpstreamError from
        `bad_request` for what this provider cannot express."""
        raise NotImplementedError

    def reply(self, data: Any, params: pb.ChatCompletionParams,
              model: str) -> pb.CreateChatCompletionResponse:
        """A whole reply's parsed JSON -> ours (UpstreamError kind "malformed" if it is not one)."""
        raise NotImplementedError

    def translator(self, params: pb.ChatCompletionParams, model: str) -> StreamTranslator:
        raise NotImplementedError

    # ---- the driver ----------------------------------------------------------

    async def chat(self, params: pb.ChatCompletionParams,
                   model: str) -> pb.CreateChatCompletionResponse:
        req = self.request(params, model, stream=False)
        return self.reply(await self.post_json(req.url, req.body, req.headers), params, model)

    async def stream(self, params: pb.ChatCompletionParams,
                     model: str) -> AsyncGenerator[pb.StreamChatCompletionResponse, None]:
        """Post, read frames, translate, relay. A generator, not just an iterator: the
        router aclose()s a stream it abandons (failover, hedging, a cancelled caller),
        and `finally` closes the upstream connection at once.

        This is the per-chunk hot path: the frame reader is a plain object fed inline
        (not one more async generator), and the translator is called directly.
        """
        req = self.request(params, model, stream=True)
        tr = self.translator(params, model)
        resp = await self.post(req.url, req.body, req.headers)
        reader = SseReader() if self.frames == "sse" else NdjsonReader()
        try:
            try:
                async for received in resp.content.iter_chunked(_READ_PIECE):
                    for event, data in reader.feed(received):
                        for chunk in tr.frame(event, data):
                            yield chunk
                        if tr.done:
                            return
            except aiohttp.ClientError as exc:
                raise stream_broken(exc) from None
            for event, data in reader.close():
                for chunk in tr.frame(event, data):
                    yield chunk
                if tr.done:
                    return
            for chunk in tr.end():  # no terminal frame: owed chunks, or "ended early"
                yield chunk
        except UpstreamError as err:
            # Upstream messages may echo what we sent, key included: never relay it.
            err.message = self.redact(err.message)
            raise
        finally:
            resp.close()

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


class LineReader:
    """Lines of a body fed in pieces as they arrive (without the newline; a trailing
    "\r" dropped): `feed` returns the lines each piece completes, `close` the last line
    when the body ended without its newline."""

    __slots__ = ("_rest",)

    def __init__(self) -> None:
        self._rest = b""

    def _split(self, received: bytes) -> list[bytes]:
        """The complete lines, as they are (newline excluded, "\r" kept)."""
        buf = self._rest + received if self._rest else received
        out: list[bytes] = []
        start = 0
        while True:  # index, not re-slice: a burst of lines stays linear
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            out.append(buf[start:nl])
            start = nl + 1
        self._rest = buf[start:]
        return out

    def feed(self, received: bytes) -> list[bytes]:
        return [line.rstrip(b"\r") for line in self._split(received)]

    def close(self) -> list[bytes]:
        return [self._rest] if self._rest else []


class NdjsonReader(LineReader):
    """NDJSON frames ("", line) of a body fed in pieces; blank lines are not frames (a
    line's trailing "\r" is left on: it is JSON whitespace). The split is inline, not
    `_split` plus a filter: with one line per read, that is per-chunk work."""

    __slots__ = ()

    def feed(self, received: bytes) -> list[tuple[str, bytes]]:  # type: ignore[override]
        buf = self._rest + received if self._rest else received
        out: list[tuple[str, bytes]] = []
        start = 0
        while (nl := buf.find(b"\n", start)) >= 0:
            line = buf[start:nl]
            start = nl + 1
            if line and not line.isspace():
                out.append(("", line))
        self._rest = buf[start:]
        return out

    def close(self) -> list[tuple[str, bytes]]:  # type: ignore[override]
        return [("", line) for line in super().close() if not line.isspace()]


class SseReader:
    """Server-sent events (event name, data) of a body fed in pieces as they arrive;
    comments, `id:`, `retry:` and keep-alives skipped; multi-line data joined by "\n".
    `close` returns a last event the body ended without its blank line."""

    __slots__ = ("_data", "_event", "_rest")

    def __init__(self) -> None:
        self._rest = b""
        self._event = ""
        self._data: list[bytes] = []

    def feed(self, received: bytes) -> list[tuple[str, bytes]]:
        buf = self._rest + received if self._rest else received
        out: list[tuple[str, bytes]] = []
        data = self._data
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
                    out.append((self._event, data[0] if len(data) == 1 else b"\n".join(data)))
                    data.clear()
                self._event = ""
            elif line.startswith(b"data:"):
                data.append(line[6:] if line[5:6] == b" " else line[5:])
            elif line.startswith(b"event:"):
                self._event = line[6:].strip().decode()
            # ':' comments, id:, retry: are ignored
        self._rest = buf[start:]
        return out

    def close(self) -> list[tuple[str, bytes]]:
        rest, data = self._rest, self._data
        if rest.endswith(b"\r"):
            rest = rest[:-1]
        if rest.startswith(b"data:"):  # a last line without its newline
            data.append(rest[6:] if rest[5:6] == b" " else rest[5:])
        return [(self._event, b"\n".join(data))] if data else []


class _Reader(Protocol[T]):
    def feed(self, received: bytes) -> list[T]: ...
    def close(self) -> list[T]: ...


async def read_frames(resp: aiohttp.ClientResponse, reader: _Reader[T]) -> AsyncIterator[T]:
    """What `reader` makes of a streamed body, frame by frame, as it arrives. (The
    stream driver feeds its reader inline instead, to spare a generator per chunk.)"""
    try:
        async for received in resp.content.iter_chunked(_READ_PIECE):
            for frame in reader.feed(received):
                yield frame
    except aiohttp.ClientError as exc:
        raise stream_broken(exc) from None
    for frame in reader.close():
        yield frame


def iter_lines(resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """Lines of a streamed body (without the newline), as they arrive."""
    return read_frames(resp, LineReader())


def iter_sse(resp: aiohttp.ClientResponse) -> AsyncIterator[tuple[str, bytes]]:
    """Server-sent events of a streamed body as (event name, data) pairs, as they arrive."""
    return read_frames(resp, SseReader())


def loads_event(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        raise UpstreamError("malformed JSON in an upstream stream event", retryable=True,
                            kind="malformed") from None
