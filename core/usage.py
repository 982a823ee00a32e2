"""Usage records: one per request, whichever surface it came from, written off the hot
path. `MemoryUsageSink` keeps recent records in a bounded buffer (tests, and stacks
built without a store); core/ledger.py writes them to the SQL store in batches."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class UsageRecord:
    request_id: str
    key_name: str
    model: str  # the model the client asked for (an alias, a route or a model name)
    surface: str  # "rest" | "grpc"
    channel: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    cost: float = 0.0
    latency_ms: float = 0.0
    ttft_ms: float | None = None
    status: str = "OK"  # gRPC status name
    estimated: bool = False
    stream: bool = False
    ts: float = field(default_factory=time.time)
    key_id: str = ""  # store key id, or "static:<name>" for config keys
    # What actually served the request (after routes and model_map): the public model
    # name and the channel's upstream name for it; "" when no upstream answered.
    served_model: str = ""
    upstream_model: str = ""


class UsageSink(Protocol):
    def record(self, rec: UsageRecord) -> None: ...

    async def close(self) -> None: ...


class MemoryUsageSink:
    """Keeps the most recent records in memory (bounded: it never grows without limit)."""

    def __init__(self, maxlen: int = 10_000) -> None:
        self.records: deque[UsageRecord] = deque(maxlen=maxlen)

    def record(self, rec: UsageRecord) -> None:
        self.records.append(rec)

    async def close(self) -> None:
        return None
