"""A fake OpenAI Chat Completions / Images upstream on loopback.

Speaks the real wire format: `chat.completion` objects, SSE `data:` chunks ending with
`data: [DONE]`, tool-call argument deltas streamed in fragments the way OpenAI does
(first delta: index, id, type, name, arguments ""; then argument pieces), usage in a
final `choices: []` chunk only when `stream_options.include_usage` is set, and
OpenAI-shaped error bodies. Replies follow tests/fakes/scenario.py.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from aiohttp import web

from tests.fakes.base import LoopbackFake
from tests.fakes.scenario import USAGE, Decision, decide, describe_image, split_json, words


def _text_of(content: Any) -> tuple[str, list[str]]:
    if isinstance(content, str):
        return content, []
    texts, images = [], []
    for p in content or []:
        if p.get("type") == "text":
            texts.append(p["text"])
        elif p.get("type") == "image_url":
            images.append(describe_image(p["image_url"]["url"]))
    return " ".join(texts), images


def _usage() -> dict[str, Any]:
    return {"prompt_tokens": USAGE["prompt_tokens"], "completion_tokens": USAGE["completion_tokens"],
            "total_tokens": USAGE["prompt_tokens"] + USAGE["completion_tokens"],
            "prompt_tokens_details": {"cached_tokens": USAGE["cached_tokens"], "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": USAGE["reasoning_tokens"],
                                          "audio_tokens": 0, "accepted_prediction_tokens": 0,
                                          "rejected_prediction_tokens": 0}}


_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
                429: "requests", 500: "server_error", 503: "server_error"}


class FakeOpenAI(LoopbackFake):
    base_path = "/v1"

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/images/generations", self._images)

    def _decide(self, body: dict[str, Any]) -> Decision:
        last = body["messages"][-1]
        text, images = _text_of(last.get("content"))
        stop = body.get("stop") or []
        rf = (body.get("response_format") or {}).get("type")
        return decide(last_text=text, last_is_tool_result=last["role"] == "tool", images=images,
                      stop=[stop] if isinstance(stop, str) else stop,
                      json_mode=rf in ("json_object", "json_schema"))

    def _error(self, status: int) -> web.Response:
        headers = {"retry-after": "1"} if status == 429 else {}
        return web.json_response(
            {"error": {"message": f"fake upstream error {status}",
                       "type": _ERROR_TYPES.get(status, "server_error"),
                       "param": None, "code": None}}, status=status, headers=headers)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._chat_inner(request)
        except asyncio.CancelledError:
            self.disconnects += 1  # the gateway closed our connection before we finished
            raise

    async def _chat_inner(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.log(request, body)
        d = self._decide(body)
        if d.error_status:
            return self._error(d.error_status)
        n = body.get("n") or 1
        cid, created, model = f"chatcmpl-fake{len(self.requests)}", int(time.time()), body["model"]
        finish = "tool_calls" if d.tool_calls else "stop"
        tool_calls = [{"id": f"call_{i}_{name}", "type": "function",
                       "function": {"name": name, "arguments": json.dumps(args)}}
                      for i, (name, args) in enumerate(d.tool_calls)]
        if not body.get("stream"):
            if d.delay_ms:
                await asyncio.sleep(d.delay_ms / 1000)
            msg: dict[str, Any] = {"role": "assistant", "content": d.text or None, "refusal": None,
                                   "annotations": []}
            if d.thinking:
                msg["reasoning_content"] = d.thinking
            if tool_calls:
                msg["tool_calls"] = tool_calls
            return web.json_response({
                "id": cid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": i, "message": msg, "logprobs": None, "finish_reason": finish}
                            for i in range(n)],
                "usage": _usage(), "system_fingerprint": "fp_fake", **self.reply_extra()})
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        await self.stream_preamble(resp)
        include_usage = (body.get("stream_options") or {}).get("include_usage")

        async def send(choices: list[dict[str, Any]], **extra: Any) -> None:
            chunk = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                     "system_fingerprint": "fp_fake", "choices": choices, **extra}
            if include_usage and "usage" not in extra:
                chunk["usage"] = None
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")

        try:
            for i in range(n):
                await send([{"index": i, "delta": {"role": "assistant", "content": ""},
                             "logprobs": None, "finish_reason": None}])
                if d.thinking:
                    await send([{"index": i, "delta": {"reasoning_content": d.thinking},
                                 "finish_reason": None}])
                for w in words(d.text) if d.text else []:
                    await asyncio.sleep(d.delay_ms / 1000)
                    await send([{"index": i, "delta": {"content": w}, "finish_reason": None}])
                if d.midstream_error:
                    await resp.write(b'data: {"error": {"message": "fake midstream failure", '
                                     b'"type": "server_error"}}\n\n')
                    return resp
                for j, tc in enumerate(tool_calls):
                    await send([{"index": i, "delta": {"tool_calls": [{
                        "index": j, "id": tc["id"], "type": "function",
                        "function": {"name": tc["function"]["name"], "arguments": ""}}]},
                        "finish_reason": None}])
                    for frag in split_json(tc["function"]["arguments"]):
                        await send([{"index": i, "delta": {"tool_calls": [{
                            "index": j, "function": {"arguments": frag}}]}, "finish_reason": None}])
                await send([{"index": i, "delta": {}, "logprobs": None, "finish_reason": finish}])
            if include_usage:
                await send([], usage=_usage())
            await resp.write(b"data: [DONE]\n\n")
        except ConnectionResetError:
            self.disconnects += 1
            raise
        return resp

    def reply_extra(self) -> dict[str, Any]:
        """Top-level fields a whole reply carries besides OpenAI's (none here)."""
        return {}

    async def stream_preamble(self, resp: web.StreamResponse) -> None:
        """Frames a stream opens with before its first chunk (none here)."""

    async def _images(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.log(request, body)
        n = body.get("n") or 1
        if body.get("response_format") == "b64_json":
            data = [{"b64_json": "aGVsbG8=", "revised_prompt": body["prompt"]} for _ in range(n)]
        else:
            data = [{"url": f"https://images.example/{i}.png", "revised_prompt": body["prompt"]}
                    for i in range(n)]
        return web.json_response({"created": int(time.time()), "data": data})


_FILTER_RESULTS = {k: {"filtered": False, "severity": "safe"}
                   for k in ("hate", "self_harm", "sexual", "violence")}


class FakeAzureOpenAI(FakeOpenAI):
    """Azure OpenAI's deployment API on loopback: OpenAI's wire format at
    `/openai/deployments/{deployment}/…?api-version=…`, authenticated by the `api-key`
    header (401 without one, 404 without `api-version`, as Azure answers). Whole replies
    carry `prompt_filter_results`; streams open with Azure's choice-less content-filter
    chunk. Logs the deployment and api-version of each call in `calls`."""

    base_path = ""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str]] = []  # (deployment, api-version)

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/openai/deployments/{deployment}/chat/completions", self._azure_chat)
        app.router.add_post("/openai/deployments/{deployment}/images/generations",
                            self._azure_images)

    def _addressing(self, request: web.Request) -> web.Response | None:
        if "api-version" not in request.query:
            return web.json_response({"error": {"code": "404", "message": "Resource not found"}},
                                     status=404)
        if not request.headers.get("api-key"):
            return web.json_response({"error": {"code": "401", "message": (
                "Access denied due to invalid subscription key or wrong API endpoint.")}},
                status=401)
        self.calls.append((request.match_info["deployment"], request.query["api-version"]))
        return None

    async def _azure_chat(self, request: web.Request) -> web.StreamResponse:
        return self._addressing(request) or await self._chat(request)

    async def _azure_images(self, request: web.Request) -> web.Response:
        return self._addressing(request) or await self._images(request)

    def reply_extra(self) -> dict[str, Any]:
        return {"prompt_filter_results": [{"prompt_index": 0,
                                           "content_filter_results": _FILTER_RESULTS}]}

    async def stream_preamble(self, resp: web.StreamResponse) -> None:
        chunk = {"choices": [], "created": 0, "id": "", "model": "", "object": "",
                 **self.reply_extra()}
        await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
