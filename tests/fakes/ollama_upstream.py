"""A fake Ollama server on loopback speaking the native chat API (`POST /api/chat`).

Faithful to the real wire format (ollama/ollama docs/api.md, api/types.go):
- `stream` defaults to TRUE when absent; streams are NDJSON (`application/x-ndjson`),
  one JSON object per line, `done: false` until a final line with `done: true`,
  `done_reason` and the `*_count` / `*_duration` metrics (durations in nanoseconds).
- Thinking arrives in `message.thinking`; tool calls arrive whole in
  `message.tool_calls[{function: {index, name, arguments: <object>}}]` (no ids), each
  call on its own stream line; `done_reason` stays "stop" after tool calls.
- Errors are `{"error": "..."}` with the real status codes (404 model not found,
  400 bad request, 429 with `retry-after`, 500, 503 busy); a failure mid-stream is an
  `{"error": ...}` line after status 200.
- Like the real server (Go's decoder), it refuses with 400 what it cannot decode:
  tool-call `arguments` given as a string instead of an object, images that are not
  bare base64 (e.g. a `data:` URL), a non-boolean `stream`, a `format` that is neither
  "json" nor a schema object.
Replies follow tests/fakes/scenario.py; images are described as
`base64 <media type sniffed from the bytes> <N> bytes` (Ollama images carry no type).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from tests.fakes.base import LoopbackFake
from tests.fakes.scenario import USAGE, Decision, decide, words

_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"),
          (b"GIF87a", "image/gif"), (b"GIF89a", "image/gif"))


class BadRequest(Exception):
    """A request the real server's decoder would refuse with 400."""


def sniff(data: bytes) -> str:
    for magic, media in _MAGIC:
        if data.startswith(magic):
            return media
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


def decode_image(value: Any) -> bytes:
    if not isinstance(value, str):
        raise BadRequest("json: cannot unmarshal into Go struct field Message.messages.images "
                         "of type api.ImageData")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("illegal base64 data at input byte 4") from None


def validate(body: dict[str, Any]) -> None:
    """The checks Go's JSON decoding and the chat handler make before generating."""
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise BadRequest("model is required")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise BadRequest("json: cannot unmarshal into Go struct field ChatRequest.stream of type bool")
    fmt = body.get("format")
    if fmt is not None and not (fmt in ("", "json") or isinstance(fmt, dict)):
        raise BadRequest(f'invalid format: "{fmt}"; expected "json" or a valid JSON Schema')
    think = body.get("think")
    if think is not None and not isinstance(think, (bool, str)):
        raise BadRequest("think must be a boolean or string")
    if not isinstance(body.get("messages"), list):
        raise BadRequest("messages is required")
    for m in body["messages"]:
        if not isinstance(m.get("content", ""), str):
            raise BadRequest("json: cannot unmarshal array into Go struct field Message.messages."
                             "content of type string")
        for img in m.get("images") or []:
            decode_image(img)
        for tc in m.get("tool_calls") or []:
            args = (tc.get("function") or {}).get("arguments")
            if args is not None and not isinstance(args, dict):
                kind = "string" if isinstance(args, str) else type(args).__name__
                raise BadRequest(f"json: cannot unmarshal {kind} into Go struct field "
                                 "ToolCallFunction.messages.tool_calls.function.arguments of type "
                                 "api.ToolCallFunctionArguments")


def now_rfc3339() -> str:
    # Go's time.Time marshals with nanosecond precision.
    t = datetime.now(UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond:06d}123Z"


def metrics(done_reason: str) -> dict[str, Any]:
    return {"done": True, "done_reason": done_reason,
            "total_duration": 1_234_567_890, "load_duration": 12_345_678,
            "prompt_eval_count": USAGE["prompt_tokens"], "prompt_eval_duration": 98_765_432,
            "eval_count": USAGE["completion_tokens"], "eval_duration": 876_543_210}


def wire_tool_calls(d: Decision) -> list[dict[str, Any]]:
    return [{"function": {"index": i, "name": name, "arguments": args}}
            for i, (name, args) in enumerate(d.tool_calls)]


class FakeOllama(LoopbackFake):
    def routes(self, app: web.Application) -> None:
        app.router.add_post("/api/chat", self._chat)

    def _decide(self, body: dict[str, Any]) -> Decision:
        last = body["messages"][-1] if body["messages"] else {"role": "user", "content": ""}
        images = []
        for img in last.get("images") or []:
            data = decode_image(img)
            images.append(f"base64 {sniff(data)} {len(data)} bytes")
        stop = (body.get("options") or {}).get("stop") or []
        return decide(last_text=last.get("content") or "", last_is_tool_result=last.get("role") == "tool",
                      images=images, stop=[stop] if isinstance(stop, str) else list(stop),
                      json_mode=bool(body.get("format")))

    @staticmethod
    def _error(status: int, model: str) -> web.Response:
        if status == 404:
            msg = f'model "{model}" not found, try pulling it first'
        elif status == 503:
            msg = "server busy, please try again.  maximum pending requests exceeded"
        else:
            msg = f"fake upstream error {status}"
        headers = {"retry-after": "1"} if status == 429 else {}
        return web.json_response({"error": msg}, status=status, headers=headers)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return web.json_response({"error": "invalid character in request body"}, status=400)
        self.log(request, body)
        try:
            validate(body)
            d = self._decide(body)
        except BadRequest as exc:
            return web.json_response({"error": str(exc)}, status=400)
        if d.error_status:
            return self._error(d.error_status, body["model"])
        if body.get("stream", True):
            return await self._stream(request, body["model"], d)
        msg: dict[str, Any] = {"role": "assistant", "content": d.text}
        if d.thinking:
            msg["thinking"] = d.thinking
        if d.tool_calls:
            msg["tool_calls"] = wire_tool_calls(d)
        return web.json_response({"model": body["model"], "created_at": now_rfc3339(),
                                  "message": msg, **metrics("stop")})

    async def _stream(self, request: web.Request, model: str, d: Decision) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "application/x-ndjson"})
        await resp.prepare(request)

        async def line(message: dict[str, Any], **extra: Any) -> None:
            obj = {"model": model, "created_at": now_rfc3339(),
                   "message": {"role": "assistant", "content": "", **message}, "done": False, **extra}
            await resp.write(json.dumps(obj).encode() + b"\n")
            await asyncio.sleep(0)

        try:
            for w in words(d.thinking) if d.thinking else []:
                await line({"thinking": w})
            deltas = words(d.text) if d.text else []
            if d.midstream_error:
                for w in deltas[:2]:
                    await line({"content": w})
                await resp.write(b'{"error":"an error was encountered while running the model: '
                                 b'fake midstream failure"}\n')
                return resp
            for w in deltas:
                await line({"content": w})
            for call in wire_tool_calls(d):
                await line({"tool_calls": [call]})
            await line({}, **metrics("stop"))
        except (ConnectionResetError, asyncio.CancelledError):
            self.disconnects += 1
            raise
        return resp
