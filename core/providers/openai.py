"""OpenAI Chat Completions and any OpenAI-compatible server (vLLM, LM Studio, DeepSeek,
Ollama's /v1, …): a small client over the OpenAI wire schema (core/schema/openai.py,
which owns every mapping between our messages and the JSON, shared with the façade).

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

from pydantic import Field

from switchboard.core.config import Bool, ChannelConfig, ProviderOptions, ProviderSpec
from switchboard.core.providers.base import (
    HttpPool,
    ProviderClient,
    UpstreamError,
    UpstreamRequest,
    loads_event,
    stream_error,
)
from switchboard.core.schema import openai as schema
from switchboard.v1 import inference_pb2 as pb

# The wire schema (tables, both directions) is core/schema/openai.py, shared with the
# façade; this module adds what is the provider's: the upstream error policy and the client.
params_to_wire = schema.params_to_json
image_to_wire = schema.image_request_to_json


class Options(ProviderOptions):
    """Channel `options` of `provider: openai`."""

    stream_usage: Bool = Field(default=True, description="ask streams for usage (`stream_options."
                                                 "include_usage`); false for servers that reject it")


def _malformed(what: str, exc: Exception) -> UpstreamError:
    return UpstreamError(f"malformed {what} from upstream ({type(exc).__name__})",
                         retryable=True, kind="malformed")


def response_from_wire(d: Any) -> pb.CreateChatCompletionResponse:
    """An OpenAI chat.completion object → our reply (UpstreamError if malformed)."""
    try:
        return schema.reply_from_json(d)
    except schema.MALFORMED as exc:
        raise _malformed("chat completion", exc) from None


def chunk_from_wire(d: Any) -> pb.StreamChatCompletionResponse:
    """An OpenAI chat.completion.chunk object → our stream message (UpstreamError if malformed)."""
    try:
        return schema.chunk_from_json(d)
    except schema.MALFORMED as exc:
        raise _malformed("stream chunk", exc) from None


def image_from_wire(d: Any) -> pb.CreateImageResponse:
    try:
        return schema.image_reply_from_json(d)
    except schema.MALFORMED as exc:
        raise _malformed("image reply", exc) from None


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
