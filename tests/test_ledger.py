"""The usage ledger: batched writes off the hot path to SQLite / PostgreSQL, flush on
close, retries without loss or duplicates, backpressure instead of dropping, spill at
shutdown when the database is gone, and cost from the price table."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest

from switchboard.core.composition.runtime import Runtime
from switchboard.core.config import Price
from switchboard.core.errors import GatewayError
from switchboard.core.gateway import Gateway
from switchboard.core.keys import KeyRecord
from switchboard.core.ledger import Ledger, PriceTable
from switchboard.core.limits import Limits, MemoryBackend
from switchboard.core.store import SqlStore, open_store
from switchboard.core.usage import UsageRecord
from switchboard.v1 import inference_pb2 as pb
from tests.harness import TEST_KEY, make_config


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SqlStore]:
    dsn = (f"sqlite:///{tmp_path}/ledger.db" if request.param == "sqlite"
           else request.getfixturevalue("pg_dsn"))
    s = await open_store(dsn)
    yield s
    await s.close()


def _rec(i: int, key_id: str = "key_a") -> UsageRecord:
    return UsageRecord(request_id=f"req_{i}", key_name="a", key_id=key_id, model="m",
                       surface="grpc", prompt_tokens=i, completion_tokens=1)


@pytest.mark.parametrize("n", [1, 3, 511, 512, 513, 2049])
async def test_insert_usage_writes_every_row_once(store: SqlStore, n: int) -> None:
    """Rows go out as multi-row INSERTs in power-of-two chunks: every count, including
    ones that straddle a chunk boundary or exceed one statement's parameter limit,
    lands exactly once, and a retried batch adds nothing."""
    recs = [_rec(i) for i in range(n)]
    ids = [f"row-{n}-{i}" for i in range(n)]
    await store.insert_usage(recs, ids)
    await store.insert_usage(recs, ids)  # the retry of a batch whose commit did land
    totals = await store.usage(key_id="key_a")
    assert sum(t.requests for t in totals) == n
    assert sum(t.prompt_tokens for t in totals) == n * (n - 1) // 2


class FlakyWriter:
    """A database that fails the first `fail` writes, or blocks until `gate` is set."""

    def __init__(self, store: SqlStore, fail: int = 0) -> None:
        self.store, self.fail = store, fail
        self.gate = asyncio.Event()
        self.gate.set()
        self.calls = 0

    async def insert_usage(self, records: list[UsageRecord], row_ids: list[str]) -> None:
        self.calls += 1
        await self.gate.wait()
        if self.fail > 0:
            self.fail -= 1
            if self.fail % 2:  # half the failures happen after the commit landed
                await self.store.insert_usage(records, row_ids)
            raise ConnectionError("database went away")
        await self.store.insert_usage(records, row_ids)


async def _request_ids(store: SqlStore) -> list[str]:
    return [r[0] for r in await store.db.fetch("SELECT request_id FROM usage_ledger ORDER BY id")]


async def test_batches_are_written_in_the_background(store: SqlStore) -> None:
    ledger = Ledger(store, batch_size=10, flush_interval_s=0.05)
    ledger.start()
    for i in range(25):
        ledger.record(_rec(i))
    assert ledger.pending == 25  # record() never waits for the database
    for _ in range(100):
        if ledger.pending == 0:
            break
        await asyncio.sleep(0.02)
    assert await _request_ids(store) == [f"req_{i}" for i in range(25)]
    await ledger.close()


async def test_close_flushes_everything(store: SqlStore) -> None:
    ledger = Ledger(store, flush_interval_s=60)
    ledger.start()
    for i in range(7):
        ledger.record(_rec(i))
    await ledger.close()
    assert len(await _request_ids(store)) == 7


async def test_failed_writes_are_retried_without_loss_or_duplicates(store: SqlStore) -> None:
    writer = FlakyWriter(store, fail=3)
    ledger = Ledger(writer, batch_size=4, flush_interval_s=0.01)
    ledger.start()
    for i in range(10):
        ledger.record(_rec(i))
    for _ in range(200):
        if ledger.pending == 0:
            break
        await asyncio.sleep(0.02)
    await ledger.close()
    assert writer.calls > 3
    assert sorted(await _request_ids(store)) == sorted(f"req_{i}" for i in range(10))


async def test_spills_to_a_file_when_the_database_is_gone_at_shutdown(tmp_path: Path) -> None:
    store = await open_store(f"sqlite:///{tmp_path}/l.db")
    writer = FlakyWriter(store, fail=10**9)
    spill = tmp_path / "spill.jsonl"
    ledger = Ledger(writer, close_timeout_s=0.2, spill_path=str(spill))
    ledger.start()
    for i in range(5):
        ledger.record(_rec(i))
    await ledger.close()
    lines = [json.loads(x) for x in spill.read_text().splitlines()]
    assert [x["request_id"] for x in lines] == [f"req_{i}" for i in range(5)]
    await store.close()


async def test_backpressure_refuses_new_requests_instead_of_dropping(tmp_path: Path) -> None:
    store = await open_store(f"sqlite:///{tmp_path}/bp.db")
    writer = FlakyWriter(store)
    writer.gate.clear()  # the database hangs
    ledger = Ledger(writer, batch_size=2, flush_interval_s=0.01, max_pending=3)
    ledger.start()
    limits = Limits(MemoryBackend(), make_config("").limit_settings, PriceTable(()),
                    saturated=lambda: ledger.saturated)
    key = KeyRecord(name="k", key_hash="h", key_id="key_k")
    params = pb.ChatCompletionParams(model="m", messages=[pb.Message(role=pb.ROLE_USER, text="x")])
    for i in range(6):
        ledger.record(_rec(i))
    assert ledger.saturated
    with pytest.raises(GatewayError) as err:
        await limits.reserve_chat(key, params, "r")
    assert err.value.status == grpc.StatusCode.UNAVAILABLE
    assert err.value.code == "ledger_backpressure"
    ledger.record(_rec(6))  # a request already admitted still gets its row
    writer.gate.set()
    for _ in range(200):
        if not ledger.pending:
            break
        await asyncio.sleep(0.02)
    assert not ledger.saturated
    await limits.reserve_chat(key, params, "r2")
    await ledger.close()
    assert len(await _request_ids(store)) == 7
    await store.close()


def test_price_table() -> None:
    prices = PriceTable((("gpt-4o-mini", Price(prompt=0.15, completion=0.6)),
                         ("gpt-4o*", Price(prompt=2.5, completion=10, cached_prompt=1.25)),
                         ("dall-e-3", Price(image=0.04))))
    assert prices.cost("gpt-4o", 1_000_000, 1_000_000) == pytest.approx(12.5)
    assert prices.cost("gpt-4o-2024", 1000, 0, cached=400) == pytest.approx(
        (600 * 2.5 + 400 * 1.25) / 1e6)
    assert prices.cost("gpt-4o-mini", 1_000_000, 0) == pytest.approx(0.15)
    assert prices.cost("dall-e-3", 0, 0, images=2) == pytest.approx(0.08)
    assert prices.cost("unknown", 10**6, 10**6) == 0.0


async def test_gateway_rows_carry_cost_key_and_surface(tmp_path: Path) -> None:
    """Real requests through the gateway end up as ledger rows with their cost."""
    from switchboard.core.composition.state import open_gateway

    config = make_config(f"""
store: sqlite:///{tmp_path}/gw.db
prices: {{echo: {{prompt: 1.0, completion: 2.0}}}}
channels:
  - {{name: echo, provider: echo, models: [echo]}}
""")
    gateway: Gateway = await open_gateway(config)
    rt = Runtime("serve", config, http="127.0.0.1:0", grpc_addr="127.0.0.1:0", gateway=gateway)
    await rt.start()
    try:
        async with httpx.AsyncClient(base_url=rt.http_url) as http:
            for stream in (False, True):
                r = await http.post("/v1/chat/completions", json={
                    "model": "echo", "stream": stream,
                    "messages": [{"role": "user", "content": "one two three"}]},
                    headers={"authorization": f"Bearer {TEST_KEY}", "x-request-id": f"rid-{stream}"})
                assert r.status_code == 200
    finally:
        await rt.stop()  # drains, then flushes the ledger
    store = await open_store(config.store)
    try:
        rows = await store.db.fetch(
            "SELECT request_id, key_id, surface, prompt_tokens, completion_tokens, cost, stream, "
            "estimated, status FROM usage_ledger ORDER BY id")
    finally:
        await store.close()
    assert [r[0] for r in rows] == ["rid-False", "rid-True"]
    for row in rows:
        assert row[1] == "static:test" and row[2] == "rest" and row[3:5] == (3, 3)
        assert row[5] == pytest.approx((3 * 1.0 + 3 * 2.0) / 1e6)
        assert row[7] == 0 and row[8] == "OK"
