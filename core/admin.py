"""The admin API: API keys, usage queries and channel health (proto AdminService).

`AdminAPI` holds the logic and is called with the request message and the caller's
bearer token; `AdminServicer` is the thin grpc.aio adapter, and facade/admin_routes.py
serves the same calls as REST under /admin/v1/ (in process, or over gRPC when the
façade runs apart).

Authorisation: `authorization: Bearer <admin_key>` compared with the config's
`admin_key` in constant time; wrong or missing → UNAUTHENTICATED; no admin_key in the
config → the admin API is disabled (PERMISSION_DENIED).

Secrets: CreateKey returns the new secret exactly once; the store keeps its SHA-256
digest and a short prefix only, and no other response or log line carries it. A change
clears this replica's key cache at once; other replicas see it within `key_cache_s`.
"""

from __future__ import annotations

import calendar
import hmac
import inspect
import ipaddress
import logging
import time
from typing import Any, Literal, TypeGuard, get_args

import grpc
from google.protobuf import timestamp_pb2

from switchboard.core.config import ConfigError, KeyConfig
from switchboard.core.errors import GatewayError, invalid
from switchboard.core.gateway import Gateway
from switchboard.core.keys import bearer_token, hash_key
from switchboard.core.reload import reload_from_file
from switchboard.core.service import abort, call_context
from switchboard.core.store import PREFIX_LEN, SqlStore, StoredKey, UsageTotals, new_key_id, new_secret
from switchboard.v1 import admin_pb2 as apb
from switchboard.v1 import admin_pb2_grpc as apb_grpc

log = logging.getLogger("switchboard.admin")

_PERIODS = {apb.BUDGET_PERIOD_DAY: "day", apb.BUDGET_PERIOD_MONTH: "month",
            apb.BUDGET_PERIOD_TOTAL: "total"}
_UNITS = {apb.BUDGET_UNIT_TOKENS: "tokens", apb.BUDGET_UNIT_USD: "usd"}
_HEALTH = {"closed": apb.CHANNEL_HEALTH_HEALTHY, "open": apb.CHANNEL_HEALTH_OPEN,
           "half_open": apb.CHANNEL_HEALTH_HALF_OPEN}
# proto field (update_mask path) -> store column
_MASK = {"name": "name", "owner": "owner", "models": "models", "rpm": "rpm", "tpm": "tpm",
         "max_concurrent": "max_concurrent", "budget": "budget", "budget_unit": "budget_unit",
         "budget_period": "budget_period", "expire_time": "expires_at",
         "allowed_cidrs": "cidrs", "enabled": "enabled", "metadata": "metadata"}


def _ts(seconds: float) -> timestamp_pb2.Timestamp:
    t = timestamp_pb2.Timestamp()
    t.FromNanoseconds(int(seconds * 1e9))
    return t


def key_message(k: StoredKey) -> apb.ApiKey:
    m = apb.ApiKey(
        id=k.id, name=k.name, owner=k.owner, prefix=k.prefix, models=list(k.models),
        budget_unit={v: n for n, v in _UNITS.items()}[k.budget_unit],
        budget_period={v: n for n, v in _PERIODS.items()}[k.budget_period],
        allowed_cidrs=list(k.cidrs), enabled=k.enabled and k.revoked_at is None,
        metadata=k.metadata,
    )
    for name in ("rpm", "tpm", "max_concurrent", "budget"):
        value = getattr(k, name)
        if value is not None:
            setattr(m, name, value)
    for field, value in (("expire_time", k.expires_at), ("create_time", k.created_at),
                         ("update_time", k.updated_at), ("revoke_time", k.revoked_at)):
        if value is not None:
            getattr(m, field).CopyFrom(_ts(value))
    return m


# The key's proto3 `optional` limits: unset means "no limit", so presence is checked.
_Limit = Literal["rpm", "tpm", "max_concurrent", "budget"]


def _is_limit(name: str) -> TypeGuard[_Limit]:
    """Narrows a field name to a limit, which is what ApiKey.HasField accepts."""
    return name in get_args(_Limit)


STATIC_PREFIX = "static:"


def static_key_message(k: KeyConfig) -> apb.ApiKey:
    """A config key as the API shows it: id `static:<name>`, marked `static`, never the secret."""
    m = apb.ApiKey(
        id=STATIC_PREFIX + k.name, name=k.name, prefix=k.key[:6],  # as KeyRing shows it
        models=[] if k.models == ("*",) else list(k.models),
        budget_unit={v: n for n, v in _UNITS.items()}[k.budget_unit],
        budget_period={v: n for n, v in _PERIODS.items()}[k.budget_period],
        allowed_cidrs=list(k.allowed_cidrs), enabled=True, static=True)
    for name in ("rpm", "tpm", "max_concurrent", "budget"):
        value = getattr(k, name)
        if value is not None:
            setattr(m, name, value)
    return m


def _fields(m: apb.ApiKey, names: list[str]) -> dict[str, Any]:
    """Store values for the named proto fields of `m`, validated."""
    out: dict[str, Any] = {}
    for name in names:
        if name not in _MASK:
            raise invalid(f"field {name!r} cannot be set", f"update_mask.{name}")
        col = _MASK[name]
        if _is_limit(name):
            value = getattr(m, name) if m.HasField(name) else None
            if value is not None and value < 0:
                raise invalid(f"{name} must be >= 0", name)
        elif name == "budget_unit":
            value = _UNITS.get(m.budget_unit, "tokens")
        elif name == "budget_period":
            value = _PERIODS.get(m.budget_period, "total")
        elif name == "expire_time":
            value = (m.expire_time.ToNanoseconds() / 1e9 if m.HasField("expire_time") else None)
        elif name == "allowed_cidrs":
            try:
                value = tuple(str(ipaddress.ip_network(c, strict=False)) for c in m.allowed_cidrs)
            except ValueError as exc:
                raise invalid(f"allowed_cidrs: {exc}", "allowed_cidrs") from None
        elif name == "models":
            value = tuple(m.models)
        elif name == "metadata":
            value = dict(m.metadata)
        elif name == "name":
            value = m.name.strip()
            if not value:
                raise invalid("a key needs a name", "name")
        else:
            value = getattr(m, name)
        out[col] = value
    return out


def _period_range(req: apb.QueryUsageRequest) -> tuple[float | None, float | None]:
    if req.HasField("start_time") or req.HasField("end_time"):
        since = req.start_time.ToNanoseconds() / 1e9 if req.HasField("start_time") else None
        until = req.end_time.ToNanoseconds() / 1e9 if req.HasField("end_time") else None
        return since, until
    now = time.gmtime()
    if req.period == apb.USAGE_PERIOD_DAY:
        return float(calendar.timegm((now.tm_year, now.tm_mon, now.tm_mday, 0, 0, 0))), None
    if req.period == apb.USAGE_PERIOD_MONTH:
        return float(calendar.timegm((now.tm_year, now.tm_mon, 1, 0, 0, 0))), None
    return None, None


def _row(t: UsageTotals) -> apb.UsageRow:
    return apb.UsageRow(key_id=t.key_id, key_name=t.key_name, model=t.model,
                        served_model=t.served_model, requests=t.requests,
                        errors=t.errors, prompt_tokens=t.prompt_tokens,
                        completion_tokens=t.completion_tokens, cached_tokens=t.cached_tokens,
                        reasoning_tokens=t.reasoning_tokens, cost=t.cost,
                        estimated_requests=t.estimated_requests)


class AdminAPI:
    """Admin operations over a Gateway's store, key cache, ledger and router."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    # ---------------------------------------------------------- plumbing ----

    def authorize(self, token: str) -> None:
        expected = self.gateway.config.admin_key
        if not expected:
            raise GatewayError(grpc.StatusCode.PERMISSION_DENIED,
                               "The admin API is disabled: set admin_key in the config.",
                               code="admin_disabled")
        if not hmac.compare_digest(token.encode("utf-8"), expected.encode("utf-8")):
            raise GatewayError(grpc.StatusCode.UNAUTHENTICATED,
                               "Missing or incorrect admin key.", code="invalid_admin_key")

    def _store(self) -> SqlStore:
        store = self.gateway.store
        if not isinstance(store, SqlStore):
            raise GatewayError(grpc.StatusCode.FAILED_PRECONDITION,
                               "This gateway runs without a key store.", code="no_store")
        return store

    def _static(self, key_id: str) -> KeyConfig | None:
        if not key_id.startswith(STATIC_PREFIX):
            return None
        for k in self.gateway.config.keys:
            if STATIC_PREFIX + k.name == key_id:
                return k
        raise GatewayError(grpc.StatusCode.NOT_FOUND, f"No static API key with id {key_id!r}.",
                           code="key_not_found", param="id")

    def _refuse_static(self, key_id: str, action: str) -> None:
        if self._static(key_id) is not None:
            raise GatewayError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"The API key {key_id!r} is a static key from the config file: "
                               f"{action} it there and reload.", code="static_key", param="id")

    async def _existing(self, key_id: str) -> StoredKey:
        if not key_id:
            raise invalid("a key id is required", "id")
        k = await self._store().get_key(key_id)
        if k is None:
            raise GatewayError(grpc.StatusCode.NOT_FOUND, f"No API key with id {key_id!r}.",
                               code="key_not_found", param="id")
        return k

    # -------------------------------------------------------------- keys ----

    async def create_key(self, req: apb.CreateKeyRequest, token: str) -> apb.CreateKeyResponse:
        self.authorize(token)
        # Every settable field is honoured; `enabled` left unset means enabled.
        fields = _fields(req.key, [n for n in _MASK if n != "enabled"])
        fields["enabled"] = req.key.enabled if req.key.HasField("enabled") else True
        secret = new_secret()
        stored = StoredKey(id=new_key_id(), key_hash=hash_key(secret), prefix=secret[:PREFIX_LEN],
                           **fields)
        stored = await self._store().create_key(stored)
        log.info("admin: created key %s (%s)", stored.id, stored.name)
        return apb.CreateKeyResponse(key=key_message(stored), secret=secret)

    async def list_keys(self, req: apb.ListKeysRequest, token: str) -> apb.ListKeysResponse:
        self.authorize(token)
        keys = await self._store().list_keys(owner=req.owner, include_revoked=req.include_revoked)
        static = ([static_key_message(k) for k in self.gateway.config.keys]
                  if req.include_static and not req.owner else [])
        return apb.ListKeysResponse(keys=[*static, *(key_message(k) for k in keys)])

    async def get_key(self, req: apb.GetKeyRequest, token: str) -> apb.GetKeyResponse:
        self.authorize(token)
        static = self._static(req.id)
        if static is not None:
            return apb.GetKeyResponse(key=static_key_message(static))
        return apb.GetKeyResponse(key=key_message(await self._existing(req.id)))

    async def update_key(self, req: apb.UpdateKeyRequest, token: str) -> apb.UpdateKeyResponse:
        self.authorize(token)
        self._refuse_static(req.key.id, "change")
        current = await self._existing(req.key.id)
        paths = list(req.update_mask.paths)
        if not paths:
            raise invalid("update_mask must name the fields to change", "update_mask")
        changes = _fields(req.key, paths)
        if current.revoked_at is not None:
            raise GatewayError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"The API key {current.id!r} is revoked and cannot change.",
                               code="key_revoked")
        updated = await self._store().update_key(current.id, changes)
        assert updated is not None
        self.gateway.keys.forget(current.key_hash)
        log.info("admin: updated key %s (%s)", current.id, ", ".join(sorted(paths)))
        return apb.UpdateKeyResponse(key=key_message(updated))

    async def revoke_key(self, req: apb.RevokeKeyRequest, token: str) -> apb.RevokeKeyResponse:
        self.authorize(token)
        self._refuse_static(req.id, "remove")
        current = await self._existing(req.id)
        if current.revoked_at is not None:  # say so: a second revoke is not a silent success
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(current.revoked_at))
            raise GatewayError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"The API key {current.id!r} ({current.name}) was already revoked "
                               f"at {when}.", code="key_revoked", param="id")
        revoked = await self._store().revoke_key(current.id)
        assert revoked is not None
        self.gateway.keys.forget(current.key_hash)
        log.info("admin: revoked key %s", current.id)
        return apb.RevokeKeyResponse(key=key_message(revoked))

    # ------------------------------------------------------ usage, channels ----

    async def query_usage(self, req: apb.QueryUsageRequest, token: str) -> apb.QueryUsageResponse:
        self.authorize(token)
        store = self._store()
        flush = getattr(self.gateway.usage, "flush", None)
        if flush is not None:
            await flush()  # this replica's buffered rows count too
        since, until = _period_range(req)
        groups = {apb.USAGE_GROUP_KEY: "key", apb.USAGE_GROUP_MODEL: "model",
                  apb.USAGE_GROUP_SERVED_MODEL: "served_model"}
        rows = await store.usage(key_id=req.key_id, model=req.model, since=since, until=until,
                                 group_by=[groups[g] for g in req.group_by if g in groups],
                                 served_model=req.served_model)
        resp = apb.QueryUsageResponse(rows=[_row(t) for t in rows])
        if since is not None:
            resp.start_time.CopyFrom(_ts(since))
        if until is not None:
            resp.end_time.CopyFrom(_ts(until))
        return resp

    async def list_channels(self, req: apb.ListChannelsRequest,
                            token: str) -> apb.ListChannelsResponse:
        self.authorize(token)
        out = apb.ListChannelsResponse()
        breaker = getattr(self.gateway.router, "breaker", None)
        for c in self.gateway.config.channels:
            state: Any = breaker.state(c.name) if breaker is not None else "closed"
            if inspect.isawaitable(state):
                state = await state
            out.channels.add(name=c.name, provider=c.provider, base_url=c.base_url,
                             models=list(c.models), weight=c.weight, priority=c.priority,
                             health=_HEALTH.get(str(state), apb.CHANNEL_HEALTH_UNSPECIFIED))
        return out


    async def reload_config(self, req: apb.ReloadConfigRequest,
                            token: str) -> apb.ReloadConfigResponse:
        """The same reload as SIGHUP (core/reload.py)."""
        self.authorize(token)
        try:
            new = await reload_from_file(self.gateway)
        except ConfigError as exc:
            raise GatewayError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"The new config was rejected; the running one keeps serving: {exc}",
                               code="invalid_config") from None
        return apb.ReloadConfigResponse(source=new.source, channels=len(new.channels),
                                        keys=len(new.keys), routes=len(new.routes))


# RPC name -> AdminAPI method name; the REST routes use the same table.
RPCS = {"CreateKey": "create_key", "ListKeys": "list_keys", "GetKey": "get_key",
        "UpdateKey": "update_key", "RevokeKey": "revoke_key", "QueryUsage": "query_usage",
        "ListChannels": "list_channels", "ReloadConfig": "reload_config"}


class AdminServicer(apb_grpc.AdminServiceServicer):
    """Thin grpc.aio adapter over AdminAPI."""

    def __init__(self, api: AdminAPI) -> None:
        self.api = api

    async def _call(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> Any:
        ctx = call_context(context)
        md = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        try:
            return await getattr(self.api, method)(request, bearer_token(md.get("authorization")))
        except GatewayError as err:
            await abort(context, err, ctx.request_id)

    async def CreateKey(self, request: apb.CreateKeyRequest,
                        context: grpc.aio.ServicerContext) -> apb.CreateKeyResponse:
        return await self._call("create_key", request, context)

    async def ListKeys(self, request: apb.ListKeysRequest,
                       context: grpc.aio.ServicerContext) -> apb.ListKeysResponse:
        return await self._call("list_keys", request, context)

    async def GetKey(self, request: apb.GetKeyRequest,
                     context: grpc.aio.ServicerContext) -> apb.GetKeyResponse:
        return await self._call("get_key", request, context)

    async def UpdateKey(self, request: apb.UpdateKeyRequest,
                        context: grpc.aio.ServicerContext) -> apb.UpdateKeyResponse:
        return await self._call("update_key", request, context)

    async def RevokeKey(self, request: apb.RevokeKeyRequest,
                        context: grpc.aio.ServicerContext) -> apb.RevokeKeyResponse:
        return await self._call("revoke_key", request, context)

    async def QueryUsage(self, request: apb.QueryUsageRequest,
                         context: grpc.aio.ServicerContext) -> apb.QueryUsageResponse:
        return await self._call("query_usage", request, context)

    async def ListChannels(self, request: apb.ListChannelsRequest,
                           context: grpc.aio.ServicerContext) -> apb.ListChannelsResponse:
        return await self._call("list_channels", request, context)

    async def ReloadConfig(self, request: apb.ReloadConfigRequest,
                           context: grpc.aio.ServicerContext) -> apb.ReloadConfigResponse:
        return await self._call("reload_config", request, context)
