"""`switchboard keys create|list|get|revoke` and `switchboard usage`: operator commands
that talk to the admin API (AdminService, gRPC) of a running gateway.

Why the API and not the database: the gateway validates, logs and clears its key cache
in one place; it works the same against SQLite or PostgreSQL, local or remote, and a
SQLite file is never written by two processes' different code paths. So the gateway
must be running, with `admin_key` set in its config.

  --server HOST:PORT   the gateway's gRPC address (default $SWITCHBOARD_ADMIN_ADDR or
                       127.0.0.1:50051)
  admin key            from $SWITCHBOARD_ADMIN_KEY (preferred: not visible in `ps`), or
                       --admin-key

`keys create` prints the new secret once (it cannot be shown again) and the key id;
`--json` prints the full replies as JSON instead of tables.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import re
import sys
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from switchboard.v1 import admin_pb2 as apb
from switchboard.v1 import admin_pb2_grpc as apb_grpc


def register(sub: Any) -> None:
    """Add the `keys` and `usage` commands to the main parser's subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--server", default=os.environ.get("SWITCHBOARD_ADMIN_ADDR", "127.0.0.1:50051"),
                        help="gateway gRPC address (default $SWITCHBOARD_ADMIN_ADDR or 127.0.0.1:50051)")
    common.add_argument("--admin-key", default=None,
                        help="admin key (default $SWITCHBOARD_ADMIN_KEY)")
    common.add_argument("--json", action="store_true", help="print replies as JSON")
    keys = sub.add_parser("keys", help="create, list, show or revoke API keys (admin API)")
    ks = keys.add_subparsers(dest="keys_cmd", required=True)
    c = ks.add_parser("create", parents=[common], help="create a key; prints its secret once")
    c.add_argument("--name", required=True)
    c.add_argument("--owner", default="")
    c.add_argument("--models", default="", help="comma-separated model names or globs")
    for flag in ("--rpm", "--tpm", "--max-concurrent"):
        c.add_argument(flag, type=int)
    c.add_argument("--budget", type=float)
    c.add_argument("--budget-unit", choices=("tokens", "usd"), default="tokens")
    c.add_argument("--budget-period", choices=("day", "month", "total"), default="total")
    c.add_argument("--expires", help="ISO time (2026-12-31T00:00:00Z) or a duration: 30d, 12h, 90m")
    c.add_argument("--cidr", action="append", default=[], help="allowed client network (repeatable)")
    c.add_argument("--meta", action="append", default=[], help="metadata KEY=VALUE (repeatable)")
    c.add_argument("--disabled", action="store_true", help="create the key disabled")
    ls = ks.add_parser("list", parents=[common], help="list keys")
    ls.add_argument("--owner", default="")
    ls.add_argument("--all", action="store_true", help="include revoked keys")
    ls.add_argument("--no-static", action="store_true",
                    help="leave out the config's static keys (listed first, state `static`)")
    g = ks.add_parser("get", parents=[common], help="show one key")
    g.add_argument("id", help="key id, or the key's name when only one key has it")
    r = ks.add_parser("revoke", parents=[common], help="revoke a key for good")
    r.add_argument("id", help="key id, or the key's name when only one key has it")
    u = sub.add_parser("usage", parents=[common], help="usage totals from the ledger (admin API)")
    u.add_argument("--key", default="", help="key id")
    u.add_argument("--model", default="", help="model requested (alias, route or model)")
    u.add_argument("--served", default="", help="model that served the requests")
    u.add_argument("--period", choices=("day", "month", "total"), default="total")
    u.add_argument("--by", default="key,model,served",
                   help="group by any of key, model (requested), served (model that answered); "
                        "or none")


def _expiry(text: str) -> dt.datetime:
    m = re.fullmatch(r"(\d+)([dhm])", text)
    if m:
        unit = {"d": "days", "h": "hours", "m": "minutes"}[m.group(2)]
        return dt.datetime.now(dt.UTC) + dt.timedelta(**{unit: int(m.group(1))})
    when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def _create_request(a: argparse.Namespace) -> apb.CreateKeyRequest:
    key = apb.ApiKey(name=a.name, owner=a.owner,
                     models=[m.strip() for m in a.models.split(",") if m.strip()],
                     budget_unit=apb.BUDGET_UNIT_USD if a.budget_unit == "usd" else apb.BUDGET_UNIT_TOKENS,
                     budget_period={"day": apb.BUDGET_PERIOD_DAY, "month": apb.BUDGET_PERIOD_MONTH,
                                    "total": apb.BUDGET_PERIOD_TOTAL}[a.budget_period],
                     allowed_cidrs=a.cidr, enabled=not a.disabled)
    for name in ("rpm", "tpm", "max_concurrent", "budget"):
        if getattr(a, name) is not None:
            setattr(key, name, getattr(a, name))
    if a.expires:
        key.expire_time.FromDatetime(_expiry(a.expires))
    for item in a.meta:
        k, _, v = item.partition("=")
        key.metadata[k] = v
    return apb.CreateKeyRequest(key=key)


def _key_line(k: apb.ApiKey) -> str:
    limits = [f"{n}={getattr(k, n)}" for n in ("rpm", "tpm", "max_concurrent") if k.HasField(n)]
    if k.HasField("budget"):
        unit = apb.BudgetUnit.Name(k.budget_unit).removeprefix("BUDGET_UNIT_").lower()
        period = apb.BudgetPeriod.Name(k.budget_period).removeprefix("BUDGET_PERIOD_").lower()
        limits.append(f"budget={k.budget:g} {unit}/{period}")
    state = ("static" if k.static else "enabled" if k.enabled
             else "revoked" if k.HasField("revoke_time") else "disabled")
    return (f"{k.id}  {k.prefix}…  {k.name:<20} {state:<8} models={','.join(k.models) or '*'} "
            + " ".join(limits))


def money(usd: float) -> str:
    """Dollars for a table: 4 decimals, but a small cost keeps 3 significant digits
    (0.0000123, not 0.0000)."""
    if usd == 0 or abs(usd) >= 0.01:
        return f"{usd:.4f}"
    return f"{usd:.{2 - math.floor(math.log10(abs(usd)))}f}"


_INT64 = {FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
          FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64}


def _numbers(node: Any, desc: Any) -> Any:  # a (python or upb) message Descriptor
    """Proto3's JSON mapping writes 64-bit integers as strings ("requests": "12"); a CLI's
    --json output is for jq and scripts, so counts become JSON numbers again."""
    if not isinstance(node, dict):
        return node
    for name, value in node.items():
        field = desc.fields_by_name.get(name)
        if field is None:
            continue
        if field.type in _INT64:
            node[name] = [int(v) for v in value] if isinstance(value, list) else int(value)
        elif field.message_type is not None and field.message_type.GetOptions().map_entry:
            inner = field.message_type.fields_by_name["value"]
            for k, v in value.items():
                value[k] = (int(v) if inner.type in _INT64 else
                            _numbers(v, inner.message_type) if inner.message_type else v)
        elif field.message_type is not None:
            for item in value if isinstance(value, list) else [value]:
                _numbers(item, field.message_type)
    return node


def to_json(msg: Message) -> str:
    data = json_format.MessageToDict(msg, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)
    return json.dumps(_numbers(data, msg.DESCRIPTOR), indent=2)


def _print(msg: Message, as_json: bool, text: str) -> None:
    print(to_json(msg) if as_json else text)


def run_admin(a: argparse.Namespace) -> int:
    token = a.admin_key or os.environ.get("SWITCHBOARD_ADMIN_KEY", "")
    if not token:
        print("switchboard: set SWITCHBOARD_ADMIN_KEY (or --admin-key)", file=sys.stderr)
        return 2
    md = (("authorization", f"Bearer {token}"),)
    with grpc.insecure_channel(a.server) as channel:
        stub = apb_grpc.AdminServiceStub(channel)
        try:
            return _dispatch(a, stub, md)
        except grpc.RpcError as err:
            print(f"switchboard: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1


def _resolve_key(stub: apb_grpc.AdminServiceStub, md: Any, ident: str) -> str:
    """Operators think in names: accept a key's name when exactly one live key has it."""
    if ident.startswith(("key_", "static:")):
        return ident
    for include_revoked in (False, True):  # a live key first; else a revoked one (the
        # server then says it is already revoked instead of "not found")
        keys = stub.ListKeys(apb.ListKeysRequest(include_revoked=include_revoked, include_static=True),
                             metadata=md, timeout=30).keys
        matches = [k.id for k in keys if k.name == ident]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise SystemExit(f"switchboard: {len(matches)} keys are named {ident!r}; give the id "
                             f"({', '.join(matches)})")
    return ident  # let the server say it does not exist


def _dispatch(a: argparse.Namespace, stub: apb_grpc.AdminServiceStub, md: Any) -> int:
    if a.cmd == "usage":
        req = apb.QueryUsageRequest(key_id=a.key, model=a.model, served_model=a.served, period={
            "day": apb.USAGE_PERIOD_DAY, "month": apb.USAGE_PERIOD_MONTH,
            "total": apb.USAGE_PERIOD_TOTAL}[a.period])
        by = {p.strip() for p in a.by.split(",")}
        req.group_by.extend(g for n, g in (("key", apb.USAGE_GROUP_KEY),
                                           ("model", apb.USAGE_GROUP_MODEL),
                                           ("served", apb.USAGE_GROUP_SERVED_MODEL)) if n in by)
        u = stub.QueryUsage(req, metadata=md, timeout=30)
        lines = [f"{'key':<22} {'model':<24} {'served by':<24} {'requests':>8} {'errors':>6} "
                 f"{'prompt':>10} {'completion':>10} {'cost $':>10}"]
        lines += [f"{(r.key_name or r.key_id or '-'):<22} {(r.model or '-'):<24} "
                  f"{(r.served_model or '-'):<24} {r.requests:>8} {r.errors:>6} "
                  f"{r.prompt_tokens:>10} {r.completion_tokens:>10} {money(r.cost):>10}"
                  for r in u.rows]
        _print(u, a.json, "\n".join(lines))
        return 0
    if a.keys_cmd == "create":
        c = stub.CreateKey(_create_request(a), metadata=md, timeout=30)
        _print(c, a.json, f"created {c.key.id} ({c.key.name})\nsecret: {c.secret}\n"
                          "Store it now: it is not shown again.")
        return 0
    if a.keys_cmd == "list":
        ks = stub.ListKeys(apb.ListKeysRequest(owner=a.owner, include_revoked=a.all,
                                               include_static=not a.no_static), metadata=md, timeout=30)
        _print(ks, a.json, "\n".join(_key_line(k) for k in ks.keys) or "(no keys)")
        return 0
    key_id = _resolve_key(stub, md, a.id)
    if a.keys_cmd == "get":
        gk = stub.GetKey(apb.GetKeyRequest(id=key_id), metadata=md, timeout=30)
        _print(gk, a.json, _key_line(gk.key))
        return 0
    rk = stub.RevokeKey(apb.RevokeKeyRequest(id=key_id), metadata=md, timeout=30)
    _print(rk, a.json, f"revoked {rk.key.id} ({rk.key.name})")
    return 0
