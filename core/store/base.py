"""The key store and usage ledger tables, written once for both SQL backends.

`SqlStore` holds every query; a backend (core/store/sqlite.py, core/store/postgres.py)
only supplies a small `Driver` (execute / fetch / migration lock) and its
dialect: placeholders are written `?` here and rewritten to `$n` for PostgreSQL.

Schema migrations: `MIGRATIONS` is an append-only list; `schema_version` holds the
highest version applied. `migrate()` applies the missing ones in one transaction under
a lock (PostgreSQL: an advisory lock; SQLite: BEGIN IMMEDIATE), so replicas starting
together migrate once.

Keys: the secret is never stored, only its SHA-256 hex digest (indexed, unique) and a
short visible prefix (`PREFIX_LEN` characters) so operators can recognise a key.
Times are Unix seconds (float); lists and maps are JSON text, identical in both
dialects.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from switchboard.core.usage import UsageRecord

PREFIX_LEN = 10
SECRET_PREFIX = "sk-sb-"
PERIODS = ("day", "month", "total")
UNITS = ("tokens", "usd")


def new_secret() -> str:
    """A fresh API key secret: 256 bits of randomness behind a recognisable prefix."""
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def new_key_id() -> str:
    return "key_" + secrets.token_hex(8)


@dataclass(frozen=True)
class StoredKey:
    """A key row (never the secret)."""

    id: str
    name: str
    key_hash: str
    prefix: str
    owner: str = ""
    models: tuple[str, ...] = ()
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    budget: float | None = None
    budget_unit: str = "tokens"
    budget_period: str = "total"
    expires_at: float | None = None
    cidrs: tuple[str, ...] = ()
    enabled: bool = True
    metadata: dict[str, str] = field(default_factory=dict)
    created_at: float = 0.0
    updated_at: float = 0.0
    revoked_at: float | None = None


# Fields an update may set (everything but identity, hash and timestamps).
UPDATABLE = ("name", "owner", "models", "rpm", "tpm", "max_concurrent", "budget", "budget_unit",
             "budget_period", "expires_at", "cidrs", "enabled", "metadata")

_KEY_COLUMNS = ("id", "name", "key_hash", "prefix", "owner", "models", "rpm", "tpm",
                "max_concurrent", "budget", "budget_unit", "budget_period", "expires_at", "cidrs",
                "enabled", "metadata", "created_at", "updated_at", "revoked_at")

_USAGE_COLUMNS = ("row_id", "request_id", "key_id", "key_name", "model", "channel", "surface",
                  "prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens",
                  "cost", "latency_ms", "ttft_ms", "status", "estimated", "stream", "ts",
                  "served_model", "upstream_model")

# (version, statements); `{serial}` is the dialect's auto-increment primary key.
MIGRATIONS: list[tuple[int, tuple[str, ...]]] = [
    (1, (
        """CREATE TABLE api_keys (
            id TEXT PRIMARY KEY, name TEXT NOT NULL, key_hash TEXT NOT NULL UNIQUE,
            prefix TEXT NOT NULL, owner TEXT NOT NULL DEFAULT '', models TEXT NOT NULL,
            rpm BIGINT, tpm BIGINT, max_concurrent BIGINT, budget DOUBLE PRECISION,
            budget_unit TEXT NOT NULL, budget_period TEXT NOT NULL,
            expires_at DOUBLE PRECISION, cidrs TEXT NOT NULL, enabled INTEGER NOT NULL,
            metadata TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL, revoked_at DOUBLE PRECISION)""",
        "CREATE INDEX api_keys_owner ON api_keys (owner)",
        """CREATE TABLE usage_ledger (
            id {serial}, row_id TEXT NOT NULL UNIQUE, request_id TEXT NOT NULL,
            key_id TEXT NOT NULL,
            key_name TEXT NOT NULL, model TEXT NOT NULL, channel TEXT NOT NULL,
            surface TEXT NOT NULL, prompt_tokens BIGINT NOT NULL,
            completion_tokens BIGINT NOT NULL, cached_tokens BIGINT NOT NULL,
            reasoning_tokens BIGINT NOT NULL, cost DOUBLE PRECISION NOT NULL,
            latency_ms DOUBLE PRECISION NOT NULL, ttft_ms DOUBLE PRECISION,
            status TEXT NOT NULL, estimated INTEGER NOT NULL, stream INTEGER NOT NULL,
            ts DOUBLE PRECISION NOT NULL)""",
        "CREATE INDEX usage_ledger_key_ts ON usage_ledger (key_id, ts)",
        "CREATE INDEX usage_ledger_ts ON usage_ledger (ts)",
    )),
    # The model that actually served each request (after routes and model_map), next to
    # the one requested (`model`): an alias is billed and audited by what it reached.
    (2, (
        "ALTER TABLE usage_ledger ADD COLUMN served_model TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE usage_ledger ADD COLUMN upstream_model TEXT NOT NULL DEFAULT ''",
    )),
]


class Driver(Protocol):
    """What a backend supplies. SQL uses `?` placeholders (rewritten per dialect)."""

    serial: str
    max_params: int  # bound parameters one statement may carry

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> int: ...

    async def fetch(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...

    def migration_lock(self) -> AbstractAsyncContextManager[None]: ...

    async def close(self) -> None: ...


@dataclass
class UsageTotals:
    key_id: str = ""
    key_name: str = ""
    model: str = ""
    served_model: str = ""
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    cost: float = 0.0
    estimated_requests: int = 0


def _row_to_key(row: Sequence[Any]) -> StoredKey:
    d = dict(zip(_KEY_COLUMNS, row, strict=True))
    return StoredKey(
        id=d["id"], name=d["name"], key_hash=d["key_hash"], prefix=d["prefix"], owner=d["owner"],
        models=tuple(json.loads(d["models"])), rpm=d["rpm"], tpm=d["tpm"],
        max_concurrent=d["max_concurrent"], budget=d["budget"], budget_unit=d["budget_unit"],
        budget_period=d["budget_period"], expires_at=d["expires_at"],
        cidrs=tuple(json.loads(d["cidrs"])), enabled=bool(d["enabled"]),
        metadata=dict(json.loads(d["metadata"])), created_at=d["created_at"],
        updated_at=d["updated_at"], revoked_at=d["revoked_at"],
    )


def _key_values(k: StoredKey) -> list[Any]:
    return [k.id, k.name, k.key_hash, k.prefix, k.owner, json.dumps(list(k.models)), k.rpm, k.tpm,
            k.max_concurrent, k.budget, k.budget_unit, k.budget_period, k.expires_at,
            json.dumps(list(k.cidrs)), int(k.enabled), json.dumps(k.metadata, sort_keys=True),
            k.created_at, k.updated_at, k.revoked_at]


def usage_values(row_id: str, r: UsageRecord) -> tuple[Any, ...]:
    return (row_id, r.request_id, r.key_id, r.key_name, r.model, r.channel, r.surface, r.prompt_tokens,
            r.completion_tokens, r.cached_tokens, r.reasoning_tokens, float(r.cost),
            float(r.latency_ms), r.ttft_ms, r.status, int(r.estimated), int(r.stream), float(r.ts),
            r.served_model, r.upstream_model)


class SqlStore:
    """Keys and the usage ledger over one Driver. All methods are coroutines."""

    def __init__(self, driver: Driver, dsn_label: str) -> None:
        self.db = driver
        self.label = dsn_label  # the DSN without credentials, for logs

    async def close(self) -> None:
        await self.db.close()

    # ---------------------------------------------------------- schema ----

    async def migrate(self) -> int:
        """Apply missing migrations; returns the schema version now in place."""
        async with self.db.migration_lock():
            await self.db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            rows = await self.db.fetch("SELECT MAX(version) FROM schema_version")
            current = rows[0][0] or 0
            for version, statements in MIGRATIONS:
                if version <= current:
                    continue
                for sql in statements:
                    await self.db.execute(sql.replace("{serial}", self.db.serial))
                await self.db.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
                current = version
            return int(current)

    # ------------------------------------------------------------ keys ----

    async def create_key(self, key: StoredKey) -> StoredKey:
        now = time.time()
        key = replace(key, created_at=now, updated_at=now)
        cols = ", ".join(_KEY_COLUMNS)
        marks = ", ".join("?" for _ in _KEY_COLUMNS)
        await self.db.execute(f"INSERT INTO api_keys ({cols}) VALUES ({marks})", _key_values(key))
        return key

    async def get_key(self, key_id: str) -> StoredKey | None:
        rows = await self.db.fetch(f"SELECT {', '.join(_KEY_COLUMNS)} FROM api_keys WHERE id = ?",
                                   (key_id,))
        return _row_to_key(rows[0]) if rows else None

    async def key_by_hash(self, digest: str) -> StoredKey | None:
        rows = await self.db.fetch(
            f"SELECT {', '.join(_KEY_COLUMNS)} FROM api_keys WHERE key_hash = ?", (digest,))
        return _row_to_key(rows[0]) if rows else None

    async def list_keys(self, owner: str = "", include_revoked: bool = False) -> list[StoredKey]:
        where: list[str] = []
        args: list[Any] = []
        if owner:
            where.append("owner = ?")
            args.append(owner)
        if not include_revoked:
            where.append("revoked_at IS NULL")
        sql = f"SELECT {', '.join(_KEY_COLUMNS)} FROM api_keys"
        if where:
            sql += " WHERE " + " AND ".join(where)
        return [_row_to_key(r) for r in await self.db.fetch(sql + " ORDER BY created_at, id", args)]

    async def update_key(self, key_id: str, changes: dict[str, Any]) -> StoredKey | None:
        """Set the given UPDATABLE fields; None when the key does not exist."""
        current = await self.get_key(key_id)
        if current is None:
            return None
        bad = set(changes) - set(UPDATABLE)
        if bad:
            raise ValueError(f"cannot update {', '.join(sorted(bad))}")
        updated = replace(current, **changes, updated_at=time.time())
        values = dict(zip(_KEY_COLUMNS, _key_values(updated), strict=True))
        names = [*changes, "updated_at"]
        sets = ", ".join(f"{n} = ?" for n in names)
        await self.db.execute(f"UPDATE api_keys SET {sets} WHERE id = ?",
                              [*(values[n] for n in names), key_id])
        return await self.get_key(key_id)

    async def revoke_key(self, key_id: str) -> StoredKey | None:
        now = time.time()
        await self.db.execute(
            "UPDATE api_keys SET enabled = 0, revoked_at = COALESCE(revoked_at, ?), updated_at = ? "
            "WHERE id = ?", (now, now, key_id))
        return await self.get_key(key_id)

    # ----------------------------------------------------------- usage ----

    async def insert_usage(self, records: Sequence[UsageRecord],
                           row_ids: Sequence[str] | None = None) -> None:
        """Insert ledger rows. `row_ids` make a retried batch idempotent: a row already
        written (the commit landed but its acknowledgement was lost) is skipped."""
        if not records:
            return
        ids = row_ids if row_ids is not None else [uuid.uuid4().hex for _ in records]
        rows = [usage_values(i, r) for i, r in zip(ids, records, strict=True)]
        # As few statements as the dialect allows (one per batch, normally), not
        # executemany: SQLite runs on aiosqlite's thread, and every statement costs that
        # thread several GIL hand-offs from a busy event loop (up to the 5 ms switch
        # interval each), which capped the ledger at ~3,000 rows/s under load and tripped
        # its backpressure. sqlite3's executemany is worse: a hand-off per row.
        # Chunk sizes are powers of two: drivers cache prepared statements by their text,
        # and one cached statement per possible row count grew SQLite's cache by ~45 MiB.
        group = "(" + ", ".join("?" for _ in _USAGE_COLUMNS) + ")"
        head = f"INSERT INTO usage_ledger ({', '.join(_USAGE_COLUMNS)}) VALUES "
        size = 1 << ((self.db.max_params // len(_USAGE_COLUMNS)).bit_length() - 1)
        start = 0
        while start < len(rows):
            while size > len(rows) - start:
                size >>= 1
            chunk = rows[start:start + size]
            start += size
            await self.db.execute(
                head + ", ".join([group] * size) + " ON CONFLICT (row_id) DO NOTHING",
                [v for row in chunk for v in row])

    async def usage(self, *, key_id: str = "", model: str = "", since: float | None = None,
                    until: float | None = None, group_by: Sequence[str] = (),
                    served_model: str = "") -> list[UsageTotals]:
        """Aggregates over the ledger; group_by ⊆ {"key", "model", "served_model"}
        (`model` is the name requested, `served_model` the one that answered)."""
        where: list[str] = []
        args: list[Any] = []
        for col, value in (("key_id", key_id), ("model", model), ("served_model", served_model)):
            if value:
                where.append(f"{col} = ?")
                args.append(value)
        if since is not None:
            where.append("ts >= ?")
            args.append(since)
        if until is not None:
            where.append("ts < ?")
            args.append(until)
        groups: list[str] = []
        if "key" in group_by:
            groups += ["key_id", "key_name"]
        if "model" in group_by:
            groups.append("model")
        if "served_model" in group_by:
            groups.append("served_model")
        select = [*groups, "COUNT(*)", "SUM(CASE WHEN status <> 'OK' THEN 1 ELSE 0 END)",
                  "SUM(prompt_tokens)", "SUM(completion_tokens)", "SUM(cached_tokens)",
                  "SUM(reasoning_tokens)", "SUM(cost)", "SUM(estimated)"]
        sql = f"SELECT {', '.join(select)} FROM usage_ledger"
        if where:
            sql += " WHERE " + " AND ".join(where)
        if groups:
            sql += f" GROUP BY {', '.join(groups)} ORDER BY {', '.join(groups)}"
        out = []
        for row in await self.db.fetch(sql, args):
            t = UsageTotals()
            n = len(groups)
            for name, value in zip(groups, row[:n], strict=True):
                setattr(t, name, value)
            counts = [v or 0 for v in row[n:]]
            if groups or counts[0]:
                (t.requests, t.errors, t.prompt_tokens, t.completion_tokens, t.cached_tokens,
                 t.reasoning_tokens) = (int(c) for c in counts[:6])
                t.cost, t.estimated_requests = float(counts[6]), int(counts[7])
                out.append(t)
        return out

    async def spent(self, key_id: str, since: float | None, unit: str) -> float:
        """What a key used since a time (tokens, or cost in USD), from the ledger."""
        expr = "SUM(cost)" if unit == "usd" else "SUM(prompt_tokens + completion_tokens)"
        sql = f"SELECT {expr} FROM usage_ledger WHERE key_id = ?"
        args: list[Any] = [key_id]
        if since is not None:
            sql += " AND ts >= ?"
            args.append(since)
        rows = await self.db.fetch(sql, args)
        return float(rows[0][0] or 0)

    async def count_usage(self, key_id: str = "") -> int:
        sql, args = "SELECT COUNT(*) FROM usage_ledger", list[Any]()
        if key_id:
            sql += " WHERE key_id = ?"
            args.append(key_id)
        return int((await self.db.fetch(sql, args))[0][0])

