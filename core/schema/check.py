"""Type checks for JSON a caller sent, shared by every wire schema's parsers.

Each check raises a 400 naming the offending `param` (e.g. `messages[2].content`) in
OpenAI's wording ("Invalid type for '…': expected …, but got …."). `set_scalar` puts a
JSON value into a proto scalar after checking it against the field's proto type and
range from the descriptor (core/bounds.py), so a value protobuf would refuse is a 400
naming the field, never a ValueError/TypeError inside the gateway.
"""

from __future__ import annotations

from typing import Any

import orjson
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from switchboard.core.bounds import check_scalar
from switchboard.core.errors import invalid


def tname(v: Any) -> str:
    """The JSON name of `v`'s type, for error messages."""
    return "null" if v is None else {bool: "boolean", int: "integer", float: "number",
                                     str: "string", list: "array", dict: "object"}.get(
        type(v), type(v).__name__)


def want(v: Any, kind: type | tuple[type, ...], param: str, what: str) -> Any:
    """`v` itself when it is a `kind` (a bool is no int here), else a 400 naming `param`."""
    if not isinstance(v, kind) or (isinstance(v, bool) and kind is not bool):
        raise invalid(f"Invalid type for '{param}': expected {what}, but got {tname(v)}.", param)
    return v


def want_str(v: Any, param: str) -> str:
    return str(want(v, str, param, "a string"))


_C = FieldDescriptor
_KINDS: dict[int, tuple[type | tuple[type, ...], str]] = {
    _C.CPPTYPE_STRING: (str, "a string"), _C.CPPTYPE_BOOL: (bool, "a boolean"),
    _C.CPPTYPE_INT32: (int, "an integer"), _C.CPPTYPE_INT64: (int, "an integer"),
    _C.CPPTYPE_UINT32: (int, "an integer"), _C.CPPTYPE_UINT64: (int, "an integer"),
    _C.CPPTYPE_DOUBLE: ((int, float), "a number"), _C.CPPTYPE_FLOAT: ((int, float), "a number"),
}


def set_scalar(msg: Message, name: str, v: Any, param: str) -> None:
    """msg.name = v, after checking v against the proto field's type and range."""
    field = msg.DESCRIPTOR.fields_by_name[name]
    kind, what = _KINDS[field.cpp_type]
    want(v, kind, param, what)
    if kind is not str and kind is not bool:
        check_scalar(field, v, param)
    setattr(msg, name, v)


def json_text(v: Any) -> str:
    """A JSON value as the text a proto `extra` / `*_json` field holds."""
    return orjson.dumps(v).decode()
