"""The key store on SQLite (temp dir) and PostgreSQL (own schema): migrations, keys
stored hashed, CRUD, usage aggregates; and store-backed authentication through the
key cache (revocation bound, expiry, CIDR), end to end through the real gateway."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest

from switchboard.core.composition.runtime import Runtime
from switchboard.core.composition.state import open_gateway
from switchboard.core.config import KeyConfig
from switchboard.core.errors import GatewayError
from switchboard.core.keys import StoreKeyRing, check_client_network, hash_key, record_from_stored
from switchboard.core.store import SqlStore, StoredKey, new_key_id, new_secret, open_store
from switchboard.core.usage import UsageRecord
from tests.harness import make_config


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SqlStore]:
    if request.param == "sqlite":
        dsn = f"sqlite:///{tmp_path}/keys.db"
    else:
        dsn = request.getfixturevalue("pg_dsn")
    s = await open_store(dsn)
    yield s
    await s.close()


def _key(secret: str, **kw: object) -> StoredKey:
    return StoredKey(id=new_key_id(), name=str(kw.pop("name", "k")), key_hash=hash_key(secret),
                     prefix=secret[:10], **kw)  # type: ignore[arg-type]


async def test_migrations_are_versioned_and_idempotent(store: SqlStore) -> None:
    assert await store.migrate() == 2
    assert await store.migrate() == 2
    rows = await store.db.fetch("SELECT version FROM schema_version ORDER BY version")
    assert rows == [(1,), (2,)]


async def test_keys_are_stored_hashed_with_a_prefix(store: SqlStore) -> None:
    secret = new_secret()
    created = await store.create_key(_key(secret, name="svc", owner="team-a", models=("gpt-*",),
                                          rpm=60, tpm=1000, max_concurrent=2, budget=5.0,
                                          budget_unit="usd", budget_period="month",
                                          cidrs=("10.0.0.0/8",), metadata={"env": "prod"}))
    raw = await store.db.fetch("SELECT * FROM api_keys")
    assert secret not in repr(raw)
    assert created.key_hash == hash_key(secret) and created.prefix == secret[:10]
    got = await store.key_by_hash(hash_key(secret))
    assert got is not None and got.id == created.id
    assert (got.models, got.rpm, got.tpm, got.max_concurrent, got.budget, got.budget_unit,
            got.budget_period, got.cidrs, got.metadata, got.owner) == (
        ("gpt-*",), 60, 1000, 2, 5.0, "usd", "month", ("10.0.0.0/8",), {"env": "prod"}, "team-a")
    assert await store.key_by_hash(hash_key("nope")) is None


async def test_update_list_and_revoke(store: SqlStore) -> None:
    a = await store.create_key(_key(new_secret(), name="a", owner="x"))
    b = await store.create_key(_key(new_secret(), name="b", owner="y"))
    updated = await store.update_key(a.id, {"rpm": 5, "models": ("m1",), "expires_at": 123.0})
    assert updated is not None and (updated.rpm, updated.models, updated.expires_at) == (
        5, ("m1",), 123.0)
    assert [k.id for k in await store.list_keys(owner="y")] == [b.id]
    revoked = await store.revoke_key(b.id)
    assert revoked is not None and revoked.revoked_at is not None and not revoked.enabled
    assert [k.id for k in await store.list_keys()] == [a.id]
    assert {k.id for k in await store.list_keys(include_revoked=True)} == {a.id, b.id}
    assert await store.update_key("key_missing", {"rpm": 1}) is None
    with pytest.raises(ValueError):
        await store.update_key(a.id, {"key_hash": "x"})


async def test_usage_rows_and_aggregates(store: SqlStore) -> None:
    now = time.time()
    rows = [UsageRecord(request_id=f"r{i}", key_name="k", key_id="key_1" if i < 3 else "key_2",
                        model="m1" if i % 2 else "m2", surface="rest", prompt_tokens=10,
                        completion_tokens=5, cost=0.5, status="OK" if i else "UNAVAILABLE",
                        estimated=i == 4, ts=now) for i in range(5)]
    await store.insert_usage(rows)
    assert await store.count_usage() == 5
    total = await store.usage()
    assert len(total) == 1 and (total[0].requests, total[0].errors, total[0].prompt_tokens,
                                total[0].estimated_requests) == (5, 1, 50, 1)
    assert total[0].cost == pytest.approx(2.5)
    by_key = {t.key_id: t.requests for t in await store.usage(group_by=["key"])}
    assert by_key == {"key_1": 3, "key_2": 2}
    by_model = await store.usage(key_id="key_1", group_by=["model"])
    assert {t.model: t.requests for t in by_model} == {"m1": 1, "m2": 2}
    assert await store.usage(since=now + 10) == []
    assert await store.spent("key_1", None, "tokens") == 45
    assert await store.spent("key_1", None, "usd") == pytest.approx(1.5)


async def test_two_stores_share_one_database(store: SqlStore, tmp_path: Path) -> None:
    """A second replica opening the same database migrates nothing and sees the keys."""
    secret = new_secret()
    await store.create_key(_key(secret))
    other = await open_store(store.label)  # the DSN itself: the test DSNs have no password
    try:
        assert (await other.key_by_hash(hash_key(secret))) is not None
    finally:
        await other.close()


# ------------------------------------------------------------- key cache ----

async def test_store_keyring_cache_bound_revocation_and_expiry(tmp_path: Path) -> None:
    store = await open_store(f"sqlite:///{tmp_path}/ring.db")
    try:
        ring = StoreKeyRing((KeyConfig(name="static", key="static-key-123"),), store, cache_s=0.3)
        assert (await ring.authenticate("static-key-123")).key_id == "static:static"
        secret = new_secret()
        k = await store.create_key(_key(secret, name="dyn"))
        # one lookup serves a concurrent burst
        records = await asyncio.gather(*(ring.authenticate(secret) for _ in range(20)))
        assert {r.key_id for r in records} == {k.id}
        await store.revoke_key(k.id)
        assert (await ring.authenticate(secret)).key_id == k.id  # still cached
        await asyncio.sleep(0.35)
        with pytest.raises(GatewayError) as err:
            await ring.authenticate(secret)
        assert err.value.status == grpc.StatusCode.UNAUTHENTICATED

        secret2 = new_secret()
        await store.create_key(_key(secret2, name="soon", expires_at=time.time() + 0.2))
        await ring.authenticate(secret2)
        await asyncio.sleep(0.25)  # expiry is checked per request, not bound by the cache
        with pytest.raises(GatewayError, match="expired"):
            await ring.authenticate(secret2)
        with pytest.raises(GatewayError):
            await ring.authenticate("sk-sb-unknown-secret")
    finally:
        await store.close()


def test_client_network_check() -> None:
    stored = _key(new_secret(), cidrs=("10.0.0.0/8", "::1/128"))
    rec = record_from_stored(stored)
    check_client_network(rec, "10.1.2.3")
    check_client_network(rec, "ipv4:10.9.9.9:5555")
    check_client_network(rec, "ipv6:[::1]:5555")
    check_client_network(rec, "::ffff:10.0.0.1")
    for peer in ("127.0.0.1", "ipv4:192.168.1.1:80", "unix:/tmp/x", ""):
        with pytest.raises(GatewayError) as err:
            check_client_network(rec, peer)
        assert err.value.status == grpc.StatusCode.PERMISSION_DENIED
    check_client_network(record_from_stored(_key(new_secret())), "1.2.3.4")  # no CIDRs: any


async def test_gateway_authenticates_store_keys_over_rest_and_grpc(tmp_path: Path) -> None:
    """Keys created in the store work through the real gateway on both surfaces,
    and a key limited to another network is refused with 403."""
    config = make_config(f"""
store: sqlite:///{tmp_path}/gw.db
key_cache_s: 0.2
channels:
  - {{name: echo, provider: echo, models: [echo]}}
""")
    gateway = await open_gateway(config)
    rt = Runtime("serve", config, http="127.0.0.1:0", grpc_addr="127.0.0.1:0", gateway=gateway)
    await rt.start()
    try:
        store = gateway.store
        assert isinstance(store, SqlStore)
        ok_secret, far_secret = new_secret(), new_secret()
        await store.create_key(_key(ok_secret, name="local", cidrs=("127.0.0.0/8",)))
        await store.create_key(_key(far_secret, name="far", cidrs=("10.0.0.0/8",)))
        body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
        async with httpx.AsyncClient(base_url=rt.http_url) as http:
            r = await http.post("/v1/chat/completions", json=body,
                                headers={"authorization": f"Bearer {ok_secret}"})
            assert r.status_code == 200, r.text
            r = await http.post("/v1/chat/completions", json=body,
                                headers={"authorization": f"Bearer {far_secret}"})
            assert r.status_code == 403 and r.json()["error"]["code"] == "ip_not_allowed"
        from switchboard.v1 import inference_pb2 as pb
        from switchboard.v1 import inference_pb2_grpc as pb_grpc
        async with grpc.aio.insecure_channel(rt.grpc_target) as ch:
            stub = pb_grpc.InferenceServiceStub(ch)
            req = pb.CreateChatCompletionRequest(params=pb.ChatCompletionParams(
                model="echo", messages=[pb.Message(role=pb.ROLE_USER, text="hi")]))
            resp = await stub.CreateChatCompletion(
                req, metadata=(("authorization", f"Bearer {ok_secret}"),))
            assert resp.choices[0].message.content == "hi"
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.CreateChatCompletion(
                    req, metadata=(("authorization", f"Bearer {far_secret}"),))
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await rt.stop()
