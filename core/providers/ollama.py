"""Ollama's native chat API (`POST {base}/api/chat`, NDJSON streaming): pure translate
functions between our messages and Ollama's wire JSON, plus a small client.

Channel: `provider: ollama`, `base_url: http://127.0.0.1:11434` (no `/api`). An
`api_key`, when set (Ollama's cloud, or a proxy in front of a local server), is sent as
`Authorization: Bearer <key>`.

Decisions (the README points here):
- Roles: system and developer → `system`; user, assistant, tool as they are.
- Content: Ollama takes one string per message, so text parts are joined with a
  newline (a boundary a model can see; words of two parts never glue together).
  An assistant turn's `refusal` is its content when it has no other content.
- Images travel only as base64 in the message's `images` list. A `data:` URL is
  unwrapped (its `data:<type>;base64,` prefix stripped; a non-base64 data URL is
  encoded). An `http(s)` image URL is REJECTED with a non-retryable 400 naming the
  part (`messages[i].content[j].image_url.url`): fetching arbitrary URLs from inside
  the gateway would make it a server-side request forger and add an unbounded
  download to the request path; clients should send a data: URL. Audio and unknown
  part types are rejected the same way rather than silently dropped.
- Tool-call arguments are JSON OBJECTS on Ollama's wire (our contract and OpenAI carry
  them as JSON text): ours are parsed, `""` means `{}`, and text that is not a JSON
  object is a 400 naming `messages[i].tool_calls[j].function.arguments` — Ollama
  itself would refuse a string with an unhelpful Go unmarshal error. Replies go the
  other way: objects become compact JSON text.
- Tool results carry `tool_name` (Ollama matches results to calls by function name),
  looked up from the assistant turn that made the call; a tool message's `name`
  is the fallback.
- Ollama has no tool_choice: `none` sends no tools (the model cannot call one);
  a named function sends only that tool; `auto`/`required` send all tools (Ollama
  cannot force a call — documented best effort). `strict` and `parallel_tool_calls`
  have no Ollama equivalent and are not sent.
- Ollama replies have no tool-call ids (newer servers may send one; it is kept):
  we generate `call_<random>_<n>`, unique per reply and stable across its chunks.
- response_format: `json_object` → `format: "json"`; `json_schema` → `format: <schema>`.
- options: temperature, top_p, num_predict (max_completion_tokens, else max_tokens),
  stop, seed, presence_penalty, frequency_penalty. Not sent (no Ollama equivalent):
  logit_bias, logprobs/top_logprobs, user, metadata, service tiers.
- reasoning_effort → `think`: "none" → false; any other level → true, or, with channel
  option `think_levels: true` (gpt-oss style models), the level itself
  ("minimal" → "low", "xhigh" → "high").
- `stream` is always sent explicitly: Ollama streams unless told `false`.
- n > 1 is a non-retryable 400 on param `n` (Ollama returns one choice).
- Fields outside our contract (`extra`): `options` (merged under ours, e.g. num_ctx),
  `keep_alive`, `think` and `format` reach Ollama; other unknown fields are not
  Ollama's and are not sent. Channel options `keep_alive` and `options` set defaults.
- Usage: prompt_eval_count / eval_count → prompt / completion tokens. Ollama reports
  no cached or reasoning counts (0). done_reason stop → stop, length → length; a
  reply with tool calls finishes with tool_calls.
- A stream line `{"error": "..."}` is an upstream failure (kind "stream"); a stream
  that ends without a `done: true` line was cut and is an error, never a silent end.

Ollama's OpenAI-compatible endpoint needs no code: a channel with `provider: openai`
and `base_url: http://127.0.0.1:11434/v1` goes through core/providers/openai.py
(set channel option `stream_usage: false` for Ollama versions that reject
`stream_options`). The native API here adds thinking, `keep_alive` and Ollama options.
"""

from __future__ import annotations

import base64
import secrets
import time
import urllib.parse
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any, Literal

import orjson
from pydantic import BeforeValidator, Field

from switchboard.core.config import AnyMap, Bool, ProviderOptions, ProviderSpec, problem
from switchboard.core.providers.base import (
    ProviderClient,
    UpstreamError,
    UpstreamRequest,
    bad_request,
    function_to_wire,
    loads_event,
    stream_error,
)
from switchboard.v1 import inference_pb2 as pb

ROLE_TO_WIRE = {
    pb.ROLE_SYSTEM: "system", pb.ROLE_DEVELOPER: "system", pb.ROLE_USER: "user",
    pb.ROLE_ASSISTANT: "assistant", pb.ROLE_TOOL: "tool",
}
FINISH_FROM_WIRE = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}
THINK_LEVELS = {"minimal": "low", "low": "low", "medium": "medium", "high": "high", "xhigh": "high"}
# Top-level Ollama request fields a client may pass through `extra` (see the docstring).
EXTRA_PASSTHROUGH = ("keep_alive", "think", "format")


def _keep_alive(v: object) -> str | int | float:
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        raise problem(f"expected a duration such as 10m, or seconds (-1: forever), got {v!r}")
    return v


class Options(ProviderOptions):
    """Channel `options` of `provider: ollama`."""

    keep_alive: Annotated[str | int | float | None, BeforeValidator(_keep_alive)] = Field(
        default=None, json_schema_extra={"yaml_type": "duration string or seconds"},
        description="how long Ollama keeps the model loaded (`10m`, seconds, -1: forever), "
                    "unless the request says")
    options: AnyMap = Field(default_factory=dict, description="Ollama model options (e.g. `num_ctx`) "
                            "under the request's own")
    think_levels: Bool = Field(default=False, description="send reasoning_effort as a level (`low` / "
                               "`medium` / `high`, gpt-oss style) instead of true")


_DEFAULTS = Options()


# ---------------------------------------------------------------- request ----


def image_to_wire(url: str, param: str) -> str:
    """An image URL → the bare base64 Ollama wants."""
    if url.startswith("data:"):
        header, sep, data = url[5:].partition(",")
        if not sep:
            raise bad_request("malformed data: URL (no comma)", param)
        if header.endswith(";base64"):
            return data.strip()
        return base64.b64encode(urllib.parse.unquote_to_bytes(data)).decode()
    if url.startswith(("http://", "https://")):
        raise bad_request(
            "Ollama accepts only inline images; this gateway does not fetch image URLs. "
            "Send the image as a data: URL (data:image/png;base64,...).", param)
    raise bad_request("unsupported image URL scheme (use a data: URL)", param)


def content_to_wire(m: pb.Message, i: int) -> tuple[str, list[str]]:
    """A message's content → (text, base64 images)."""
    kind = m.WhichOneof("content")
    if kind == "text":
        return m.text, []
    if kind != "parts":
        return "", []
    texts: list[str] = []
    images: list[str] = []
    for j, p in enumerate(m.parts.parts):
        part = p.WhichOneof("part")
        where = f"messages[{i}].content[{j}]"
        if part == "text":
            texts.append(p.text)
        elif part == "refusal":
            texts.append(p.refusal)
        elif part == "image_url":
            images.append(image_to_wire(p.image_url.url, f"{where}.image_url.url"))
        elif part == "input_audio":
            raise bad_request("Ollama does not accept audio input", where)
        else:
            raise bad_request("content part type not supported by Ollama", where)
    return "\n".join(texts), images


def arguments_to_wire(text: str, param: str) -> dict[str, Any]:
    """Our tool-call arguments (JSON text) → the JSON object Ollama requires."""
    if not text.strip():
        return {}
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise bad_request("tool-call arguments are not valid JSON; Ollama needs a JSON object",
                          param) from None
    if not isinstance(value, dict):
        raise bad_request("tool-call arguments must be a JSON object for Ollama", param)
    return value


def message_to_wire(m: pb.Message, i: int, tool_names: Mapping[str, str]) -> dict[str, Any]:
    text, images = content_to_wire(m, i)
    if not text and m.HasField("refusal"):
        text = m.refusal
    d: dict[str, Any] = {"role": ROLE_TO_WIRE.get(m.role, "user"), "content": text}
    if images:
        d["images"] = images
    if m.role == pb.ROLE_ASSISTANT:
        if m.HasField("reasoning_content") and m.reasoning_content:
            d["thinking"] = m.reasoning_content
        if m.tool_calls:
            d["tool_calls"] = [
                {"function": {"name": tc.function.name, "arguments": arguments_to_wire(
                    tc.function.arguments, f"messages[{i}].tool_calls[{j}].function.arguments")}}
                for j, tc in enumerate(m.tool_calls)]
    elif m.role == pb.ROLE_TOOL:
        name = tool_names.get(m.tool_call_id) if m.HasField("tool_call_id") else None
        name = name or (m.name if m.HasField("name") else None)
        if name:
            d["tool_name"] = name
    return d


def tool_to_wire(t: pb.Tool) -> dict[str, Any]:
    # Unlike OpenAI: always "function", always a parameters object, no `strict`.
    fn = function_to_wire(t, default_schema={"type": "object", "properties": {}})
    return {"type": "function", "function": fn}


def tools_to_wire(p: pb.ChatCompletionParams) -> list[dict[str, Any]]:
    choice = p.tool_choice.WhichOneof("choice")
    if choice == "mode" and p.tool_choice.mode == "none":
        return []
    tools = list(p.tools)
    if choice == "function_name":
        tools = [t for t in tools if t.function.name == p.tool_choice.function_name]
        if not tools:
            raise bad_request(f"tool_choice names `{p.tool_choice.function_name}`, which is not "
                              "in tools", "tool_choice")
    return [tool_to_wire(t) for t in tools]


def options_to_wire(p: pb.ChatCompletionParams) -> dict[str, Any]:
    o: dict[str, Any] = {}
    # Optional fields Ollama takes under the same option name (typed: HasField checks them).
    same: tuple[Literal["temperature", "top_p", "seed", "presence_penalty", "frequency_penalty"], ...] = (
        "temperature", "top_p", "seed", "presence_penalty", "frequency_penalty")
    for name in same:
        if p.HasField(name):
            o[name] = getattr(p, name)
    if p.HasField("max_completion_tokens"):
        o["num_predict"] = p.max_completion_tokens
    elif p.HasField("max_tokens"):
        o["num_predict"] = p.max_tokens
    if p.stop:
        o["stop"] = list(p.stop)
    return o


def think_to_wire(effort: str, levels: bool) -> bool | str:
    if effort == "none":
        return False
    return THINK_LEVELS.get(effort, "high") if levels else True


def params_to_wire(p: pb.ChatCompletionParams, model: str, *, stream: bool,
                   channel_options: Options | None = None) -> dict[str, Any]:
    """Our request → an Ollama /api/chat body for `model` (the upstream name)."""
    if p.HasField("n") and p.n > 1:
        raise bad_request("Ollama returns one choice per request; n must be 1", "n")
    copts = channel_options or _DEFAULTS
    tool_names = {tc.id: tc.function.name for m in p.messages for tc in m.tool_calls if tc.id}
    d: dict[str, Any] = {
        "model": model,
        "messages": [message_to_wire(m, i, tool_names) for i, m in enumerate(p.messages)],
        "stream": stream,
    }
    tools = tools_to_wire(p)
    if tools:
        d["tools"] = tools
    fmt = p.response_format.WhichOneof("format")
    if fmt == "json_object":
        d["format"] = "json"
    elif fmt == "json_schema":
        schema = p.response_format.json_schema.schema_json
        d["format"] = orjson.loads(schema) if schema else "json"
    if p.HasField("reasoning_effort"):
        d["think"] = think_to_wire(p.reasoning_effort, copts.think_levels)
    extra = {k: orjson.loads(v) for k, v in p.extra.items()}
    for key in EXTRA_PASSTHROUGH:
        if key in extra and key not in d:
            d[key] = extra[key]
    if "keep_alive" not in d and copts.keep_alive is not None:
        d["keep_alive"] = copts.keep_alive
    options: dict[str, Any] = {}
    for layer in (copts.options, extra.get("options")):
        if isinstance(layer, dict):
            options.update(layer)
    options.update(options_to_wire(p))
    if options:
        d["options"] = options
    return d


# ---------------------------------------------------------------- replies ----


def created_from_wire(value: Any) -> int:
    """Ollama's RFC 3339 `created_at` (nanosecond precision) → Unix seconds."""
    if isinstance(value, str) and value:
        try:
            return int(datetime.fromisoformat(value).timestamp())
        except ValueError:
            pass
    return int(time.time())


class CallIds:
    """Tool-call ids for one reply: `call_<random>_<n>`, unique, in order of appearance."""

    def __init__(self) -> None:
        self.prefix = f"call_{secrets.token_hex(6)}_"
        self.count = 0

    def next(self, wire_id: Any) -> str:
        n = self.count
        self.count += 1
        return wire_id if isinstance(wire_id, str) and wire_id else f"{self.prefix}{n}"


def arguments_from_wire(value: Any) -> str:
    if isinstance(value, str):
        return value  # not Ollama's shape, but relay text as the model produced it
    return orjson.dumps(value if value is not None else {}).decode()


def usage_from_wire(d: Mapping[str, Any], out: pb.Usage) -> None:
    out.prompt_tokens = int(d.get("prompt_eval_count") or 0)
    out.completion_tokens = int(d.get("eval_count") or 0)
    out.total_tokens = out.prompt_tokens + out.completion_tokens


def finish_from_wire(done_reason: Any, had_tool_calls: bool) -> pb.FinishReason.ValueType:
    if had_tool_calls:
        return pb.FINISH_REASON_TOOL_CALLS
    return FINISH_FROM_WIRE.get(done_reason or "stop", pb.FINISH_REASON_STOP)


def new_id() -> str:
    return f"chatcmpl-{secrets.token_hex(12)}"


def response_from_wire(d: Any) -> pb.CreateChatCompletionResponse:
    """An Ollama /api/chat reply (stream: false) → our reply (UpstreamError if malformed)."""
    if isinstance(d, dict) and (err := d.get("error")):
        raise stream_error(err)
    try:
        msg = d.get("message") or {}
        r = pb.CreateChatCompletionResponse(id=new_id(), created=created_from_wire(d.get("created_at")),
                                            model=d.get("model") or "")
        ch = r.choices.add(index=0)
        m = ch.message
        m.content = msg.get("content") or ""
        if msg.get("thinking"):
            m.reasoning_content = msg["thinking"]
        ids = CallIds()
        for tc in msg.get("tool_calls") or ():
            fn = tc.get("function") or {}
            m.tool_calls.add(id=ids.next(tc.get("id")), type="function",
                             function=pb.FunctionCall(name=fn.get("name") or "",
                                                      arguments=arguments_from_wire(fn.get("arguments"))))
        if m.tool_calls and not m.content:
            m.ClearField("content")  # OpenAI: content is null on a tool-calls-only turn
        ch.finish_reason = finish_from_wire(d.get("done_reason"), bool(m.tool_calls))
        usage_from_wire(d, r.usage)
        return r
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UpstreamError(f"malformed chat reply from upstream ({type(exc).__name__})",
                            retryable=True, kind="malformed") from None


class StreamTranslator:
    """Ollama NDJSON stream objects → our stream messages, one `feed` per line.

    `done` turns true at the `done: true` line, whose chunk carries the finish reason
    and usage. Tool calls arrive whole; each gets the next index.
    """

    def __init__(self, model: str = "") -> None:
        self.id = new_id()
        self.model = model
        self.created: int | None = None
        self.done = False
        self._role_sent = False
        self._ids = CallIds()

    def _chunk(self) -> pb.StreamChatCompletionResponse:
        r = pb.StreamChatCompletionResponse(id=self.id, created=self.created or 0, model=self.model)
        if not self._role_sent:
            r.choices.add(index=0).delta.role = pb.ROLE_ASSISTANT
            self._role_sent = True
        else:
            r.choices.add(index=0)
        return r

    def frame(self, event: str, line: bytes) -> list[pb.StreamChatCompletionResponse]:
        return self.feed(loads_event(line))

    def end(self) -> list[pb.StreamChatCompletionResponse]:
        raise UpstreamError("upstream stream ended before its final `done` line",
                            retryable=True, kind="stream")

    def feed(self, obj: Any) -> list[pb.StreamChatCompletionResponse]:
        if isinstance(obj, dict) and (err := obj.get("error")):
            raise stream_error(err)
        if self.done:
            return []  # nothing follows the final line
        try:
            return self._feed(obj)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise UpstreamError(f"malformed stream line from upstream ({type(exc).__name__})",
                                retryable=True, kind="malformed") from None

    def _feed(self, obj: dict[str, Any]) -> list[pb.StreamChatCompletionResponse]:
        if self.created is None:
            self.created = created_from_wire(obj.get("created_at"))
        self.model = obj.get("model") or self.model
        msg = obj.get("message") or {}
        content, thinking = msg.get("content") or "", msg.get("thinking") or ""
        calls = msg.get("tool_calls") or []
        done = bool(obj.get("done"))
        if not (content or thinking or calls or done):
            return []
        chunk = self._chunk()
        delta = chunk.choices[0].delta
        if content:
            delta.content = content
        if thinking:
            delta.reasoning_content = thinking
        for tc in calls:
            fn = tc.get("function") or {}
            index = self._ids.count
            delta.tool_calls.add(index=index, id=self._ids.next(tc.get("id")), type="function",
                                 function=pb.FunctionCallDelta(
                                     name=fn.get("name") or "",
                                     arguments=arguments_from_wire(fn.get("arguments"))))
        if done:
            self.done = True
            chunk.choices[0].finish_reason = finish_from_wire(obj.get("done_reason"),
                                                              self._ids.count > 0)
            usage_from_wire(obj, chunk.usage)
        return [chunk]


# ----------------------------------------------------------------- client ----


class OllamaClient(ProviderClient):
    frames = "ndjson"

    def _url(self) -> str:
        return f"{self.channel.base_url.rstrip('/')}/api/chat"

    def _headers(self) -> dict[str, str]:
        h = {"content-type": "application/json"}
        if self.channel.api_key:
            h["authorization"] = f"Bearer {self.channel.api_key}"
        return h

    def request(self, params: pb.ChatCompletionParams, model: str, *,
                stream: bool) -> UpstreamRequest:
        body = params_to_wire(params, model, stream=stream, channel_options=Options.of(self.channel))
        return UpstreamRequest(self._url(), self._headers(), body)

    def reply(self, data: Any, params: pb.ChatCompletionParams,
              model: str) -> pb.CreateChatCompletionResponse:
        return response_from_wire(data)

    def translator(self, params: pb.ChatCompletionParams, model: str) -> StreamTranslator:
        return StreamTranslator(model)


SPEC = ProviderSpec(name="ollama", default_base_url="http://127.0.0.1:11434", options=Options,
                    client=OllamaClient)
