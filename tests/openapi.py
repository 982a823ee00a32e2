"""Checks that our JSON has the shape of OpenAI's API, using the official `openai` SDK's
own response types (a dev dependency from PyPI), so it runs on any fresh clone.

Two layers, because the SDK's types alone are lenient in two ways a real client cares about:

1. The SDK's pydantic model for the body, validated in *strict* mode from JSON text:
   a wrong type (`"created": "1"`), an unknown enum value (`finish_reason: "done"`), a
   wrong `object` tag or a missing required field fails. Fields the SDK does not know
   are allowed, as they are in OpenAI's spec.
2. Keys that OpenAI's reference lists as *required but nullable* — the SDK models them as
   optional with a `None` default, so a body that omits them would pass layer 1. A client
   doing `choice["logprobs"]` would crash on such a body; `_PRESENT` names those keys and
   they must be there (null is fine).

`validate(name, body)` keeps the names of the OpenAPI schemas the tests used before.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import orjson
from openai.types import ErrorObject, ImagesResponse, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError


class SchemaError(AssertionError):
    """`instance` does not have the shape of the named OpenAI schema."""


class _ListModelsResponse(BaseModel):
    # GET /v1/models: the SDK pages this itself and has no type for the envelope.
    model_config = ConfigDict(extra="allow")
    object: Literal["list"]
    data: list[Model]


class _ErrorResponse(BaseModel):
    model_config = ConfigDict(extra="allow")
    error: ErrorObject


_MODELS: dict[str, type[BaseModel]] = {
    "CreateChatCompletionResponse": ChatCompletion,
    "CreateChatCompletionStreamResponse": ChatCompletionChunk,
    "ListModelsResponse": _ListModelsResponse,
    "Model": Model,
    "ImagesResponse": ImagesResponse,
    "ErrorResponse": _ErrorResponse,
}

# Required-but-nullable keys (layer 2), as paths; "*" walks every item of a list.
_PRESENT: dict[str, tuple[tuple[str, ...], ...]] = {
    "CreateChatCompletionResponse": (("choices", "*", "logprobs"),
                                     ("choices", "*", "message", "content"),
                                     ("choices", "*", "message", "refusal")),
    "CreateChatCompletionStreamResponse": (("choices", "*", "delta"),
                                           ("choices", "*", "finish_reason")),
    "ErrorResponse": (("error", "param"), ("error", "code")),
}


@functools.cache
def _adapter(schema_name: str) -> TypeAdapter[Any]:
    try:
        model = _MODELS[schema_name]
    except KeyError:
        raise KeyError(f"no OpenAI type for schema {schema_name!r}; known: {sorted(_MODELS)}") from None
    return TypeAdapter(model)


def _missing(node: Any, path: tuple[str, ...], where: str) -> list[str]:
    if not path:
        return []
    head, rest = path[0], path[1:]
    if head == "*":
        items = node if isinstance(node, list) else []
        return [m for i, item in enumerate(items) for m in _missing(item, rest, f"{where}[{i}]")]
    if not isinstance(node, dict) or head not in node:
        return [f"{where}.{head}".lstrip(".")]
    return _missing(node[head], rest, f"{where}.{head}")


def validate(schema_name: str, instance: Any) -> None:
    """Raises SchemaError if `instance` (parsed JSON) does not match the named schema."""
    text = orjson.dumps(instance)
    try:
        _adapter(schema_name).validate_json(text, strict=True)
    except ValidationError as e:
        raise SchemaError(f"{schema_name}: {e}") from None
    missing = [m for p in _PRESENT.get(schema_name, ()) for m in _missing(instance, p, "")]
    if missing:
        raise SchemaError(f"{schema_name}: required keys missing (null is allowed): {missing}")
