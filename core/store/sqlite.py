"""SQLite backend (the embedded default) over aiosqlite: one connection on its own
thread, WAL journal so readers never block the ledger writer, autocommit except where
a transaction is opened explicitly. `sqlite:///relative/path.db`,
`sqlite:////absolute/path.db` or `sqlite://:memory:`."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite


def sqlite_path(dsn: str) -> str:
    rest = dsn.removeprefix("sqlite://")
    if rest in (":memory:", "/:memory:"):
        return ":memory:"
    return rest.removeprefix("/") if not rest.startswith("//") else rest[1:]


class SqliteDriver:
    serial = "INTEGER PRIMARY KEY AUTOINCREMENT"
    # SQLITE_MAX_VARIABLE_NUMBER: 32766 since SQLite 3.32, 999 before.
    max_params = 32766 if sqlite3.sqlite_version_info >= (3, 32, 0) else 999

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self.conn = conn

    @classmethod
    async def open(cls, dsn: str) -> SqliteDriver:
        path = sqlite_path(dsn)
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        conn = await aiosqlite.connect(path, isolation_level=None)
        await conn.execute("PRAGMA journal_mode=WAL")
        await conn.execute("PRAGMA busy_timeout=5000")
        await conn.execute("PRAGMA synchronous=NORMAL")
        return cls(conn)

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        cur = await self.conn.execute(sql, tuple(args))
        count = cur.rowcount
        await cur.close()
        return count

    async def fetch(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        async with self.conn.execute(sql, tuple(args)) as cur:
            return [tuple(r) for r in await cur.fetchall()]

    @asynccontextmanager
    async def migration_lock(self) -> AsyncIterator[None]:
        # IMMEDIATE takes the write lock at once: two processes sharing the file
        # migrate one after the other.
        await self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            await self.conn.execute("ROLLBACK")
            raise
        await self.conn.execute("COMMIT")

    async def close(self) -> None:
        await self.conn.close()
