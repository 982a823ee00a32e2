"""Azure OpenAI (the deployment-based data-plane API): OpenAI's wire format, addressed
and authenticated the Azure way. Everything about the body, the reply and the stream
is core/providers/openai.py; this module holds only Azure's differences.

Channel: `provider: azure`, `base_url: https://<resource>.openai.azure.com` (there is no
default: every resource has its own), `api_key`: the resource's key. The channel's
upstream model names (`models`, `model_map` values) are DEPLOYMENT names, e.g.
`model_map: {gpt-4o: prod-gpt4o}`.

Channel options:
- `api_version`: the `api-version` query parameter (default "2024-10-21", a GA version).
- `stream_usage: false`, as for `openai`, for API versions older than 2024-09-01-preview,
  which reject `stream_options`.

Decisions:
- Chat: `POST {base}/openai/deployments/{deployment}/chat/completions?api-version=…`;
  images: `…/deployments/{deployment}/images/generations?api-version=…` — the paths and
  query the official `openai` SDK's `AzureOpenAI` client uses. The deployment name is
  percent-encoded as one path segment.
- Auth: the `api-key` header, never `Authorization`. For Microsoft Entra ID instead of a
  key, leave `api_key` empty and set `headers: {authorization: "Bearer <token>"}`.
- The body is OpenAI's, `model` included (Azure ignores it: the deployment decides).
  Replies name the deployed model's version (e.g. `gpt-4o-2024-11-20`), relayed as is.
- With content filtering on, Azure opens a stream with a chunk that has no choices, no
  id and no usage, only `prompt_filter_results`; it is dropped (a client would see an
  empty chunk with an empty id). `content_filter_results` / `prompt_filter_results` are
  not relayed (the contract has no field for them); a filtered answer still ends with
  finish_reason `content_filter`.
"""

from __future__ import annotations

import datetime
from typing import Annotated, Any
from urllib.parse import quote

from pydantic import BeforeValidator, Field

from switchboard.core.config import ChannelConfig, ProviderSpec, Str
from switchboard.core.providers import openai
from switchboard.core.providers.base import HttpPool
from switchboard.core.providers.openai import OpenAIClient, StreamTranslator
from switchboard.v1 import inference_pb2 as pb

DEFAULT_API_VERSION = "2024-10-21"


def _version(v: Any) -> Any:
    # YAML reads an unquoted 2024-10-21 as a date; Azure's versions look just like that.
    return v.isoformat() if isinstance(v, datetime.date) else v


class Options(openai.Options):
    """Channel `options` of `provider: azure` (`stream_usage` as for `openai`)."""

    api_version: Annotated[Str, BeforeValidator(_version)] = Field(
        default=DEFAULT_API_VERSION, description="the `api-version` query parameter of every call "
        "(e.g. `2024-10-21`, `2025-04-01-preview`)")


class AzureStreamTranslator(StreamTranslator):
    """OpenAI's translator minus Azure's content-filter preamble (see the module doc)."""

    __slots__ = ()

    def frame(self, event: str, data: bytes) -> tuple[pb.StreamChatCompletionResponse, ...]:
        chunks = super().frame(event, data)
        if chunks and not chunks[0].choices and not chunks[0].HasField("usage"):
            return ()
        return chunks


class AzureOpenAIClient(OpenAIClient):
    def __init__(self, channel: ChannelConfig, http: HttpPool) -> None:
        super().__init__(channel, http)
        # Read once: a channel never changes (a reload makes a new client).
        version = Options.of(channel).api_version
        self._query = f"?api-version={quote(version, safe='')}"
        self._base = f"{channel.base_url}/openai/deployments/"

    def auth_headers(self, api_key: str) -> dict[str, str]:
        return {"api-key": api_key}

    def chat_url(self, model: str) -> str:
        return f"{self._base}{quote(model, safe='')}/chat/completions{self._query}"

    def images_url(self, model: str) -> str:
        return f"{self._base}{quote(model, safe='')}/images/generations{self._query}"

    def translator(self, params: pb.ChatCompletionParams, model: str) -> StreamTranslator:
        return AzureStreamTranslator()


# No default base URL: every Azure resource has its own endpoint.
SPEC = ProviderSpec(name="azure", default_base_url="", options=Options, client=AzureOpenAIClient)
