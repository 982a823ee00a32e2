"""Runs the real gateway in-process for tests: the same `Runtime` the CLI uses, on
loopback port 0, with a gRPC stub and URLs ready. Nothing here stands in for our code."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc

from switchboard.core.composition.runtime import Runtime
from switchboard.core.config import Config, load_config_text
from switchboard.core.gateway import Gateway
from switchboard.core.usage import MemoryUsageSink
from switchboard.v1 import inference_pb2_grpc as pb_grpc

TEST_KEY = "sk-test-key-0123456789"
AUTH = (("authorization", f"Bearer {TEST_KEY}"),)


def make_config(yaml_text: str, **env: str) -> Config:
    """A Config from YAML text (goes through the real parser); `keys` defaults to TEST_KEY
    and `store` to an in-memory SQLite database."""
    if "\nstore:" not in "\n" + yaml_text:
        yaml_text += '\nstore: "sqlite://:memory:"\n'  # never a file in the working directory
    if "shutdown_grace_s" not in yaml_text:
        yaml_text += "\nshutdown_grace_s: 1\n"  # test stacks stop quickly
    if "\nkeys:" not in "\n" + yaml_text:
        yaml_text += f"\nkeys: [{{name: test, key: {TEST_KEY}}}]\n"
    return load_config_text(yaml_text, "<test>", env={"TEST_KEY": TEST_KEY, **env})


def channel_yaml(name: str, provider: str, base_url: str, models: list[str], **extra: object) -> str:
    lines = [f"  - name: {name}", f"    provider: {provider}", f"    base_url: {base_url}",
             f"    api_key: upstream-secret-{name}", f"    models: [{', '.join(models)}]"]
    lines += [f"    {k}: {v}" for k, v in extra.items()]
    return "\n".join(lines)


@dataclass
class Stack:
    runtime: Runtime
    gateway: Gateway
    usage: MemoryUsageSink
    http_url: str          # e.g. http://127.0.0.1:4711 (OpenAI base_url is http_url + "/v1")
    grpc_target: str       # e.g. 127.0.0.1:4712
    channel: grpc.aio.Channel
    stub: pb_grpc.InferenceServiceStub

    @property
    def base_url(self) -> str:
        return self.http_url + "/v1"


@asynccontextmanager
async def running_stack(config: Config, *, split: bool = False) -> AsyncIterator[Stack]:
    """Core + façade on port 0. split=True runs the façade as a real gRPC client of the
    core (two Runtimes, as `switchboard core` + `switchboard facade` would)."""
    usage = MemoryUsageSink()
    gateway = Gateway(config, usage=usage)
    core = Runtime("core" if split else "serve", config, http="127.0.0.1:0",
                   grpc_addr="127.0.0.1:0", gateway=gateway)
    await core.start()
    facade = None
    if split:
        facade = Runtime("facade", config, http="127.0.0.1:0", core_target=core.grpc_target)
        await facade.start()
    channel = grpc.aio.insecure_channel(core.grpc_target)
    try:
        yield Stack(runtime=core, gateway=gateway, usage=usage,
                    http_url=(facade or core).http_url, grpc_target=core.grpc_target,
                    channel=channel, stub=pb_grpc.InferenceServiceStub(channel))
    finally:
        await channel.close()
        if facade is not None:
            await facade.stop()
        await core.stop()
