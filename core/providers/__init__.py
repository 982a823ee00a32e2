"""Upstream providers: one module per wire format, each pure translate functions plus a
small client. This registry is the one place that maps a channel's `provider` name to
its client class."""

from __future__ import annotations

from switchboard.core.config import ChannelConfig
from switchboard.core.providers.anthropic import AnthropicClient
from switchboard.core.providers.azure import AzureOpenAIClient
from switchboard.core.providers.base import HttpPool, ProviderClient
from switchboard.core.providers.echo import EchoClient
from switchboard.core.providers.gemini import GeminiClient
from switchboard.core.providers.ollama import OllamaClient
from switchboard.core.providers.openai import OpenAIClient

PROVIDERS: dict[str, type[ProviderClient]] = {
    "openai": OpenAIClient,
    "echo": EchoClient,
    "anthropic": AnthropicClient,
    "gemini": GeminiClient,
    "ollama": OllamaClient,
    "azure": AzureOpenAIClient,
}


def make_client(channel: ChannelConfig, http: HttpPool) -> ProviderClient:
    try:
        cls = PROVIDERS[channel.provider]
    except KeyError:
        raise ValueError(f"provider {channel.provider!r} is not available in this build") from None
    return cls(channel, http)
