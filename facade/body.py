"""Reading a request body: size limit, Content-Encoding, JSON with the depth limit.

The façade decodes `Content-Encoding` itself (the runner turns aiohttp's automatic
decompression off): aiohttp's decoder hangs the request when a deflate body is cut
short and arrives after the headers (its error goes to the parser, not to the handler
waiting on the body), and it cannot say which encoding was wrong. Here a body that does
not decode is a 400, and the decoded size counts against the same `max_body_bytes`
limit as a plain body (413), so a small compressed bomb is refused without being inflated.
"""

from __future__ import annotations

import zlib
from typing import Any

import grpc
import orjson
from aiohttp import web

from switchboard.core import bounds
from switchboard.core.errors import GatewayError, invalid

SUPPORTED = ("gzip", "x-gzip", "deflate", "identity")


def too_large(limit: int) -> GatewayError:
    return GatewayError(grpc.StatusCode.INVALID_ARGUMENT,
                        f"Request body exceeds the limit of {limit} bytes.",
                        code="request_too_large")


def _inflate(data: bytes, encoding: str, limit: int) -> bytes:
    if encoding == "deflate":
        # RFC 9110 deflate is zlib-wrapped; some clients send raw deflate.
        wbits = 15 if data[:1] and data[0] & 0x0F == 8 else -15
    else:
        wbits = 31  # gzip header and trailer
    d = zlib.decompressobj(wbits)
    try:
        out = d.decompress(data, limit + 1)
        if len(out) > limit:
            raise too_large(limit)
        if d.unconsumed_tail or not d.eof:
            raise zlib.error("truncated or trailing data")
    except zlib.error:
        raise invalid(f"The request body could not be decoded as Content-Encoding: {encoding}.",
                      None, code="invalid_body") from None
    return out


async def read_body(request: web.Request) -> bytes:
    """The decoded body bytes; 413 past the app's client_max_size, 400 when undecodable."""
    limit = request.app._client_max_size
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise too_large(limit) from None
    header = request.headers.get("content-encoding", "")
    codings = [c.strip().lower() for c in header.split(",") if c.strip()]
    for coding in reversed(codings):  # applied in order, so undone last-first
        if coding == "identity":
            continue
        if coding not in SUPPORTED:
            raise invalid(f"Unsupported Content-Encoding {coding[:40]!r} (supported: gzip, "
                          "deflate, identity).", "content-encoding", code="unsupported_encoding")
        raw = _inflate(raw, "gzip" if coding == "x-gzip" else coding, limit)
    return raw


async def read_json(request: web.Request, *, empty: Any = None) -> Any:
    """The body as JSON within the depth limit; `empty` (when not None) stands for an
    empty body, otherwise an empty body is a 400."""
    raw = await read_body(request)
    if not raw:
        if empty is not None:
            return empty
        raise invalid("The request body is empty; send a JSON object.", None)
    try:
        return bounds.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise invalid(f"We could not parse the JSON body of your request ({exc.msg} at "
                      f"position {exc.pos}).", None, code="invalid_json") from None
