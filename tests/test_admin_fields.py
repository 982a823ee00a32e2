"""Every field the admin API accepts is honoured, on create and on update, over REST
(/admin/v1/) and gRPC (AdminService) (issue 10, item 3): for each field, the key is
created (or updated) with it, GetKey and ListKeys show it, and the gateway behaves
accordingly — a disabled or expired key is refused 401, CIDRs, models and limits are
enforced, the budget's unit and period apply."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import field_mask_pb2, json_format
from google.protobuf.message import Message

from switchboard.core.errors import GatewayError
from switchboard.core.runtime import Runtime
from switchboard.core.state import open_gateway
from switchboard.v1 import admin_pb2 as apb
from switchboard.v1 import admin_pb2_grpc as apb_grpc
from switchboard.v1 import inference_pb2 as pb
from switchboard.v1 import inference_pb2_grpc as pb_grpc
from tests.harness import make_config

ADMIN_KEY = "adm-fields-0123456789abcdef"
ADMIN_MD = (("authorization", f"Bearer {ADMIN_KEY}"),)


@dataclass
class Reply:
    status: int  # HTTP status, or the HTTP status the gRPC code maps to
    code: str = ""
    headers: dict[str, str] | None = None  # x-ratelimit-* and retry-after, either surface


class Surface:
    """The admin API and a chat call on one surface; keys come back as proto3 JSON
    (snake_case names, int64 as strings), the REST reply format."""

    def __init__(self, name: str, http: httpx.AsyncClient, channel: grpc.aio.Channel) -> None:
        self.name, self.http = name, http
        self.admin = apb_grpc.AdminServiceStub(channel)
        self.inference = pb_grpc.InferenceServiceStub(channel)

    @staticmethod
    def _json(msg: Message) -> dict[str, Any]:
        return json_format.MessageToDict(msg, preserving_proto_field_name=True,
                                         always_print_fields_with_no_presence=True)

    async def create(self, fields: dict[str, Any]) -> tuple[dict[str, Any], str]:
        if self.name == "rest":
            r = await self.http.post("/admin/v1/keys", headers=dict(ADMIN_MD), json=fields)
            assert r.status_code == 201, r.text
            return r.json()["key"], r.json()["secret"]
        c = await self.admin.CreateKey(apb.CreateKeyRequest(
            key=json_format.ParseDict(fields, apb.ApiKey())), metadata=ADMIN_MD)
        return self._json(c.key), c.secret

    async def update(self, key_id: str, fields: dict[str, Any]) -> dict[str, Any]:
        if self.name == "rest":
            r = await self.http.patch(f"/admin/v1/keys/{key_id}", headers=dict(ADMIN_MD),
                                      json=fields)
            assert r.status_code == 200, r.text
            return dict(r.json()["key"])
        key = json_format.ParseDict(fields, apb.ApiKey())
        key.id = key_id
        u = await self.admin.UpdateKey(apb.UpdateKeyRequest(
            key=key, update_mask=field_mask_pb2.FieldMask(paths=list(fields))), metadata=ADMIN_MD)
        return self._json(u.key)

    async def get(self, key_id: str) -> dict[str, Any]:
        if self.name == "rest":
            r = await self.http.get(f"/admin/v1/keys/{key_id}", headers=dict(ADMIN_MD))
            return dict(r.json()["key"])
        return self._json((await self.admin.GetKey(apb.GetKeyRequest(id=key_id),
                                                   metadata=ADMIN_MD)).key)

    async def list(self, owner: str = "") -> list[dict[str, Any]]:
        if self.name == "rest":
            r = await self.http.get("/admin/v1/keys", headers=dict(ADMIN_MD),
                                    params={"owner": owner} if owner else {})
            return list(r.json()["keys"])
        ks = await self.admin.ListKeys(apb.ListKeysRequest(owner=owner), metadata=ADMIN_MD)
        return [self._json(k) for k in ks.keys]

    async def usage_key_name(self, key_id: str) -> str:
        if self.name == "rest":
            r = await self.http.get("/admin/v1/usage", headers=dict(ADMIN_MD),
                                    params={"key_id": key_id, "group_by": "key"})
            return str(r.json()["rows"][0]["key_name"])
        u = await self.admin.QueryUsage(apb.QueryUsageRequest(
            key_id=key_id, group_by=[apb.USAGE_GROUP_KEY]), metadata=ADMIN_MD)
        return u.rows[0].key_name

    async def chat(self, secret: str, model: str = "echo", max_tokens: int = 5) -> Reply:
        if self.name == "rest":
            r = await self.http.post("/v1/chat/completions", headers={
                "authorization": f"Bearer {secret}"}, json={
                "model": model, "max_tokens": max_tokens,
                "messages": [{"role": "user", "content": "hi"}]})
            hdrs = {k: v for k, v in r.headers.items()
                    if k.startswith("x-ratelimit-") or k == "retry-after"}
            return Reply(r.status_code, r.json()["error"]["code"] if r.status_code != 200 else "",
                         hdrs)
        req = pb.CreateChatCompletionRequest(params=pb.ChatCompletionParams(
            model=model, max_tokens=max_tokens, messages=[pb.Message(role=pb.ROLE_USER, text="hi")]))
        try:
            await self.inference.CreateChatCompletion(
                req, metadata=(("authorization", f"Bearer {secret}"),), timeout=10)
        except grpc.aio.AioRpcError as err:
            e = GatewayError.from_rpc_error(err)
            hdrs = dict(e.http_headers())
            return Reply(e.http_status, e.code or "", hdrs)
        return Reply(200)


@pytest.fixture(params=["rest", "grpc"])
async def surface(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Surface]:
    config = make_config(f"""
store: sqlite:///{tmp_path}/fields.db
admin_key: {ADMIN_KEY}
prices: {{echo: {{prompt: 1.0, completion: 1.0}}}}
channels:
  - {{name: echo, provider: echo, models: [echo, echo-2]}}
""")
    rt = Runtime("serve", config, http="127.0.0.1:0", grpc_addr="127.0.0.1:0",
                 gateway=await open_gateway(config))
    await rt.start()
    try:
        async with httpx.AsyncClient(base_url=rt.http_url, timeout=10) as http, \
                grpc.aio.insecure_channel(rt.grpc_target) as ch:
            yield Surface(request.param, http, ch)
    finally:
        await rt.stop()


# ------------------------------------------------------------ field table ----
# (field, value in proto3 JSON, fields the key starts with, behaviour with the value).

Behaviour = Callable[[Surface, str, str], Awaitable[None]]


async def _name(s: Surface, secret: str, key_id: str) -> None:
    assert (await s.chat(secret)).status == 200
    assert await s.usage_key_name(key_id) == "renamed"


async def _owner(s: Surface, secret: str, key_id: str) -> None:
    assert key_id in [k["id"] for k in await s.list(owner="team-x")]
    assert key_id not in [k["id"] for k in await s.list(owner="team-y")]


async def _models(s: Surface, secret: str, key_id: str) -> None:
    assert (await s.chat(secret, "echo-2")).status == 200
    r = await s.chat(secret, "echo")
    assert (r.status, r.code) == (403, "model_not_allowed")


async def _rpm(s: Surface, secret: str, key_id: str) -> None:
    assert (await s.chat(secret)).status == 200
    r = await s.chat(secret)
    assert (r.status, r.code) == (429, "rate_limit_exceeded")
    assert r.headers is not None and r.headers["x-ratelimit-limit-requests"] == "1"


async def _tpm(s: Surface, secret: str, key_id: str) -> None:
    assert (await s.chat(secret, max_tokens=5)).status == 200  # 8 + 5 <= 20
    r = await s.chat(secret, max_tokens=100)                   # 8 + 100 > 20
    assert (r.status, r.code) == (429, "rate_limit_exceeded")
    assert r.headers is not None and r.headers["x-ratelimit-limit-tokens"] == "20"


async def _max_concurrent(s: Surface, secret: str, key_id: str) -> None:
    r = await s.chat(secret)  # no slot at all
    assert (r.status, r.code) == (429, "rate_limit_exceeded")
    assert r.headers is not None and r.headers["x-ratelimit-limit-concurrency"] == "0"


async def _budget(s: Surface, secret: str, key_id: str) -> None:
    r = await s.chat(secret)  # 13 tokens reserved > a 1-token budget
    assert (r.status, r.code) == (429, "insufficient_quota")


async def _budget_usd(s: Surface, secret: str, key_id: str) -> None:
    # 0.0001 tokens refuses everything; $0.0001 admits 13 tokens at $1/M ($0.000013).
    assert (await s.chat(secret)).status == 200


async def _budget_day(s: Surface, secret: str, key_id: str) -> None:
    r = await s.chat(secret)
    assert (r.status, r.code) == (429, "insufficient_quota")
    assert r.headers is not None and "retry-after" in r.headers  # a day budget resets


async def _expired(s: Surface, secret: str, key_id: str) -> None:
    r = await s.chat(secret)
    assert (r.status, r.code) == (401, "invalid_api_key")


async def _cidrs(s: Surface, secret: str, key_id: str) -> None:
    r = await s.chat(secret)
    assert (r.status, r.code) == (403, "ip_not_allowed")


async def _disabled(s: Surface, secret: str, key_id: str) -> None:
    r = await s.chat(secret)
    assert (r.status, r.code) == (401, "invalid_api_key")


async def _metadata(s: Surface, secret: str, key_id: str) -> None:
    # Metadata is the operator's own; it changes nothing about the key's use.
    assert (await s.chat(secret)).status == 200


CASES: list[tuple[str, Any, dict[str, Any], Behaviour]] = [
    ("name", "renamed", {}, _name),
    ("owner", "team-x", {}, _owner),
    ("models", ["echo-2"], {}, _models),
    ("rpm", "1", {}, _rpm),
    ("tpm", "20", {}, _tpm),
    ("max_concurrent", "0", {}, _max_concurrent),
    ("budget", 1.0, {}, _budget),
    ("budget_unit", "BUDGET_UNIT_USD", {"budget": 0.0001}, _budget_usd),
    ("budget_period", "BUDGET_PERIOD_DAY", {"budget": 1.0}, _budget_day),
    ("expire_time", "2001-01-01T00:00:00Z", {}, _expired),
    ("allowed_cidrs", ["10.0.0.0/8"], {}, _cidrs),
    ("enabled", False, {}, _disabled),
    ("metadata", {"team": "x", "env": "test"}, {}, _metadata),
]


def test_the_table_covers_every_settable_field() -> None:
    output_only = {"id", "prefix", "create_time", "update_time", "revoke_time", "static"}
    settable = {f.name for f in apb.ApiKey.DESCRIPTOR.fields} - output_only
    assert {field for field, *_ in CASES} == settable


def _shown(view: dict[str, Any], field: str, value: Any) -> bool:
    return bool(view.get(field) == value)


@pytest.mark.parametrize("field,value,base,behaves", CASES, ids=[c[0] for c in CASES])
async def test_each_field_is_honoured_on_create(surface: Surface, field: str, value: Any,
                                                base: dict[str, Any], behaves: Behaviour) -> None:
    created, secret = await surface.create({"name": "renamed" if field == "name" else "k",
                                            **base, field: value})
    assert _shown(created, field, value), created
    assert _shown(await surface.get(created["id"]), field, value)
    listed = {k["id"]: k for k in await surface.list()}
    assert _shown(listed[created["id"]], field, value)
    await behaves(surface, secret, created["id"])


@pytest.mark.parametrize("field,value,base,behaves", CASES, ids=[c[0] for c in CASES])
async def test_each_field_is_honoured_on_update(surface: Surface, field: str, value: Any,
                                                base: dict[str, Any], behaves: Behaviour) -> None:
    created, secret = await surface.create({"name": "k", **base})
    assert not _shown(created, field, value)  # the update is what changes it
    updated = await surface.update(created["id"], {field: value})
    assert _shown(updated, field, value), updated
    assert _shown(await surface.get(created["id"]), field, value)
    listed = {k["id"]: k for k in await surface.list()}
    assert _shown(listed[created["id"]], field, value)
    await behaves(surface, secret, created["id"])


async def test_a_key_created_disabled_is_refused_until_enabled(surface: Surface) -> None:
    """The issue's report: `POST /admin/v1/keys {"name": …, "enabled": false}` gave a
    key that worked."""
    created, secret = await surface.create({"name": "off", "enabled": False})
    assert created["enabled"] is False
    assert (await surface.chat(secret)).status == 401
    await surface.update(created["id"], {"enabled": True})
    assert (await surface.chat(secret)).status == 200
    # Unset on create means enabled (as before).
    created, secret = await surface.create({"name": "on"})
    assert created["enabled"] is True and (await surface.chat(secret)).status == 200
