"""Anthropic Messages API (`POST {base_url}/v1/messages`): pure translate functions
between our OpenAI-shaped messages and Anthropic's wire JSON, a stream translator
(Anthropic SSE events -> OpenAI-style chunks), and a small client.

Channel options:
- `version`: the `anthropic-version` header (default "2023-06-01").
- `default_max_tokens`: Anthropic requires `max_tokens`; used when the client gave
  neither max_completion_tokens nor max_tokens. An int, or a mapping of upstream model
  name -> int with an optional "*" fallback (default 4096).
A base_url ending in `/v1` is accepted too (the path is then `{base_url}/messages`).
Beta features: add an `anthropic-beta` header through the channel's `headers`.

Request decisions:
- system and developer messages, wherever they appear, are joined (blank line between)
  into the top-level `system`; consecutive turns of the same role are merged, tool
  results become `tool_result` blocks in a user turn (consecutive ones in one turn).
- `temperature` is clamped to Anthropic's 0..1 range (OpenAI allows up to 2).
- `reasoning_effort` -> `thinking: {type: enabled, budget_tokens}` with budgets
  minimal 1024, low 2048, medium 8192, high 16384, xhigh 32768; "none" sends no
  thinking. Without a client token cap, max_tokens = default + budget (Anthropic counts
  thinking inside max_tokens); with one, the budget is capped below it, and a cap too
  small for the 1024 minimum is a 400. While thinking, temperature and top_p are not
  sent (Anthropic only accepts their defaults then).
- response_format json_object / json_schema: Anthropic has no JSON mode that every
  model supports, so we offer one extra tool, `json_response`, whose input_schema is
  the requested schema (json_object: any object) and make the model call it
  (tool_choice `tool`, or `any` when the client's own tools are offered too, so the
  model may still call those). Its input comes back as the message *content* (JSON
  text) with finish_reason "stop"; it is never reported as a tool call, streamed or
  not. Text the model writes before calling it is dropped (streams hold such text until
  they know). With thinking enabled Anthropic forbids forced tool choice, so the tool is
  offered with `auto` plus a one-line system instruction. A client tool of the same
  name is a 400. The schema's root must be an object (Anthropic input_schema rule).
- Tool-call ids are made to fit Anthropic's `[a-zA-Z0-9_-]+` (other characters -> "_",
  identically on the tool_use and its tool_result). An assistant turn with no content
  and no tool calls is dropped (Anthropic rejects empty turns).
- `user` -> `metadata.user_id`. `n` > 1 is a 400 (Anthropic has one completion per
  request). `input_audio` parts are a 400.
- Not sent, because Anthropic rejects fields it does not know or has no equivalent:
  the `extra` maps (request and message), presence/frequency penalties, logit_bias,
  logprobs, seed, OpenAI `metadata`, message `name`, function `strict`. An assistant
  turn's reasoning_content is not sent back (Anthropic only accepts signed thinking).
- Thinking across tool loops: Anthropic requires the signed thinking blocks that
  preceded a tool call to be echoed in the next request, and OpenAI clients only hand
  back tool-call ids. So the tool-call id we return is Anthropic's id plus
  `__thk__<base64url JSON of those thinking / redacted_thinking blocks>` (thinking text
  and signature; it can be long). Decoding puts the blocks back where Anthropic wants
  them (the first call's at the start of the assistant turn) and the plain id on
  tool_use / tool_result. If thinking is on but the last assistant turn called tools
  with ids we did not mint, thinking is left off for that request (Anthropic would
  reject it); with thinking off, carried thinking blocks are not sent.

Reply decisions: text blocks joined -> content; tool_use -> tool_calls (arguments =
the input as JSON text); thinking -> reasoning_content; stop_reason end_turn /
stop_sequence / pause_turn -> stop, max_tokens / model_context_window_exceeded ->
length, tool_use -> tool_calls, refusal -> content_filter. Usage: prompt_tokens =
input + cache_read + cache_creation input tokens, cached_tokens = cache_read,
completion_tokens = output, reasoning_tokens = output_tokens_details.thinking_tokens.
In streams, message_delta usage is cumulative and overrides message_start's.
"""

from __future__ import annotations

import base64
import re
import time
from typing import Annotated, Any

import orjson
from pydantic import BeforeValidator, Field

from switchboard.core.config import ProviderOptions, ProviderSpec, Str, problem
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

DEFAULT_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 4096


def _max_tokens(v: object) -> int | dict[str, int]:
    """A whole number >= 1, or a mapping of upstream model name -> one."""
    def one(x: object, *at: str) -> int:
        if isinstance(x, bool) or not isinstance(x, int) or x < 1:
            raise problem(f"expected a whole number >= 1, got {x!r}", *at)
        return x
    if isinstance(v, dict):
        return {str(k): one(x, str(k)) for k, x in v.items()}
    return one(v)


class Options(ProviderOptions):
    """Channel `options` of `provider: anthropic`."""

    version: Str = Field(default=DEFAULT_VERSION, description="the `anthropic-version` header")
    default_max_tokens: Annotated[int | dict[str, int], BeforeValidator(_max_tokens)] = Field(
        default=DEFAULT_MAX_TOKENS, description="`max_tokens` when the client sets none (Anthropic requires "
        "it): a number, or a mapping of upstream model name -> number with an optional `*` fallback")
JSON_TOOL = "json_response"
THINKING_BUDGETS = {"minimal": 1024, "low": 2048, "medium": 8192, "high": 16384, "xhigh": 32768}
MIN_THINKING_BUDGET = 1024
_JSON_TOOL_INSTRUCTION = f"Give your final answer by calling the `{JSON_TOOL}` tool."

FINISH_FROM_WIRE: dict[str, pb.FinishReason.ValueType] = {
    "end_turn": pb.FINISH_REASON_STOP, "stop_sequence": pb.FINISH_REASON_STOP,
    "pause_turn": pb.FINISH_REASON_STOP, "max_tokens": pb.FINISH_REASON_LENGTH,
    "model_context_window_exceeded": pb.FINISH_REASON_LENGTH,
    "tool_use": pb.FINISH_REASON_TOOL_CALLS, "refusal": pb.FINISH_REASON_CONTENT_FILTER,
}
# In-stream error types worth trying another channel for, and the HTTP status each
# would have had (so the router treats them like their HTTP twins).
_STREAM_ERROR_STATUS = {"overloaded_error": 529, "api_error": 500, "rate_limit_error": 429,
                        "invalid_request_error": 400, "authentication_error": 401,
                        "permission_error": 403, "not_found_error": 404,
                        "request_too_large": 413}
_RETRYABLE_STREAM_ERRORS = {"overloaded_error", "api_error", "rate_limit_error"}
_DATA_URL = re.compile(r"data:([^;,]+)((?:;[^;,]+)*),(.*)", re.S)
_BAD_ID_CHARS = re.compile(r"[^a-zA-Z0-9_-]")
THINKING_MARK = "__thk__"
_THINKING_TYPES = ("thinking", "redacted_thinking")


# ---------------------------------------------------------------- request ----


def image_block(url: str, param: str) -> dict[str, Any]:
    if url.startswith("data:"):
        m = _DATA_URL.fullmatch(url)
        if not m or ";base64" not in m.group(2):
            raise bad_request("image data: URLs must be base64 (data:<type>;base64,<data>)", param)
        return {"type": "image",
                "source": {"type": "base64", "media_type": m.group(1), "data": m.group(3)}}
    if url.startswith(("http://", "https://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise bad_request("image_url must be an http(s) or base64 data: URL", param)


def content_blocks(m: pb.Message, param: str) -> list[dict[str, Any]]:
    """A message's content as Anthropic blocks (empty text is dropped: Anthropic rejects it)."""
    kind = m.WhichOneof("content")
    if kind == "text":
        return [{"type": "text", "text": m.text}] if m.text else []
    if kind != "parts":
        return []
    out: list[dict[str, Any]] = []
    for j, p in enumerate(m.parts.parts):
        which = p.WhichOneof("part")
        where = f"{param}[{j}]"
        if which == "text":
            if p.text:
                out.append({"type": "text", "text": p.text})
        elif which == "refusal":
            if p.refusal:
                out.append({"type": "text", "text": p.refusal})
        elif which == "image_url":
            out.append(image_block(p.image_url.url, f"{where}.image_url.url"))
        elif which == "input_audio":
            raise bad_request("Anthropic models do not accept audio input", where)
        elif which == "other_json":
            # A part type the contract does not model: relay it (it may be a native
            # Anthropic block such as `document`); Anthropic rejects what it cannot use.
            out.append(orjson.loads(p.other_json))
    return out


def tool_use_blocks(m: pb.Message, i: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(thinking blocks that must open the turn, tool_use blocks with their own thinking)."""
    lead: list[dict[str, Any]] = []
    out: list[dict[str, Any]] = []
    for j, tc in enumerate(m.tool_calls):
        param = f"messages[{i}].tool_calls[{j}].function.arguments"
        raw = tc.function.arguments.strip()
        try:
            args = orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError:
            raise bad_request(f"tool call arguments must be valid JSON for Anthropic, got "
                              f"{tc.function.arguments[:80]!r}", param) from None
        if not isinstance(args, dict):
            raise bad_request("tool call arguments must be a JSON object for Anthropic", param)
        _, carried = decode_tool_call_id(tc.id)
        (lead if j == 0 else out).extend(carried)
        out.append({"type": "tool_use", "id": tool_id(tc.id), "name": tc.function.name,
                    "input": args})
    return lead, out


def encode_tool_call_id(call_id: str, thinking: list[dict[str, Any]]) -> str:
    """The id we hand the client: Anthropic's id, plus the signed thinking blocks that
    came before the call (base64url JSON), which Anthropic needs echoed on the next turn."""
    if not thinking:
        return call_id
    payload = base64.urlsafe_b64encode(orjson.dumps(thinking)).rstrip(b"=").decode()
    return f"{call_id}{THINKING_MARK}{payload}"


def decode_tool_call_id(call_id: str) -> tuple[str, list[dict[str, Any]]]:
    """(Anthropic's id, carried thinking blocks); ([id], []) for ids we did not mint."""
    base, mark, payload = call_id.partition(THINKING_MARK)
    if not mark:
        return call_id, []
    try:
        blocks = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (ValueError, orjson.JSONDecodeError):
        return call_id, []
    if not (isinstance(blocks, list)
            and all(isinstance(b, dict) and b.get("type") in _THINKING_TYPES for b in blocks)):
        return call_id, []
    return base, blocks


def tool_id(call_id: str) -> str:
    """Anthropic accepts tool_use ids matching [a-zA-Z0-9_-]+; ids minted elsewhere (another
    provider, a client) are made to fit, the same way on the call and on its result."""
    return _BAD_ID_CHARS.sub("_", decode_tool_call_id(call_id)[0]) or "call"


def tool_result_block(m: pb.Message, i: int) -> dict[str, Any]:
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": tool_id(m.tool_call_id)}
    if m.WhichOneof("content") == "parts":
        block["content"] = content_blocks(m, f"messages[{i}].content")
    else:
        text = message_text(m, "\n")
        if text:
            block["content"] = text
    return block


def messages_to_wire(messages: Any) -> tuple[list[str], list[dict[str, Any]]]:
    """(system texts, alternating user/assistant turns)."""
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if m.role in (pb.ROLE_SYSTEM, pb.ROLE_DEVELOPER):
            if text := message_text(m, "\n"):
                system.append(text)
            continue
        if m.role == pb.ROLE_ASSISTANT:
            role = "assistant"
            lead, uses = tool_use_blocks(m, i)
            blocks = lead + content_blocks(m, f"messages[{i}].content") + uses
            if not blocks:
                continue  # an empty assistant turn says nothing, and Anthropic rejects it
        elif m.role == pb.ROLE_TOOL:
            role, blocks = "user", [tool_result_block(m, i)]
        else:
            role, blocks = "user", content_blocks(m, f"messages[{i}].content")
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)  # Anthropic wants strictly alternating turns
        else:
            turns.append({"role": role, "content": blocks})
    return system, turns


def tool_to_wire(t: pb.Tool) -> dict[str, Any]:
    d = function_to_wire(t, "input_schema", default_schema={})  # `strict` is not Anthropic's
    schema = d["input_schema"]
    if isinstance(schema, dict) and not schema:
        d["input_schema"] = {"type": "object", "properties": {}}
    elif isinstance(schema, dict) and "type" not in schema:
        d["input_schema"] = {"type": "object", **schema}  # Anthropic insists on an object root
    return d


def default_max_tokens(options: Options, model: str) -> int:
    value = options.default_max_tokens
    if isinstance(value, dict):
        return value.get(model, value.get("*", DEFAULT_MAX_TOKENS))
    return value


def json_tool(p: pb.ChatCompletionParams) -> dict[str, Any] | None:
    """The forced `json_response` tool for response_format json_object/json_schema."""
    fmt = p.response_format.WhichOneof("format")
    if fmt == "json_object":
        return {"name": JSON_TOOL, "description": "Respond with a JSON object.",
                "input_schema": {"type": "object"}}
    if fmt != "json_schema":
        return None
    js = p.response_format.json_schema
    schema = orjson.loads(js.schema_json) if js.schema_json else {"type": "object"}
    if not isinstance(schema, dict) or schema.get("type", "object") != "object":
        raise bad_request("Anthropic can only produce a JSON object: the schema's root must "
                          "have type object", "response_format.json_schema.schema")
    desc = js.description if js.HasField("description") else f"Respond with `{js.name}` JSON."
    return {"name": JSON_TOOL, "description": desc, "input_schema": schema}


def uses_json_tool(p: pb.ChatCompletionParams) -> bool:
    return p.response_format.WhichOneof("format") in ("json_object", "json_schema")


def _tool_choice(p: pb.ChatCompletionParams, jtool: dict[str, Any] | None,
                 thinking: bool) -> dict[str, Any] | None:
    which = p.tool_choice.WhichOneof("choice")
    mode = p.tool_choice.mode if which == "mode" else None
    user_tools = bool(p.tools) and mode != "none"
    if jtool is not None and not thinking and (mode in (None, "auto", "none") or not p.tools):
        choice: dict[str, Any] = ({"type": "any"} if user_tools
                                  else {"type": "tool", "name": JSON_TOOL})
    elif jtool is not None and thinking and mode in (None, "auto", "none"):
        choice = {"type": "auto"}
    elif not p.tools or which is None:
        choice = {"type": "auto"} if p.tools or jtool is not None else {}
    elif which == "function_name":
        choice = {"type": "tool", "name": p.tool_choice.function_name}
    else:
        choice = {"type": {"auto": "auto", "none": "none", "required": "any"}[mode or "auto"]}
    if not choice:
        return None
    if p.HasField("parallel_tool_calls") and not p.parallel_tool_calls and choice["type"] != "none":
        choice["disable_parallel_tool_use"] = True
    return choice


def _thinking_budget(p: pb.ChatCompletionParams) -> int | None:
    if not p.HasField("reasoning_effort") or p.reasoning_effort == "none":
        return None
    try:
        return THINKING_BUDGETS[p.reasoning_effort]
    except KeyError:
        raise bad_request(f"reasoning_effort must be one of none, {', '.join(THINKING_BUDGETS)}; "
                          f"got {p.reasoning_effort!r}", "reasoning_effort") from None


def _tool_loop_keeps_thinking(turns: list[dict[str, Any]]) -> bool:
    """Anthropic rejects thinking when the last assistant turn called tools without the
    signed thinking that preceded the calls (ids not minted by us): then it stays off."""
    last: list[dict[str, Any]] = next(
        (t["content"] for t in reversed(turns) if t["role"] == "assistant"), [])
    if not any(b.get("type") == "tool_use" for b in last):
        return True
    return bool(last) and last[0].get("type") in _THINKING_TYPES


def _strip_thinking(turns: list[dict[str, Any]]) -> None:
    for t in turns:
        if t["role"] == "assistant":
            t["content"] = [b for b in t["content"] if b.get("type") not in _THINKING_TYPES]


def params_to_wire(params: pb.ChatCompletionParams, model: str, *, stream: bool,
                   options: Options) -> dict[str, Any]:
    """Our request -> an Anthropic Messages body for `model` (the upstream name).

    Raises a non-retryable UpstreamError (status 400, `param` set) for requests
    Anthropic cannot serve, before any network call.
    """
    p = params
    if p.HasField("n") and p.n > 1:
        raise bad_request("Anthropic returns one completion per request: n must be 1", "n")
    system, turns = messages_to_wire(p.messages)
    if not turns:
        raise bad_request("Anthropic needs at least one user or assistant message", "messages")
    d: dict[str, Any] = {"model": model, "messages": turns}

    cap_param = ("max_completion_tokens" if p.HasField("max_completion_tokens")
                 else "max_tokens" if p.HasField("max_tokens") else None)
    budget = _thinking_budget(p)
    if budget is not None and not _tool_loop_keeps_thinking(turns):
        budget = None
    if budget is None:
        _strip_thinking(turns)
    if cap_param is not None:
        max_tokens = getattr(p, cap_param)
        if budget is not None:
            budget = min(budget, max_tokens - 1)
            if budget < MIN_THINKING_BUDGET:
                raise bad_request(f"Anthropic thinking needs {cap_param} above "
                                  f"{MIN_THINKING_BUDGET}; raise it or drop reasoning_effort",
                                  cap_param)
    else:
        max_tokens = default_max_tokens(options, model) + (budget or 0)
    d["max_tokens"] = max_tokens
    if budget is not None:
        d["thinking"] = {"type": "enabled", "budget_tokens": budget}
    else:
        if p.HasField("temperature"):
            d["temperature"] = min(p.temperature, 1.0)
        if p.HasField("top_p"):
            d["top_p"] = p.top_p
    if p.stop:
        d["stop_sequences"] = list(p.stop)
    if p.HasField("user"):
        d["metadata"] = {"user_id": p.user}

    jtool = json_tool(p)
    tools = [tool_to_wire(t) for t in p.tools]
    if jtool is not None:
        if any(t["name"] == JSON_TOOL for t in tools):
            raise bad_request(f"the tool name `{JSON_TOOL}` is reserved for JSON mode on "
                              "Anthropic channels", "tools")
        tools.append(jtool)
        if budget is not None:
            system.append(_JSON_TOOL_INSTRUCTION)
    if tools:
        d["tools"] = tools
    choice = _tool_choice(p, jtool, budget is not None)
    if choice is not None and tools:
        d["tool_choice"] = choice
    if system:
        d["system"] = "\n\n".join(system)
    if stream:
        d["stream"] = True
    return d


# ---------------------------------------------------------------- replies ----


def usage_from_wire(u: Any, out: pb.Usage) -> None:
    if not isinstance(u, dict):
        return
    cache_read = int(u.get("cache_read_input_tokens") or 0)
    prompt = (int(u.get("input_tokens") or 0) + cache_read
              + int(u.get("cache_creation_input_tokens") or 0))
    out.prompt_tokens = prompt
    out.completion_tokens = int(u.get("output_tokens") or 0)
    out.total_tokens = out.prompt_tokens + out.completion_tokens
    out.prompt_tokens_details.cached_tokens = cache_read
    details = u.get("output_tokens_details")
    if isinstance(details, dict):
        out.completion_tokens_details.reasoning_tokens = int(details.get("thinking_tokens") or 0)
    else:
        out.completion_tokens_details.reasoning_tokens = 0


def _finish(stop_reason: Any, has_tool_calls: bool) -> pb.FinishReason.ValueType:
    if stop_reason == "tool_use" and not has_tool_calls:
        return pb.FINISH_REASON_STOP  # only the JSON-mode tool was called
    return FINISH_FROM_WIRE.get(stop_reason or "", pb.FINISH_REASON_STOP)


def response_from_wire(data: Any, *, json_mode: bool = False) -> pb.CreateChatCompletionResponse:
    """An Anthropic `message` object -> our reply (UpstreamError if malformed).

    json_mode: the request used the `json_response` tool (see module docstring).
    """
    try:
        r = pb.CreateChatCompletionResponse(id=data.get("id") or "", created=int(time.time()),
                                            model=data.get("model") or "")
        ch = r.choices.add(index=0)
        m = ch.message
        texts: list[str] = []
        thinking: list[str] = []
        signed: list[dict[str, Any]] = []  # thinking blocks since the last tool call
        json_text: str | None = None
        for block in data["content"]:
            kind = block.get("type")
            if kind == "text":
                texts.append(block.get("text") or "")
            elif kind in _THINKING_TYPES:
                if kind == "thinking":
                    thinking.append(block.get("thinking") or "")
                signed.append(block)
            elif kind == "tool_use" and json_mode and block.get("name") == JSON_TOOL:
                json_text = orjson.dumps(block.get("input") or {}).decode()
            elif kind == "tool_use":
                call_id = encode_tool_call_id(block.get("id") or "", signed)
                signed = []
                m.tool_calls.add(id=call_id, type="function",
                                 function=pb.FunctionCall(
                                     name=block.get("name") or "",
                                     arguments=orjson.dumps(block.get("input") or {}).decode()))
        if json_text is not None:
            m.content = json_text
        elif texts or not m.tool_calls:
            m.content = "".join(texts)
        if thinking:
            m.reasoning_content = "".join(thinking)
        ch.finish_reason = _finish(data.get("stop_reason"), bool(m.tool_calls))
        usage_from_wire(data.get("usage"), r.usage)
        return r
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UpstreamError(f"malformed Anthropic message from upstream ({type(exc).__name__})",
                            retryable=True, kind="malformed") from None


def stream_error(data: Any) -> UpstreamError:
    """An in-stream `error` event -> UpstreamError (retryable when overloaded/5xx/429)."""
    err = data.get("error") if isinstance(data, dict) else None
    etype = str(err.get("type") or "error") if isinstance(err, dict) else "error"
    msg = str(err.get("message") or "") if isinstance(err, dict) else str(data)
    return UpstreamError(f"upstream stream error: {etype}: {msg}",
                         retryable=etype in _RETRYABLE_STREAM_ERRORS,
                         status=_STREAM_ERROR_STATUS.get(etype), kind="stream")


class StreamTranslator:
    """Anthropic SSE events -> OpenAI-style chunks, one event at a time.

    Tool-call indexes count tool calls only (not content blocks). The first delta of
    a call carries id, type, name and arguments ""; later ones carry the
    input_json_delta fragments as they come. The last chunk (emitted at message_stop)
    carries the finish reason and the usage (message_start's input counts, overridden
    by message_delta's cumulative counts). The first emitted chunk has role assistant;
    nothing is emitted before the first content, so a failure right after
    message_start can still fail over to another channel.
    """

    def __init__(self, *, json_mode: bool = False) -> None:
        self.json_mode = json_mode
        self.id = ""
        self.model = ""
        self.created = int(time.time())
        self.usage: dict[str, Any] = {}
        self.stop_reason: str | None = None
        self.done = False
        self._role_sent = False
        self._blocks: dict[int, str] = {}         # content block index -> text|thinking|tool|json
        self._tool_index: dict[int, int] = {}     # content block index -> OpenAI tool-call index
        self._tool_has_args: dict[int, bool] = {}
        self._tools = 0
        self._json_seen = False
        self._held_text: list[str] = []           # JSON mode: text before we know
        self._signed: list[dict[str, Any]] = []   # thinking blocks since the last tool call

    # -- chunk builders

    def _chunk(self) -> tuple[pb.StreamChatCompletionResponse, pb.Delta]:
        c = pb.StreamChatCompletionResponse(id=self.id, created=self.created, model=self.model)
        choice = c.choices.add(index=0)
        if not self._role_sent:
            choice.delta.role = pb.ROLE_ASSISTANT
            self._role_sent = True
        return c, choice.delta

    def _content(self, text: str) -> list[pb.StreamChatCompletionResponse]:
        if not text:
            return []
        c, delta = self._chunk()
        delta.content = text
        return [c]

    # -- the driver's side (core/providers/base.py)

    def frame(self, event: str, raw: bytes) -> list[pb.StreamChatCompletionResponse]:
        obj = loads_event(raw)
        if not isinstance(obj, dict):
            raise UpstreamError("malformed Anthropic stream event", retryable=True,
                                kind="malformed")
        try:
            return self.feed(event, obj)
        except (KeyError, TypeError, ValueError) as exc:
            raise UpstreamError(f"malformed Anthropic stream event ({type(exc).__name__})",
                                retryable=True, kind="malformed") from None

    def end(self) -> list[pb.StreamChatCompletionResponse]:
        raise UpstreamError("Anthropic stream ended before message_stop", retryable=True,
                            kind="stream")

    # -- events

    def feed(self, event_name: str, data: dict[str, Any]) -> list[pb.StreamChatCompletionResponse]:
        name = event_name or str(data.get("type") or "")
        if name == "error":
            raise stream_error(data)
        handler = getattr(self, f"_on_{name}", None)
        if handler is None:
            return []  # ping and event types added after this was written
        out: list[pb.StreamChatCompletionResponse] = handler(data)
        return out

    def _on_message_start(self, data: dict[str, Any]) -> list[pb.StreamChatCompletionResponse]:
        msg = data.get("message") or {}
        self.id = msg.get("id") or ""
        self.model = msg.get("model") or ""
        if isinstance(msg.get("usage"), dict):
            self.usage = dict(msg["usage"])
        return []

    def _on_content_block_start(self, data: dict[str, Any]) -> list[pb.StreamChatCompletionResponse]:
        index = int(data["index"])
        block = data.get("content_block") or {}
        kind = block.get("type")
        if kind == "text":
            self._blocks[index] = "text"
            return self._text(block.get("text") or "")
        if kind == "thinking":
            self._blocks[index] = "thinking"
            self._signed.append({"type": "thinking", "thinking": block.get("thinking") or "",
                                 "signature": block.get("signature") or ""})
            return self._thinking(block.get("thinking") or "")
        if kind == "redacted_thinking":
            self._signed.append({"type": "redacted_thinking", "data": block.get("data") or ""})
            return []
        if kind != "tool_use":
            return []  # server tools, …: nothing OpenAI can show
        initial = block.get("input")
        initial_json = orjson.dumps(initial).decode() if initial else ""
        if self.json_mode and block.get("name") == JSON_TOOL:
            self._blocks[index] = "json"
            self._json_seen = True
            self._held_text.clear()  # preamble before the JSON answer is not content
            return self._content(initial_json)
        self._blocks[index] = "tool"
        self._tool_index[index] = self._tools
        self._tools += 1
        self._tool_has_args[index] = bool(initial_json)
        call_id = encode_tool_call_id(block.get("id") or "", self._signed)
        self._signed = []
        c, delta = self._chunk()
        delta.tool_calls.add(index=self._tool_index[index], id=call_id,
                             type="function",
                             function=pb.FunctionCallDelta(name=block.get("name") or "",
                                                           arguments=initial_json))
        return [c]

    def _text(self, text: str) -> list[pb.StreamChatCompletionResponse]:
        if self.json_mode and not self._json_seen:
            if text:
                self._held_text.append(text)
            return []
        return self._content(text)

    def _thinking(self, text: str) -> list[pb.StreamChatCompletionResponse]:
        if not text:
            return []
        c, delta = self._chunk()
        delta.reasoning_content = text
        return [c]

    def _on_content_block_delta(self, data: dict[str, Any]) -> list[pb.StreamChatCompletionResponse]:
        index = int(data["index"])
        delta = data.get("delta") or {}
        kind = delta.get("type")
        block = self._blocks.get(index)
        if kind == "text_delta" and block == "text":
            return self._text(delta.get("text") or "")
        if kind == "thinking_delta" and block == "thinking":
            self._signed[-1]["thinking"] += delta.get("thinking") or ""
            return self._thinking(delta.get("thinking") or "")
        if kind == "signature_delta" and block == "thinking":
            self._signed[-1]["signature"] = delta.get("signature") or ""
            return []
        if kind == "input_json_delta":
            frag = delta.get("partial_json") or ""
            if block == "json":
                return self._content(frag)
            if block == "tool" and frag:
                self._tool_has_args[index] = True
                c, d = self._chunk()
                d.tool_calls.add(index=self._tool_index[index],
                                 function=pb.FunctionCallDelta(arguments=frag))
                return [c]
        return []  # signature_delta, citations_delta: nothing to relay

    def _on_content_block_stop(self, data: dict[str, Any]) -> list[pb.StreamChatCompletionResponse]:
        index = int(data["index"])
        if self._blocks.get(index) == "tool" and not self._tool_has_args.get(index):
            # A call without arguments: OpenAI clients expect a JSON object, not "".
            self._tool_has_args[index] = True
            c, d = self._chunk()
            d.tool_calls.add(index=self._tool_index[index],
                             function=pb.FunctionCallDelta(arguments="{}"))
            return [c]
        return []

    def _on_message_delta(self, data: dict[str, Any]) -> list[pb.StreamChatCompletionResponse]:
        delta = data.get("delta") or {}
        if delta.get("stop_reason"):
            self.stop_reason = delta["stop_reason"]
        usage = data.get("usage")
        if isinstance(usage, dict):
            # Cumulative counts: they replace, never add; absent ones keep message_start's.
            self.usage.update({k: v for k, v in usage.items() if v is not None})
        return []

    def _on_message_stop(self, data: dict[str, Any]) -> list[pb.StreamChatCompletionResponse]:
        self.done = True
        out = self._content("".join(self._held_text)) if self.json_mode else []
        self._held_text.clear()
        c, _ = self._chunk()
        c.choices[0].finish_reason = _finish(self.stop_reason, self._tools > 0)
        usage_from_wire(self.usage, c.usage)
        out.append(c)
        return out


# ----------------------------------------------------------------- client ----


class AnthropicClient(ProviderClient):
    def _url(self) -> str:
        base = self.channel.base_url
        return f"{base}/messages" if base.endswith("/v1") else f"{base}/v1/messages"

    def _headers(self) -> dict[str, str]:
        h = {"content-type": "application/json",
             "anthropic-version": Options.of(self.channel).version}
        if self.channel.api_key:
            h["x-api-key"] = self.channel.api_key
        return h

    def request(self, params: pb.ChatCompletionParams, model: str, *,
                stream: bool) -> UpstreamRequest:
        body = params_to_wire(params, model, stream=stream, options=Options.of(self.channel))
        return UpstreamRequest(self._url(), self._headers(), body)

    def reply(self, data: Any, params: pb.ChatCompletionParams,
              model: str) -> pb.CreateChatCompletionResponse:
        return response_from_wire(data, json_mode=uses_json_tool(params))

    def translator(self, params: pb.ChatCompletionParams, model: str) -> StreamTranslator:
        return StreamTranslator(json_mode=uses_json_tool(params))


SPEC = ProviderSpec(name="anthropic", default_base_url="https://api.anthropic.com", options=Options,
                    client=AnthropicClient)
