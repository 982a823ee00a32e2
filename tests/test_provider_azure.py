"""The Azure OpenAI provider (core/providers/azure.py) against a fake Azure deployment API
(tests/fakes/openai_upstream.py `FakeAzureOpenAI`), which is first checked against the
official `openai` SDK's `AzureOpenAI` client: the gateway must address Azure exactly as
that client does. The shared scenarios run in tests/test_conformance.py too."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import grpc
import httpx
import openai
import pytest

from switchboard.core.config import ConfigError
from switchboard.core.providers.azure import DEFAULT_API_VERSION
from switchboard.v1 import inference_pb2 as pb
from tests.fakes.openai_upstream import FakeAzureOpenAI
from tests.harness import AUTH, TEST_KEY, Stack, channel_yaml, make_config, running_stack

KEY = "upstream-secret-az"  # what channel_yaml gives channel "az"
HI = [{"role": "user", "content": "hello there"}]


@pytest.fixture
async def fake() -> AsyncIterator[FakeAzureOpenAI]:
    f = FakeAzureOpenAI()
    await f.start()
    yield f
    await f.close()


@pytest.fixture
async def stack(fake: FakeAzureOpenAI) -> AsyncIterator[Stack]:
    cfg = make_config("channels:\n" + channel_yaml(
        "az", "azure", fake.url, ["dall-e-3"], model_map="{gpt-4o: prod-gpt4o}",
        options="{api_version: 2024-06-01}") + "\nrouter: {backoff_ms: 0, max_attempts: 1}\n")
    async with running_stack(cfg) as s:
        yield s


def gateway_sdk(stack: Stack) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=stack.base_url, api_key=TEST_KEY, max_retries=0)


async def test_the_fake_serves_the_official_azure_client(fake: FakeAzureOpenAI) -> None:
    """The fake answers AzureOpenAI's own requests (paths, query, api-key), so it is a
    fair stand-in; what it logged is what a real Azure resource would have received."""
    sdk = openai.AsyncAzureOpenAI(azure_endpoint=fake.url, api_key=KEY,
                                  api_version=DEFAULT_API_VERSION, max_retries=0)
    r = await sdk.chat.completions.create(model="prod-gpt4o", messages=HI)  # type: ignore[arg-type]
    assert r.choices[0].message.content == "You said: hello there"
    stream = await sdk.chat.completions.create(model="prod-gpt4o", messages=HI, stream=True,  # type: ignore[arg-type]
                                               stream_options={"include_usage": True})
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "You said: hello there"
    await sdk.close()
    assert fake.calls == [("prod-gpt4o", DEFAULT_API_VERSION)] * 2
    assert all(h["api-key"] == KEY and "authorization" not in h for h in fake.headers)


async def test_gateway_addresses_azure_as_the_official_client_does(
        fake: FakeAzureOpenAI, stack: Stack) -> None:
    sdk = openai.AsyncAzureOpenAI(azure_endpoint=fake.url, api_key=KEY,
                                  api_version="2024-06-01", max_retries=0)
    await sdk.chat.completions.create(model="prod-gpt4o", messages=HI)  # type: ignore[arg-type]
    await sdk.close()
    via = gateway_sdk(stack)
    r = await via.chat.completions.create(model="gpt-4o", messages=HI)  # type: ignore[arg-type]
    await via.close()
    assert r.choices[0].message.content == "You said: hello there"
    direct, gateway = fake.calls
    assert gateway == direct == ("prod-gpt4o", "2024-06-01")
    assert fake.headers[1]["api-key"] == fake.headers[0]["api-key"] == KEY
    assert "authorization" not in fake.headers[1]


async def test_stream_drops_the_content_filter_preamble(fake: FakeAzureOpenAI, stack: Stack) -> None:
    """Azure's first frame has no choices, no id, no usage: clients never see it."""
    async with httpx.AsyncClient(timeout=10) as http:
        r = await http.post(stack.base_url + "/chat/completions", headers={
            "authorization": f"Bearer {TEST_KEY}"}, json={
            "model": "gpt-4o", "messages": HI, "stream": True,
            "stream_options": {"include_usage": True}})
    frames = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert frames[-1] == "[DONE]"
    chunks = [json.loads(f) for f in frames[:-1]]
    assert all(c["choices"] or c.get("usage") for c in chunks)
    assert {c["id"] for c in chunks} == {"chatcmpl-fake1"}
    assert "".join(c["choices"][0]["delta"].get("content") or ""
                   for c in chunks if c["choices"]) == "You said: hello there"
    assert chunks[-1]["usage"]["total_tokens"] == 18
    assert fake.requests[0]["stream_options"] == {"include_usage": True}


async def test_grpc_stream_and_images(fake: FakeAzureOpenAI, stack: Stack) -> None:
    params = pb.ChatCompletionParams(model="gpt-4o", messages=[pb.Message(role=pb.ROLE_USER,
                                                                         text="hello there")])
    got = [m async for m in stack.stub.StreamChatCompletion(
        pb.StreamChatCompletionRequest(params=params), metadata=AUTH, timeout=10)]
    assert all(m.choices or m.HasField("usage") for m in got)
    assert "".join(c.delta.content for m in got for c in m.choices) == "You said: hello there"
    sdk = gateway_sdk(stack)
    img = await sdk.images.generate(model="dall-e-3", prompt="a cat", response_format="b64_json")
    await sdk.close()
    assert img.data and img.data[0].b64_json == "aGVsbG8="
    assert fake.calls == [("prod-gpt4o", "2024-06-01"), ("dall-e-3", "2024-06-01")]


async def test_errors(fake: FakeAzureOpenAI, stack: Stack) -> None:
    sdk = gateway_sdk(stack)
    with pytest.raises(openai.RateLimitError):
        await sdk.chat.completions.create(model="gpt-4o", messages=[  # type: ignore[arg-type]
            {"role": "user", "content": "ERROR 429"}])
    stream = await sdk.chat.completions.create(model="gpt-4o", stream=True, messages=[  # type: ignore[arg-type]
        {"role": "user", "content": "ERROR midstream"}])
    with pytest.raises(openai.APIError) as err:
        async for _ in stream:
            pass
    await sdk.close()
    assert "fake midstream failure" in str(err.value)
    params = pb.ChatCompletionParams(model="gpt-4o", messages=[pb.Message(role=pb.ROLE_USER,
                                                                         text="ERROR 503")])
    with pytest.raises(grpc.aio.AioRpcError) as rpc:
        await stack.stub.CreateChatCompletion(pb.CreateChatCompletionRequest(params=params),
                                              metadata=AUTH, timeout=10)
    assert rpc.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_default_api_version_and_no_key(fake: FakeAzureOpenAI) -> None:
    """Without `api_version` the GA default is sent; without a key no api-key header goes
    out, and the fake answers 401 as Azure does (a channel fault: 502/503 to the client)."""
    cfg = make_config("channels:\n" + channel_yaml("az", "azure", fake.url, ["prod-gpt4o"])
                      + "\n  - {name: nokey, provider: azure, base_url: '" + fake.url
                      + "', models: [other]}\nrouter: {backoff_ms: 0, max_attempts: 1}\n")
    async with running_stack(cfg) as s:
        sdk = gateway_sdk(s)
        await sdk.chat.completions.create(model="prod-gpt4o", messages=HI)  # type: ignore[arg-type]
        with pytest.raises(openai.APIStatusError) as err:
            await sdk.chat.completions.create(model="other", messages=HI)  # type: ignore[arg-type]
        await sdk.close()
    assert fake.calls == [("prod-gpt4o", DEFAULT_API_VERSION)]
    assert err.value.status_code in (502, 503)


def test_base_url_is_required_and_options_are_checked_at_load() -> None:
    """Every Azure resource has its own endpoint: there is no default to fall back on.
    An unquoted YAML date is the api-version it spells; unknown options are refused."""
    with pytest.raises(ConfigError, match=r"channels\[0\]\.base_url: expected an http\(s\) URL"):
        make_config("channels:\n  - {name: az, provider: azure, models: [m]}\n")
    cfg = make_config("channels:\n  - {name: az, provider: azure, base_url: 'http://h', models: [m], "
                      "options: {api_version: 2025-04-01-preview}}\n  - {name: b, provider: azure, "
                      "base_url: 'http://h', models: [n], options: {api_version: 2024-06-01}}\n")
    assert [c.options.api_version for c in cfg.channels] == [  # type: ignore[attr-defined]
        "2025-04-01-preview", "2024-06-01"]
    with pytest.raises(ConfigError, match=r"channels\[0\]\.options\.api_versoin"):
        make_config("channels:\n  - {name: az, provider: azure, base_url: 'http://h', models: [m], "
                    "options: {api_versoin: x}}\n")
