"""The admin API over gRPC and REST (/admin/v1/) and the `switchboard keys|usage` CLI,
against the real gateway in-process with a SQLite store: key lifecycle, usage queries,
channels, admin-key checks, and no secret in responses or logs after creation."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from google.protobuf import field_mask_pb2

from switchboard.core.runtime import Runtime
from switchboard.core.state import open_gateway
from switchboard.v1 import admin_pb2 as apb
from switchboard.v1 import admin_pb2_grpc as apb_grpc
from tests.harness import make_config

ADMIN_KEY = "adm-test-0123456789abcdef"
UPSTREAM_KEY = "upstream-secret-echo"
# The installed console script is not needed: the CLI module runs with this interpreter.
BIN = (sys.executable, "-m", "switchboard.core.cli")


@dataclass
class Admin:
    rt: Runtime
    http: httpx.AsyncClient
    stub: apb_grpc.AdminServiceStub
    md: tuple[tuple[str, str], ...]


async def _start(tmp_path: Path, admin_key: str = ADMIN_KEY) -> Runtime:
    config = make_config(f"""
store: sqlite:///{tmp_path}/admin.db
admin_key: ${{ADMIN}}
prices: {{echo: {{prompt: 1.0, completion: 1.0}}}}
channels:
  - {{name: echo, provider: echo, models: [echo, echo-2], api_key: {UPSTREAM_KEY}}}
""", ADMIN=admin_key)
    rt = Runtime("serve", config, http="127.0.0.1:0", grpc_addr="127.0.0.1:0",
                 gateway=await open_gateway(config))
    await rt.start()
    return rt


@pytest.fixture
async def admin(tmp_path: Path) -> AsyncIterator[Admin]:
    rt = await _start(tmp_path)
    async with httpx.AsyncClient(base_url=rt.http_url, timeout=10) as http, \
            grpc.aio.insecure_channel(rt.grpc_target) as ch:
        yield Admin(rt, http, apb_grpc.AdminServiceStub(ch),
                    (("authorization", f"Bearer {ADMIN_KEY}"),))
    await rt.stop()


def _hdr(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def _chat(http: httpx.AsyncClient, secret: str, model: str = "echo") -> httpx.Response:
    return await http.post("/v1/chat/completions", headers=_hdr(secret), json={
        "model": model, "messages": [{"role": "user", "content": "hello admin"}], "max_tokens": 8})


async def test_wrong_or_missing_admin_key_is_refused_on_both_surfaces(admin: Admin) -> None:
    for headers in ({}, _hdr("wrong-admin-key"), _hdr(ADMIN_KEY + "x"), _hdr("sk-test-key-0123456789")):
        for method, path in (("GET", "/admin/v1/keys"), ("POST", "/admin/v1/keys"),
                             ("GET", "/admin/v1/usage"), ("GET", "/admin/v1/channels"),
                             ("POST", "/admin/v1/keys/key_x:revoke")):
            r = await admin.http.request(method, path, headers=headers, json={"name": "x"})
            assert r.status_code == 401, (method, path, r.text)
            assert r.json()["error"]["code"] == "invalid_admin_key"
    for md in ((), (("authorization", "Bearer wrong-admin-key"),)):
        for call, req in ((admin.stub.ListKeys, apb.ListKeysRequest()),
                          (admin.stub.CreateKey, apb.CreateKeyRequest(key=apb.ApiKey(name="x"))),
                          (admin.stub.QueryUsage, apb.QueryUsageRequest()),
                          (admin.stub.ListChannels, apb.ListChannelsRequest())):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call(req, metadata=md)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    keys = await admin.stub.ListKeys(apb.ListKeysRequest(), metadata=admin.md)
    assert list(keys.keys) == []  # nothing was created by the refused calls


async def test_admin_api_is_disabled_without_an_admin_key(tmp_path: Path) -> None:
    rt = await _start(tmp_path, admin_key="")
    try:
        async with httpx.AsyncClient(base_url=rt.http_url) as http:
            r = await http.get("/admin/v1/keys")
            assert r.status_code == 403 and r.json()["error"]["code"] == "admin_disabled"
        async with grpc.aio.insecure_channel(rt.grpc_target) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await apb_grpc.AdminServiceStub(ch).ListKeys(apb.ListKeysRequest())
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await rt.stop()


async def test_rest_key_lifecycle(admin: Admin, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    auth = _hdr(ADMIN_KEY)
    r = await admin.http.post("/admin/v1/keys", headers=auth, json={
        "name": "svc", "owner": "team-a", "models": ["echo"], "rpm": 100, "tpm": 10000,
        "max_concurrent": 5, "budget": 1000, "budget_unit": "BUDGET_UNIT_TOKENS",
        "budget_period": "BUDGET_PERIOD_MONTH", "metadata": {"env": "test"}})
    assert r.status_code == 201, r.text
    created = r.json()
    secret, key = created["secret"], created["key"]
    assert secret.startswith("sk-sb-") and secret.startswith(key["prefix"])
    assert key["rpm"] == "100" and key["budget_period"] == "BUDGET_PERIOD_MONTH"
    assert (await _chat(admin.http, secret)).status_code == 200
    r = await _chat(admin.http, secret, model="echo-2")
    assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed"

    listed = await admin.http.get("/admin/v1/keys", headers=auth)
    got = await admin.http.get(f"/admin/v1/keys/{key['id']}", headers=auth)
    assert got.json()["key"]["name"] == "svc" and listed.json()["keys"][0]["id"] == key["id"]
    r = await admin.http.patch(f"/admin/v1/keys/{key['id']}", headers=auth,
                               json={"models": [], "rpm": 2})
    assert r.status_code == 200 and r.json()["key"]["rpm"] == "2"
    assert (await _chat(admin.http, secret, model="echo-2")).status_code == 200
    r = await _chat(admin.http, secret)
    assert r.status_code == 429 and r.headers["x-ratelimit-limit-requests"] == "2"
    r = await admin.http.patch(f"/admin/v1/keys/{key['id']}", headers=auth, json={"prefix": "x"})
    assert r.status_code == 400

    usage = await admin.http.get("/admin/v1/usage", headers=auth,
                                 params={"key_id": key["id"], "period": "day",
                                         "group_by": "key,model"})
    rows = {row["model"]: row for row in usage.json()["rows"]}
    # the 403 was refused before admission and has no row; the 429 has one
    assert rows["echo"]["requests"] == "2" and rows["echo"]["errors"] == "1"
    assert rows["echo-2"]["requests"] == "1"
    assert rows["echo"]["cost"] > 0 and rows["echo"]["key_name"] == "svc"

    r = await admin.http.post(f"/admin/v1/keys/{key['id']}:revoke", headers=auth)
    assert r.status_code == 200 and r.json()["key"]["enabled"] is False
    assert "revoke_time" in r.json()["key"]
    r = await _chat(admin.http, secret)  # this replica forgot its cache entry at once
    assert r.status_code == 401
    r = await admin.http.patch(f"/admin/v1/keys/{key['id']}", headers=auth, json={"enabled": True})
    assert r.status_code == 400 and r.json()["error"]["code"] == "key_revoked"
    assert (await admin.http.get("/admin/v1/keys", headers=auth)).json() == {"keys": []}
    assert len((await admin.http.get("/admin/v1/keys?include_revoked=true",
                                     headers=auth)).json()["keys"]) == 1
    assert (await admin.http.get("/admin/v1/keys/key_nope", headers=auth)).status_code == 404

    channels = (await admin.http.get("/admin/v1/channels", headers=auth)).json()["channels"]
    assert channels == [{"name": "echo", "provider": "echo", "base_url": "",
                         "models": ["echo", "echo-2"], "weight": 1.0, "priority": 0,
                         "health": "CHANNEL_HEALTH_HEALTHY"}]

    # After creation, the secret appears in no admin response and no log line.
    for path in ("/admin/v1/keys?include_revoked=true", f"/admin/v1/keys/{key['id']}",
                 "/admin/v1/usage?group_by=key", "/admin/v1/channels"):
        text = (await admin.http.get(path, headers=auth)).text
        assert secret not in text and ADMIN_KEY not in text and UPSTREAM_KEY not in text
    logs = "\n".join(r.getMessage() + repr(r.__dict__) for r in caplog.records)
    assert "svc" in logs or key["id"] in logs
    for s in (secret, ADMIN_KEY, UPSTREAM_KEY):
        assert s not in logs


async def test_grpc_key_lifecycle_and_validation(admin: Admin) -> None:
    c = await admin.stub.CreateKey(apb.CreateKeyRequest(key=apb.ApiKey(
        name="g", allowed_cidrs=["127.0.0.0/8"], budget_period=apb.BUDGET_PERIOD_TOTAL)),
        metadata=admin.md)
    assert c.secret and c.key.enabled and list(c.key.allowed_cidrs) == ["127.0.0.0/8"]
    assert (await _chat(admin.http, c.secret)).status_code == 200
    upd = apb.UpdateKeyRequest(key=apb.ApiKey(id=c.key.id, allowed_cidrs=["10.0.0.0/8"]),
                               update_mask=field_mask_pb2.FieldMask(paths=["allowed_cidrs"]))
    u = await admin.stub.UpdateKey(upd, metadata=admin.md)
    assert list(u.key.allowed_cidrs) == ["10.0.0.0/8"]
    assert (await _chat(admin.http, c.secret)).status_code == 403
    upd = apb.UpdateKeyRequest(key=apb.ApiKey(id=c.key.id, enabled=False),
                               update_mask=field_mask_pb2.FieldMask(paths=["enabled"]))
    await admin.stub.UpdateKey(upd, metadata=admin.md)
    assert (await _chat(admin.http, c.secret)).status_code == 401
    for bad in (apb.CreateKeyRequest(key=apb.ApiKey(name="")),
                apb.CreateKeyRequest(key=apb.ApiKey(name="x", allowed_cidrs=["nope"])),
                apb.CreateKeyRequest(key=apb.ApiKey(name="x", rpm=-1))):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await admin.stub.CreateKey(bad, metadata=admin.md)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await admin.stub.GetKey(apb.GetKeyRequest(id="key_missing"), metadata=admin.md)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    g = await admin.stub.GetKey(apb.GetKeyRequest(id=c.key.id), metadata=admin.md)
    assert c.secret not in str(g)
    ch = await admin.stub.ListChannels(apb.ListChannelsRequest(), metadata=admin.md)
    assert ch.channels[0].health == apb.CHANNEL_HEALTH_HEALTHY


async def _cli(*args: str, admin_key: str = ADMIN_KEY) -> tuple[int, str, str]:
    env = {**os.environ, "SWITCHBOARD_ADMIN_KEY": admin_key}
    proc = await asyncio.create_subprocess_exec(*BIN, *args, env=env, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(), err.decode()


async def test_cli_keys_and_usage(admin: Admin) -> None:
    server = ("--server", admin.rt.grpc_target)
    code, out, _ = await _cli("keys", "create", "--name", "cli-key", "--rpm", "50", "--models",
                              "echo", "--budget", "5", "--budget-unit", "usd", "--budget-period",
                              "day", "--expires", "30d", "--meta", "team=x", *server)
    assert code == 0, out
    secret = re.search(r"secret: (\S+)", out).group(1)  # type: ignore[union-attr]
    key_id = re.search(r"created (key_\w+)", out).group(1)  # type: ignore[union-attr]
    assert (await _chat(admin.http, secret)).status_code == 200
    code, out, _ = await _cli("keys", "list", *server)
    assert code == 0 and key_id in out and "rpm=50" in out and "budget=5 usd/day" in out
    assert secret not in out
    code, out, _ = await _cli("usage", "--period", "day", *server)
    assert code == 0 and "cli-key" in out and "echo" in out
    code, out, _ = await _cli("keys", "get", key_id, *server)
    assert code == 0 and "cli-key" in out
    code, out, _ = await _cli("keys", "revoke", "cli-key", *server)  # by name: it is unique
    assert code == 0 and f"revoked {key_id}" in out
    assert (await _chat(admin.http, secret)).status_code == 401
    code, _, err = await _cli("keys", "list", *server, admin_key="wrong-admin-key")
    assert code == 1 and "UNAUTHENTICATED" in err


async def test_rest_admin_reaches_a_remote_core_over_grpc(tmp_path: Path) -> None:
    """With the façade apart (`switchboard facade --core …`), /admin/v1/ calls the
    core's AdminService over gRPC: same answers, same refusals."""
    core = await _start(tmp_path)
    facade = Runtime("facade", core.config, http="127.0.0.1:0", core_target=core.grpc_target)
    await facade.start()
    try:
        async with httpx.AsyncClient(base_url=facade.http_url) as http:
            r = await http.get("/admin/v1/keys", headers=_hdr("wrong-admin-key"))
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_admin_key"
            r = await http.post("/admin/v1/keys", headers=_hdr(ADMIN_KEY), json={"name": "remote"})
            assert r.status_code == 201
            secret = r.json()["secret"]
            assert (await _chat(http, secret)).status_code == 200
            r = await http.get("/admin/v1/keys", headers=_hdr(ADMIN_KEY))
            assert [k["name"] for k in r.json()["keys"]] == ["remote"] and secret not in r.text
    finally:
        await facade.stop()
        await core.stop()


async def test_cli_static_keys_revoke_twice_usage_json_and_small_costs(admin: Admin) -> None:
    """Issue 11: `keys list` shows the config's static keys (marked), a second revoke says
    so, `usage --json` prints numbers as numbers, and small costs are not rounded to 0."""
    from switchboard.core.cli_admin import money
    from tests.harness import TEST_KEY

    server = ("--server", admin.rt.grpc_target)
    code, out, _ = await _cli("keys", "list", *server)
    assert code == 0 and out.splitlines()[0].startswith("static:test ")  # the harness's config key
    assert " static " in out.splitlines()[0] and TEST_KEY not in out
    code, out, _ = await _cli("keys", "list", "--no-static", *server)
    assert code == 0 and "static:" not in out
    r = await admin.http.get("/admin/v1/keys?include_static=true", headers=_hdr(ADMIN_KEY))
    assert [(k["id"], k["static"]) for k in r.json()["keys"]] == [("static:test", True)]
    code, out, _ = await _cli("keys", "get", "test", *server)  # by name, static too
    assert code == 0 and "static:test" in out
    code, _, err = await _cli("keys", "revoke", "test", *server)
    assert code == 1 and "static key from the config file" in err

    code, out, _ = await _cli("keys", "create", "--name", "tiny", *server)
    secret = re.search(r"secret: (\S+)", out).group(1)  # type: ignore[union-attr]
    assert (await _chat(admin.http, secret)).status_code == 200
    code, out, _ = await _cli("usage", "--json", "--by", "key", *server)
    assert code == 0, out
    row = next(r for r in json.loads(out)["rows"] if r["key_name"] == "tiny")
    assert row["requests"] == 1 and isinstance(row["prompt_tokens"], int) and row["prompt_tokens"] > 0
    assert 0 < row["cost"] < 0.0001  # a few tokens at $1 per million
    code, out, _ = await _cli("usage", "--by", "key", *server)
    line = next(ln for ln in out.splitlines() if ln.startswith("tiny "))
    shown = float(line.split()[-1])
    assert shown == pytest.approx(row["cost"], rel=0.01) and line.split()[-1] == money(row["cost"])

    code, out, _ = await _cli("keys", "revoke", "tiny", *server)
    assert code == 0 and "revoked" in out
    code, _, err = await _cli("keys", "revoke", "tiny", *server)  # by name: found among revoked
    assert code == 1 and "already revoked" in err and "FAILED_PRECONDITION" in err


def test_money_keeps_small_costs_visible() -> None:
    from switchboard.core.cli_admin import money

    assert [money(x) for x in (0, 12.5, 0.01, 0.0042, 0.0000123, 0.000000456)] == [
        "0.0000", "12.5000", "0.0100", "0.00420", "0.0000123", "0.000000456"]


async def test_cli_version() -> None:
    import importlib.metadata

    code, out, _ = await _cli("--version")
    assert code == 0 and out.strip() == f"switchboard {importlib.metadata.version('switchboard')}"
