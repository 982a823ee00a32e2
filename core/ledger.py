"""The usage ledger writer: one row per request into the SQL store, off the hot path.

`Ledger.record()` (the UsageSink protocol, core/usage.py) only appends to an in-memory
buffer; a background task writes the buffer in batches (`batch_size` rows, or whatever
is there every `flush_interval_s`), one transaction per batch.

Nothing accepted is lost:
- a record handed to `record()` is always kept — the buffer never drops;
- bounded by backpressure instead: while more than `max_pending` rows wait (the
  database is slow or down), `saturated` is true and the limiter (core/limits.py)
  refuses *new* requests with UNAVAILABLE, so the buffer can only grow by the requests
  already in flight;
- a failed write is retried with backoff, the batch staying at the head of the queue;
  every row carries a unique row id and inserts skip ids already present, so a retry
  after a commit whose acknowledgement was lost writes no duplicates;
- a write in progress is never cancelled: `close()` asks the writer to stop and waits;
- `close()` (graceful shutdown, after the drain) flushes everything; rows that still
  cannot be written after `close_timeout_s` are spilled as JSON lines to `spill_path`
  (if set) and the count is logged, never silently dropped.

Cost: `PriceTable` turns token counts into US dollars from the config's `prices`
(USD per million tokens; `cached_prompt` for cached prompt tokens; `image` per image);
the first entry whose model name or glob matches wins; unpriced models cost 0.
A request is priced by what actually served it, never by the name it asked for (an
alias or route would otherwise cost nothing): the served public model name (after
routes) is looked up first, then the channel's upstream name for it (after
`model_map`), so `prices: {gpt-4o: …}` also prices a `model_map: {fast: gpt-4o}` name.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fnmatch
import json
import logging
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Protocol

from switchboard.core.config import Price
from switchboard.core.usage import UsageRecord

log = logging.getLogger("switchboard.ledger")


class PriceTable:
    def __init__(self, prices: tuple[tuple[str, Price], ...]) -> None:
        self._prices = prices
        self._memo: dict[str, Price | None] = {}

    def price(self, model: str) -> Price | None:
        if model not in self._memo:
            self._memo[model] = next(
                (p for pattern, p in self._prices if fnmatch.fnmatchcase(model, pattern)), None)
        return self._memo[model]

    def cost(self, model: str, prompt: int, completion: int, cached: int = 0,
             images: int = 0, *, upstream: str = "") -> float:
        """USD for `model` (the served public name); an unpriced `model` falls back to
        the price of its `upstream` name."""
        p = self.price(model)
        if p is None and upstream:
            p = self.price(upstream)
        if p is None:
            return 0.0
        cached = min(cached, prompt)
        cached_rate = p.prompt if p.cached_prompt is None else p.cached_prompt
        return ((prompt - cached) * p.prompt + cached * cached_rate
                + completion * p.completion) / 1_000_000 + images * p.image


class UsageWriter(Protocol):
    async def insert_usage(self, records: list[UsageRecord], row_ids: list[str]) -> None: ...


class Ledger:
    """Batched, bounded, off-hot-path writer of usage rows (a UsageSink)."""

    def __init__(self, store: UsageWriter, *, batch_size: int = 512, flush_interval_s: float = 0.2,
                 max_pending: int = 20_000, close_timeout_s: float = 10.0,
                 spill_path: str | None = None) -> None:
        self.store = store
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.max_pending = max_pending
        self.close_timeout_s = close_timeout_s
        self.spill_path = spill_path
        self._buf: deque[tuple[str, UsageRecord]] = deque()  # (row id, record)
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._write_lock = asyncio.Lock()
        self.written = 0
        self.failures = 0

    # ---------------------------------------------------------- sink API ----

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="usage-ledger")

    def record(self, rec: UsageRecord) -> None:
        if self._closed:
            # Only a request that outlived the drain gets here; say so rather than drop silently.
            log.error("usage ledger: a row arrived after shutdown (request %s)", rec.request_id)
        self._buf.append((uuid.uuid4().hex, rec))
        if len(self._buf) >= self.batch_size:
            self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._buf)

    @property
    def saturated(self) -> bool:
        """True while the backlog is over `max_pending`: new requests are refused."""
        return len(self._buf) > self.max_pending

    async def flush(self) -> None:
        """Write everything buffered so far (raises if the store fails)."""
        while self._buf:
            await self._write_batch()

    async def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._task is not None:
            # Let a write in progress finish rather than cancel it (a cancelled write may
            # have committed); only a database that hangs past the timeout is cut off —
            # row ids keep the retry below from duplicating what it wrote.
            await asyncio.wait({self._task}, timeout=self.close_timeout_s)
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for _ in range(3):
            await asyncio.sleep(0)  # let requests cancelled by the drain record their rows
        deadline = time.monotonic() + self.close_timeout_s
        delay = 0.05
        while self._buf and time.monotonic() < deadline:
            try:
                await self._write_batch()
            except Exception as exc:
                log.warning("usage ledger: write failed during shutdown (%s); retrying",
                            type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
        if self._buf:
            await self._spill()
        self._closed = True

    # ---------------------------------------------------------- internals ----

    async def _write_batch(self) -> None:
        async with self._write_lock:
            n = min(len(self._buf), self.batch_size)
            if n == 0:
                return
            batch = [self._buf[i] for i in range(n)]
            await self.store.insert_usage([r for _, r in batch], [i for i, _ in batch])
            # Only now leave the buffer: a failed write keeps the rows for the next try.
            for _ in range(n):
                self._buf.popleft()
            self.written += n

    async def _run(self) -> None:
        delay = 0.05
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._wake.wait(), self.flush_interval_s)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                while self._buf and not self._stop.is_set():
                    await self._write_batch()
                delay = 0.05
            except Exception as exc:
                self.failures += 1
                log.warning("usage ledger: write failed (%s: %s); %d rows kept, retrying in %.2fs",
                            type(exc).__name__, str(exc)[:200], len(self._buf), delay)
                try:
                    await asyncio.wait_for(self._stop.wait(), delay)
                except TimeoutError:
                    pass
                delay = min(delay * 2, 5.0)

    async def _spill(self) -> None:
        rows = [r for _, r in self._buf]
        if not self.spill_path:
            log.error("usage ledger: %d rows could not be written at shutdown and no spill "
                      "file is configured", len(rows))
            return
        path = Path(self.spill_path)
        lines = "".join(json.dumps(dataclasses.asdict(r)) + "\n" for r in rows)

        def write() -> None:
            with path.open("a", encoding="utf-8") as f:
                f.write(lines)

        await asyncio.to_thread(write)
        self._buf.clear()
        log.error("usage ledger: %d rows spilled to %s (database unreachable at shutdown)",
                  len(rows), path)
