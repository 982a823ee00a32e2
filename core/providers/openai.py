"""OpenAI Chat Completions and any OpenAI-compatible server (vLLM, LM Studio, DeepSeek,
Ollama's /v1, …): pure translate functions between our messages and the wire JSON,
plus a small client.

Decisions:
- Streams always ask the upstream for usage (`stream_options.include_usage`) so the
  ledger has real figures; whether the client sees the usage chunk is the façade's
  business. Set channel option `stream_usage: false` for servers that reject it.
- Fields the contract does not model (`extra` maps) are relayed untouched.
- A stream that ends with neither `[DONE]` nor a finish reason was cut: it is an
  error, never a silent end.
"""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import Field

from switchboard.core.config import Bool, ChannelConfig, ProviderOptions, ProviderSpec
from switchboard.core.providers.base import (
    HttpPool,
    ProviderClient,
    UpstreamError,
    UpstreamRequest,
    function_to_wire,
    loads_event,
    stream_error,
)
from switchboard.v1 import inference_pb2 as pb

ROLE_TO_WIRE = {
    pb.ROLE_SYSTEM: "system", pb.ROLE_DEVELOPER: "developer", pb.ROLE_USER: "user",
    pb.ROLE_ASSISTANT: "assistant", pb.ROLE_TOOL: "tool",
}
FINISH_FROM_WIRE = {
    "stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH,
    "tool_calls": pb.FINISH_REASON_TOOL_CALLS, "content_filter": pb.FINISH_REASON_CONTENT_FILTER,
    "function_call": pb.FINISH_REASON_FUNCTION_CALL,
}



class Options(ProviderOptions):
    """Channel `options` of `provider: openai`."""

    stream_usage: Bool = Field(default=True, description="ask streams for usage (`stream_options."
                                                 "include_usage`); false for servers that reject it")


# ---------------------------------------------------------------- request ----


def part_to_wire(p: pb.ContentPart) -> Any:
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


def message_to_wire(m: pb.Message) -> dict[str, Any]:
    d: dict[str, Any] = {"role": ROLE_TO_WIRE.get(m.role, "user")}
    kind = m.WhichOneof("content")
    if kind == "text":
        d["content"] = m.text
    elif kind == "parts":
        d["content"] = [part_to_wire(p) for p in m.parts.parts]
    else:
        d["content"] = None
    if m.HasField("name"):
        d["name"] = m.name
    if m.tool_calls:
        d["tool_calls"] = [
            {"id": tc.id, "type": tc.type or "function",
             "function": {"name": tc.function.name, "arguments": tc.function.arguments}}
            for tc in m.tool_calls
        ]
    if m.HasField("tool_call_id"):
        d["tool_call_id"] = m.tool_call_id
    if m.HasField("refusal"):
        d["refusal"] = m.refusal
    if m.HasField("reasoning_content"):
        d["reasoning_content"] = m.reasoning_content
    for k, v in m.extra.items():
        d[k] = orjson.loads(v)
    return d


def params_to_wire(p: pb.ChatCompletionParams, model: str, *, stream: bool,
                   stream_usage: bool = True) -> dict[str, Any]:
    """Our request → an OpenAI chat completion body for `model` (the upstream name)."""
    d: dict[str, Any] = {"model": model, "messages": [message_to_wire(m) for m in p.messages]}
    for name in ("temperature", "top_p", "n", "max_tokens", "max_completion_tokens",
                 "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs", "seed",
                 "user", "parallel_tool_calls", "reasoning_effort"):
        if p.HasField(name):
            d[name] = getattr(p, name)
    if p.stop:
        d["stop"] = list(p.stop)
    if p.logit_bias:
        d["logit_bias"] = dict(p.logit_bias)
    if p.metadata:
        d["metadata"] = dict(p.metadata)
    if p.tools:
        d["tools"] = [tool_to_wire(t) for t in p.tools]
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


def tool_to_wire(t: pb.Tool) -> dict[str, Any]:
    fn = function_to_wire(t)  # no parameters: none sent (OpenAI's own default)
    if t.function.HasField("strict"):
        fn["strict"] = t.function.strict
    return {"type": t.type or "function", "function": fn}


# ---------------------------------------------------------------- replies ----


def usage_from_wire(u: Any, out: pb.Usage) -> None:
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


_MESSAGE_KNOWN = {"role", "content", "refusal", "tool_calls", "reasoning_content", "reasoning"}


def response_from_wire(d: Any) -> pb.CreateChatCompletionResponse:
    """An OpenAI chat.completion object → our reply (UpstreamError if malformed)."""
    try:
        r = pb.CreateChatCompletionResponse(
            id=d.get("id") or "", created=int(d.get("created") or 0), model=d.get("model") or "",
            system_fingerprint=d.get("system_fingerprint") or "",
            service_tier=d.get("service_tier") or "")
        for c in d["choices"]:
            ch = r.choices.add(index=int(c.get("index") or 0),
                               finish_reason=FINISH_FROM_WIRE.get(c.get("finish_reason") or "", 0))
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
                if k not in _MESSAGE_KNOWN and v is not None:
                    m.extra[k] = orjson.dumps(v).decode()
            if c.get("logprobs") is not None:
                ch.logprobs_json = orjson.dumps(c["logprobs"]).decode()
        usage_from_wire(d.get("usage"), r.usage)
        return r
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UpstreamError(f"malformed chat completion from upstream ({type(exc).__name__})",
                            retryable=True, kind="malformed") from None


def chunk_from_wire(d: Any) -> pb.StreamChatCompletionResponse:
    """An OpenAI chat.completion.chunk object → our stream message."""
    try:
        # Runs once per streamed token: only non-empty values are set (an unset proto3
        # scalar and an empty one are the same message), which halves the cost.
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
                ch.finish_reason = FINISH_FROM_WIRE.get(v, pb.FINISH_REASON_UNSPECIFIED)
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
                ch.logprobs_json = orjson.dumps(c["logprobs"]).decode()
        usage_from_wire(d.get("usage"), r.usage)
        return r
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UpstreamError(f"malformed stream chunk from upstream ({type(exc).__name__})",
                            retryable=True, kind="malformed") from None


def image_to_wire(req: pb.CreateImageRequest, model: str) -> dict[str, Any]:
    d: dict[str, Any] = {"prompt": req.prompt, "model": model}
    for name in ("n", "size", "quality", "style", "response_format", "user"):
        if req.HasField(name):
            d[name] = getattr(req, name)
    for k, v in req.extra.items():
        d[k] = orjson.loads(v)
    return d


def image_from_wire(d: Any) -> pb.CreateImageResponse:
    try:
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
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UpstreamError(f"malformed image reply from upstream ({type(exc).__name__})",
                            retryable=True, kind="malformed") from None


class StreamTranslator:
    """OpenAI SSE `data:` frames -> our chunks: one chunk per frame until `[DONE]`.

    A body that ends with neither `[DONE]` nor a finish reason was cut (`end` raises)."""

    __slots__ = ("done", "finished")

    def __init__(self) -> None:
        self.done = False
        self.finished = False

    def frame(self, event: str, data: bytes) -> tuple[pb.StreamChatCompletionResponse, ...]:
        if data == b"[DONE]":
            self.done = True
            return ()
        obj = loads_event(data)
        if isinstance(obj, dict) and (err := obj.get("error")):
            raise stream_error(err)
        chunk = chunk_from_wire(obj)
        if not self.finished:
            for c in chunk.choices:
                if c.finish_reason:
                    self.finished = True
        return (chunk,)

    def end(self) -> tuple[pb.StreamChatCompletionResponse, ...]:
        if not self.finished:
            raise UpstreamError("upstream stream ended before it finished", retryable=True,
                                kind="stream")
        return ()


# ----------------------------------------------------------------- client ----


class OpenAIClient(ProviderClient):
    supports_images = True

    def __init__(self, channel: ChannelConfig, http: HttpPool) -> None:
        super().__init__(channel, http)
        # Built once per client (a channel's settings never change; a reload makes new
        # clients); aiohttp copies headers into each request, so sharing them is safe.
        self._hdrs = {"content-type": "application/json"}
        if channel.api_key:
            self._hdrs.update(self.auth_headers(channel.api_key))
        self._chat_url = f"{channel.base_url}/chat/completions"

    def auth_headers(self, api_key: str) -> dict[str, str]:
        return {"authorization": f"Bearer {api_key}"}

    def chat_url(self, model: str) -> str:
        return self._chat_url

    def images_url(self, model: str) -> str:
        return f"{self.channel.base_url}/images/generations"

    def _headers(self) -> dict[str, str]:
        return self._hdrs

    def request(self, params: pb.ChatCompletionParams, model: str, *,
                stream: bool) -> UpstreamRequest:
        body = params_to_wire(params, model, stream=stream,
                              stream_usage=Options.of(self.channel).stream_usage)
        return UpstreamRequest(self.chat_url(model), self._headers(), body)

    def reply(self, data: Any, params: pb.ChatCompletionParams,
              model: str) -> pb.CreateChatCompletionResponse:
        return response_from_wire(data)

    def translator(self, params: pb.ChatCompletionParams, model: str) -> StreamTranslator:
        return StreamTranslator()

    async def create_image(self, req: pb.CreateImageRequest, model: str) -> pb.CreateImageResponse:
        data = await self.post_json(self.images_url(model), image_to_wire(req, model),
                                    self._headers())
        return image_from_wire(data)


SPEC = ProviderSpec(name="openai", default_base_url="https://api.openai.com/v1", options=Options,
                    client=OpenAIClient)
