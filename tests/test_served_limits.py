"""Limits hold through routes and `model_map` (issue 10, item 3): a request is priced by
the model that actually served it, the USD budget refuses an alias once spent, the
key's model allowlist covers every model a route can reach, and the usage ledger
(SQLite and PostgreSQL) records the requested and the served names — on REST and gRPC,
against the real gateway with a store and a fake OpenAI upstream."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest

from switchboard.core.composition.runtime import Runtime
from switchboard.core.composition.state import open_gateway
from switchboard.core.config import LimitSettings, Price
from switchboard.core.errors import GatewayError
from switchboard.core.keys import KeyRecord
from switchboard.core.ledger import PriceTable
from switchboard.core.limits import Limits, MemoryBackend
from switchboard.core.store import SqlStore
from switchboard.v1 import inference_pb2 as pb
from switchboard.v1 import inference_pb2_grpc as pb_grpc
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fakes.scenario import USAGE
from tests.harness import make_config

ADMIN_KEY = "adm-served-0123456789abcdef"
SPENDER = "sk-spender-0123456789"      # $5 total USD budget, any model
NARROW = "sk-narrow-0123456789"        # gpt-4o-mini only
ALIAS_ONLY = "sk-aliasonly-0123456789"  # the aliases, and gpt-4o-mini, but not gpt-4o
MINI_ALIAS = "sk-minialias-0123456789"  # an alias whose only target it may use

# USD per million tokens: gpt-4o costs $0.10 per token, gpt-4o-mini $0.001.
GPT4O, MINI = 100_000.0, 1_000.0
# The fake upstream always reports 11 prompt (3 cached) + 7 completion tokens.
COST_4O = (USAGE["prompt_tokens"] + USAGE["completion_tokens"]) * GPT4O / 1e6  # $1.80
COST_MINI = (USAGE["prompt_tokens"] + USAGE["completion_tokens"]) * MINI / 1e6  # $0.018


def _config(base: str, store: str) -> str:
    return f"""
store: "{store}"
admin_key: {ADMIN_KEY}
prices:
  gpt-4o: {{prompt: {GPT4O}, completion: {GPT4O}}}
  gpt-4o-mini: {{prompt: {MINI}, completion: {MINI}}}
channels:
  - name: oa
    provider: openai
    base_url: {base}
    api_key: upstream-secret-oa
    models: [gpt-4o, gpt-4o-mini]
    model_map: {{fast: gpt-4o}}
routes:
  - {{model: smart, targets: [gpt-4o, gpt-4o-mini]}}
  - {{model: minis, targets: [gpt-4o-mini]}}
  - {{model: fastalias, targets: [fast]}}
keys:
  - {{name: spender, key: {SPENDER}, budget: 5, budget_unit: usd, budget_period: total}}
  - {{name: narrow, key: {NARROW}, models: [gpt-4o-mini]}}
  - {{name: alias-only, key: {ALIAS_ONLY}, models: [smart, fastalias, gpt-4o-mini]}}
  - {{name: mini-alias, key: {MINI_ALIAS}, models: [minis, gpt-4o-mini]}}
"""


@dataclass
class Env:
    rt: Runtime
    fake: FakeOpenAI
    http: httpx.AsyncClient
    stub: pb_grpc.InferenceServiceStub
    store: SqlStore

    async def chat(self, surface: str, key: str, model: str) -> tuple[int, str, str]:
        """(HTTP-equivalent status, error code or "", served content) on either surface."""
        if surface == "rest":
            r = await self.http.post("/v1/chat/completions", headers={
                "authorization": f"Bearer {key}"}, json={
                "model": model, "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]})
            body = r.json()
            if r.status_code != 200:
                return r.status_code, body["error"]["code"], ""
            return 200, "", body["model"]
        req = pb.CreateChatCompletionRequest(params=pb.ChatCompletionParams(
            model=model, max_tokens=10, messages=[pb.Message(role=pb.ROLE_USER, text="hi")]))
        try:
            resp = await self.stub.CreateChatCompletion(
                req, metadata=(("authorization", f"Bearer {key}"),), timeout=10)
        except grpc.aio.AioRpcError as err:
            status = {grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
                      grpc.StatusCode.PERMISSION_DENIED: 403}.get(err.code(), 500)
            err_code = GatewayError.from_rpc_error(err).code or ""
            return status, err_code, ""
        return 200, "", resp.model

    async def ledger(self) -> list[tuple[str, str, str, str, float]]:
        """(key name, model requested, served model, upstream model, cost) per row."""
        await self.rt.gateway.usage.flush()  # type: ignore[attr-defined]
        rows = await self.store.db.fetch(
            "SELECT key_name, model, served_model, upstream_model, cost, status FROM usage_ledger "
            "ORDER BY id")
        return [(k, m, s, u, c) for k, m, s, u, c, st in rows if st == "OK"]


@pytest.fixture(params=["sqlite", "postgres"])
async def env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Env]:
    dsn = (f"sqlite:///{tmp_path}/served.db" if request.param == "sqlite"
           else request.getfixturevalue("pg_dsn"))
    fake = FakeOpenAI()
    base = await fake.start()
    config = make_config(_config(base, dsn))
    gateway = await open_gateway(config)
    rt = Runtime("serve", config, http="127.0.0.1:0", grpc_addr="127.0.0.1:0", gateway=gateway)
    await rt.start()
    assert isinstance(gateway.store, SqlStore)
    try:
        async with httpx.AsyncClient(base_url=rt.http_url, timeout=10) as http, \
                grpc.aio.insecure_channel(rt.grpc_target) as ch:
            yield Env(rt, fake, http, pb_grpc.InferenceServiceStub(ch), gateway.store)
    finally:
        await rt.stop()
        await fake.close()


@pytest.mark.parametrize("surface", ["rest", "grpc"])
async def test_an_alias_is_charged_at_the_served_price_and_its_budget_holds(
        env: Env, surface: str) -> None:
    # $5 budget; each call reserves 18 tokens at gpt-4o's price ($1.80) and settles to the
    # upstream's 18 real tokens ($1.80): two fit ($3.60), the third would reach $5.40.
    assert await env.chat(surface, SPENDER, "smart") == (200, "", "gpt-4o")
    assert await env.chat(surface, SPENDER, "fast") == (200, "", "gpt-4o")
    assert await env.chat(surface, SPENDER, "smart") == (429, "insufficient_quota", "")
    assert await env.chat(surface, SPENDER, "fast") == (429, "insufficient_quota", "")
    assert await env.chat(surface, SPENDER, "gpt-4o") == (429, "insufficient_quota", "")
    # What reached the upstream: the served model's upstream name each time.
    assert [r["model"] for r in env.fake.requests] == ["gpt-4o", "gpt-4o"]
    assert await env.ledger() == [
        ("spender", "smart", "gpt-4o", "gpt-4o", pytest.approx(COST_4O)),
        ("spender", "fast", "fast", "gpt-4o", pytest.approx(COST_4O)),  # priced via upstream
    ]


async def test_streams_through_an_alias_are_recorded_and_priced_by_the_served_model(
        env: Env) -> None:
    body = {"model": "smart", "stream": True, "max_tokens": 10,
            "messages": [{"role": "user", "content": "hi"}]}
    async with env.http.stream("POST", "/v1/chat/completions", json=body,
                               headers={"authorization": f"Bearer {SPENDER}"}) as r:
        assert r.status_code == 200
        assert [line async for line in r.aiter_lines() if line][-1] == "data: [DONE]"
    req = pb.StreamChatCompletionRequest(params=pb.ChatCompletionParams(
        model="fast", max_tokens=10, messages=[pb.Message(role=pb.ROLE_USER, text="hi")]))
    chunks = [c async for c in env.stub.StreamChatCompletion(
        req, metadata=(("authorization", f"Bearer {SPENDER}"),), timeout=10)]
    assert chunks
    assert await env.ledger() == [
        ("spender", "smart", "gpt-4o", "gpt-4o", pytest.approx(COST_4O)),
        ("spender", "fast", "fast", "gpt-4o", pytest.approx(COST_4O)),
    ]
    # $3.60 of $5 spent: the next stream on the alias is refused before it starts.
    async with env.http.stream("POST", "/v1/chat/completions", json=body,
                               headers={"authorization": f"Bearer {SPENDER}"}) as r:
        assert r.status_code == 429
        assert (await r.aread()).find(b"insufficient_quota") > 0


async def test_admin_usage_and_the_cli_show_the_served_model(env: Env) -> None:
    assert (await env.chat("rest", SPENDER, "smart"))[0] == 200
    assert (await env.chat("grpc", NARROW, "gpt-4o-mini"))[0] == 200
    r = await env.http.get("/admin/v1/usage", headers={"authorization": f"Bearer {ADMIN_KEY}"},
                           params={"group_by": "key,model,served_model"})
    assert r.status_code == 200, r.text
    rows = {(row["key_name"], row["model"], row["served_model"]): row for row in r.json()["rows"]}
    assert set(rows) == {("spender", "smart", "gpt-4o"), ("narrow", "gpt-4o-mini", "gpt-4o-mini")}
    assert rows[("spender", "smart", "gpt-4o")]["cost"] == pytest.approx(COST_4O)
    assert rows[("narrow", "gpt-4o-mini", "gpt-4o-mini")]["cost"] == pytest.approx(COST_MINI)
    r = await env.http.get("/admin/v1/usage", headers={"authorization": f"Bearer {ADMIN_KEY}"},
                           params={"served_model": "gpt-4o"})
    assert [row["requests"] for row in r.json()["rows"]] == ["1"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "switchboard.core.composition.cli", "usage", "--server", env.rt.grpc_target,
        env={**os.environ, "SWITCHBOARD_ADMIN_KEY": ADMIN_KEY}, stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    lines = out.decode().splitlines()
    assert proc.returncode == 0 and "served by" in lines[0]
    assert any(line.split()[:3] == ["spender", "smart", "gpt-4o"] for line in lines[1:]), lines


@pytest.mark.parametrize("surface", ["rest", "grpc"])
async def test_the_allowlist_holds_through_routes_and_model_map(env: Env, surface: str) -> None:
    # A key allowed only gpt-4o-mini reaches gpt-4o by no name.
    for model in ("gpt-4o", "smart", "fast", "fastalias"):
        assert await env.chat(surface, NARROW, model) == (403, "model_not_allowed", ""), model
    assert await env.chat(surface, NARROW, "gpt-4o-mini") == (200, "", "gpt-4o-mini")
    # Allowed the alias but not every model it routes to: refused, not quietly served.
    assert await env.chat(surface, ALIAS_ONLY, "smart") == (403, "model_not_allowed", "")
    assert await env.chat(surface, ALIAS_ONLY, "fastalias") == (403, "model_not_allowed", "")
    # Allowed the alias and everything it can reach: served.
    assert await env.chat(surface, MINI_ALIAS, "minis") == (200, "", "gpt-4o-mini")
    assert [r["model"] for r in env.fake.requests] == ["gpt-4o-mini", "gpt-4o-mini"]
    assert await env.ledger() == [
        ("narrow", "gpt-4o-mini", "gpt-4o-mini", "gpt-4o-mini", pytest.approx(COST_MINI)),
        ("mini-alias", "minis", "gpt-4o-mini", "gpt-4o-mini", pytest.approx(COST_MINI)),
    ]


async def test_model_lists_offer_only_what_the_key_may_reach(env: Env) -> None:
    r = await env.http.get("/v1/models", headers={"authorization": f"Bearer {ALIAS_ONLY}"})
    assert [m["id"] for m in r.json()["data"]] == ["gpt-4o-mini"]
    r = await env.http.get("/v1/models/smart", headers={"authorization": f"Bearer {ALIAS_ONLY}"})
    assert r.status_code == 404
    r = await env.http.get("/v1/models", headers={"authorization": f"Bearer {MINI_ALIAS}"})
    assert [m["id"] for m in r.json()["data"]] == ["gpt-4o-mini", "minis"]


# ------------------------------------------------------------- reservation ----

async def test_usd_reservation_is_priced_at_the_most_expensive_reachable_model() -> None:
    """Before the call the serving model is unknown: the reservation takes the dearest
    candidate, so a fallback to an expensive model cannot overspend the budget; the
    settlement then charges what served."""
    limits = Limits(MemoryBackend(), LimitSettings(), PriceTable((
        ("big", Price(prompt=1_000_000, completion=1_000_000)),  # $1 per token
        ("small", Price(prompt=1_000, completion=1_000)))))
    key = KeyRecord(name="k", key_hash="h", key_id="key_k", budget=25.0, budget_unit="usd")
    params = pb.ChatCompletionParams(model="alias", max_tokens=10,
                                     messages=[pb.Message(role=pb.ROLE_USER, text="hi")])
    # 8 prompt tokens (estimate) + 10 = 18 tokens: $18 at big's price, $0.018 at small's.
    t = await limits.reserve_chat(key, params, "a", lambda: [("small", "small"), ("big", "big")])
    assert t.budget == 18_000_000  # micro-dollars
    with pytest.raises(GatewayError) as err:  # $18 + $18 > $25
        await limits.reserve_chat(key, params, "b", lambda: [("small", "small"), ("big", "big")])
    assert err.value.code == "insufficient_quota"
    # The upstream name prices a public name the table does not know (model_map).
    t2 = await limits.reserve_chat(key, params, "c", lambda: [("mapped", "small")])
    assert t2.budget == 18_000


# --------------------------------------------------------------- migration ----

@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_migration_2_adds_the_served_columns_and_keeps_old_rows(
        backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """A ledger written by the previous release (schema 1) upgrades in place: its rows
    stay, with empty served names, and new rows carry them."""
    from switchboard.core.store import open_store
    from switchboard.core.store.base import MIGRATIONS
    from switchboard.core.usage import UsageRecord

    dsn = (f"sqlite:///{tmp_path}/old.db" if backend == "sqlite"
           else request.getfixturevalue("pg_dsn"))
    if backend == "sqlite":
        from switchboard.core.store.sqlite import SqliteDriver
        driver: object = await SqliteDriver.open(dsn)
    else:
        from switchboard.core.store.postgres import PostgresDriver
        driver = await PostgresDriver.open(dsn)
    old = SqlStore(driver, "old")  # type: ignore[arg-type]
    version, statements = MIGRATIONS[0]
    assert version == 1
    await old.db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    for sql in statements:
        await old.db.execute(sql.replace("{serial}", old.db.serial))
    await old.db.execute("INSERT INTO schema_version (version) VALUES (1)")
    await old.db.execute(
        "INSERT INTO usage_ledger (row_id, request_id, key_id, key_name, model, channel, surface, "
        "prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, cost, latency_ms, "
        "ttft_ms, status, estimated, stream, ts) VALUES "
        "('r0', 'req_old', 'key_a', 'a', 'smart', 'oa', 'rest', 1, 1, 0, 0, 0.0, 1.0, NULL, "
        "'OK', 0, 0, 1.0)")
    await old.close()

    store = await open_store(dsn)  # migrates 1 -> 2
    try:
        await store.insert_usage([UsageRecord(request_id="req_new", key_name="a", model="smart",
                                              surface="grpc", key_id="key_a",
                                              served_model="gpt-4o", upstream_model="gpt-4o")])
        rows = await store.db.fetch(
            "SELECT request_id, model, served_model, upstream_model FROM usage_ledger ORDER BY id")
        assert rows == [("req_old", "smart", "", ""), ("req_new", "smart", "gpt-4o", "gpt-4o")]
        totals = await store.usage(group_by=["served_model"])
        assert [(t.served_model, t.requests) for t in totals] == [("", 1), ("gpt-4o", 1)]
    finally:
        await store.close()
