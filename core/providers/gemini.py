"""Google Gemini (generativelanguage API, v1beta): pure translate functions between our
messages and the generateContent wire JSON, plus a small client.

Endpoints: `POST {base}/v1beta/models/{model}:generateContent` and
`…:streamGenerateContent?alt=sse` (SSE, one GenerateContentResponse per `data:` line),
authenticated with the `x-goog-api-key` header. Errors come as google.rpc.Status JSON,
`{"error": {"code", "message", "status", "details"}}`: the client reads the status name
and the ErrorInfo reasons (not the message text) to tell a channel at fault (bad key,
billing, region: retryable on another channel) from a bad request, and RetryInfo's
`retryDelay` as the retry-after of a 429.

Decisions (the README points here):
- Tool schemas go in `parametersJsonSchema`, which the API reference documents as taking
  JSON Schema as is ("mutually exclusive with parameters"; its own example carries
  `additionalProperties: false`). The older `parameters` field only takes Gemini's
  OpenAPI-subset `Schema` and rejects keywords OpenAI clients send all the time
  (`additionalProperties`, `$schema`, `strict` schemas), so sending the schema untouched is
  the lossless choice. Channel option `schema_field: parameters` switches to the old field
  for deployments without `parametersJsonSchema`; the schema is then reduced to the subset
  (unsupported keywords dropped, `type: [T, "null"]` → `nullable`, `const` → `enum`).
  `response_format: json_schema` likewise uses `responseJsonSchema` (or `responseSchema`
  with the same reduction under `schema_field: parameters`); `json_object` is
  `responseMimeType: application/json` alone.
- Thought signatures (Gemini 3 rejects a functionCall part replayed without the
  `thoughtSignature` it came with). OpenAI clients only hand back the tool call id, so the
  id we hand out carries what we must echo: `call_<16 hex>` when there is nothing to
  carry, else `call_<16 hex>__ts__<base64url(JSON {"s": signature, "i": Gemini's own
  functionCall id})>`. The random part keeps ids unique; the blob starts at a fixed offset,
  so parsing never depends on characters inside it. Decoding puts `thoughtSignature` back
  on exactly the part it came on, and Gemini's `id` back on the functionCall and on the
  matching functionResponse. An assistant turn whose tool call ids we did not issue (a
  conversation begun on another model, e.g. after a route failover) gets the documented
  bypass value `skip_thought_signature_validator` on its first functionCall part (the one
  Gemini 3 checks) so it is accepted; channel option
  `thought_signature_fallback: false` sends no signature instead. Signatures Gemini puts
  on plain text parts are optional to echo and are not carried, and neither is an
  assistant turn's reasoning_content (Gemini does not take thought summaries back).
- Tool results become `functionResponse` parts in a user turn; the function name comes
  from the assistant tool call with the same id earlier in the conversation; `response`
  is the result's JSON when it is an object, else `{"result": <text>}`.
- reasoning_effort → `thinkingConfig`. Gemini 3 and later take `thinkingLevel`:
  none/minimal → minimal, low → low, medium → medium, high/xhigh → high. Models named
  `gemini-2*` (and channel option `thinking: budget`) take `thinkingBudget` tokens:
  none → 0, minimal → 512, low → 1024, medium → 8192, high → 24576, xhigh → 32768.
  Levels above high (xhigh, max) are clamped to high since not every model takes more.
  `includeThoughts: true` is sent so thought summaries arrive as `reasoning_content` —
  by default for models that think (`gemini-*` except 1.x, 2.0 and image models) and
  whenever reasoning_effort is given, because Gemini answers 400 "thinking_config is not
  supported" to models that do not think; channel option `include_thoughts: true|false`
  overrides the guess.
- Images: data: URLs → `inlineData`; http(s)/gs:// URLs → `fileData` with a MIME type
  guessed from the URL's extension, else channel option `file_mime_type` (default
  image/jpeg). Audio parts → `inlineData` audio/wav or audio/mp3.
- Not carried (Gemini has no equivalent): logit_bias, logprobs, parallel_tool_calls,
  user, metadata. `extra` fields `safetySettings`, `cachedContent`, `labels` and `top_k`
  (→ generationConfig.topK) are passed on.
- finishReason: STOP → stop (tool_calls when the candidate called functions),
  MAX_TOKENS → length, SAFETY/RECITATION/BLOCKLIST/PROHIBITED_CONTENT/SPII/LANGUAGE and
  the IMAGE_* safety reasons → content_filter, anything else → stop. A prompt blocked
  before any candidate (`promptFeedback.blockReason`) is a reply with one empty choice
  finished by content_filter, not an error.
- Usage: promptTokenCount (+ toolUsePromptTokenCount) → prompt_tokens,
  candidatesTokenCount + thoughtsTokenCount → completion_tokens, thoughtsTokenCount →
  reasoning_tokens, cachedContentTokenCount → cached_tokens. Streams: Gemini repeats
  usageMetadata on its events; only the latest counts and it is sent once, on the chunk
  that finishes the last candidate (or on a trailing usage-only chunk).
- A stream that ends before any candidate finished was cut: it is an error.
- Gemini reports a bad API key as 400 INVALID_ARGUMENT ("API key not valid"); that is a
  channel fault, so it is retryable on another channel rather than blamed on the client.
"""

from __future__ import annotations

import base64
import binascii
import mimetypes
import re
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal
from urllib.parse import unquote_to_bytes, urlsplit

import orjson
from google.protobuf import json_format
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from pydantic import BeforeValidator, Field

from switchboard.core.config import Bool, OptBool, ProviderOptions, ProviderSpec, Str, one_of
from switchboard.core.providers.base import (
    ProviderClient,
    UpstreamError,
    UpstreamRequest,
    bad_request,
    function_to_wire,
    loads_event,
    message_text,
)
from switchboard.v1 import inference_pb2 as pb

API_VERSION = "v1beta"
SKIP_SIGNATURE = "skip_thought_signature_validator"


class Options(ProviderOptions):
    """Channel `options` of `provider: gemini` (the module docstring says why each exists)."""

    schema_field: Annotated[Literal["parametersJsonSchema", "parameters"],
                            BeforeValidator(one_of("parametersJsonSchema", "parameters"))] = Field(
        default="parametersJsonSchema", description="`parameters`: send tool and response schemas in the "
        "older field, reduced to Gemini's OpenAPI subset")
    thought_signature_fallback: Bool = Field(
        default=True, description="send the documented bypass signature on tool calls Gemini did not issue")
    include_thoughts: OptBool = Field(
        default=None, description="ask for thought summaries; default: guessed from the model name")
    thinking: Annotated[Literal["level", "budget"] | None,
                        BeforeValidator(one_of("level", "budget"))] = Field(
        default=None, description="`thinkingLevel` or `thinkingBudget`; default: budget for `gemini-2*`, "
        "else level")
    file_mime_type: Str = Field(default="image/jpeg", description="MIME type of image URLs whose "
                                "extension says none")
_TS_MARK = "__ts__"
_NONCE_HEX = 16
_BLOB_AT = len("call_") + _NONCE_HEX + len(_TS_MARK)

FINISH_FROM_WIRE = {
    "STOP": pb.FINISH_REASON_STOP,
    "MAX_TOKENS": pb.FINISH_REASON_LENGTH,
    **{r: pb.FINISH_REASON_CONTENT_FILTER for r in (
        "SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "LANGUAGE",
        "IMAGE_SAFETY", "IMAGE_PROHIBITED_CONTENT", "IMAGE_RECITATION")},
}
THINKING_LEVELS = {"none": "minimal", "minimal": "minimal", "low": "low", "medium": "medium",
                   "high": "high", "xhigh": "high", "max": "high"}
THINKING_BUDGETS = {"none": 0, "minimal": 512, "low": 1024, "medium": 8192, "high": 24576,
                    "xhigh": 32768, "max": 32768}
# Models that do not think and answer 400 to any thinkingConfig.
_NO_THINKING = re.compile(r"^(?!gemini-)|^gemini-(1\.|2\.0)|image")
TOOL_MODES = {"auto": "AUTO", "none": "NONE", "required": "ANY"}
AUDIO_MIME = {"wav": "audio/wav", "mp3": "audio/mp3"}
# Gemini's OpenAPI-subset Schema (the `parameters` / `responseSchema` fields).
SCHEMA_KEYS = frozenset({
    "type", "format", "title", "description", "nullable", "enum", "maxItems", "minItems",
    "properties", "required", "minProperties", "maxProperties", "minLength", "maxLength",
    "pattern", "example", "anyOf", "propertyOrdering", "default", "items", "minimum", "maximum",
})
_EXTRA_TOP = ("safetySettings", "cachedContent", "labels")


# ------------------------------------------------------------- tool call ids ----


def encode_tool_call_id(signature: str | None = None, gemini_id: str | None = None) -> str:
    """A fresh, unique OpenAI tool call id carrying what Gemini needs echoed (see module doc)."""
    base = "call_" + secrets.token_hex(_NONCE_HEX // 2)
    carry: dict[str, str] = {}
    if signature:
        carry["s"] = signature
    if gemini_id:
        carry["i"] = gemini_id
    if not carry:
        return base
    blob = base64.urlsafe_b64encode(orjson.dumps(carry)).rstrip(b"=").decode()
    return base + _TS_MARK + blob


def issued_by_us(tool_call_id: str) -> bool:
    """Whether `tool_call_id` has the shape of an id `encode_tool_call_id` made."""
    head = tool_call_id[:len("call_") + _NONCE_HEX]
    rest = tool_call_id[len(head):]
    return (head.startswith("call_") and len(head) == len("call_") + _NONCE_HEX
            and all(c in "0123456789abcdef" for c in head[5:])
            and (not rest or rest.startswith(_TS_MARK)))


def decode_tool_call_id(tool_call_id: str) -> tuple[str | None, str | None]:
    """(thoughtSignature, Gemini functionCall id) carried by an id we issued; (None, None)
    for any other id."""
    if (len(tool_call_id) <= _BLOB_AT or not tool_call_id.startswith("call_")
            or tool_call_id[_BLOB_AT - len(_TS_MARK):_BLOB_AT] != _TS_MARK):
        return None, None
    blob = tool_call_id[_BLOB_AT:]
    try:
        carry = orjson.loads(base64.urlsafe_b64decode(blob + "=" * (-len(blob) % 4)))
    except (binascii.Error, ValueError):
        return None, None
    if not isinstance(carry, dict):
        return None, None
    sig, gid = carry.get("s"), carry.get("i")
    return (sig if isinstance(sig, str) else None), (gid if isinstance(gid, str) else None)


# ------------------------------------------------------------------ request ----


def _data_url(url: str) -> tuple[str, str] | None:
    """(mime type, base64 data) of a data: URL, or None when `url` is not one."""
    if not url.startswith("data:"):
        return None
    header, sep, payload = url[5:].partition(",")
    if not sep:
        raise bad_request("malformed data: URL in an image part", "messages")
    meta = header.split(";")
    mime = meta[0] or "text/plain"
    if "base64" in meta[1:]:
        data = payload.replace("\n", "").replace(" ", "")
    else:
        data = base64.b64encode(unquote_to_bytes(payload)).decode()
    return mime, data


def _guess_mime(url: str, options: Options) -> str:
    guessed, _ = mimetypes.guess_type(urlsplit(url).path)
    return guessed or options.file_mime_type or "image/jpeg"


def _media_part(url: str, options: Options) -> dict[str, Any]:
    inline = _data_url(url)
    if inline is not None:
        return {"inlineData": {"mimeType": inline[0], "data": inline[1]}}
    if url.startswith(("http://", "https://", "gs://")):
        return {"fileData": {"mimeType": _guess_mime(url, options), "fileUri": url}}
    raise bad_request("image_url must be an http(s), gs:// or data: URL", "messages")


def _part_to_wire(p: pb.ContentPart, options: Options) -> dict[str, Any] | None:
    kind = p.WhichOneof("part")
    if kind == "text":
        return {"text": p.text}
    if kind == "refusal":
        return {"text": p.refusal}
    if kind == "image_url":
        return _media_part(p.image_url.url, options)
    if kind == "input_audio":
        mime = AUDIO_MIME.get(p.input_audio.format, f"audio/{p.input_audio.format or 'wav'}")
        return {"inlineData": {"mimeType": mime, "data": p.input_audio.data}}
    if kind == "other_json":
        other = orjson.loads(p.other_json)
        f = other.get("file") if isinstance(other, dict) else None
        if isinstance(f, dict) and isinstance(f.get("file_data"), str):
            return _media_part(f["file_data"], options)
        raise bad_request(f"content part type {other.get('type') if isinstance(other, dict) else '?'!r} "
                           "is not supported by Gemini channels", "messages")
    return None


def _content_parts(m: pb.Message, options: Options) -> list[dict[str, Any]]:
    kind = m.WhichOneof("content")
    if kind == "text":
        return [{"text": m.text}] if m.text else []
    if kind == "parts":
        return [w for p in m.parts.parts if (w := _part_to_wire(p, options)) is not None]
    return []


def _function_call_part(tc: pb.ToolCall) -> dict[str, Any]:
    raw = tc.function.arguments.strip()
    try:
        args = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError:
        raise bad_request(f"tool call {tc.id!r} has arguments that are not valid JSON",
                           "messages") from None
    if not isinstance(args, dict):
        raise bad_request(f"tool call {tc.id!r} arguments must be a JSON object", "messages")
    signature, gemini_id = decode_tool_call_id(tc.id)
    call: dict[str, Any] = {"name": tc.function.name, "args": args}
    if gemini_id:
        call["id"] = gemini_id
    part: dict[str, Any] = {"functionCall": call}
    if signature:
        part["thoughtSignature"] = signature
    return part


def _model_parts(m: pb.Message, options: Options, fallback: bool) -> list[dict[str, Any]]:
    parts = _content_parts(m, options)
    calls = [_function_call_part(tc) for tc in m.tool_calls]
    # Gemini checks the first functionCall part of each step. Calls we issued carry their
    # own signatures (exactly where Gemini put them); a step made elsewhere gets the bypass.
    if calls and fallback and not any(issued_by_us(tc.id) for tc in m.tool_calls):
        calls[0]["thoughtSignature"] = SKIP_SIGNATURE
    return parts + calls


def _function_response_part(m: pb.Message, calls: dict[str, str], i: int) -> dict[str, Any]:
    name = calls.get(m.tool_call_id)
    if name is None:
        raise bad_request(f"messages[{i}] answers tool call {m.tool_call_id!r}, which no earlier "
                           "assistant message made (Gemini needs the function name)",
                           f"messages[{i}].tool_call_id")
    text = message_text(m, "")
    try:
        parsed = orjson.loads(text)
    except orjson.JSONDecodeError:
        parsed = None
    response = parsed if isinstance(parsed, dict) else {"result": text}
    fr: dict[str, Any] = {"name": name, "response": response}
    _, gemini_id = decode_tool_call_id(m.tool_call_id)
    if gemini_id:
        fr["id"] = gemini_id
    return {"functionResponse": fr}


def contents_to_wire(messages: Iterable[pb.Message], options: Options
                     ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(contents, systemInstruction parts). Consecutive same-role turns are merged, since
    Gemini wants user and model turns to alternate."""
    fallback = options.thought_signature_fallback
    contents: list[dict[str, Any]] = []
    system: list[dict[str, Any]] = []
    calls: dict[str, str] = {}
    for i, m in enumerate(messages):
        if m.role in (pb.ROLE_SYSTEM, pb.ROLE_DEVELOPER):
            system.extend(p for p in _content_parts(m, options) if "text" in p)
            continue
        if m.role == pb.ROLE_ASSISTANT:
            role = "model"
            parts = _model_parts(m, options, fallback)
            calls.update((tc.id, tc.function.name) for tc in m.tool_calls)
        elif m.role == pb.ROLE_TOOL:
            role, parts = "user", [_function_response_part(m, calls, i)]
        else:
            role, parts = "user", _content_parts(m, options)
        if not parts:
            continue
        if contents and contents[-1]["role"] == role:
            contents[-1]["parts"].extend(parts)
        else:
            contents.append({"role": role, "parts": parts})
    return contents, system


def openapi_schema(schema: Any) -> Any:
    """A JSON Schema reduced to Gemini's OpenAPI-subset Schema (for `parameters` and
    `responseSchema`): unsupported keywords dropped, nullable unions folded."""
    if isinstance(schema, list):
        return [openapi_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for k, v in schema.items():
        if k == "type" and isinstance(v, list):
            kinds = [t for t in v if t != "null"]
            out["type"] = kinds[0] if kinds else "null"
            if len(kinds) < len(v):
                out["nullable"] = True
        elif k == "const":
            out.setdefault("enum", [v])
        elif k == "oneOf":
            out["anyOf"] = openapi_schema(v)
        elif k == "properties" and isinstance(v, dict):
            out[k] = {name: openapi_schema(s) for name, s in v.items()}
        elif k in ("items", "anyOf"):
            out[k] = openapi_schema(v)
        elif k in SCHEMA_KEYS:
            out[k] = v
    return out


def _uses_openapi(options: Options) -> bool:
    return options.schema_field == "parameters"


def tools_to_wire(tools: Any, options: Options) -> list[dict[str, Any]]:
    if not _uses_openapi(options):
        return [{"functionDeclarations": [function_to_wire(t, "parametersJsonSchema")
                                          for t in tools]}]
    decls = [function_to_wire(t) for t in tools]
    for d in decls:
        if "parameters" in d:
            d["parameters"] = openapi_schema(d["parameters"])
    return [{"functionDeclarations": decls}]


def tool_config_to_wire(choice: pb.ToolChoice) -> dict[str, Any] | None:
    kind = choice.WhichOneof("choice")
    if kind == "mode":
        mode = TOOL_MODES.get(choice.mode)
        return {"functionCallingConfig": {"mode": mode}} if mode else None
    if kind == "function_name":
        return {"functionCallingConfig": {"mode": "ANY",
                                          "allowedFunctionNames": [choice.function_name]}}
    return None


def thinking_to_wire(p: pb.ChatCompletionParams, model: str,
                     options: Options) -> dict[str, Any] | None:
    cfg: dict[str, Any] = {}
    include = options.include_thoughts
    if include is None:
        include = p.HasField("reasoning_effort") or not _NO_THINKING.search(model)
    if include:
        cfg["includeThoughts"] = True
    if p.HasField("reasoning_effort"):
        effort = p.reasoning_effort.lower()
        style = options.thinking or ("budget" if model.startswith("gemini-2") else "level")
        if style == "budget":
            if effort not in THINKING_BUDGETS:
                raise bad_request(f"unknown reasoning_effort {p.reasoning_effort!r}",
                                   "reasoning_effort")
            cfg["thinkingBudget"] = THINKING_BUDGETS[effort]
        else:
            if effort not in THINKING_LEVELS:
                raise bad_request(f"unknown reasoning_effort {p.reasoning_effort!r}",
                                   "reasoning_effort")
            cfg["thinkingLevel"] = THINKING_LEVELS[effort]
    return cfg or None


def generation_config(p: pb.ChatCompletionParams, model: str,
                      options: Options) -> dict[str, Any]:
    g: dict[str, Any] = {}
    if p.HasField("temperature"):
        g["temperature"] = p.temperature
    if p.HasField("top_p"):
        g["topP"] = p.top_p
    if p.HasField("max_completion_tokens"):
        g["maxOutputTokens"] = p.max_completion_tokens
    elif p.HasField("max_tokens"):
        g["maxOutputTokens"] = p.max_tokens
    if p.stop:
        g["stopSequences"] = list(p.stop)
    if p.HasField("n"):
        g["candidateCount"] = p.n
    if p.HasField("seed"):
        g["seed"] = p.seed
    if p.HasField("presence_penalty"):
        g["presencePenalty"] = p.presence_penalty
    if p.HasField("frequency_penalty"):
        g["frequencyPenalty"] = p.frequency_penalty
    if "top_k" in p.extra:
        g["topK"] = orjson.loads(p.extra["top_k"])
    fmt = p.response_format.WhichOneof("format")
    if fmt == "json_object":
        g["responseMimeType"] = "application/json"
    elif fmt == "json_schema":
        g["responseMimeType"] = "application/json"
        js = p.response_format.json_schema
        if js.schema_json:
            schema = orjson.loads(js.schema_json)
            if _uses_openapi(options):
                g["responseSchema"] = openapi_schema(schema)
            else:
                g["responseJsonSchema"] = schema
    thinking = thinking_to_wire(p, model, options)
    if thinking:
        g["thinkingConfig"] = thinking
    return g


def params_to_wire(params: pb.ChatCompletionParams, model: str,
                   options: Options) -> dict[str, Any]:
    """Our request → a generateContent body (the model goes in the URL, not the body)."""
    contents, system = contents_to_wire(list(params.messages), options)
    if not contents:
        raise bad_request("Gemini needs at least one user or assistant message", "messages")
    d: dict[str, Any] = {"contents": contents}
    if system:
        d["systemInstruction"] = {"parts": system}
    if params.tools:
        d["tools"] = tools_to_wire(params.tools, options)
    tool_config = tool_config_to_wire(params.tool_choice)
    if tool_config and params.tools:
        d["toolConfig"] = tool_config
    gen = generation_config(params, model, options)
    if gen:
        d["generationConfig"] = gen
    for name in _EXTRA_TOP:
        if name in params.extra:
            d[name] = orjson.loads(params.extra[name])
    return d


# ------------------------------------------------------------------ replies ----


def usage_from_wire(u: Any, out: pb.Usage) -> None:
    if not isinstance(u, dict):
        return
    thoughts = int(u.get("thoughtsTokenCount") or 0)
    out.prompt_tokens = int(u.get("promptTokenCount") or 0) + int(u.get("toolUsePromptTokenCount") or 0)
    out.completion_tokens = int(u.get("candidatesTokenCount") or 0) + thoughts
    out.total_tokens = int(u.get("totalTokenCount") or (out.prompt_tokens + out.completion_tokens))
    out.prompt_tokens_details.cached_tokens = int(u.get("cachedContentTokenCount") or 0)
    out.completion_tokens_details.reasoning_tokens = thoughts


def _finish(reason: str | None, called: bool) -> pb.FinishReason.ValueType:
    if not reason:
        return pb.FINISH_REASON_UNSPECIFIED
    if called and reason == "STOP":
        return pb.FINISH_REASON_TOOL_CALLS
    return FINISH_FROM_WIRE.get(reason, pb.FINISH_REASON_STOP)


@dataclass
class _Parts:
    """What one candidate's parts add up to."""

    text: list[str] = field(default_factory=list)
    thoughts: list[str] = field(default_factory=list)
    calls: list[pb.ToolCall] = field(default_factory=list)


def _read_parts(content: Any) -> _Parts:
    out = _Parts()
    parts = content.get("parts") if isinstance(content, dict) else None
    for part in parts or ():
        if not isinstance(part, dict):
            continue
        fc = part.get("functionCall")
        if isinstance(fc, dict):
            args = fc.get("args")
            out.calls.append(pb.ToolCall(
                id=encode_tool_call_id(part.get("thoughtSignature"), fc.get("id")),
                type="function",
                function=pb.FunctionCall(name=fc.get("name") or "",
                                         arguments=orjson.dumps(args if args is not None else {})
                                         .decode())))
        elif isinstance(part.get("text"), str):
            (out.thoughts if part.get("thought") else out.text).append(part["text"])
    return out


def _blocked(d: dict[str, Any]) -> bool:
    fb = d.get("promptFeedback")
    return not d.get("candidates") and isinstance(fb, dict) and bool(fb.get("blockReason"))


def response_from_wire(data: Any, model: str = "") -> pb.CreateChatCompletionResponse:
    """A GenerateContentResponse → our reply (UpstreamError if malformed)."""
    try:
        r = pb.CreateChatCompletionResponse(
            id=f"chatcmpl-{data.get('responseId') or secrets.token_hex(12)}",
            created=int(time.time()), model=data.get("modelVersion") or model)
        if _blocked(data):
            r.choices.add(index=0, message=pb.AssistantMessage(content=""),
                          finish_reason=pb.FINISH_REASON_CONTENT_FILTER)
        for pos, cand in enumerate(data.get("candidates") or ()):
            got = _read_parts(cand.get("content"))
            ch = r.choices.add(index=int(cand.get("index") or pos),
                               finish_reason=_finish(cand.get("finishReason") or "STOP",
                                                     bool(got.calls)))
            m = ch.message
            if got.text or not got.calls:
                m.content = "".join(got.text)
            if got.thoughts:
                m.reasoning_content = "".join(got.thoughts)
            m.tool_calls.extend(got.calls)
        if not r.choices:
            raise KeyError("candidates")
        usage_from_wire(data.get("usageMetadata"), r.usage)
        return r
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UpstreamError(f"malformed generateContent reply from upstream ({type(exc).__name__})",
                            retryable=True, kind="malformed") from None


def stream_error(data: Any) -> UpstreamError | None:
    """The error object Gemini may put in a stream event, as an UpstreamError."""
    err = data.get("error") if isinstance(data, dict) else None
    if not err:
        return None
    if isinstance(err, dict):
        msg = f"{err.get('status') or err.get('code') or 'error'}: {err.get('message') or ''}"
    else:
        msg = str(err)
    return UpstreamError(f"upstream stream error: {msg}", retryable=True, kind="stream")


@dataclass
class _ChoiceState:
    started: bool = False
    calls: int = 0
    finished: bool = False


class StreamTranslator:
    """Turns `:streamGenerateContent?alt=sse` events into our stream chunks.

    Function calls arrive whole, so each becomes one tool-call delta with id, name and
    full arguments; `index` counts tool calls per choice. Usage is held (each event
    repeats the running figures) and sent once: on the chunk that finishes the last of the
    `candidates` expected choices, else by `close()`.
    """

    # Gemini has no terminal frame (usage may follow the finish): read to the end.
    done = False

    def __init__(self, model: str = "", candidates: int = 1) -> None:
        self.id = f"chatcmpl-{secrets.token_hex(12)}"
        self.created = int(time.time())
        self.model = model
        self.expected = max(1, candidates)
        self.choices: dict[int, _ChoiceState] = {}
        self.usage: pb.Usage | None = None
        self.usage_sent = False
        self._seen = False

    @property
    def finished_any(self) -> bool:
        return any(c.finished for c in self.choices.values())

    def _chunk(self) -> pb.StreamChatCompletionResponse:
        return pb.StreamChatCompletionResponse(id=self.id, created=self.created, model=self.model)

    def _candidate(self, pos: int, cand: dict[str, Any]) -> pb.StreamChatCompletionResponse | None:
        index = int(cand.get("index") or pos)
        st = self.choices.setdefault(index, _ChoiceState())
        got = _read_parts(cand.get("content"))
        text, thoughts = "".join(got.text), "".join(got.thoughts)
        reason = cand.get("finishReason")
        if not (text or thoughts or got.calls or reason):
            return None
        chunk = self._chunk()
        ch = chunk.choices.add(index=index)
        if not st.started:
            ch.delta.role = pb.ROLE_ASSISTANT
            st.started = True
        if text:
            ch.delta.content = text
        if thoughts:
            ch.delta.reasoning_content = thoughts
        for tc in got.calls:
            ch.delta.tool_calls.add(index=st.calls, id=tc.id, type="function",
                                    function=pb.FunctionCallDelta(name=tc.function.name,
                                                                  arguments=tc.function.arguments))
            st.calls += 1
        if reason:
            ch.finish_reason = _finish(reason, st.calls > 0)
            st.finished = True
        return chunk

    def frame(self, event: str, data: bytes) -> list[pb.StreamChatCompletionResponse]:
        return self.feed(loads_event(data))

    def end(self) -> list[pb.StreamChatCompletionResponse]:
        """A stream in which no candidate finished was cut; else the usage still owed."""
        if not self.finished_any:
            raise UpstreamError("upstream stream ended before it finished", retryable=True,
                                kind="stream")
        return self.close()

    def feed(self, data: Any) -> list[pb.StreamChatCompletionResponse]:
        """One event → zero or more chunks (UpstreamError for an in-stream error)."""
        err = stream_error(data)
        if err is not None:
            raise err
        if not isinstance(data, dict):
            raise UpstreamError("malformed stream event from upstream", retryable=True,
                                kind="malformed")
        if not self._seen:  # like a whole reply: Gemini's response id and model version
            self._seen = True
            if data.get("responseId"):
                self.id = f"chatcmpl-{data['responseId']}"
            self.model = data.get("modelVersion") or self.model
        out: list[pb.StreamChatCompletionResponse] = []
        try:
            if _blocked(data):
                chunk = self._chunk()
                chunk.choices.add(index=0, finish_reason=pb.FINISH_REASON_CONTENT_FILTER,
                                  delta=pb.Delta(role=pb.ROLE_ASSISTANT, content=""))
                self.choices.setdefault(0, _ChoiceState(started=True)).finished = True
                self.expected = 1
                out.append(chunk)
            for pos, cand in enumerate(data.get("candidates") or ()):
                chunk_or_none = self._candidate(pos, cand)
                if chunk_or_none is not None:
                    out.append(chunk_or_none)
            if isinstance(data.get("usageMetadata"), dict):
                self.usage = pb.Usage()
                usage_from_wire(data["usageMetadata"], self.usage)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise UpstreamError(f"malformed stream event from upstream ({type(exc).__name__})",
                                retryable=True, kind="malformed") from None
        done = sum(c.finished for c in self.choices.values()) >= self.expected
        if out and done and self.usage is not None and not self.usage_sent:
            out[-1].usage.CopyFrom(self.usage)
            self.usage_sent = True
        return out

    def close(self) -> list[pb.StreamChatCompletionResponse]:
        """At the end of the stream: a usage-only chunk if usage is still unsent."""
        if self.usage is None or self.usage_sent:
            return []
        chunk = self._chunk()
        chunk.usage.CopyFrom(self.usage)
        self.usage_sent = True
        return [chunk]


# ------------------------------------------------------------------- errors ----


# google.rpc status names of an error reply that mean the channel, not the request, is
# at fault: its key is not accepted, or its project cannot use the API (region, billing).
_CHANNEL_STATUSES = frozenset({"UNAUTHENTICATED", "PERMISSION_DENIED", "FAILED_PRECONDITION"})
# ErrorInfo reasons (domain googleapis.com) that say the same of a 400 INVALID_ARGUMENT.
_CHANNEL_REASONS = frozenset({
    "API_KEY_INVALID", "API_KEY_EXPIRED", "API_KEY_SERVICE_BLOCKED", "API_KEY_IP_ADDRESS_BLOCKED",
    "API_KEY_HTTP_REFERRER_BLOCKED", "SERVICE_DISABLED", "BILLING_DISABLED", "CONSUMER_INVALID",
    "CONSUMER_SUSPENDED", "ACCESS_TOKEN_EXPIRED"})
_DETAILS: dict[str, type[Message]] = {
    "google.rpc.ErrorInfo": error_details_pb2.ErrorInfo,
    "google.rpc.RetryInfo": error_details_pb2.RetryInfo,
}


@dataclass(frozen=True)
class GoogleError:
    """What a Google error body says beyond its text: the google.rpc status name (e.g.
    RESOURCE_EXHAUSTED), the ErrorInfo reasons and the RetryInfo delay in seconds."""

    status: str
    reasons: frozenset[str]
    retry_delay: float | None


def google_error(body: bytes) -> GoogleError | None:
    """Read `{"error": {"code", "message", "status", "details": [...]}}` (a list of one
    on the streaming endpoint); None when the body is not that. Details are parsed with
    protobuf's JSON mapping into the google.rpc messages; kinds we do not use, and
    malformed ones, are skipped."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if isinstance(data, list) and data:
        data = data[0]
    err = data.get("error") if isinstance(data, dict) else None
    if not isinstance(err, dict):
        return None
    status = err.get("status")
    reasons: set[str] = set()
    delay = None
    for detail in err.get("details") or ():
        if not isinstance(detail, dict):
            continue
        kind = _DETAILS.get(str(detail.get("@type", "")).rpartition("/")[2])
        if kind is None:
            continue
        msg = kind()
        try:
            json_format.ParseDict({k: v for k, v in detail.items() if k != "@type"}, msg,
                                  ignore_unknown_fields=True)
        except json_format.ParseError:
            continue
        if isinstance(msg, error_details_pb2.ErrorInfo) and msg.reason:
            reasons.add(msg.reason)
        elif isinstance(msg, error_details_pb2.RetryInfo) and msg.HasField("retry_delay"):
            delay = msg.retry_delay.ToTimedelta().total_seconds()
    return GoogleError(status if isinstance(status, str) else "", frozenset(reasons), delay)


# ------------------------------------------------------------------- client ----


class GeminiClient(ProviderClient):
    """Channel options: schema_field, thought_signature_fallback, include_thoughts,
    thinking, file_mime_type (see the module docstring)."""

    def _headers(self) -> dict[str, str]:
        h = {"content-type": "application/json"}
        if self.channel.api_key:
            h["x-goog-api-key"] = self.channel.api_key
        return h

    def http_error(self, status: int, reason: str, retry_after: str | None,
                   body: bytes) -> UpstreamError:
        err = super().http_error(status, reason, retry_after, body)
        google = google_error(body)
        if google is None:
            return err
        if google.status in _CHANNEL_STATUSES or not _CHANNEL_REASONS.isdisjoint(google.reasons):
            # The channel's key, project or region is the problem, not the request (e.g.
            # 400 INVALID_ARGUMENT with reason API_KEY_INVALID, 400 FAILED_PRECONDITION
            # "enable billing"): another channel may serve it.
            err.retryable = True
        if err.retry_after is None and google.retry_delay is not None:
            err.retry_after = google.retry_delay  # Gemini's 429s say when in RetryInfo
        return err

    def _url(self, model: str, method: str) -> str:
        return f"{self.channel.base_url}/{API_VERSION}/models/{model}:{method}"

    def request(self, params: pb.ChatCompletionParams, model: str, *,
                stream: bool) -> UpstreamRequest:
        body = params_to_wire(params, model, Options.of(self.channel))
        url = (self._url(model, "streamGenerateContent") + "?alt=sse" if stream
               else self._url(model, "generateContent"))
        return UpstreamRequest(url, self._headers(), body)

    def reply(self, data: Any, params: pb.ChatCompletionParams,
              model: str) -> pb.CreateChatCompletionResponse:
        return response_from_wire(data, model)

    def translator(self, params: pb.ChatCompletionParams, model: str) -> StreamTranslator:
        return StreamTranslator(model, params.n if params.HasField("n") else 1)


SPEC = ProviderSpec(name="gemini", default_base_url="https://generativelanguage.googleapis.com",
                    options=Options, client=GeminiClient)
