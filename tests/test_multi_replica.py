"""Three real gateway processes (`switchboard serve`) sharing one Redis and one
PostgreSQL: limits are exact across them, revocation and expiry reach every replica
within the stated bound, a SIGTERM under load loses no usage rows, the admin API
refuses a wrong admin key, and no secret appears in any log line or admin response.

Runs when SWITCHBOARD_TEST_REDIS_URL and SWITCHBOARD_TEST_DATABASE_URL are set (each
run uses its own PostgreSQL schema and Redis key prefix), skips otherwise.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import pytest
import redis.asyncio as aioredis

from switchboard.core.store import open_store
from switchboard.v1 import admin_pb2 as apb
from switchboard.v1 import admin_pb2_grpc as apb_grpc
from switchboard.v1 import inference_pb2 as pb
from switchboard.v1 import inference_pb2_grpc as pb_grpc
from tests.conftest import (
    DATABASE_URL,
    REDIS_URL,
    drop_pg_schema,
    drop_redis_prefix,
    needs_postgres,
    needs_redis,
    pg_dsn_with_schema,
    unique_name,
)

pytestmark = [needs_redis, needs_postgres]

# The installed console script is not needed: the CLI module runs with this interpreter.
BIN = (sys.executable, "-m", "switchboard.core.cli")
ADMIN_KEY = "adm-" + os.urandom(12).hex()
UPSTREAM_KEY = "upstream-" + os.urandom(12).hex()
STATIC_KEY = "sk-static-" + os.urandom(12).hex()
KEY_CACHE_S = 1.0
SECRETS: list[str] = [ADMIN_KEY, UPSTREAM_KEY, STATIC_KEY]  # + every key created below


@dataclass
class Replica:
    proc: subprocess.Popen[str]
    http_url: str
    grpc_target: str
    log_path: Path


@dataclass
class Cluster:
    replicas: list[Replica]
    config_path: Path
    env: dict[str, str]
    dsn: str
    prefix: str
    tmp: Path
    extra_logs: list[Path] = field(default_factory=list)


def start_gateway(config_path: Path, env: dict[str, str], log_path: Path) -> Replica:
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [*BIN, "serve", "--config", str(config_path), "--http", "127.0.0.1:0", "--grpc",
         "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=log, env=env, text=True)
    log.close()
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("switchboard: ready"):
        proc.kill()
        raise AssertionError(f"gateway did not start: {line!r}\n{log_path.read_text()}")
    http = re.search(r"http=(\S+)", line)
    grpc_addr = re.search(r"grpc=(\S+)", line)
    assert http and grpc_addr
    return Replica(proc, f"http://{http.group(1)}", grpc_addr.group(1), log_path)


def stop_gateway(r: Replica) -> int:
    if r.proc.poll() is None:
        r.proc.send_signal(signal.SIGTERM)
    try:
        return r.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        r.proc.kill()
        return r.proc.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if not (REDIS_URL and DATABASE_URL):
        pytest.skip("needs SWITCHBOARD_TEST_REDIS_URL and SWITCHBOARD_TEST_DATABASE_URL")
    tmp = tmp_path_factory.mktemp("replicas")
    schema, prefix = unique_name("sbtest"), unique_name("sbtest")
    dsn = pg_dsn_with_schema(schema)
    config_path = tmp / "switchboard.yaml"
    config_path.write_text(f"""
store: "{dsn}"
limits: {{backend: "{REDIS_URL}", key_prefix: {prefix}, on_error: closed}}
admin_key: ${{SB_ADMIN_KEY}}
key_cache_s: {KEY_CACHE_S}
shutdown_grace_s: 10
prices: {{echo: {{prompt: 1.0, completion: 2.0}}}}
keys: [{{name: static, key: "${{SB_STATIC_KEY}}"}}]
channels:
  - {{name: echo, provider: echo, models: [echo], api_key: "${{SB_UPSTREAM_KEY}}",
     options: {{delay_ms: 10}}}}
""")
    env = {**os.environ, "SB_ADMIN_KEY": ADMIN_KEY, "SB_UPSTREAM_KEY": UPSTREAM_KEY,
           "SB_STATIC_KEY": STATIC_KEY}
    replicas: list[Replica] = []
    try:
        # Started together: they race to create the schema and migrate it.
        import concurrent.futures

        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(start_gateway, config_path, env, tmp / f"replica{i}.log")
                       for i in range(3)]
            replicas = [f.result() for f in futures]
        yield Cluster(replicas, config_path, env, dsn, prefix, tmp)
    finally:
        for r in replicas:
            stop_gateway(r)
        drop_pg_schema(schema)
        drop_redis_prefix(prefix)


# ------------------------------------------------------------------ helpers ----

def _admin_md() -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {ADMIN_KEY}"),)


async def create_key(replica: Replica, **fields: object) -> tuple[str, str]:
    """(key id, secret) via the REST admin API of one replica."""
    async with httpx.AsyncClient(base_url=replica.http_url) as http:
        r = await http.post("/admin/v1/keys", json={"name": unique_name("k"), **fields},
                            headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert r.status_code == 201, r.text
    body = r.json()
    SECRETS.append(body["secret"])
    return body["key"]["id"], body["secret"]


def _chat_body(text: str = "alpha beta gamma delta", max_tokens: int = 10) -> dict[str, object]:
    return {"model": "echo", "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": text}]}


async def rest_chat(http: httpx.AsyncClient, replica: Replica, secret: str,
                    **body: object) -> tuple[int, str]:
    r = await http.post(f"{replica.http_url}/v1/chat/completions", json=_chat_body(**body),  # type: ignore[arg-type]
                        headers={"authorization": f"Bearer {secret}"})
    code = r.json()["error"]["code"] if r.status_code != 200 else ""
    return r.status_code, code


async def grpc_chat(stub: pb_grpc.InferenceServiceStub, secret: str,
                    text: str = "alpha beta gamma delta", max_tokens: int = 10) -> tuple[int, str]:
    req = pb.CreateChatCompletionRequest(params=pb.ChatCompletionParams(
        model="echo", max_tokens=max_tokens, messages=[pb.Message(role=pb.ROLE_USER, text=text)]))
    try:
        await stub.CreateChatCompletion(req, metadata=(("authorization", f"Bearer {secret}"),),
                                        timeout=30)
        return 200, ""
    except grpc.aio.AioRpcError as err:
        mapped = {grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.UNAUTHENTICATED: 401}
        return mapped.get(err.code(), 500), err.details() or ""


class Clients:
    """One HTTP client and one gRPC channel per replica."""

    def __init__(self, replicas: list[Replica]) -> None:
        self.replicas = replicas
        self.http = httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=200))
        self.channels = [grpc.aio.insecure_channel(r.grpc_target) for r in replicas]
        self.stubs = [pb_grpc.InferenceServiceStub(c) for c in self.channels]

    async def call(self, i: int, secret: str, **body: object) -> tuple[int, str]:
        """Request i goes to replica i % 3, alternating REST and gRPC."""
        n = i % len(self.replicas)
        if (i // len(self.replicas)) % 2:
            return await grpc_chat(self.stubs[n], secret, **body)  # type: ignore[arg-type]
        return await rest_chat(self.http, self.replicas[n], secret, **body)

    async def close(self) -> None:
        await self.http.aclose()
        for c in self.channels:
            await c.close()


async def ledger_rows(dsn: str, key_id: str) -> list[tuple[object, ...]]:
    store = await open_store(dsn)
    try:
        return await store.db.fetch(
            "SELECT status, prompt_tokens, completion_tokens, surface FROM usage_ledger "
            "WHERE key_id = ?", (key_id,))
    finally:
        await store.close()


async def flush_all(cluster: Cluster) -> None:
    """Ask every replica for usage: the admin query flushes that replica's ledger first."""
    async with httpx.AsyncClient() as http:
        for r in cluster.replicas:
            resp = await http.get(f"{r.http_url}/admin/v1/usage",
                                  headers={"authorization": f"Bearer {ADMIN_KEY}"})
            assert resp.status_code == 200


# -------------------------------------------------------------------- tests ----

async def test_rpm_is_exact_across_three_replicas(cluster: Cluster) -> None:
    rpm = 25
    key_id, secret = await create_key(cluster.replicas[0], rpm=str(rpm))
    clients = Clients(cluster.replicas)
    try:
        results = await asyncio.gather(*(clients.call(i, secret) for i in range(90)))
    finally:
        await clients.close()
    codes = [c for c, _ in results]
    assert codes.count(200) == rpm, results
    assert codes.count(429) == 90 - rpm
    await flush_all(cluster)
    rows = await ledger_rows(cluster.dsn, key_id)
    assert sum(1 for r in rows if r[0] == "OK") == rpm
    assert sum(1 for r in rows if r[0] == "RESOURCE_EXHAUSTED") == 90 - rpm
    assert {r[3] for r in rows} == {"rest", "grpc"}


async def test_budget_is_never_overspent_by_more_than_one_reservation(cluster: Cluster) -> None:
    budget = 300
    # prompt estimate: ceil(22 chars / 4) + 4 + 3 = 13, + max_tokens 10 = 23 per request;
    # the echo upstream really uses 4 + 4 = 8 tokens.
    reservation = 23
    key_id, secret = await create_key(cluster.replicas[1], budget=budget,
                                      budget_unit="BUDGET_UNIT_TOKENS",
                                      budget_period="BUDGET_PERIOD_TOTAL")
    clients = Clients(cluster.replicas)
    try:
        burst = await asyncio.gather(*(clients.call(i, secret) for i in range(120)))
        assert any(c == 429 and ("insufficient_quota" in m or "budget" in m) for c, m in burst)
        # Then one at a time until the budget refuses with nothing in flight.
        # A reservation is settled to real usage just after its response is sent (off the
        # reply's path), so a refusal right after a reply may still count that reply's
        # reservation: it is final only if it stands once the settles have landed.
        for i in range(200):
            code, msg = await clients.call(i, secret)
            if code == 429:
                await asyncio.sleep(0.3)
                code, msg = await clients.call(i, secret)
            if code == 429:
                assert "insufficient_quota" in msg or "budget" in msg
                break
        else:
            pytest.fail("the budget never ran out")
    finally:
        await clients.close()
    await flush_all(cluster)
    rows = await ledger_rows(cluster.dsn, key_id)
    spent = sum(int(r[1]) + int(r[2]) for r in rows if r[0] == "OK")  # type: ignore[call-overload]
    assert spent <= budget + reservation
    assert spent > budget - reservation  # it stopped only when the next reservation did not fit
    # The shared counter agrees with the ledger exactly (settled to real usage).
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        counter = int(await client.get(f"{cluster.prefix}:{{{key_id}}}:budget:tokens-total") or -1)
    finally:
        await client.aclose()
    assert counter == spent


async def test_revocation_reaches_every_replica_within_the_cache_bound(cluster: Cluster) -> None:
    key_id, secret = await create_key(cluster.replicas[2])
    async with httpx.AsyncClient(timeout=10) as http:
        for r in cluster.replicas:  # warm every replica's key cache
            assert (await rest_chat(http, r, secret))[0] == 200
        async with grpc.aio.insecure_channel(cluster.replicas[0].grpc_target) as ch:
            await apb_grpc.AdminServiceStub(ch).RevokeKey(apb.RevokeKeyRequest(id=key_id),
                                                          metadata=_admin_md())
        revoked_at = time.monotonic()
        assert (await rest_chat(http, cluster.replicas[0], secret))[0] == 401  # at once here

        async def until_refused(r: Replica) -> float:
            while True:
                code, _ = await rest_chat(http, r, secret)
                if code == 401:
                    return time.monotonic() - revoked_at
                assert code == 200
                await asyncio.sleep(0.05)

        delays = await asyncio.wait_for(
            asyncio.gather(*(until_refused(r) for r in cluster.replicas)), timeout=10)
    # The stated bound is key_cache_s; the slack covers the polling interval and requests.
    assert max(delays) <= KEY_CACHE_S + 0.5, delays


async def test_expiry_takes_effect_on_every_replica_at_once(cluster: Cluster) -> None:
    expires = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=2)
    _, secret = await create_key(cluster.replicas[0],
                                 expire_time=expires.isoformat().replace("+00:00", "Z"))
    clients = Clients(cluster.replicas)
    try:
        for i in range(6):
            assert (await clients.call(i, secret))[0] == 200
        await asyncio.sleep(max(0.0, (expires - dt.datetime.now(dt.UTC)).total_seconds()) + 0.05)
        results = [await clients.call(i, secret) for i in range(6)]  # still cached: no matter
        assert all(code == 401 for code, _ in results), results
        assert "expired" in results[3][1]  # a gRPC call: the status message
    finally:
        await clients.close()


async def test_admin_api_refuses_a_wrong_admin_key(cluster: Cluster) -> None:
    async with httpx.AsyncClient() as http:
        for r in cluster.replicas:
            for headers in ({}, {"authorization": "Bearer not-the-admin-key"},
                            {"authorization": f"Bearer {STATIC_KEY}"}):
                resp = await http.get(f"{r.http_url}/admin/v1/keys", headers=headers)
                assert resp.status_code == 401
                resp = await http.post(f"{r.http_url}/admin/v1/keys", headers=headers,
                                       json={"name": "intruder"})
                assert resp.status_code == 401
    for r in cluster.replicas:
        async with grpc.aio.insecure_channel(r.grpc_target) as ch:
            stub = apb_grpc.AdminServiceStub(ch)
            for md in ((), (("authorization", "Bearer not-the-admin-key"),)):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.CreateKey(apb.CreateKeyRequest(key=apb.ApiKey(name="intruder")),
                                         metadata=md)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            keys = await stub.ListKeys(apb.ListKeysRequest(include_revoked=True),
                                       metadata=_admin_md())
            assert "intruder" not in {k.name for k in keys.keys}


async def test_sigterm_during_load_loses_no_usage_rows(cluster: Cluster) -> None:
    """A fourth replica under streaming load gets SIGTERM: it drains, flushes, and the
    ledger holds exactly one row per request it accepted."""
    log_path = cluster.tmp / "replica-sigterm.log"
    cluster.extra_logs.append(log_path)
    victim = start_gateway(cluster.config_path, cluster.env, log_path)
    key_id, secret = await create_key(victim)
    accepted = 0
    by_surface = {"rest": 0, "grpc": 0}
    stop = asyncio.Event()
    text = "one two three four five six seven eight"  # 8 streamed words, 10 ms apart
    body = {"model": "echo", "stream": True, "messages": [{"role": "user", "content": text}]}

    async def rest_worker(http: httpx.AsyncClient) -> None:
        nonlocal accepted
        while not stop.is_set():
            try:
                async with http.stream("POST", f"{victim.http_url}/v1/chat/completions",
                                       json=body, headers={"authorization": f"Bearer {secret}"}
                                       ) as r:
                    accepted += 1  # the status line arrived: the gateway took the request
                    by_surface["rest"] += 1
                    async for _ in r.aiter_lines():
                        pass
            except httpx.TransportError:
                if victim.proc.poll() is not None or stop.is_set():
                    return
                await asyncio.sleep(0.01)

    async def grpc_worker(stub: pb_grpc.InferenceServiceStub) -> None:
        nonlocal accepted
        req = pb.StreamChatCompletionRequest(params=pb.ChatCompletionParams(
            model="echo", messages=[pb.Message(role=pb.ROLE_USER, text=text)]))
        while not stop.is_set():
            got_first = False
            try:
                call = stub.StreamChatCompletion(
                    req, metadata=(("authorization", f"Bearer {secret}"),), timeout=30)
                async for _ in call:
                    if not got_first:
                        got_first = True
                        accepted += 1
                        by_surface["grpc"] += 1
            except grpc.aio.AioRpcError:
                if not got_first and (victim.proc.poll() is not None or stop.is_set()):
                    return
                await asyncio.sleep(0.01)

    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=100)) as http, \
            grpc.aio.insecure_channel(victim.grpc_target) as ch:
        stub = pb_grpc.InferenceServiceStub(ch)
        workers = [asyncio.create_task(rest_worker(http)) for _ in range(20)]
        workers += [asyncio.create_task(grpc_worker(stub)) for _ in range(20)]
        for _ in range(600):  # under load: at least 40 requests served, 40 more in flight
            if accepted >= 40:
                break
            await asyncio.sleep(0.05)
        assert accepted >= 40
        victim.proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(victim.proc.wait, 30)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*workers, return_exceptions=True), timeout=30)
    assert code == 0, log_path.read_text()[-2000:]
    rows = await ledger_rows(cluster.dsn, key_id)
    rows_by = {s: sum(1 for r in rows if r[3] == s) for s in by_surface}
    assert len(rows) == accepted, (rows_by, by_surface, sorted(set(rows)))
    assert {r[3] for r in rows} == {"rest", "grpc"}


async def test_no_secret_in_any_log_line_or_admin_response(cluster: Cluster) -> None:
    created = SECRETS[3:]
    assert created, "the tests above create keys"
    async with httpx.AsyncClient() as http:
        for r in cluster.replicas:
            for path in ("/admin/v1/keys?include_revoked=true", "/admin/v1/usage?group_by=key,model",
                         "/admin/v1/channels"):
                text = (await http.get(f"{r.http_url}{path}",
                                       headers={"authorization": f"Bearer {ADMIN_KEY}"})).text
                for s in SECRETS:
                    assert s not in text, path
    logs = [r.log_path for r in cluster.replicas] + cluster.extra_logs
    total = 0
    for path in logs:
        text = path.read_text()
        total += text.count("\n")
        for s in SECRETS:
            assert s not in text, f"a secret appears in {path.name}"
    assert total > 50  # the replicas did log (access log lines, admin actions)
