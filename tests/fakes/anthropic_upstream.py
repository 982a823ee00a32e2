"""A fake Anthropic Messages API (`POST /v1/messages`) on loopback.

Speaks the real wire format, written from Anthropic's API reference and checked
against the official `anthropic` SDK (tests/test_provider_anthropic.py): `message`
objects; SSE streams with named events (message_start, content_block_start /
content_block_delta / content_block_stop, message_delta with CUMULATIVE usage,
message_stop, `ping` keep-alives, `error`); tool input streamed as input_json_delta
fragments; thinking blocks with signature_delta; error bodies
`{"type": "error", "error": {"type": "overloaded_error", "message": …}}`.

It validates what the real API validates and matters here: the API key (x-api-key or
Bearer) and anthropic-version headers, `max_tokens` required, unknown top-level fields rejected,
roles user/assistant strictly alternating (stricter than today's API, which merges
same-role turns: the gateway must not depend on that), non-empty text blocks, image
sources, every tool_use answered by a tool_result in the next turn (results first),
tool_choice naming a known tool, thinking budget >= 1024 and < max_tokens, no forced
tool choice or temperature while thinking, thinking blocks carrying the signature the
fake issued (`signature_for`), and — with thinking on — the last assistant turn that
called tools opening with its thinking block.

Replies follow tests/fakes/scenario.py. JSON mode is our documented strategy for
Anthropic (core/providers/anthropic.py): when a tool named `json_response` is
offered, the reply is a call to it with input {"said": <text>}. THINK adds a thinking
block and reports output_tokens_details.thinking_tokens = 5.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from typing import Any

from aiohttp import web

from tests.fakes.base import LoopbackFake
from tests.fakes.scenario import USAGE, Decision, decide, split_json, words

JSON_TOOL = "json_response"
THINKING_TOKENS = 5
TOP_LEVEL = {"model", "messages", "max_tokens", "system", "metadata", "stop_sequences", "stream",
             "temperature", "top_p", "top_k", "tools", "tool_choice", "thinking", "service_tier",
             "container", "output_config", "cache_control", "inference_geo", "speed",
             "mcp_servers", "context_management"}
IMAGE_TYPES = {"image/jpeg", "image/png", "image/gif", "image/webp"}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
               500: "api_error", 529: "overloaded_error"}


class Invalid(Exception):
    """A request the real API answers with 400 invalid_request_error."""


def signature_for(thinking: str) -> str:
    """The fake's thinking signature: checkable, like the real (cryptographic) one."""
    return "sig-" + hashlib.sha256(thinking.encode()).hexdigest()[:24]


def _usage(thinking: bool, *, start: bool = False) -> dict[str, Any]:
    u: dict[str, Any] = {
        "input_tokens": USAGE["prompt_tokens"] - USAGE["cached_tokens"],
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": USAGE["cached_tokens"],
        "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
        "output_tokens": 1 if start else USAGE["completion_tokens"],
        "service_tier": "standard",
    }
    if thinking and not start:
        u["output_tokens_details"] = {"thinking_tokens": THINKING_TOKENS}
    return u


# ------------------------------------------------------------- validation ----


def _check_blocks(content: Any, where: str, role: str) -> None:
    if isinstance(content, str):
        if not content:
            raise Invalid(f"{where}: text content blocks must be non-empty")
        return
    if not isinstance(content, list) or not content:
        raise Invalid(f"{where}: all messages must have non-empty content")
    allowed = ({"text", "image", "tool_result", "document"} if role == "user"
               else {"text", "tool_use", "thinking", "redacted_thinking"})
    seen_other = False
    for j, b in enumerate(content):
        at = f"{where}.{j}"
        kind = b.get("type") if isinstance(b, dict) else None
        if kind not in allowed:
            raise Invalid(f"{at}.type: Input tag '{kind}' found using 'type' does not match any of "
                          f"the expected tags: {', '.join(sorted(allowed))}")
        if kind == "text" and not b.get("text"):
            raise Invalid(f"{at}.text: text content blocks must be non-empty")
        if kind == "image":
            _check_image(b.get("source"), f"{at}.source")
        if kind == "tool_use" and not (b.get("id") and b.get("name")
                                       and isinstance(b.get("input"), dict)):
            raise Invalid(f"{at}: tool_use blocks need id, name and an object input")
        if kind == "thinking" and b.get("signature") != signature_for(b.get("thinking", "")):
            raise Invalid(f"{at}: Invalid `signature` in `thinking` block")
        if kind == "tool_result":
            if seen_other:
                raise Invalid(f"{where}: tool_result blocks must come first in the content")
            if isinstance(b.get("content"), list):
                _check_blocks(b["content"], f"{at}.content", "user")
        else:
            seen_other = True


def _check_image(src: Any, where: str) -> None:
    kind = src.get("type") if isinstance(src, dict) else None
    if kind == "base64":
        if src.get("media_type") not in IMAGE_TYPES:
            raise Invalid(f"{where}.media_type: Input should be {', '.join(sorted(IMAGE_TYPES))}")
        try:
            base64.b64decode(src["data"], validate=True)
        except (KeyError, ValueError):
            raise Invalid(f"{where}.data: invalid base64 data") from None
    elif kind == "url":
        if not str(src.get("url", "")).startswith(("http://", "https://")):
            raise Invalid(f"{where}.url: must be an http(s) URL")
    else:
        raise Invalid(f"{where}: Input tag '{kind}' does not match base64, url, file")


def _tool_ids(content: Any, kind: str, key: str) -> list[str]:
    if not isinstance(content, list):
        return []
    return [b[key] for b in content if isinstance(b, dict) and b.get("type") == kind]


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise Invalid("messages: at least one message is required")
    prev_role = None
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("user", "assistant"):
            raise Invalid(f"messages.{i}.role: Input should be 'user' or 'assistant'")
        if role == prev_role:
            raise Invalid(f'messages: roles must alternate between "user" and "assistant", but '
                          f'found multiple "{role}" roles in a row')
        prev_role = role
        _check_blocks(m.get("content"), f"messages.{i}.content", role)
        results = _tool_ids(m.get("content"), "tool_result", "tool_use_id")
        if results:
            before = messages[i - 1].get("content") if i else None
            unknown = set(results) - set(_tool_ids(before, "tool_use", "id"))
            if unknown:
                raise Invalid(f"messages.{i}.content: unexpected `tool_use_id` found in "
                              f"`tool_result` blocks: {sorted(unknown)}. Each `tool_result` block "
                              "must have a corresponding `tool_use` block in the previous message.")
        uses = _tool_ids(m.get("content"), "tool_use", "id")
        if uses and i + 1 < len(messages):
            missing = set(uses) - set(_tool_ids(messages[i + 1].get("content"), "tool_result",
                                                "tool_use_id"))
            if missing:
                raise Invalid(f"messages.{i + 1}: `tool_use` ids were found without `tool_result` "
                              f"blocks immediately after: {sorted(missing)}")


def _check_tools(body: dict[str, Any]) -> None:
    names = set()
    for k, t in enumerate(body.get("tools") or []):
        schema = t.get("input_schema")
        if not t.get("name") or not isinstance(schema, dict) or schema.get("type") != "object":
            raise Invalid(f"tools.{k}: a tool needs a name and an input_schema of type object")
        if set(t) - {"name", "description", "input_schema", "cache_control", "type"}:
            raise Invalid(f"tools.{k}: Extra inputs are not permitted")
        names.add(t["name"])
    choice = body.get("tool_choice")
    if choice is None:
        return
    kind = choice.get("type")
    if kind not in ("auto", "any", "tool", "none"):
        raise Invalid("tool_choice.type: Input should be auto, any, tool or none")
    if kind == "tool" and choice.get("name") not in names:
        raise Invalid(f"tool_choice.name: tool `{choice.get('name')}` is not in tools")
    if kind == "none" and "disable_parallel_tool_use" in choice:
        raise Invalid("tool_choice.none.disable_parallel_tool_use: Extra inputs are not permitted")


def validate(body: Any) -> None:
    if not isinstance(body, dict):
        raise Invalid("request body must be a JSON object")
    for key in body:
        if key not in TOP_LEVEL:
            raise Invalid(f"{key}: Extra inputs are not permitted")
    if not isinstance(body.get("model"), str):
        raise Invalid("model: Field required")
    mt = body.get("max_tokens")
    if mt is None:
        raise Invalid("max_tokens: Field required")
    if not isinstance(mt, int) or isinstance(mt, bool) or mt < 1:
        raise Invalid("max_tokens: Input should be a positive integer")
    _check_messages(body.get("messages"))
    system = body.get("system")
    if system is not None and not isinstance(system, str):
        _check_blocks(system, "system", "user")
    for name in ("temperature", "top_p"):
        v = body.get(name)
        if v is not None and not 0 <= v <= 1:
            raise Invalid(f"{name}: Input should be less than or equal to 1")
    stops = body.get("stop_sequences")
    if stops is not None and not (isinstance(stops, list) and all(isinstance(s, str) for s in stops)):
        raise Invalid("stop_sequences: Input should be a list of strings")
    if set(body.get("metadata") or {}) - {"user_id"}:
        raise Invalid("metadata: Extra inputs are not permitted")
    _check_tools(body)
    thinking = body.get("thinking")
    if thinking and thinking.get("type") == "enabled":
        budget = thinking.get("budget_tokens")
        if not isinstance(budget, int) or budget < 1024:
            raise Invalid("thinking.enabled.budget_tokens: Input should be greater than or equal to 1024")
        if budget >= mt:
            raise Invalid("`max_tokens` must be greater than `thinking.budget_tokens`")
        if body.get("temperature") not in (None, 1):
            raise Invalid("`temperature` may only be set to 1 when thinking is enabled")
        if (body.get("tool_choice") or {}).get("type") in ("any", "tool"):
            raise Invalid("Thinking may not be enabled when tool_choice forces tool use.")
        _check_thinking_tool_loop(body["messages"])


def _check_thinking_tool_loop(messages: list[dict[str, Any]]) -> None:
    """With thinking on, the last assistant turn that called tools must open with the
    (signed) thinking that preceded those calls."""
    for i in range(len(messages) - 1, -1, -1):
        m = messages[i]
        if m["role"] != "assistant":
            continue
        content = m["content"] if isinstance(m["content"], list) else []
        if _tool_ids(content, "tool_use", "id") and content[0].get("type") not in (
                "thinking", "redacted_thinking"):
            raise Invalid(f"messages.{i}.content.0.type: Expected `thinking` or `redacted_thinking`, "
                          f"but found `{content[0].get('type')}`. When `thinking` is enabled, a final "
                          "`assistant` message must start with a thinking block.")
        return


# ---------------------------------------------------------------- replies ----


def _block_text(block: dict[str, Any]) -> str:
    content = block.get("content")
    if isinstance(content, str):
        return content
    return " ".join(b["text"] for b in content or [] if b.get("type") == "text")


def _describe(src: dict[str, Any]) -> str:
    if src["type"] == "base64":
        return f"base64 {src['media_type']} {len(base64.b64decode(src['data']))} bytes"
    return f"url {src['url']}"


def _last_message(body: dict[str, Any]) -> tuple[str, bool, list[str]]:
    """(text, is a tool result, image descriptions) of the conversation's last message:
    the blocks after the last tool_result of the last turn (OpenAI's last message)."""
    content = body["messages"][-1]["content"]
    if isinstance(content, str):
        return content, False, []
    last_result = max((j for j, b in enumerate(content) if b["type"] == "tool_result"), default=-1)
    if last_result == len(content) - 1:
        return _block_text(content[last_result]), True, []
    tail = content[last_result + 1:]
    text = " ".join(b["text"] for b in tail if b["type"] == "text")
    return text, False, [_describe(b["source"]) for b in tail if b["type"] == "image"]


class FakeAnthropic(LoopbackFake):
    def __init__(self) -> None:
        super().__init__()
        self._ids = 0

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/messages", self._messages)

    def _id(self, prefix: str) -> str:
        self._ids += 1
        return f"{prefix}_fake{self._ids:04d}"

    @staticmethod
    def error(status: int, message: str) -> web.Response:
        etype = ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
        headers = {"request-id": "req_fake", **({"retry-after": "1"} if status == 429 else {})}
        return web.json_response({"type": "error", "error": {"type": etype, "message": message},
                                  "request_id": "req_fake"}, status=status, headers=headers)

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.headers.append(headers)
        try:
            body = await request.json()
        except ValueError:
            return self.error(400, "There was an issue with your request body: invalid JSON")
        self.requests.append(body)
        # The API takes the key as x-api-key (what the gateway sends) or, as newer SDKs
        # send it, as a Bearer token.
        if not (headers.get("x-api-key") or headers.get("authorization", "").startswith("Bearer ")):
            return self.error(401, "x-api-key header is required")
        if not headers.get("anthropic-version"):
            return self.error(400, "anthropic-version: header is required")
        try:
            validate(body)
        except Invalid as exc:
            return self.error(400, str(exc))
        text, is_result, images = _last_message(body)
        stop = body.get("stop_sequences") or []
        json_mode = any(t["name"] == JSON_TOOL for t in body.get("tools") or [])
        d = decide(last_text=text, last_is_tool_result=is_result, images=images, stop=stop,
                   json_mode=json_mode)
        if d.error_status:
            return self.error(d.error_status, f"fake upstream error {d.error_status}")
        stop_seq = None
        if d.stopped_by_sequence:
            full = decide(last_text=text, last_is_tool_result=is_result, images=images, stop=[],
                          json_mode=json_mode).text
            stop_seq = next(s for s in stop if s and full.find(s) == len(d.text))
        calls = list(d.tool_calls)
        if json_mode and not calls and not d.stopped_by_sequence:
            calls = [(JSON_TOOL, json.loads(d.text))]
            d.text = ""
        blocks = self._blocks(d, calls)
        reason = "tool_use" if calls else "stop_sequence" if stop_seq else "end_turn"
        if not body.get("stream"):
            return web.json_response({
                "id": self._id("msg"), "type": "message", "role": "assistant",
                "model": body["model"], "content": blocks, "stop_reason": reason,
                "stop_sequence": stop_seq, "usage": _usage(bool(d.thinking))})
        return await self._stream(request, body, d, blocks, reason, stop_seq)

    def _blocks(self, d: Decision, calls: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
        blocks: list[dict[str, Any]] = []
        if d.thinking:
            blocks.append({"type": "thinking", "thinking": d.thinking,
                           "signature": signature_for(d.thinking)})
        if d.text:
            blocks.append({"type": "text", "text": d.text, "citations": None})
        for name, args in calls:
            blocks.append({"type": "tool_use", "id": self._id("toolu"), "name": name, "input": args})
        return blocks

    async def _stream(self, request: web.Request, body: dict[str, Any], d: Decision,
                      blocks: list[dict[str, Any]], reason: str,
                      stop_seq: str | None) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream",
                                           "cache-control": "no-cache", "request-id": "req_fake"})
        await resp.prepare(request)

        async def send(event: str, data: dict[str, Any]) -> None:
            await resp.write(f"event: {event}\ndata: {json.dumps({'type': event, **data})}\n\n".encode())
            await asyncio.sleep(0)

        try:
            await send("message_start", {"message": {
                "id": self._id("msg"), "type": "message", "role": "assistant",
                "model": body["model"], "content": [], "stop_reason": None, "stop_sequence": None,
                "usage": _usage(bool(d.thinking), start=True)}})
            await send("ping", {})
            for i, block in enumerate(blocks):
                if not await self._stream_block(send, resp, i, block, d.midstream_error):
                    return resp
            await send("message_delta", {"delta": {"stop_reason": reason, "stop_sequence": stop_seq},
                                         "usage": self._delta_usage(bool(d.thinking))})
            await send("message_stop", {})
        except (ConnectionResetError, asyncio.CancelledError):
            self.disconnects += 1
            raise
        return resp

    @staticmethod
    def _delta_usage(thinking: bool) -> dict[str, Any]:
        # Cumulative output only, as the classic API sends: input counts stay in message_start.
        u: dict[str, Any] = {"output_tokens": USAGE["completion_tokens"]}
        if thinking:
            u["output_tokens_details"] = {"thinking_tokens": THINKING_TOKENS}
        return u

    async def _stream_block(self, send: Any, resp: web.StreamResponse, i: int,
                            block: dict[str, Any], midstream: bool) -> bool:
        """Streams one content block; False when the stream was cut by ERROR midstream."""
        kind = block["type"]
        if kind == "thinking":
            await send("content_block_start", {"index": i, "content_block": {
                "type": "thinking", "thinking": "", "signature": ""}})
            for w in words(block["thinking"]):
                await send("content_block_delta", {"index": i, "delta": {
                    "type": "thinking_delta", "thinking": w}})
            await send("content_block_delta", {"index": i, "delta": {
                "type": "signature_delta", "signature": block["signature"]}})
        elif kind == "text":
            await send("content_block_start", {"index": i, "content_block": {
                "type": "text", "text": "", "citations": None}})
            for n, w in enumerate(words(block["text"])):
                if midstream and n == 2:
                    await send("error", {"error": {"type": "overloaded_error", "message": "Overloaded"}})
                    return False
                await send("content_block_delta", {"index": i, "delta": {"type": "text_delta", "text": w}})
                if n == 0:
                    await send("ping", {})
        else:
            await send("content_block_start", {"index": i, "content_block": {
                "type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}})
            for frag in split_json(json.dumps(block["input"])):
                await send("content_block_delta", {"index": i, "delta": {
                    "type": "input_json_delta", "partial_json": frag}})
        await send("content_block_stop", {"index": i})
        return True
