"""Validates our JSON against OpenAI's published OpenAPI spec (../shared/specs).

The spec is OpenAPI 3.1 but still uses 3.0's `nullable: true` in places; that is
rewritten to a JSON-Schema null union before validation."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SPEC = Path(os.environ.get("SWITCHBOARD_OPENAI_SPEC",
                           Path(__file__).resolve().parents[2] / "shared/specs/openai-openapi.yaml"))


def _denull(node: Any) -> Any:
    if isinstance(node, dict):
        out = {k: _denull(v) for k, v in node.items()}
        if out.pop("nullable", False):
            t = out.get("type")
            if isinstance(t, str):
                out["type"] = [t, "null"]
            elif "enum" in out:
                out["enum"] = [*out["enum"], None]
            else:
                out = {"anyOf": [out, {"type": "null"}]}
            if "enum" in out and None not in out["enum"]:
                out["enum"] = [*out["enum"], None]
        return out
    if isinstance(node, list):
        return [_denull(v) for v in node]
    return node


@functools.cache
def _spec() -> dict[str, Any]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with SPEC.open() as f:
        return dict(_denull(yaml.load(f, Loader=loader)))


@functools.cache
def _validator(schema_name: str) -> jsonschema.Draft202012Validator:
    spec = _spec()
    resource = Resource.from_contents(spec, default_specification=DRAFT202012)
    registry: Registry[Any] = Registry().with_resource("urn:openai", resource)
    schema = {"$ref": f"urn:openai#/components/schemas/{schema_name}"}
    return jsonschema.Draft202012Validator(schema, registry=registry)


def validate(schema_name: str, instance: Any) -> None:
    """Raises jsonschema.ValidationError if `instance` does not match the named schema."""
    _validator(schema_name).validate(instance)
