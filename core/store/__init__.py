"""The key store and usage ledger: SQLite by default (`store: sqlite:///./switchboard.db`),
PostgreSQL for replicas sharing state (`store: postgresql://…`). `open_store` picks
the backend from the DSN, connects and applies schema migrations."""

from __future__ import annotations

from urllib.parse import urlsplit

from switchboard.core.store.base import (
    PERIODS,
    PREFIX_LEN,
    UNITS,
    UPDATABLE,
    SqlStore,
    StoredKey,
    UsageTotals,
    new_key_id,
    new_secret,
)

__all__ = ["PERIODS", "PREFIX_LEN", "UNITS", "UPDATABLE", "SqlStore", "StoredKey", "UsageTotals",
           "new_key_id", "new_secret", "open_store", "redact_dsn"]


def redact_dsn(dsn: str) -> str:
    """The DSN without its password, for logs."""
    parts = urlsplit(dsn)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return parts._replace(netloc=netloc).geturl()
    return dsn


async def open_store(dsn: str) -> SqlStore:
    if dsn.startswith("sqlite://"):
        from switchboard.core.store.sqlite import SqliteDriver
        store = SqlStore(await SqliteDriver.open(dsn), redact_dsn(dsn))
    elif dsn.startswith(("postgresql://", "postgres://")):
        from switchboard.core.store.postgres import PostgresDriver
        store = SqlStore(await PostgresDriver.open(dsn), redact_dsn(dsn))
    else:
        raise ValueError(f"unsupported store {redact_dsn(dsn)!r} (expected sqlite:// or postgresql://)")
    try:
        await store.migrate()
    except BaseException:
        await store.close()
        raise
    return store
