"""The scenario language every fake upstream shares (see each fake's docstring): the
reply is decided from the text of the last message, so one conformance suite can run
the same scenarios against every provider. Provider-neutral: fakes map these
decisions onto their own wire formats."""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass, field
from typing import Any

USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "cached_tokens": 3, "reasoning_tokens": 0}


@dataclass
class Decision:
    text: str = ""
    tool_calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    thinking: str = ""
    error_status: int | None = None
    midstream_error: bool = False
    stopped_by_sequence: bool = False
    delay_ms: float = 0.0  # `SLOW <ms>`: pause before each streamed delta (OpenAI fake)


def describe_image(url: str) -> str:
    m = re.match(r"data:([^;]+);base64,(.*)", url, re.S)
    if m:
        return f"base64 {m.group(1)} {len(base64.b64decode(m.group(2)))} bytes"
    return f"url {url}"


def decide(*, last_text: str, last_is_tool_result: bool, images: list[str],
           stop: list[str], json_mode: bool) -> Decision:
    """images: per image part, the description from `describe_image` (or an equivalent)."""
    if last_is_tool_result:
        return Decision(text=f"Tool said: {last_text}")
    d = Decision()
    lines = last_text.splitlines()
    for line in lines:
        parts = line.strip().split(" ", 2)
        if parts[0] == "ERROR" and len(parts) > 1:
            if parts[1] == "midstream":
                d.midstream_error = True
            else:
                d.error_status = int(parts[1])
                return d
        elif parts[0] == "TOOL" and len(parts) == 3:
            d.tool_calls.append((parts[1], json.loads(parts[2])))
        elif parts[0] == "SLOW" and len(parts) > 1:
            d.delay_ms = float(parts[1])
        elif parts[0] == "THINK":
            d.thinking = line.strip()[6:]
    if d.tool_calls:
        return d
    if json_mode:
        d.text = json.dumps({"said": last_text})
    else:
        d.text = f"You said: {last_text}" + "".join(f" [image: {i}]" for i in images)
    for s in stop:
        at = d.text.find(s)
        if s and at >= 0:
            d.text = d.text[:at]
            d.stopped_by_sequence = True
    return d


def words(text: str) -> list[str]:
    """Word-sized deltas that join back to `text` exactly."""
    return re.findall(r"\S+\s*|\s+", text) or [""]


def split_json(args: str) -> list[str]:
    """An argument string in at least two fragments (when it has 2+ characters)."""
    if len(args) < 2:
        return [args]
    mid = len(args) // 2
    return [args[:mid], args[mid:]]
