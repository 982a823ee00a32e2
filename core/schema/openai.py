"""OpenAI's wire schema (Chat Completions, Images, Models) ⇄ Switchboard messages, both
directions, by hand (no json_format on the hot path).

One owner for both users of the format:

- client request JSON → proto (REST façade): `parse_chat`, `parse_image`;
- proto → upstream request JSON (OpenAI provider): `params_to_json`, `image_request_to_json`;
- upstream reply/chunk JSON → proto (OpenAI provider): `reply_from_json`, `chunk_from_json`,
  `image_reply_from_json`;
- proto → client reply/chunk JSON (REST façade): `reply_to_json`, `chunk_to_json`,
  `usage_chunk_to_json`, `image_reply_to_json`, `models_to_json`.

The tables (roles, finish reasons) and the usage and tool-call codecs are shared by both.

Two policies, on purpose:
- What a **caller** sends is checked strictly: each type error is a 400 naming the
  `param` (e.g. `messages[2].content`); every JSON value that lands in a proto scalar
  goes through `check.set_scalar` (type and range from the descriptor). Semantic checks
  (ranges of meaning, required combinations) live in the core so both surfaces share them.
- What an **upstream** sends is read leniently (a missing field is empty); a reply too
  broken to read raises one of `MALFORMED`, which the provider turns into its retryable
  error.

Normalisations (the round trip JSON → proto → JSON gives the input back except these;
tests/test_schema_openai.py holds them):
- request: `stop: "x"` → `["x"]`; an `image_url` string → `{"url": …}`; tool-call
  `arguments` sent as an object → its JSON text; a missing tool/tool-call `type` →
  `"function"`; `tool_choice: {"function": {"name": n}}` → `{"type": "function",
  "function": {"name": n}}`; a missing message `content` → `null`; a float `logit_bias`
  value → int; `model` is the upstream name; `stream_options` upstream is decided by the
  provider (usage is always asked for unless the channel says not to), the caller's
  `include_usage` only decides what the façade relays.
- replies: upstream `reasoning` (vLLM, OpenRouter) → `reasoning_content`; message
  `content`/`refusal` and choice `logprobs` are always present (null when absent); an
  empty `system_fingerprint`/`service_tier` is left out; a chunk delta's role is
  `assistant` or absent; `service_tier` is relayed on the reply and the usage chunk,
  not on every content chunk (a per-token cost for a value fixed for the stream).
Fields the contract does not model go into `extra` maps as JSON text and are relayed
untouched.
"""

from __future__ import annotations

from typing import Any, Final

import orjson

from switchboard.core.bounds import check_scalar
from switchboard.core.errors import GatewayError, invalid
from switchboard.core.schema.check import json_text, set_scalar, tname, want, want_str
from switchboard.v1 import inference_pb2 as pb

# ----------------------------------------------------------------- tables ----

ROLE_TO_JSON: dict[int, str] = {
    pb.ROLE_SYSTEM: "system", pb.ROLE_DEVELOPER: "developer", pb.ROLE_USER: "user",
    pb.ROLE_ASSISTANT: "assistant", pb.ROLE_TOOL: "tool",
}
ROLE_FROM_JSON: dict[str, pb.Role.ValueType] = {v: pb.Role.Value(f"ROLE_{v.upper()}")
                                                for v in ROLE_TO_JSON.values()}
FINISH_TO_JSON: dict[int, str | None] = {
    pb.FINISH_REASON_UNSPECIFIED: None, pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_TOOL_CALLS: "tool_calls",
    pb.FINISH_REASON_CONTENT_FILTER: "content_filter",
    pb.FINISH_REASON_FUNCTION_CALL: "function_call",
}
FINISH_FROM_JSON: dict[str, pb.FinishReason.ValueType] = {
    v: pb.FinishReason.Value(f"FINISH_REASON_{v.upper()}")
    for v in FINISH_TO_JSON.values() if v is not None}

# What an upstream reply that cannot be read raises (the provider maps them to its error).
MALFORMED = (KeyError, TypeError, ValueError, AttributeError)

# The optional scalars of a chat request, copied 1:1 between JSON and params.
_PARAM_SCALARS: Final = ("temperature", "top_p", "n", "max_tokens", "max_completion_tokens",
                  "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs", "seed",
                  "user", "parallel_tool_calls", "reasoning_effort")
_HANDLED = {"model", "messages", "stream", "stop", "logit_bias", "metadata", "tools",
            "tool_choice", "response_format", "stream_options", *_PARAM_SCALARS}
_MSG_HANDLED = {"role", "content", "name", "tool_calls", "tool_call_id", "refusal",
                "reasoning_content"}
_MSG_OPTIONAL = ("name", "tool_call_id", "refusal", "reasoning_content")
_REPLY_MSG_KNOWN = {"role", "content", "refusal", "tool_calls", "reasoning_content", "reasoning"}
_IMAGE_SCALARS: Final = ("n", "size", "quality", "style", "response_format", "user")
_IMAGE_HANDLED = {"prompt", "model", *_IMAGE_SCALARS}

_LOGIT_BIAS_VALUE: Any = pb.ChatCompletionParams.DESCRIPTOR.fields_by_name[
    "logit_bias"].message_type.fields_by_name["value"]  # type: ignore[union-attr]


def _rejected(exc: Exception) -> GatewayError:
    # A safety net: every field is checked, so reaching this means protobuf refused a
    # value a check missed. It is still the caller's input, so a 400, not a 500.
    return invalid(f"A value in the request is not valid for its field: {exc}.", None)


# ------------------------------------------------- requests: JSON → params ----


def _part(v: Any, param: str) -> pb.ContentPart:
    want(v, dict, param, "an object")
    kind = v.get("type")
    if kind == "text":
        return pb.ContentPart(text=want_str(v.get("text"), f"{param}.text"))
    if kind == "image_url":
        img = v.get("image_url")
        if isinstance(img, str):
            return pb.ContentPart(image_url=pb.ImageUrl(url=img))
        want(img, dict, f"{param}.image_url", "an object")
        detail = img.get("detail")
        return pb.ContentPart(image_url=pb.ImageUrl(
            url=want_str(img.get("url"), f"{param}.image_url.url"),
            detail=want_str(detail, f"{param}.image_url.detail") if detail is not None else ""))
    if kind == "input_audio":
        audio = want(v.get("input_audio"), dict, f"{param}.input_audio", "an object")
        return pb.ContentPart(input_audio=pb.InputAudio(
            data=want_str(audio.get("data"), f"{param}.input_audio.data"),
            format=want_str(audio.get("format"), f"{param}.input_audio.format")))
    if kind == "refusal":
        return pb.ContentPart(refusal=want_str(v.get("refusal"), f"{param}.refusal"))
    if not isinstance(kind, str):
        raise invalid(f"Missing or invalid '{param}.type'.", f"{param}.type")
    return pb.ContentPart(other_json=json_text(v))


def _tool_calls(v: Any, param: str, out: Any) -> None:
    for j, tc in enumerate(want(v, list, param, "an array")):
        p = f"{param}[{j}]"
        want(tc, dict, p, "an object")
        fn = want(tc.get("function"), dict, f"{p}.function", "an object")
        args = fn.get("arguments", "")
        if not isinstance(args, str):  # lenient: some clients send the object itself
            args = json_text(args)
        call = out.add(id=want_str(tc.get("id", ""), f"{p}.id"),
                       function=pb.FunctionCall(name=want_str(fn.get("name"), f"{p}.function.name"),
                                                arguments=args))
        set_scalar(call, "type", tc.get("type", "function") or "function", f"{p}.type")


def _message(v: Any, param: str) -> pb.Message:
    want(v, dict, param, "an object")
    role = v.get("role")
    if not isinstance(role, str) or role not in ROLE_FROM_JSON:  # a list/dict is unhashable
        raise invalid(f"Invalid value for '{param}.role': expected one of system, developer, "
                      f"user, assistant, tool, got {role!r}.", f"{param}.role")
    m = pb.Message(role=ROLE_FROM_JSON[role])
    content = v.get("content")
    if isinstance(content, str):
        m.text = content
    elif isinstance(content, list):
        m.parts.SetInParent()
        m.parts.parts.extend(_part(p, f"{param}.content[{i}]") for i, p in enumerate(content))
    elif content is not None:
        raise invalid(f"Invalid type for '{param}.content': expected a string or an array of "
                      f"content parts, but got {tname(content)}.", f"{param}.content")
    for name in _MSG_OPTIONAL:
        if v.get(name) is not None:
            setattr(m, name, want_str(v[name], f"{param}.{name}"))
    if v.get("tool_calls") is not None:
        _tool_calls(v["tool_calls"], f"{param}.tool_calls", m.tool_calls)
    for k, val in v.items():
        if k not in _MSG_HANDLED:
            m.extra[k] = json_text(val)
    return m


def _tool(v: Any, param: str) -> pb.Tool:
    want(v, dict, param, "an object")
    fn = want(v.get("function"), dict, f"{param}.function", "an object")
    f = pb.FunctionDefinition(name=want_str(fn.get("name"), f"{param}.function.name"))
    if fn.get("description") is not None:
        f.description = want_str(fn["description"], f"{param}.function.description")
    if fn.get("parameters") is not None:
        f.parameters_json = json_text(want(fn["parameters"], dict, f"{param}.function.parameters",
                                           "an object"))
    if fn.get("strict") is not None:
        f.strict = want(fn["strict"], bool, f"{param}.function.strict", "a boolean")
    tool = pb.Tool(function=f)
    set_scalar(tool, "type", v.get("type", "function") or "function", f"{param}.type")
    return tool


def _tool_choice(v: Any, out: pb.ToolChoice) -> None:
    if isinstance(v, str):
        if v not in ("none", "auto", "required"):
            raise invalid(f"Invalid value for 'tool_choice': {v!r}.", "tool_choice")
        out.mode = v
        return
    want(v, dict, "tool_choice", "a string or an object")
    fn = want(v.get("function"), dict, "tool_choice.function", "an object")
    out.function_name = want_str(fn.get("name"), "tool_choice.function.name")


def _response_format(v: Any, out: pb.ResponseFormat) -> None:
    want(v, dict, "response_format", "an object")
    kind = v.get("type")
    if kind == "text":
        out.text.SetInParent()
    elif kind == "json_object":
        out.json_object.SetInParent()
    elif kind == "json_schema":
        js = want(v.get("json_schema"), dict, "response_format.json_schema", "an object")
        s = out.json_schema
        s.name = want_str(js.get("name"), "response_format.json_schema.name")
        if js.get("description") is not None:
            s.description = want_str(js["description"], "response_format.json_schema.description")
        if js.get("schema") is not None:
            s.schema_json = json_text(want(js["schema"], dict, "response_format.json_schema.schema",
                                           "an object"))
        if js.get("strict") is not None:
            s.strict = want(js["strict"], bool, "response_format.json_schema.strict", "a boolean")
    else:
        raise invalid(f"Invalid value for 'response_format.type': {kind!r} (expected text, "
                      "json_object or json_schema).", "response_format.type")


def parse_chat(body: Any) -> tuple[pb.ChatCompletionParams, bool]:
    """A caller's chat request body → (params, stream?); a 400 GatewayError if bad."""
    try:
        return _parse_chat(body)
    except (TypeError, ValueError) as exc:
        raise _rejected(exc) from None


def _parse_chat(body: Any) -> tuple[pb.ChatCompletionParams, bool]:
    want(body, dict, "body", "a JSON object")
    p = pb.ChatCompletionParams()
    if "model" in body:
        p.model = want_str(body["model"], "model")
    msgs = body.get("messages")
    if msgs is None:
        raise invalid("Missing required parameter: 'messages'.", "messages")
    p.messages.extend(_message(m, f"messages[{i}]")
                      for i, m in enumerate(want(msgs, list, "messages", "an array")))
    for name in _PARAM_SCALARS:
        v = body.get(name)
        if v is not None:
            set_scalar(p, name, v, name)
    stop = body.get("stop")
    if isinstance(stop, str):
        p.stop.append(stop)
    elif stop is not None:
        p.stop.extend(want_str(s, f"stop[{i}]") for i, s in enumerate(want(stop, list, "stop",
                                                                           "a string or an array")))
    if body.get("logit_bias") is not None:
        for k, v in want(body["logit_bias"], dict, "logit_bias", "an object").items():
            # a number, stored as int32: range-check it before the truncation
            want(v, (int, float), f"logit_bias.{k}", "a number")
            check_scalar(_LOGIT_BIAS_VALUE, v, f"logit_bias.{k}")
            p.logit_bias[str(k)] = int(v)
    if body.get("metadata") is not None:
        for k, v in want(body["metadata"], dict, "metadata", "an object").items():
            p.metadata[str(k)] = want_str(v, f"metadata.{k}")
    if body.get("tools") is not None:
        p.tools.extend(_tool(t, f"tools[{i}]")
                       for i, t in enumerate(want(body["tools"], list, "tools", "an array")))
    if body.get("tool_choice") is not None:
        _tool_choice(body["tool_choice"], p.tool_choice)
    if body.get("response_format") is not None:
        _response_format(body["response_format"], p.response_format)
    stream = body.get("stream")
    if stream is not None:
        want(stream, bool, "stream", "a boolean")
    if body.get("stream_options") is not None:
        so = want(body["stream_options"], dict, "stream_options", "an object")
        if so.get("include_usage") is not None:
            p.stream_options.include_usage = want(so["include_usage"], bool,
                                                  "stream_options.include_usage", "a boolean")
    for k, v in body.items():
        if k not in _HANDLED:
            p.extra[k] = json_text(v)
    return p, bool(stream)


# ------------------------------------------------- requests: params → JSON ----


def _tool_calls_to_json(tcs: Any) -> list[dict[str, Any]]:
    return [{"id": t.id, "type": t.type or "function",
             "function": {"name": t.function.name, "arguments": t.function.arguments}}
            for t in tcs]


def part_to_json(p: pb.ContentPart) -> Any:
    kind = p.WhichOneof("part")
    if kind == "text":
        return {"type": "text", "text": p.text}
    if kind == "image_url":
        img: dict[str, str] = {"url": p.image_url.url}
        if p.image_url.detail:
            img["detail"] = p.image_url.detail
        return {"type": "image_url", "image_url": img}
    if kind == "input_audio":
        return {"type": "input_audio",
                "input_audio": {"data": p.input_audio.data, "format": p.input_audio.format}}
    if kind == "refusal":
        return {"type": "refusal", "refusal": p.refusal}
    return orjson.loads(p.other_json) if p.other_json else {}


def message_to_json(m: pb.Message) -> dict[str, Any]:
    d: dict[str, Any] = {"role": ROLE_TO_JSON.get(m.role, "user")}
    kind = m.WhichOneof("content")
    if kind == "text":
        d["content"] = m.text
    elif kind == "parts":
        d["content"] = [part_to_json(p) for p in m.parts.parts]
    else:
        d["content"] = None
    if m.HasField("name"):
        d["name"] = m.name
    if m.tool_calls:
        d["tool_calls"] = _tool_calls_to_json(m.tool_calls)
    if m.HasField("tool_call_id"):
        d["tool_call_id"] = m.tool_call_id
    if m.HasField("refusal"):
        d["refusal"] = m.refusal
    if m.HasField("reasoning_content"):
        d["reasoning_content"] = m.reasoning_content
    for k, v in m.extra.items():
        d[k] = orjson.loads(v)
    return d


def tool_to_json(t: pb.Tool) -> dict[str, Any]:
    f = t.function
    fn: dict[str, Any] = {"name": f.name}
    if f.HasField("description"):
        fn["description"] = f.description
    if f.parameters_json:
        fn["parameters"] = orjson.loads(f.parameters_json)
    if f.HasField("strict"):
        fn["strict"] = f.strict
    return {"type": t.type or "function", "function": fn}


def params_to_json(p: pb.ChatCompletionParams, model: str, *, stream: bool,
                   stream_usage: bool = True) -> dict[str, Any]:
    """Params → a chat completion request body for `model` (the upstream name)."""
    d: dict[str, Any] = {"model": model, "messages": [message_to_json(m) for m in p.messages]}
    for name in _PARAM_SCALARS:
        if p.HasField(name):
            d[name] = getattr(p, name)
    if p.stop:
        d["stop"] = list(p.stop)
    if p.logit_bias:
        d["logit_bias"] = dict(p.logit_bias)
    if p.metadata:
        d["metadata"] = dict(p.metadata)
    if p.tools:
        d["tools"] = [tool_to_json(t) for t in p.tools]
    choice = p.tool_choice.WhichOneof("choice")
    if choice == "mode":
        d["tool_choice"] = p.tool_choice.mode
    elif choice == "function_name":
        d["tool_choice"] = {"type": "function", "function": {"name": p.tool_choice.function_name}}
    fmt = p.response_format.WhichOneof("format")
    if fmt == "text":
        d["response_format"] = {"type": "text"}
    elif fmt == "json_object":
        d["response_format"] = {"type": "json_object"}
    elif fmt == "json_schema":
        js = p.response_format.json_schema
        schema: dict[str, Any] = {"name": js.name}
        if js.HasField("description"):
            schema["description"] = js.description
        if js.schema_json:
            schema["schema"] = orjson.loads(js.schema_json)
        if js.HasField("strict"):
            schema["strict"] = js.strict
        d["response_format"] = {"type": "json_schema", "json_schema": schema}
    for k, v in p.extra.items():
        d[k] = orjson.loads(v)
    if stream:
        d["stream"] = True
        if stream_usage:
            d["stream_options"] = {"include_usage": True}
    else:
        d.pop("stream", None)
        d.pop("stream_options", None)
    return d


# ------------------------------------------------------------------ usage ----


def usage_from_json(u: Any, out: pb.Usage) -> None:
    """An upstream `usage` object into `out` (ignored unless an object)."""
    if not isinstance(u, dict):
        return
    out.prompt_tokens = int(u.get("prompt_tokens") or 0)
    out.completion_tokens = int(u.get("completion_tokens") or 0)
    out.total_tokens = int(u.get("total_tokens") or (out.prompt_tokens + out.completion_tokens))
    ptd = u.get("prompt_tokens_details")
    if isinstance(ptd, dict):
        out.prompt_tokens_details.cached_tokens = int(ptd.get("cached_tokens") or 0)
        out.prompt_tokens_details.audio_tokens = int(ptd.get("audio_tokens") or 0)
    ctd = u.get("completion_tokens_details")
    if isinstance(ctd, dict):
        c = out.completion_tokens_details
        c.reasoning_tokens = int(ctd.get("reasoning_tokens") or 0)
        c.audio_tokens = int(ctd.get("audio_tokens") or 0)
        c.accepted_prediction_tokens = int(ctd.get("accepted_prediction_tokens") or 0)
        c.rejected_prediction_tokens = int(ctd.get("rejected_prediction_tokens") or 0)


def usage_to_json(u: pb.Usage) -> dict[str, Any]:
    d: dict[str, Any] = {"prompt_tokens": u.prompt_tokens,
                         "completion_tokens": u.completion_tokens,
                         "total_tokens": u.total_tokens}
    if u.HasField("prompt_tokens_details"):
        ptd = u.prompt_tokens_details
        d["prompt_tokens_details"] = {"cached_tokens": ptd.cached_tokens,
                                      "audio_tokens": ptd.audio_tokens}
    if u.HasField("completion_tokens_details"):
        c = u.completion_tokens_details
        d["completion_tokens_details"] = {
            "reasoning_tokens": c.reasoning_tokens, "audio_tokens": c.audio_tokens,
            "accepted_prediction_tokens": c.accepted_prediction_tokens,
            "rejected_prediction_tokens": c.rejected_prediction_tokens}
    return d


# ---------------------------------------------------------------- replies ----


def reply_from_json(d: Any) -> pb.CreateChatCompletionResponse:
    """An upstream chat.completion object → the reply (one of MALFORMED if unreadable)."""
    r = pb.CreateChatCompletionResponse(
        id=d.get("id") or "", created=int(d.get("created") or 0), model=d.get("model") or "",
        system_fingerprint=d.get("system_fingerprint") or "",
        service_tier=d.get("service_tier") or "")
    for c in d["choices"]:
        ch = r.choices.add(index=int(c.get("index") or 0),
                           finish_reason=FINISH_FROM_JSON.get(c.get("finish_reason") or "", 0))
        msg = c.get("message") or {}
        m = ch.message
        if msg.get("content") is not None:
            m.content = msg["content"]
        if msg.get("refusal") is not None:
            m.refusal = msg["refusal"]
        reasoning = msg.get("reasoning_content") or msg.get("reasoning")
        if isinstance(reasoning, str):
            m.reasoning_content = reasoning
        for tc in msg.get("tool_calls") or ():
            fn = tc.get("function") or {}
            m.tool_calls.add(id=tc.get("id") or "", type=tc.get("type") or "function",
                             function=pb.FunctionCall(name=fn.get("name") or "",
                                                      arguments=fn.get("arguments") or ""))
        for k, v in msg.items():
            if k not in _REPLY_MSG_KNOWN and v is not None:
                m.extra[k] = json_text(v)
        if c.get("logprobs") is not None:
            ch.logprobs_json = json_text(c["logprobs"])
    usage_from_json(d.get("usage"), r.usage)
    return r


def reply_to_json(r: pb.CreateChatCompletionResponse) -> dict[str, Any]:
    """The reply → a chat.completion object for the caller."""
    choices = []
    for c in r.choices:
        m = c.message
        msg: dict[str, Any] = {
            "role": "assistant",
            "content": m.content if m.HasField("content") else None,
            "refusal": m.refusal if m.HasField("refusal") else None,
        }
        if m.tool_calls:
            msg["tool_calls"] = _tool_calls_to_json(m.tool_calls)
        if m.HasField("reasoning_content"):
            msg["reasoning_content"] = m.reasoning_content
        for k, v in m.extra.items():
            msg[k] = orjson.loads(v)
        choices.append({"index": c.index, "message": msg,
                        "logprobs": orjson.loads(c.logprobs_json) if c.logprobs_json else None,
                        "finish_reason": FINISH_TO_JSON[c.finish_reason]})
    d: dict[str, Any] = {"id": r.id, "object": "chat.completion", "created": r.created,
                         "model": r.model, "choices": choices}
    if r.HasField("usage"):
        d["usage"] = usage_to_json(r.usage)
    return _add_tier(d, r)


def _add_tier(d: dict[str, Any],
              r: pb.CreateChatCompletionResponse | pb.StreamChatCompletionResponse) -> dict[str, Any]:
    """`system_fingerprint` and `service_tier` when the upstream sent them."""
    if r.system_fingerprint:
        d["system_fingerprint"] = r.system_fingerprint
    if r.service_tier:
        d["service_tier"] = r.service_tier
    return d


# ----------------------------------------------------------------- chunks ----
# Both run once per streamed token: only non-empty values are set or read (an unset
# proto3 scalar and an empty one are the same message), which halves the cost.


def chunk_from_json(d: Any) -> pb.StreamChatCompletionResponse:
    """An upstream chat.completion.chunk object → a stream message (MALFORMED if unreadable)."""
    r = pb.StreamChatCompletionResponse()
    if v := d.get("id"):
        r.id = v
    if v := d.get("created"):
        r.created = int(v)
    if v := d.get("model"):
        r.model = v
    if v := d.get("system_fingerprint"):
        r.system_fingerprint = v
    if v := d.get("service_tier"):
        r.service_tier = v
    for c in d.get("choices") or ():
        ch = r.choices.add()
        if v := c.get("index"):
            ch.index = int(v)
        if v := c.get("finish_reason"):
            ch.finish_reason = FINISH_FROM_JSON.get(v, pb.FINISH_REASON_UNSPECIFIED)
        delta = c.get("delta") or {}
        out = ch.delta
        if delta.get("role") == "assistant":
            out.role = pb.ROLE_ASSISTANT
        if delta.get("content") is not None:
            out.content = delta["content"]
        if delta.get("refusal") is not None:
            out.refusal = delta["refusal"]
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        if isinstance(reasoning, str):
            out.reasoning_content = reasoning
        for tc in delta.get("tool_calls") or ():
            t = out.tool_calls.add(index=int(tc.get("index") or 0))
            if tc.get("id"):
                t.id = tc["id"]
            if tc.get("type"):
                t.type = tc["type"]
            fn = tc.get("function")
            if fn:
                if fn.get("name") is not None:
                    t.function.name = fn["name"]
                if fn.get("arguments") is not None:
                    t.function.arguments = fn["arguments"]
        if c.get("logprobs") is not None:
            ch.logprobs_json = json_text(c["logprobs"])
    usage_from_json(d.get("usage"), r.usage)
    return r


def chunk_to_json(r: pb.StreamChatCompletionResponse, include_usage: bool) -> dict[str, Any]:
    """One chat.completion.chunk for the caller, without usage (see `usage_chunk_to_json`);
    `include_usage` adds the `usage: null` OpenAI puts on every chunk of such a stream."""
    choices = []
    for c in r.choices:
        dl = c.delta
        delta: dict[str, Any] = {}
        if dl.role:
            delta["role"] = "assistant"
        if dl.HasField("content"):
            delta["content"] = dl.content
        if dl.HasField("reasoning_content"):
            delta["reasoning_content"] = dl.reasoning_content
        if dl.HasField("refusal"):
            delta["refusal"] = dl.refusal
        if dl.tool_calls:
            tcs = []
            for t in dl.tool_calls:
                tc: dict[str, Any] = {"index": t.index}
                if t.HasField("id"):
                    tc["id"] = t.id
                if t.HasField("type"):
                    tc["type"] = t.type
                if t.HasField("function"):
                    fn: dict[str, str] = {}
                    if t.function.HasField("name"):
                        fn["name"] = t.function.name
                    if t.function.HasField("arguments"):
                        fn["arguments"] = t.function.arguments
                    tc["function"] = fn
                tcs.append(tc)
            delta["tool_calls"] = tcs
        choice: dict[str, Any] = {"index": c.index, "delta": delta,
                                  "finish_reason": FINISH_TO_JSON[c.finish_reason]}
        if c.logprobs_json:
            choice["logprobs"] = orjson.loads(c.logprobs_json)
        choices.append(choice)
    d: dict[str, Any] = {"id": r.id, "object": "chat.completion.chunk", "created": r.created,
                         "model": r.model, "choices": choices}
    # Not `_add_tier`: per token, a call and the service_tier read cost ~4% of this
    # function, and the tier is the same for the whole stream (the usage chunk has it).
    if r.system_fingerprint:
        d["system_fingerprint"] = r.system_fingerprint
    if include_usage:
        d["usage"] = None
    return d


def usage_chunk_to_json(r: pb.StreamChatCompletionResponse) -> dict[str, Any]:
    """The final usage-only chunk of a stream whose caller asked for usage."""
    d: dict[str, Any] = {"id": r.id, "object": "chat.completion.chunk", "created": r.created,
                         "model": r.model, "choices": [], "usage": usage_to_json(r.usage)}
    return _add_tier(d, r)


# ----------------------------------------------------------------- images ----


def parse_image(body: Any) -> pb.CreateImageRequest:
    """A caller's images/generations body → the request; a 400 GatewayError if bad."""
    try:
        return _parse_image(body)
    except (TypeError, ValueError) as exc:
        raise _rejected(exc) from None


def _parse_image(body: Any) -> pb.CreateImageRequest:
    want(body, dict, "body", "a JSON object")
    if body.get("prompt") is None:
        raise invalid("Missing required parameter: 'prompt'.", "prompt")
    req = pb.CreateImageRequest(prompt=want_str(body["prompt"], "prompt"),
                                model=want_str(body.get("model", "dall-e-2"), "model"))
    for name in _IMAGE_SCALARS:
        if body.get(name) is not None:
            set_scalar(req, name, body[name], name)
    for k, v in body.items():
        if k not in _IMAGE_HANDLED:
            req.extra[k] = json_text(v)
    return req


def image_request_to_json(req: pb.CreateImageRequest, model: str) -> dict[str, Any]:
    """The request → an images/generations body for `model` (the upstream name)."""
    d: dict[str, Any] = {"prompt": req.prompt, "model": model}
    for name in _IMAGE_SCALARS:
        if req.HasField(name):
            d[name] = getattr(req, name)
    for k, v in req.extra.items():
        d[k] = orjson.loads(v)
    return d


def image_reply_from_json(d: Any) -> pb.CreateImageResponse:
    """An upstream images reply → the reply (one of MALFORMED if unreadable)."""
    r = pb.CreateImageResponse(created=int(d.get("created") or 0))
    for item in d["data"]:
        img = r.data.add()
        if item.get("b64_json"):
            img.b64_json = item["b64_json"]
        elif item.get("url"):
            img.url = item["url"]
        if item.get("revised_prompt"):
            img.revised_prompt = item["revised_prompt"]
    u = d.get("usage")
    if isinstance(u, dict):
        r.usage.prompt_tokens = int(u.get("input_tokens") or 0)
        r.usage.completion_tokens = int(u.get("output_tokens") or 0)
        r.usage.total_tokens = int(u.get("total_tokens") or 0)
    return r


def image_reply_to_json(r: pb.CreateImageResponse) -> dict[str, Any]:
    data = []
    for img in r.data:
        item: dict[str, Any] = ({"b64_json": img.b64_json} if img.WhichOneof("data") == "b64_json"
                                else {"url": img.url})
        if img.HasField("revised_prompt"):
            item["revised_prompt"] = img.revised_prompt
        data.append(item)
    d: dict[str, Any] = {"created": r.created, "data": data}
    if r.HasField("usage"):
        d["usage"] = {"input_tokens": r.usage.prompt_tokens,
                      "output_tokens": r.usage.completion_tokens,
                      "total_tokens": r.usage.total_tokens,
                      "input_tokens_details": {"text_tokens": r.usage.prompt_tokens,
                                               "image_tokens": 0}}
    return d


# ----------------------------------------------------------------- models ----


def models_to_json(models: Any) -> dict[str, Any]:
    return {"object": "list", "data": [model_to_json(m) for m in models]}


def model_to_json(m: pb.Model) -> dict[str, Any]:
    return {"id": m.id, "object": "model", "created": m.created, "owned_by": m.owned_by}
