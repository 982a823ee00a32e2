"""Upstream providers: one module per wire format, each pure translate functions plus a
small client. Each module declares a `SPEC` (core/config.py ProviderSpec): its name in
`provider:`, its default base URL, its channel `options` model and its client. This
registry is the one place that lists them: adding a provider is one module and one line
here. The config validates channels against it when it loads."""

from __future__ import annotations

from switchboard.core.config import ChannelConfig, ProviderSpec
from switchboard.core.providers import anthropic, azure, echo, gemini, ollama, openai
from switchboard.core.providers.base import HttpPool, ProviderClient

SPECS: dict[str, ProviderSpec] = {spec.name: spec for spec in (
    openai.SPEC,
    anthropic.SPEC,
    gemini.SPEC,
    ollama.SPEC,
    echo.SPEC,
    azure.SPEC,
)}
# name -> client class
PROVIDERS: dict[str, type[ProviderClient]] = {name: spec.client for name, spec in SPECS.items()}


def make_client(channel: ChannelConfig, http: HttpPool) -> ProviderClient:
    try:
        cls = PROVIDERS[channel.provider]
    except KeyError:
        raise ValueError(f"provider {channel.provider!r} is not available in this build") from None
    return cls(channel, http)
