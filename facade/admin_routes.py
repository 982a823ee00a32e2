"""The admin API as REST under /admin/v1/: JSON ⇄ the AdminService messages, nothing
else. In one process the routes call core/admin.py's AdminAPI directly; with the
façade apart they call the core's AdminService over the transport's gRPC channel.
Bodies and replies use the proto3 JSON mapping (snake_case accepted and returned;
int64 values are JSON strings; enums by name, e.g. "BUDGET_PERIOD_DAY";
times RFC 3339). Errors are the same OpenAI-style objects as /v1 (errors_middleware).

  POST   /admin/v1/keys                 body: ApiKey          -> {key, secret} (201)
  GET    /admin/v1/keys?owner=&include_revoked=true&include_static=true
  GET    /admin/v1/keys/{id}
  PATCH  /admin/v1/keys/{id}            body: ApiKey fields to change (they form the mask)
  POST   /admin/v1/keys/{id}:revoke     (DELETE /admin/v1/keys/{id} does the same)
  GET    /admin/v1/usage?key_id=&model=&served_model=&period=day|month|total&start_time=&end_time=
                                        &group_by=key,model,served_model
         (`model` is the name requested, `served_model` the one that answered after routes)
  GET    /admin/v1/channels
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import orjson
from aiohttp import web
from google.protobuf import json_format
from google.protobuf.message import Message

from switchboard.core.errors import GatewayError, invalid
from switchboard.core.keys import bearer_token
from switchboard.facade.body import read_json
from switchboard.v1 import admin_pb2 as apb
from switchboard.v1 import admin_pb2_grpc as apb_grpc

Caller = Callable[[str, Message, str], Awaitable[Message]]
ADMIN: web.AppKey[Caller] = web.AppKey("admin_caller")
_MASKABLE = {f.name for f in apb.ApiKey.DESCRIPTOR.fields} - {
    "id", "prefix", "create_time", "update_time", "revoke_time"}
_CAMEL = {f.json_name: f.name for f in apb.ApiKey.DESCRIPTOR.fields}


def _in_process(transport: Any) -> Caller:
    from switchboard.core.admin import RPCS, AdminAPI

    api = AdminAPI(transport)

    async def call(rpc: str, req: Message, token: str) -> Message:
        return await getattr(api, RPCS[rpc])(req, token)

    return call


def _over_grpc(channel: grpc.aio.Channel) -> Caller:
    stub = apb_grpc.AdminServiceStub(channel)

    async def call(rpc: str, req: Message, token: str) -> Message:
        md = (("authorization", f"Bearer {token}"),) if token else ()
        try:
            return await getattr(stub, rpc)(req, metadata=md)
        except grpc.aio.AioRpcError as err:
            raise GatewayError.from_rpc_error(err) from None

    return call


def add_admin_routes(app: web.Application, transport: Any) -> None:
    """Mount /admin/v1/ for a transport: the Gateway itself, or a GrpcTransport."""
    channel = getattr(transport, "channel", None)
    app[ADMIN] = _over_grpc(channel) if channel is not None else _in_process(transport)
    app.router.add_post("/admin/v1/keys", create_key)
    app.router.add_get("/admin/v1/keys", list_keys)
    app.router.add_get("/admin/v1/keys/{id}", get_key)
    app.router.add_patch("/admin/v1/keys/{id}", update_key)
    app.router.add_delete("/admin/v1/keys/{id}", revoke_key)
    app.router.add_post("/admin/v1/keys/{id}:revoke", revoke_key)
    app.router.add_get("/admin/v1/usage", query_usage)
    app.router.add_get("/admin/v1/channels", list_channels)
    app.router.add_post("/admin/v1/config:reload", reload_config)


# ------------------------------------------------------------------ plumbing ----

async def _call(request: web.Request, rpc: str, req: Message, status: int = 200) -> web.Response:
    caller = request.app[ADMIN]
    resp = await caller(rpc, req, bearer_token(request.headers.get("authorization")))
    body = json_format.MessageToDict(resp, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


async def _json_object(request: web.Request) -> dict[str, Any]:
    # the same size, encoding and depth limits as every JSON body
    data = await read_json(request, empty={})
    if not isinstance(data, dict):
        raise invalid("The request body must be a JSON object.", None)
    return data


M = TypeVar("M", bound=Message)


def _parse(data: dict[str, Any], msg: M) -> M:
    try:
        return json_format.ParseDict(data, msg)
    except json_format.ParseError as exc:
        raise invalid(str(exc), None) from None


# ------------------------------------------------------------------ handlers ----

async def create_key(request: web.Request) -> web.Response:
    key = _parse(await _json_object(request), apb.ApiKey())
    return await _call(request, "CreateKey", apb.CreateKeyRequest(key=key), status=201)


async def list_keys(request: web.Request) -> web.Response:
    q = request.query
    return await _call(request, "ListKeys", apb.ListKeysRequest(
        owner=q.get("owner", ""), include_revoked=q.get("include_revoked", "") in ("1", "true"),
        include_static=q.get("include_static", "") in ("1", "true")))


async def get_key(request: web.Request) -> web.Response:
    return await _call(request, "GetKey", apb.GetKeyRequest(id=request.match_info["id"]))


async def update_key(request: web.Request) -> web.Response:
    data = await _json_object(request)
    paths = []
    for name in data:
        field = _CAMEL.get(name, name)
        if field not in _MASKABLE:
            raise invalid(f"field {name!r} cannot be changed", name)
        paths.append(field)
    key = _parse(data, apb.ApiKey())
    assert isinstance(key, apb.ApiKey)
    key.id = request.match_info["id"]
    req = apb.UpdateKeyRequest(key=key)
    req.update_mask.paths.extend(paths)
    return await _call(request, "UpdateKey", req)


async def revoke_key(request: web.Request) -> web.Response:
    return await _call(request, "RevokeKey", apb.RevokeKeyRequest(id=request.match_info["id"]))


async def query_usage(request: web.Request) -> web.Response:
    q = request.query
    data: dict[str, Any] = {k: q[k] for k in ("key_id", "model", "served_model", "start_time",
                                              "end_time") if k in q}
    if "period" in q:
        data["period"] = f"USAGE_PERIOD_{q['period'].upper()}"
    if "group_by" in q:
        data["group_by"] = [f"USAGE_GROUP_{g.strip().upper()}" for g in q["group_by"].split(",")
                            if g.strip()]
    return await _call(request, "QueryUsage", _parse(data, apb.QueryUsageRequest()))


async def list_channels(request: web.Request) -> web.Response:
    return await _call(request, "ListChannels", apb.ListChannelsRequest())


async def reload_config(request: web.Request) -> web.Response:
    return await _call(request, "ReloadConfig", apb.ReloadConfigRequest())
