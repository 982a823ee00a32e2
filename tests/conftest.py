"""Shared pytest setup: a short shutdown grace so test stacks stop quickly."""

from __future__ import annotations

import logging
import os
import sys
import uuid
from collections.abc import Iterator

import pytest

logging.getLogger("switchboard").setLevel(logging.INFO)


# ---- real Redis / PostgreSQL (issue 5) -------------------------------------------
# Tests that need them RUN when these variables are set and SKIP, saying why, when not.
# Each test run uses its own Redis key prefix and PostgreSQL schema, so parallel or
# repeated runs never see each other's data.

REDIS_URL = os.environ.get("SWITCHBOARD_TEST_REDIS_URL", "")
DATABASE_URL = os.environ.get("SWITCHBOARD_TEST_DATABASE_URL", "")
needs_redis = pytest.mark.skipif(
    not REDIS_URL, reason="needs a real Redis: set SWITCHBOARD_TEST_REDIS_URL, "
                          "e.g. redis://127.0.0.1:6379/0")
needs_postgres = pytest.mark.skipif(
    not DATABASE_URL, reason="needs a real PostgreSQL: set SWITCHBOARD_TEST_DATABASE_URL, "
                             "e.g. postgresql://postgres@127.0.0.1:5432/test")


def unique_name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def pg_dsn_with_schema(schema: str) -> str:
    sep = "&" if "?" in DATABASE_URL else "?"
    return f"{DATABASE_URL}{sep}schema={schema}"


def drop_pg_schema(schema: str) -> None:
    import asyncio

    import asyncpg

    async def drop() -> None:
        conn = await asyncpg.connect(DATABASE_URL)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()

    asyncio.run(drop())


def drop_redis_prefix(prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def pg_dsn() -> Iterator[str]:
    """A PostgreSQL DSN whose tables live in a fresh schema, dropped afterwards."""
    if not DATABASE_URL:
        pytest.skip("needs a real PostgreSQL: set SWITCHBOARD_TEST_DATABASE_URL")
    schema = unique_name("sbtest")
    yield pg_dsn_with_schema(schema)
    drop_pg_schema(schema)


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A Redis key prefix for this test alone; its keys are deleted afterwards."""
    if not REDIS_URL:
        pytest.skip("needs a real Redis: set SWITCHBOARD_TEST_REDIS_URL")
    prefix = unique_name("sbtest")
    yield prefix
    drop_redis_prefix(prefix)


# ---- nothing outside the repository (issue 11) -------------------------------------
# tests/fsguard.py: an audit hook fails the session if any test opens or runs a path
# outside the repository, its Python and the few system roots listed there.

from tests import fsguard  # noqa: E402

# HTTP clients with trust_env (aiohttp in google-genai's SDK) read ~/.netrc for credentials.
# The suite must not pick up, or send to a fake upstream, whatever the developer keeps
# there: point them at an empty file.
os.environ["NETRC"] = os.devnull
fsguard.install()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if fsguard.violations:
        lines = "\n  ".join(dict.fromkeys(fsguard.violations))
        print(f"\nfsguard: the tests touched paths outside the repository:\n  {lines}", file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
