"""PostgreSQL backend over an asyncpg pool, for replicas sharing one database.

`postgresql://user@host:5432/db` — an extra `schema=NAME` query parameter puts every
table in that schema (created if missing), which keeps test runs or tenants apart.
Queries are written with `?` placeholders (core/store/base.py) and rewritten here.
Migrations run under a transaction-scoped advisory lock so replicas starting together
apply them once.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg

_MIGRATION_LOCK_ID = 0x5357_4243  # "SWBC"
_SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def _dollar(sql: str) -> str:
    n = 0

    def repl(_: re.Match[str]) -> str:
        nonlocal n
        n += 1
        return f"${n}"

    return re.sub(r"\?", repl, sql)


def split_schema(dsn: str) -> tuple[str, str]:
    """(dsn without `schema=`, schema or '')."""
    parts = urlsplit(dsn)
    query = parse_qsl(parts.query, keep_blank_values=True)
    schema = next((v for k, v in query if k == "schema"), "")
    if schema and not _SCHEMA_NAME.match(schema):
        raise ValueError(f"invalid schema name {schema!r} in the store DSN")
    rest = urlencode([(k, v) for k, v in query if k != "schema"])
    return urlunsplit(parts._replace(query=rest)), schema


class PostgresDriver:
    serial = "BIGSERIAL PRIMARY KEY"
    max_params = 32767  # the wire protocol's 16-bit parameter count

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self._lock_conn: asyncpg.Connection | None = None

    @classmethod
    async def open(cls, dsn: str, *, min_size: int = 1, max_size: int = 10) -> PostgresDriver:
        url, schema = split_schema(dsn)
        settings: dict[str, str] = {"application_name": "switchboard"}
        if schema:
            conn = await asyncpg.connect(url)
            try:
                await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
            except asyncpg.UniqueViolationError:
                pass  # another replica created it at the same moment
            finally:
                await conn.close()
            settings["search_path"] = schema
        pool = await asyncpg.create_pool(url, min_size=min_size, max_size=max_size,
                                         server_settings=settings)
        return cls(pool)

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        if self._lock_conn is not None:
            status = await self._lock_conn.execute(_dollar(sql), *args)
        else:
            status = await self.pool.execute(_dollar(sql), *args)
        tail = status.rsplit(" ", 1)[-1]
        return int(tail) if tail.isdigit() else 0

    async def fetch(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        if self._lock_conn is not None:
            rows = await self._lock_conn.fetch(_dollar(sql), *args)
        else:
            rows = await self.pool.fetch(_dollar(sql), *args)
        return [tuple(r) for r in rows]

    @asynccontextmanager
    async def migration_lock(self) -> AsyncIterator[None]:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK_ID)
            self._lock_conn = conn
            try:
                yield
            finally:
                self._lock_conn = None

    async def close(self) -> None:
        await self.pool.close()
