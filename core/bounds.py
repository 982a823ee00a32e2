"""Bounds on untrusted input that both surfaces share, so bad input is a 400 naming the
field instead of an exception deep inside the gateway.

- **JSON depth**: every JSON document the gateway accepts from a caller (REST bodies:
  chat, images, admin; and JSON text inside gRPC messages: `extra`, `*_json` fields)
  may nest at most `MAX_JSON_DEPTH` (128) arrays/objects. Encoders and provider
  translations recurse, and orjson refuses to serialise past 254 levels, so a limit
  well below that keeps every later step safe; no real request comes close to it.
- **Proto scalar ranges**: a JSON number put into a proto field must fit the field's
  type (int32, int64, uint32, uint64, float, double); `check_scalar` decides it from
  the field descriptor, so every numeric field is covered without a per-field list.
- **JSON text fields**: `check_json_fields` walks a request message and checks that
  each `extra` value and each `*_json` string (except replies' logprobs) is JSON within
  the depth limit, naming the field (e.g. `params.tools[0].function.parameters_json`).
"""

from __future__ import annotations

import math
from typing import Any

import orjson
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from switchboard.core.errors import GatewayError, invalid

MAX_JSON_DEPTH = 128

_INT_RANGES = {
    FieldDescriptor.CPPTYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.CPPTYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.CPPTYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.CPPTYPE_UINT64: (0, 2**64 - 1),
}
_FLOAT_MAX = 3.4028234663852886e38  # largest finite float32


def too_deep(value: Any, limit: int = MAX_JSON_DEPTH) -> str | None:
    """None when `value` (parsed JSON) nests at most `limit` arrays/objects; otherwise
    where it goes too deep: the top-level key or index ("" for the value itself).
    Iterative: a recursive walk would hit the very RecursionError this prevents."""
    if not isinstance(value, (dict, list)):
        return None
    top = value.items() if isinstance(value, dict) else enumerate(value)
    stack: list[tuple[Any, int, str]] = [(c, 2, str(k)) for k, c in top
                                         if isinstance(c, (dict, list))]
    while stack:
        v, depth, where = stack.pop()
        if depth > limit:
            return where
        children = v.values() if isinstance(v, dict) else v
        stack.extend((c, depth + 1, where) for c in children if isinstance(c, (dict, list)))
    return None


def _may_be_deep(raw: bytes | str, limit: int) -> bool:
    # Fewer brackets than the limit cannot nest past it: the common case skips the walk
    # with two C-speed counts.
    if isinstance(raw, str):
        return raw.count("[") + raw.count("{") > limit
    return raw.count(b"[") + raw.count(b"{") > limit


def depth_error(param: str | None) -> GatewayError:
    where = f"'{param}'" if param else "The request body"
    return invalid(f"{where} nests JSON arrays/objects deeper than {MAX_JSON_DEPTH} levels.",
                   param, code="json_too_deep")


def loads(raw: bytes | str, param: str | None = None) -> Any:
    """orjson.loads plus the depth limit; raises orjson.JSONDecodeError for bad syntax
    (callers word that error themselves) and a 400 GatewayError for too deep."""
    value = orjson.loads(raw)
    if _may_be_deep(raw, MAX_JSON_DEPTH):
        where = too_deep(value)
        if where is not None:
            # Name the field: the JSON text's own field, or the body's top-level key.
            raise depth_error(param or where or None)
    return value


def check_scalar(field: Any, value: Any, param: str) -> None:
    """Raise a 400 naming `param` unless `value` fits the numeric proto `field` (a
    FieldDescriptor: typed Any, the stubs know the pure-Python class but not upb's)."""
    cpp = field.cpp_type
    bounds = _INT_RANGES.get(cpp)
    if bounds is not None:
        lo, hi = bounds
        if not lo <= value <= hi:
            raise invalid(f"Invalid value for '{param}': {value} is outside the supported "
                          f"range [{lo}, {hi}].", param, code="integer_out_of_range")
    elif cpp in (FieldDescriptor.CPPTYPE_DOUBLE, FieldDescriptor.CPPTYPE_FLOAT):
        limit = _FLOAT_MAX if cpp == FieldDescriptor.CPPTYPE_FLOAT else math.inf
        if not (math.isfinite(value) and -limit <= value <= limit):
            raise invalid(f"Invalid value for '{param}': {value} is not a finite number in "
                          "range.", param, code="number_out_of_range")


def _check_text(text: str, param: str) -> None:
    try:
        loads(text, param)
    except orjson.JSONDecodeError:
        raise invalid(f"Invalid value for '{param}': expected JSON text.", param) from None


# Per message type: (JSON-text string fields, `extra`-style map<string,string> fields,
# message fields to descend into). Built once per type: the walk itself stays cheap.
_PLAN: dict[str, tuple[list[FieldDescriptor], list[FieldDescriptor], list[FieldDescriptor]]] = {}


def _plan(desc: Any) -> tuple[list[FieldDescriptor], list[FieldDescriptor],
                                     list[FieldDescriptor]]:
    plan = _PLAN.get(desc.full_name)
    if plan is None:
        texts, maps, subs = [], [], []
        for f in desc.fields:
            if f.cpp_type == FieldDescriptor.CPPTYPE_STRING and f.name.endswith("_json"):
                texts.append(f)
            elif f.message_type is not None and f.message_type.GetOptions().map_entry:
                if f.name == "extra":
                    maps.append(f)
            elif f.message_type is not None:
                subs.append(f)
        plan = _PLAN[desc.full_name] = (texts, maps, subs)
    return plan


def check_json_fields(msg: Message, prefix: str = "") -> None:
    """Every `*_json` string and `extra` value in `msg` must be JSON within the depth
    limit (a gRPC caller sends them as text; the REST façade always sends valid JSON)."""
    texts, maps, subs = _plan(msg.DESCRIPTOR)
    for f in texts:
        value = getattr(msg, f.name)
        if value:
            _check_text(value, f"{prefix}{f.name}")
    for f in maps:
        for k, v in getattr(msg, f.name).items():
            _check_text(v, f"{prefix}{f.name}.{k}")
    for f in subs:
        if f.is_repeated:
            for i, item in enumerate(getattr(msg, f.name)):
                check_json_fields(item, f"{prefix}{f.name}[{i}].")
        elif msg.HasField(f.name):
            check_json_fields(getattr(msg, f.name), f"{prefix}{f.name}.")
