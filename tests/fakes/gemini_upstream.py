"""A fake Google Gemini (generativelanguage v1beta) upstream on loopback.

Speaks the real wire format: `POST /v1beta/models/{model}:generateContent` returns a
GenerateContentResponse (camelCase JSON: candidates[].content.parts, finishReason, index,
usageMetadata, modelVersion, responseId); `…:streamGenerateContent?alt=sse` sends one
GenerateContentResponse per SSE `data:` line (without `alt=sse`, a JSON array, as the
real endpoint does). Errors use Google's shape `{"error": {"code", "message", "status"}}`;
429 adds `retry-after: 1`. `ERROR <code> <STATUS> [message]` sends the google.rpc.Status
body the real API sends for that status name, with its `details`: RESOURCE_EXHAUSTED
carries QuotaFailure, Help and RetryInfo (`retryDelay: "7s"`, no Retry-After header),
FAILED_PRECONDITION says the user location is not supported; any other status name
carries the given message. Replies follow tests/fakes/scenario.py, mapped to Gemini:

- function calls arrive whole (also when streaming); the first functionCall part of a
  reply carries `thoughtSignature` = base64("sig-<name>") (the field is bytes on the wire,
  so its JSON form is base64) and every call has an `id` ("fc-<n>-<name>");
- `THINK <text>` adds a `thought: true` part when `thinkingConfig.includeThoughts` is set
  (as the real API does) and reports thoughtsTokenCount 5 either way; completion tokens stay
  USAGE["completion_tokens"] (candidatesTokenCount = 7 - thoughts). `last_usage` holds the
  figures of the latest reply in OpenAI terms;
- JSON mode is `generationConfig.responseMimeType: application/json`; candidateCount gives
  that many identical candidates; maxOutputTokens cuts the reply to that many words with
  finishReason MAX_TOKENS.
Gemini-only scenario lines: `BLOCK` → promptFeedback.blockReason SAFETY and no candidates;
`SAFETY` → a candidate finished by SAFETY with no text; `CUT` (streaming) → one text
delta, then the connection closes with no finishReason (a cut stream).

It rejects (400 INVALID_ARGUMENT) what the real API rejects and matters here: a
`parameters`/`responseSchema` using JSON Schema keywords outside Gemini's OpenAPI subset
(e.g. additionalProperties, $schema); both `parameters` and `parametersJsonSchema`;
both `responseSchema` and `responseJsonSchema`; a model turn whose first functionCall
part lacks the thoughtSignature this fake issued for it (or the documented bypass value
`skip_thought_signature_validator`); a functionResponse whose name or id matches no call of
the model turn before it; roles other than user/model. A missing API key is a 403; a key
containing "invalid" gets the real 400 API_KEY_INVALID answer.
"""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

from aiohttp import web

from tests.fakes.base import LoopbackFake
from tests.fakes.scenario import USAGE, Decision, decide, words

SKIP_SIGNATURE = "skip_thought_signature_validator"
SCHEMA_KEYS = frozenset({
    "type", "format", "title", "description", "nullable", "enum", "maxItems", "minItems",
    "properties", "required", "minProperties", "maxProperties", "minLength", "maxLength",
    "pattern", "example", "anyOf", "propertyOrdering", "default", "items", "minimum", "maximum",
})
_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
           404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE",
           504: "DEADLINE_EXCEEDED"}


# Free-form JSON inside a request: left as sent when spellings are normalised.
_OPAQUE = frozenset({"args", "response", "parametersJsonSchema", "responseJsonSchema", "parameters",
                     "responseSchema", "labels"})


def _camel(key: str) -> str:
    head, *rest = key.split("_")
    return head + "".join(w[:1].upper() + w[1:] for w in rest)


def normalize(value: Any) -> Any:
    """Proto JSON accepts field names in lowerCamelCase or as declared (snake_case), and the
    google-genai SDK sends a mix (`mime_type`, `parameters_json_schema`, `thinking_level`), so
    the fake reads every request in camelCase, as the real API effectively does."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            ck = _camel(k)
            out[ck] = v if ck in _OPAQUE else normalize(v)
        return out
    if isinstance(value, list):
        return [normalize(v) for v in value]
    return value


def signature_for(name: str) -> str:
    """The thoughtSignature (JSON form) this fake attaches to a call of `name`."""
    return base64.b64encode(f"sig-{name}".encode()).decode()


class Rejected(Exception):
    """A request the real API would answer with 400 INVALID_ARGUMENT."""


def _check_schema(schema: Any, where: str) -> None:
    if not isinstance(schema, dict):
        return
    for k, v in schema.items():
        if k not in SCHEMA_KEYS:
            raise Rejected(f'Invalid JSON payload received. Unknown name "{k}" at \'{where}\': '
                           "Cannot find field.")
        if k == "properties" and isinstance(v, dict):
            for name, sub in v.items():
                _check_schema(sub, f"{where}.properties[{name}].value")
        elif k == "items":
            _check_schema(v, f"{where}.items")
        elif k == "anyOf" and isinstance(v, list):
            for i, sub in enumerate(v):
                _check_schema(sub, f"{where}.any_of[{i}]")


def _check_request(body: dict[str, Any]) -> None:
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents:
        raise Rejected("* GenerateContentRequest.contents: contents is not specified")
    for t, tool in enumerate(body.get("tools") or []):
        for f, decl in enumerate(tool.get("functionDeclarations") or []):
            if "parameters" in decl and "parametersJsonSchema" in decl:
                raise Rejected("parameters and parametersJsonSchema are mutually exclusive")
            if "parameters" in decl:
                _check_schema(decl["parameters"], f"tools[{t}].function_declarations[{f}].parameters")
    gen = body.get("generationConfig") or {}
    if "responseSchema" in gen:
        if "responseJsonSchema" in gen:
            raise Rejected("responseSchema and responseJsonSchema are mutually exclusive")
        _check_schema(gen["responseSchema"], "generation_config.response_schema")
    prev_calls: list[dict[str, Any]] = []
    for i, c in enumerate(contents):
        role = c.get("role", "user")
        if role not in ("user", "model"):
            raise Rejected(f"Please use a valid role: user, model. (contents[{i}].role={role!r})")
        parts = c.get("parts") or []
        calls = [p for p in parts if "functionCall" in p]
        if role == "model" and calls:
            first = calls[0]
            sig = first.get("thoughtSignature")
            name = first["functionCall"].get("name", "")
            if not sig:
                raise Rejected(f"Function call is missing a thought_signature in functionCall parts. "
                               f"This is required for tools to work correctly. Additional data, "
                               f"function call `{name}`, position {i}.")
            if sig not in (signature_for(name), SKIP_SIGNATURE):
                raise Rejected(f"Corrupted thought signature (contents[{i}]).")
        for p in parts:
            fr = p.get("functionResponse")
            if fr is None:
                continue
            names = {pc["functionCall"].get("name") for pc in prev_calls}
            ids = {pc["functionCall"].get("id") for pc in prev_calls} - {None}
            if fr.get("name") not in names:
                raise Rejected(f"functionResponse name {fr.get('name')!r} (contents[{i}]) matches no "
                               "functionCall of the previous model turn")
            if ids and fr.get("id") not in ids:
                raise Rejected(f"functionResponse id {fr.get('id')!r} (contents[{i}]) matches no "
                               "functionCall id of the previous model turn")
        if role == "model":
            prev_calls = calls


def _result_text(response: Any) -> str:
    if isinstance(response, dict) and set(response) == {"result"} and isinstance(response["result"], str):
        return response["result"]
    return json.dumps(response)


def _google_error(code: int, text: str) -> web.Response | None:
    """`ERROR <code> <STATUS> [message]` as the real API's google.rpc.Status JSON."""
    for line in text.splitlines():
        parts = line.strip().split(" ", 3)
        if parts[0] == "ERROR" and len(parts) > 2 and parts[2].isupper():
            status, message = parts[2], parts[3] if len(parts) > 3 else ""
            break
    else:
        return None
    details: list[dict[str, Any]] = []
    if status == "RESOURCE_EXHAUSTED":
        message = ("You exceeded your current quota, please check your plan and billing details. "
                   "For more information on this error, head to: "
                   "https://ai.google.dev/gemini-api/docs/rate-limits.")
        details = [
            {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{
                "quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
                "quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
                "quotaDimensions": {"location": "global", "model": "gemini-2.0-flash"},
                "quotaValue": "15"}]},
            {"@type": "type.googleapis.com/google.rpc.Help", "links": [{
                "description": "Learn more about Gemini API quotas",
                "url": "https://ai.google.dev/gemini-api/docs/rate-limits"}]},
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "7s"}]
    elif status == "FAILED_PRECONDITION":
        message = "User location is not supported for the API use."
    error: dict[str, Any] = {"code": code, "message": message or status, "status": status}
    if details:
        error["details"] = details
    return web.json_response({"error": error}, status=code)


def _describe(part: dict[str, Any]) -> str | None:
    if "inlineData" in part:
        d = part["inlineData"]
        return f"base64 {d.get('mimeType')} {len(base64.b64decode(d.get('data', '')))} bytes"
    if "fileData" in part:
        return f"url {part['fileData'].get('fileUri')}"
    return None


class FakeGemini(LoopbackFake):
    def __init__(self) -> None:
        super().__init__()  # requests are logged as received (before normalising spellings)
        self.paths: list[str] = []
        self.last_usage: dict[str, int] = dict(USAGE)

    def routes(self, app: web.Application) -> None:
        app.router.add_post(r"/{version:v1|v1beta}/models/{target:[^/]+}", self._handle)

    # ------------------------------------------------------------------ helpers ----

    @staticmethod
    def _error(status: int, message: str) -> web.Response:
        headers = {"retry-after": "1"} if status == 429 else {}
        return web.json_response({"error": {"code": status, "message": message,
                                            "status": _STATUS.get(status, "UNKNOWN")}},
                                 status=status, headers=headers)

    def _decide(self, body: dict[str, Any]) -> tuple[Decision, str]:
        last = body["contents"][-1]
        parts = last.get("parts") or []
        responses = [p["functionResponse"] for p in parts if "functionResponse" in p]
        text = " ".join(p["text"] for p in parts if isinstance(p.get("text"), str) and not p.get("thought"))
        images = [desc for p in parts if (desc := _describe(p)) is not None]
        gen = body.get("generationConfig") or {}
        if responses:
            text = _result_text(responses[-1].get("response"))
        d = decide(last_text=text, last_is_tool_result=bool(responses), images=images,
                   stop=list(gen.get("stopSequences") or []),
                   json_mode=gen.get("responseMimeType") == "application/json")
        return d, text

    def _usage(self, thoughts: int) -> dict[str, Any]:
        prompt, completion = USAGE["prompt_tokens"], USAGE["completion_tokens"]
        self.last_usage = {"prompt_tokens": prompt, "completion_tokens": completion,
                           "cached_tokens": USAGE["cached_tokens"], "reasoning_tokens": thoughts}
        u: dict[str, Any] = {
            "promptTokenCount": prompt, "candidatesTokenCount": completion - thoughts,
            "totalTokenCount": prompt + completion,
            "cachedContentTokenCount": USAGE["cached_tokens"],
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt}],
            "cacheTokensDetails": [{"modality": "TEXT", "tokenCount": USAGE["cached_tokens"]}],
        }
        if thoughts:
            u["thoughtsTokenCount"] = thoughts
        return u

    # ------------------------------------------------------------------ handler ----

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        model, _, method = request.match_info["target"].partition(":")
        self.paths.append(request.path_qs)
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return self._error(400, "Invalid JSON payload received.")
        self.log(request, body)
        body = normalize(body)
        if not (request.headers.get("x-goog-api-key") or request.query.get("key")):
            return self._error(403, "Method doesn't allow unregistered callers (callers without "
                                    "established identity). Please use API Key or other form of "
                                    "API consumer identity to call this API.")
        if "invalid" in (request.headers.get("x-goog-api-key") or request.query.get("key") or ""):
            return web.json_response({"error": {
                "code": 400, "message": "API key not valid. Please pass a valid API key.",
                "status": "INVALID_ARGUMENT", "details": [{
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
                    "domain": "googleapis.com",
                    "metadata": {"service": "generativelanguage.googleapis.com"}}]}}, status=400)
        if method not in ("generateContent", "streamGenerateContent"):
            return self._error(404, f"Method {method!r} not found.")
        try:
            _check_request(body)
        except Rejected as exc:
            return self._error(400, str(exc))
        d, user_text = self._decide(body)
        if d.error_status:
            shaped = _google_error(d.error_status, user_text)
            if shaped is not None:
                return shaped
            return self._error(d.error_status, f"fake upstream error {d.error_status}")
        lines = {ln.strip() for ln in user_text.splitlines()}
        gen = body.get("generationConfig") or {}
        include_thoughts = bool((gen.get("thinkingConfig") or {}).get("includeThoughts"))
        reply = _Reply(d, model, gen, include_thoughts, blocked="BLOCK" in lines,
                       safety="SAFETY" in lines, response_id=f"fake-{len(self.requests)}")
        cut = "CUT" in lines
        usage = self._usage(5 if d.thinking else 0)
        if method == "generateContent":
            return web.json_response(reply.whole(usage))
        if request.query.get("alt") != "sse":
            return web.json_response(list(reply.events(usage)))
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        events = reply.events(usage)
        for event in events[:1] if cut else events:
            await resp.write(b"data: " + json.dumps(event).encode() + b"\r\n\r\n")
            await asyncio.sleep(0)
        return resp


class _Reply:
    """One decided reply, rendered whole or as stream events."""

    def __init__(self, d: Decision, model: str, gen: dict[str, Any], include_thoughts: bool, *,
                 blocked: bool, safety: bool, response_id: str) -> None:
        self.d = d
        self.model = model
        self.n = int(gen.get("candidateCount") or 1)
        self.thought = d.thinking if include_thoughts else ""
        self.blocked = blocked
        self.safety = safety
        self.response_id = response_id
        self.text = d.text
        self.finish = "STOP"
        limit = gen.get("maxOutputTokens")
        if limit and not d.tool_calls:
            ws = words(self.text)
            if len(ws) > int(limit):
                self.text = "".join(ws[: int(limit)])
                self.finish = "MAX_TOKENS"
        if safety:
            self.text, self.finish = "", "SAFETY"

    def _calls(self) -> list[dict[str, Any]]:
        out = []
        for i, (name, args) in enumerate(self.d.tool_calls):
            part: dict[str, Any] = {"functionCall": {"id": f"fc-{i}-{name}", "name": name, "args": args}}
            if i == 0:
                part["thoughtSignature"] = signature_for(name)
            out.append(part)
        return out

    def _envelope(self, candidates: list[dict[str, Any]] | None, usage: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"usageMetadata": usage, "modelVersion": self.model,
                               "responseId": self.response_id}
        if candidates is not None:
            out["candidates"] = candidates
        return out

    def _blocked(self, usage: dict[str, Any]) -> dict[str, Any]:
        return {"promptFeedback": {"blockReason": "SAFETY", "safetyRatings": [
            {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH"}]},
                "usageMetadata": {"promptTokenCount": usage["promptTokenCount"],
                                  "totalTokenCount": usage["promptTokenCount"]},
                "modelVersion": self.model, "responseId": self.response_id}

    def whole(self, usage: dict[str, Any]) -> dict[str, Any]:
        if self.blocked:
            return self._blocked(usage)
        parts: list[dict[str, Any]] = []
        if self.thought:
            parts.append({"text": self.thought, "thought": True})
        if self.d.tool_calls:
            parts.extend(self._calls())
        elif self.text or not self.safety:
            parts.append({"text": self.text})
        cands = []
        for i in range(self.n):
            cand: dict[str, Any] = {"finishReason": self.finish, "index": i}
            if parts:  # the real API leaves content out of a candidate blocked for safety
                cand["content"] = {"role": "model", "parts": parts}
            if self.safety:
                cand["safetyRatings"] = [{"category": "HARM_CATEGORY_HARASSMENT", "probability": "HIGH",
                                          "blocked": True}]
            cands.append(cand)
        return self._envelope(cands, usage)

    def events(self, usage: dict[str, Any]) -> list[dict[str, Any]]:
        if self.blocked:
            return [self._blocked(usage)]
        running = {"promptTokenCount": usage["promptTokenCount"],
                   "totalTokenCount": usage["promptTokenCount"]}

        def event(parts: list[dict[str, Any]], finish: str | None = None,
                  final: bool = False) -> dict[str, Any]:
            cands = []
            for i in range(self.n):
                cand: dict[str, Any] = {"content": {"role": "model", "parts": parts}, "index": i}
                if finish:
                    cand["finishReason"] = finish
                cands.append(cand)
            return self._envelope(cands, usage if final else running)

        out: list[dict[str, Any]] = []
        if self.thought:
            out.append(event([{"text": self.thought, "thought": True}]))
        if self.d.tool_calls:
            out.append(event(self._calls()))
            out.append(event([{"text": ""}], self.finish, final=True))
            return out
        deltas = words(self.text) if self.text else []
        if self.d.midstream_error:
            out.extend(event([{"text": w}]) for w in deltas[:2])
            out.append({"error": {"code": 500, "message": "fake midstream failure",
                                  "status": "INTERNAL"}})
            return out
        for w in deltas[:-1]:
            out.append(event([{"text": w}]))
        out.append(event([{"text": deltas[-1] if deltas else ""}], self.finish, final=True))
        return out
