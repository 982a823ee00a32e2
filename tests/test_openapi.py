"""The shape checker in tests/openapi.py can fail: real bodies from the gateway pass, and
the same bodies with one deliberate mistake each (a wrong type, an unknown enum value, a
wrong object tag, a missing required field, a missing required-but-nullable key) fail."""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from tests.harness import TEST_KEY, Stack, make_config, running_stack
from tests.openapi import SchemaError, validate


@pytest.fixture
async def bodies() -> AsyncIterator[dict[str, Any]]:
    """One real body of each kind the REST tests validate, from an echo gateway."""
    cfg = make_config("channels:\n  - {name: echo, provider: echo, models: [echo]}\n")
    async with running_stack(cfg) as s:
        yield await _collect(s)


async def _collect(s: Stack) -> dict[str, Any]:
    auth = {"authorization": f"Bearer {TEST_KEY}"}
    msgs = [{"role": "user", "content": "two words"}]
    out: dict[str, Any] = {}
    async with aiohttp.ClientSession(headers=auth) as http:
        async with http.post(s.base_url + "/chat/completions", json={"model": "echo", "messages": msgs}) as r:
            out["CreateChatCompletionResponse"] = await r.json()
        async with http.post(s.base_url + "/chat/completions",
                             json={"model": "echo", "messages": msgs, "stream": True}) as r:
            events = [ln[6:] for ln in (await r.text()).split("\n") if ln.startswith("data: ")]
        out["CreateChatCompletionStreamResponse"] = json.loads(events[0])
        async with http.get(s.base_url + "/models") as r:
            out["ListModelsResponse"] = await r.json()
        async with http.get(s.base_url + "/models/echo") as r:
            out["Model"] = await r.json()
        async with http.post(s.base_url + "/images/generations",
                             json={"model": "echo", "prompt": "a cat", "response_format": "b64_json"}) as r:
            out["ImagesResponse"] = await r.json()
        async with http.post(s.base_url + "/chat/completions", json={"model": "nope", "messages": msgs}) as r:
            out["ErrorResponse"] = await r.json()
    return out


def _set(path: tuple[Any, ...], value: Any) -> Callable[[Any], None]:
    def mutate(body: Any) -> None:
        for p in path[:-1]:
            body = body[p]
        body[path[-1]] = value
    return mutate


def _drop(path: tuple[Any, ...]) -> Callable[[Any], None]:
    def mutate(body: Any) -> None:
        for p in path[:-1]:
            body = body[p]
        del body[path[-1]]
    return mutate


BROKEN: list[tuple[str, str, Callable[[Any], None]]] = [
    ("CreateChatCompletionResponse", "created as a string", _set(("created",), "1700000000")),
    ("CreateChatCompletionResponse", "no id", _drop(("id",))),
    ("CreateChatCompletionResponse", "wrong object tag", _set(("object",), "chat.completion.chunk")),
    ("CreateChatCompletionResponse", "unknown finish_reason", _set(("choices", 0, "finish_reason"), "done")),
    ("CreateChatCompletionResponse", "content as a number", _set(("choices", 0, "message", "content"), 5)),
    ("CreateChatCompletionResponse", "no message role", _drop(("choices", 0, "message", "role"))),
    ("CreateChatCompletionResponse", "no logprobs key", _drop(("choices", 0, "logprobs"))),
    ("CreateChatCompletionResponse", "usage tokens as floats", _set(("usage", "prompt_tokens"), 1.5)),
    ("CreateChatCompletionStreamResponse", "wrong object tag", _set(("object",), "chat.completion")),
    ("CreateChatCompletionStreamResponse", "no finish_reason key", _drop(("choices", 0, "finish_reason"))),
    ("CreateChatCompletionStreamResponse", "choices not a list", _set(("choices",), {})),
    ("ListModelsResponse", "no data", _drop(("data",))),
    ("ListModelsResponse", "model without owned_by", _drop(("data", 0, "owned_by"))),
    ("Model", "wrong object tag", _set(("object",), "list")),
    ("ImagesResponse", "no created", _drop(("created",))),
    ("ImagesResponse", "b64_json as a list", _set(("data", 0, "b64_json"), ["aGk="])),
    ("ErrorResponse", "no message", _drop(("error", "message"))),
    ("ErrorResponse", "no code key", _drop(("error", "code"))),
    ("ErrorResponse", "error as a string", _set(("error",), "model not found")),
]


async def test_real_bodies_pass_and_each_mistake_fails(bodies: dict[str, Any]) -> None:
    for name, body in bodies.items():
        validate(name, body)  # the gateway's own answers have the right shape
    for name, what, mutate in BROKEN:
        body = copy.deepcopy(bodies[name])
        mutate(body)
        with pytest.raises(SchemaError):
            validate(name, body)
            pytest.fail(f"{name} with {what} was accepted")


def test_unknown_schema_name_is_an_error() -> None:
    with pytest.raises(KeyError, match="no OpenAI type"):
        validate("CreateChatCompletionResponsee", {})
