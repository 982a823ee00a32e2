"""OpenAI JSON ⇄ Switchboard messages, by hand (no json_format on the hot path).

Parsing checks types and names the offending `param` (e.g. `messages[2].content`);
semantic checks (ranges, required combinations) live in the core so both surfaces
share them. Request fields the contract does not model go into `extra` as JSON text.

Every JSON value that lands in a proto scalar goes through `_set`, which checks it
against the field's proto type (string, bool, int32/int64 range, finite number) from
the descriptor, so a value protobuf would refuse is a 400 naming the field, never a
ValueError/TypeError inside the gateway (core/bounds.py holds the shared limits).
"""

from __future__ import annotations

from typing import Any

import orjson
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from switchboard.core.bounds import check_scalar
from switchboard.core.errors import GatewayError, invalid
from switchboard.v1 import inference_pb2 as pb

ROLES = {"system": pb.ROLE_SYSTEM, "developer": pb.ROLE_DEVELOPER, "user": pb.ROLE_USER,
         "assistant": pb.ROLE_ASSISTANT, "tool": pb.ROLE_TOOL}
FINISH = {pb.FINISH_REASON_UNSPECIFIED: None, pb.FINISH_REASON_STOP: "stop",
          pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_TOOL_CALLS: "tool_calls",
          pb.FINISH_REASON_CONTENT_FILTER: "content_filter",
          pb.FINISH_REASON_FUNCTION_CALL: "function_call"}

_FLOATS = ("temperature", "top_p", "presence_penalty", "frequency_penalty")
_INTS = ("n", "max_tokens", "max_completion_tokens", "top_logprobs", "seed")
_STRS = ("user", "reasoning_effort")
_BOOLS = ("logprobs", "parallel_tool_calls")
_SCALARS = (*_FLOATS, *_INTS, *_STRS, *_BOOLS)
_HANDLED = {"model", "messages", "stream", "stop", "logit_bias", "metadata", "tools",
            "tool_choice", "response_format", "stream_options", *_FLOATS, *_INTS, *_STRS, *_BOOLS}
_MSG_HANDLED = {"role", "content", "name", "tool_calls", "tool_call_id", "refusal",
                "reasoning_content"}
_IMAGE_HANDLED = {"prompt", "model", "n", "size", "quality", "style", "response_format", "user"}


def _tname(v: Any) -> str:
    return "null" if v is None else {bool: "boolean", int: "integer", float: "number",
                                     str: "string", list: "array", dict: "object"}.get(
        type(v), type(v).__name__)


def _want(v: Any, kind: type | tuple[type, ...], param: str, what: str) -> Any:
    if not isinstance(v, kind) or (isinstance(v, bool) and kind is not bool):
        raise invalid(f"Invalid type for '{param}': expected {what}, but got {_tname(v)}.", param)
    return v


def _str(v: Any, param: str) -> str:
    return str(_want(v, str, param, "a string"))


_C = FieldDescriptor
_KINDS: dict[int, tuple[type | tuple[type, ...], str]] = {
    _C.CPPTYPE_STRING: (str, "a string"), _C.CPPTYPE_BOOL: (bool, "a boolean"),
    _C.CPPTYPE_INT32: (int, "an integer"), _C.CPPTYPE_INT64: (int, "an integer"),
    _C.CPPTYPE_UINT32: (int, "an integer"), _C.CPPTYPE_UINT64: (int, "an integer"),
    _C.CPPTYPE_DOUBLE: ((int, float), "a number"), _C.CPPTYPE_FLOAT: ((int, float), "a number"),
}


def _set(msg: Message, name: str, v: Any, param: str) -> None:
    """msg.name = v, after checking v against the proto field's type and range."""
    field = msg.DESCRIPTOR.fields_by_name[name]
    kind, what = _KINDS[field.cpp_type]
    _want(v, kind, param, what)
    if kind is not str and kind is not bool:
        check_scalar(field, v, param)
    setattr(msg, name, v)


def _json_text(v: Any) -> str:
    return orjson.dumps(v).decode()


# ------------------------------------------------------------- requests ----


def _part(v: Any, param: str) -> pb.ContentPart:
    _want(v, dict, param, "an object")
    kind = v.get("type")
    if kind == "text":
        return pb.ContentPart(text=_str(v.get("text"), f"{param}.text"))
    if kind == "image_url":
        img = v.get("image_url")
        if isinstance(img, str):
            return pb.ContentPart(image_url=pb.ImageUrl(url=img))
        _want(img, dict, f"{param}.image_url", "an object")
        detail = img.get("detail")
        return pb.ContentPart(image_url=pb.ImageUrl(
            url=_str(img.get("url"), f"{param}.image_url.url"),
            detail=_str(detail, f"{param}.image_url.detail") if detail is not None else ""))
    if kind == "input_audio":
        audio = _want(v.get("input_audio"), dict, f"{param}.input_audio", "an object")
        return pb.ContentPart(input_audio=pb.InputAudio(
            data=_str(audio.get("data"), f"{param}.input_audio.data"),
            format=_str(audio.get("format"), f"{param}.input_audio.format")))
    if kind == "refusal":
        return pb.ContentPart(refusal=_str(v.get("refusal"), f"{param}.refusal"))
    if not isinstance(kind, str):
        raise invalid(f"Missing or invalid '{param}.type'.", f"{param}.type")
    return pb.ContentPart(other_json=_json_text(v))


def _tool_calls(v: Any, param: str, out: Any) -> None:
    for j, tc in enumerate(_want(v, list, param, "an array")):
        p = f"{param}[{j}]"
        _want(tc, dict, p, "an object")
        fn = _want(tc.get("function"), dict, f"{p}.function", "an object")
        args = fn.get("arguments", "")
        if not isinstance(args, str):  # lenient: some clients send the object itself
            args = _json_text(args)
        call = out.add(id=_str(tc.get("id", ""), f"{p}.id"),
                       function=pb.FunctionCall(name=_str(fn.get("name"), f"{p}.function.name"),
                                                arguments=args))
        _set(call, "type", tc.get("type", "function") or "function", f"{p}.type")


def _message(v: Any, param: str) -> pb.Message:
    _want(v, dict, param, "an object")
    role = v.get("role")
    if not isinstance(role, str) or role not in ROLES:  # a list/dict is unhashable
        raise invalid(f"Invalid value for '{param}.role': expected one of system, developer, "
                      f"user, assistant, tool, got {role!r}.", f"{param}.role")
    m = pb.Message(role=ROLES[role])
    content = v.get("content")
    if isinstance(content, str):
        m.text = content
    elif isinstance(content, list):
        m.parts.SetInParent()
        m.parts.parts.extend(_part(p, f"{param}.content[{i}]") for i, p in enumerate(content))
    elif content is not None:
        raise invalid(f"Invalid type for '{param}.content': expected a string or an array of "
                      f"content parts, but got {_tname(content)}.", f"{param}.content")
    for name in ("name", "tool_call_id", "refusal", "reasoning_content"):
        if v.get(name) is not None:
            setattr(m, name, _str(v[name], f"{param}.{name}"))
    if v.get("tool_calls") is not None:
        _tool_calls(v["tool_calls"], f"{param}.tool_calls", m.tool_calls)
    for k, val in v.items():
        if k not in _MSG_HANDLED:
            m.extra[k] = _json_text(val)
    return m


def _tool(v: Any, param: str) -> pb.Tool:
    _want(v, dict, param, "an object")
    fn = _want(v.get("function"), dict, f"{param}.function", "an object")
    f = pb.FunctionDefinition(name=_str(fn.get("name"), f"{param}.function.name"))
    if fn.get("description") is not None:
        f.description = _str(fn["description"], f"{param}.function.description")
    if fn.get("parameters") is not None:
        f.parameters_json = _json_text(_want(fn["parameters"], dict, f"{param}.function.parameters",
                                             "an object"))
    if fn.get("strict") is not None:
        f.strict = _want(fn["strict"], bool, f"{param}.function.strict", "a boolean")
    tool = pb.Tool(function=f)
    _set(tool, "type", v.get("type", "function") or "function", f"{param}.type")
    return tool


def _tool_choice(v: Any, out: pb.ToolChoice) -> None:
    if isinstance(v, str):
        if v not in ("none", "auto", "required"):
            raise invalid(f"Invalid value for 'tool_choice': {v!r}.", "tool_choice")
        out.mode = v
        return
    _want(v, dict, "tool_choice", "a string or an object")
    fn = _want(v.get("function"), dict, "tool_choice.function", "an object")
    out.function_name = _str(fn.get("name"), "tool_choice.function.name")


def _response_format(v: Any, out: pb.ResponseFormat) -> None:
    _want(v, dict, "response_format", "an object")
    kind = v.get("type")
    if kind == "text":
        out.text.SetInParent()
    elif kind == "json_object":
        out.json_object.SetInParent()
    elif kind == "json_schema":
        js = _want(v.get("json_schema"), dict, "response_format.json_schema", "an object")
        s = out.json_schema
        s.name = _str(js.get("name"), "response_format.json_schema.name")
        if js.get("description") is not None:
            s.description = _str(js["description"], "response_format.json_schema.description")
        if js.get("schema") is not None:
            s.schema_json = _json_text(_want(js["schema"], dict, "response_format.json_schema.schema",
                                             "an object"))
        if js.get("strict") is not None:
            s.strict = _want(js["strict"], bool, "response_format.json_schema.strict", "a boolean")
    else:
        raise invalid(f"Invalid value for 'response_format.type': {kind!r} (expected text, "
                      "json_object or json_schema).", "response_format.type")


def parse_chat(body: Any) -> tuple[pb.ChatCompletionParams, bool]:
    """An OpenAI chat request body → (params, stream?)."""
    try:
        return _parse_chat(body)
    except (TypeError, ValueError) as exc:
        raise _rejected(exc) from None


def _rejected(exc: Exception) -> GatewayError:
    # A safety net: every field is checked above, so reaching this means protobuf refused
    # a value a check missed. It is still the caller's input, so a 400, not a 500.
    return invalid(f"A value in the request is not valid for its field: {exc}.", None)


_LOGIT_BIAS_VALUE: Any = pb.ChatCompletionParams.DESCRIPTOR.fields_by_name[
    "logit_bias"].message_type.fields_by_name["value"]  # type: ignore[union-attr]


def _parse_chat(body: Any) -> tuple[pb.ChatCompletionParams, bool]:
    _want(body, dict, "body", "a JSON object")
    p = pb.ChatCompletionParams()
    if "model" in body:
        p.model = _str(body["model"], "model")
    msgs = body.get("messages")
    if msgs is None:
        raise invalid("Missing required parameter: 'messages'.", "messages")
    p.messages.extend(_message(m, f"messages[{i}]")
                      for i, m in enumerate(_want(msgs, list, "messages", "an array")))
    for name in _SCALARS:
        v = body.get(name)
        if v is not None:
            _set(p, name, v, name)
    stop = body.get("stop")
    if isinstance(stop, str):
        p.stop.append(stop)
    elif stop is not None:
        p.stop.extend(_str(s, f"stop[{i}]") for i, s in enumerate(_want(stop, list, "stop",
                                                                         "a string or an array")))
    if body.get("logit_bias") is not None:
        for k, v in _want(body["logit_bias"], dict, "logit_bias", "an object").items():
            # a number, stored as int32: range-check it before the truncation
            _want(v, (int, float), f"logit_bias.{k}", "a number")
            check_scalar(_LOGIT_BIAS_VALUE, v, f"logit_bias.{k}")
            p.logit_bias[str(k)] = int(v)
    if body.get("metadata") is not None:
        for k, v in _want(body["metadata"], dict, "metadata", "an object").items():
            p.metadata[str(k)] = _str(v, f"metadata.{k}")
    if body.get("tools") is not None:
        p.tools.extend(_tool(t, f"tools[{i}]")
                       for i, t in enumerate(_want(body["tools"], list, "tools", "an array")))
    if body.get("tool_choice") is not None:
        _tool_choice(body["tool_choice"], p.tool_choice)
    if body.get("response_format") is not None:
        _response_format(body["response_format"], p.response_format)
    stream = body.get("stream")
    if stream is not None:
        _want(stream, bool, "stream", "a boolean")
    if body.get("stream_options") is not None:
        so = _want(body["stream_options"], dict, "stream_options", "an object")
        if so.get("include_usage") is not None:
            p.stream_options.include_usage = _want(so["include_usage"], bool,
                                                   "stream_options.include_usage", "a boolean")
    for k, v in body.items():
        if k not in _HANDLED:
            p.extra[k] = _json_text(v)
    return p, bool(stream)


def parse_image(body: Any) -> pb.CreateImageRequest:
    """An OpenAI images/generations body → the request message."""
    try:
        return _parse_image(body)
    except (TypeError, ValueError) as exc:
        raise _rejected(exc) from None


def _parse_image(body: Any) -> pb.CreateImageRequest:
    _want(body, dict, "body", "a JSON object")
    if body.get("prompt") is None:
        raise invalid("Missing required parameter: 'prompt'.", "prompt")
    req = pb.CreateImageRequest(prompt=_str(body["prompt"], "prompt"),
                                model=_str(body.get("model", "dall-e-2"), "model"))
    for name in ("n", "size", "quality", "style", "response_format", "user"):
        if body.get(name) is not None:
            _set(req, name, body[name], name)
    for k, v in body.items():
        if k not in _IMAGE_HANDLED:
            req.extra[k] = _json_text(v)
    return req


# -------------------------------------------------------------- replies ----


def usage_json(u: pb.Usage) -> dict[str, Any]:
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


def _tool_calls_json(tcs: Any) -> list[dict[str, Any]]:
    return [{"id": t.id, "type": t.type or "function",
             "function": {"name": t.function.name, "arguments": t.function.arguments}}
            for t in tcs]


def chat_response_json(r: pb.CreateChatCompletionResponse) -> dict[str, Any]:
    choices = []
    for c in r.choices:
        m = c.message
        msg: dict[str, Any] = {
            "role": "assistant",
            "content": m.content if m.HasField("content") else None,
            "refusal": m.refusal if m.HasField("refusal") else None,
        }
        if m.tool_calls:
            msg["tool_calls"] = _tool_calls_json(m.tool_calls)
        if m.HasField("reasoning_content"):
            msg["reasoning_content"] = m.reasoning_content
        for k, v in m.extra.items():
            msg[k] = orjson.loads(v)
        choices.append({"index": c.index, "message": msg,
                        "logprobs": orjson.loads(c.logprobs_json) if c.logprobs_json else None,
                        "finish_reason": FINISH[c.finish_reason]})
    d: dict[str, Any] = {"id": r.id, "object": "chat.completion", "created": r.created,
                         "model": r.model, "choices": choices}
    if r.HasField("usage"):
        d["usage"] = usage_json(r.usage)
    if r.system_fingerprint:
        d["system_fingerprint"] = r.system_fingerprint
    if r.service_tier:
        d["service_tier"] = r.service_tier
    return d


def chunk_json(r: pb.StreamChatCompletionResponse, include_usage: bool) -> dict[str, Any]:
    """One chat.completion.chunk without usage (see `usage_chunk_json`)."""
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
                                  "finish_reason": FINISH[c.finish_reason]}
        if c.logprobs_json:
            choice["logprobs"] = orjson.loads(c.logprobs_json)
        choices.append(choice)
    d: dict[str, Any] = {"id": r.id, "object": "chat.completion.chunk", "created": r.created,
                         "model": r.model, "choices": choices}
    if r.system_fingerprint:
        d["system_fingerprint"] = r.system_fingerprint
    if include_usage:
        d["usage"] = None
    return d


def usage_chunk_json(r: pb.StreamChatCompletionResponse) -> dict[str, Any]:
    return {"id": r.id, "object": "chat.completion.chunk", "created": r.created, "model": r.model,
            "choices": [], "usage": usage_json(r.usage)}


def models_json(models: Any) -> dict[str, Any]:
    return {"object": "list", "data": [model_json(m) for m in models]}


def model_json(m: pb.Model) -> dict[str, Any]:
    return {"id": m.id, "object": "model", "created": m.created, "owned_by": m.owned_by}


def image_response_json(r: pb.CreateImageResponse) -> dict[str, Any]:
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


def error_json(err: GatewayError) -> bytes:
    return orjson.dumps(err.openai_body())
