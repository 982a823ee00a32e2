"""Liveness and readiness for the HTTP probes (`/healthz`, `/readyz`) and the check
functions behind them. gRPC health (grpc.health.v1) is served by core/server.py.

- `/healthz` answers 200 while the process's event loop runs: a liveness probe must
  not fail because a dependency is down (restarting us would not fix Redis).
- `/readyz` answers 200 only when every configured dependency answers: the core
  (in-process: the gateway exists and is not draining; split: the core's
  grpc.health.v1 says SERVING), the store (PostgreSQL: a real `SELECT 1`; SQLite: its
  directory is writable) and Redis when `limits:` is a redis:// URL (PING, with AUTH
  when the URL has a password). It answers 503 with the failing checks while draining,
  so a load balancer stops sending before the listener closes.

Checks run concurrently, each bounded by `timeout` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import unquote, urlsplit

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from switchboard.core.store.sqlite import sqlite_path

Check = Callable[[], Awaitable[None]]


class Readiness:
    """Named checks; a check passes by returning and fails by raising."""

    def __init__(self, checks: dict[str, Check] | None = None, *, timeout: float = 2.0,
                 draining: Callable[[], bool] = lambda: False) -> None:
        self.checks = dict(checks or {})
        self.timeout = timeout
        self.draining = draining

    async def run(self) -> tuple[bool, dict[str, str]]:
        """(ready, {check name: "ok" or why not})."""
        results: dict[str, str] = {}
        if self.draining():
            results["draining"] = "shutting down"
        names = list(self.checks)
        outcomes = await asyncio.gather(*(self._one(self.checks[n]) for n in names))
        results.update(zip(names, outcomes, strict=True))
        return all(v == "ok" for v in results.values()), results

    async def _one(self, check: Check) -> str:
        try:
            async with asyncio.timeout(self.timeout):
                await check()
        except TimeoutError:
            return f"no answer within {self.timeout:g}s"
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"[:300]
        return "ok"


async def check_grpc_core(channel: grpc.aio.Channel) -> None:
    resp = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    if resp.status != health_pb2.HealthCheckResponse.SERVING:
        raise RuntimeError(f"core reports {health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)}")


async def check_redis(url: str) -> None:
    """PING over RESP: no client library needed, proves the server answers commands."""
    u = urlsplit(url)
    tls = ssl.create_default_context() if u.scheme == "rediss" else None
    reader, writer = await asyncio.open_connection(u.hostname or "127.0.0.1", u.port or 6379, ssl=tls)
    try:
        if u.password:
            parts = [b"AUTH", *([unquote(u.username).encode()] if u.username else []),
                     unquote(u.password).encode()]
            writer.write(_resp(parts))
            line = await reader.readline()
            if not line.startswith(b"+OK"):
                raise RuntimeError("redis AUTH failed")
        writer.write(_resp([b"PING"]))
        await writer.drain()
        line = await reader.readline()
        if not line.startswith(b"+PONG"):
            raise RuntimeError(f"unexpected redis reply {line[:60]!r}")
    finally:
        await _close(writer)


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


def _resp(parts: list[bytes]) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for p in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(p), p))
    return b"".join(out)


async def check_store(url: str) -> None:
    if url.startswith(("postgres://", "postgresql://")):
        await _check_postgres(url)
    elif url.startswith("sqlite:"):
        if sqlite_path(url) == ":memory:":
            return  # nothing on disk: a read-only root filesystem (container) is fine
        path = Path(url.removeprefix("sqlite:").removeprefix("///").removeprefix("//") or ".")
        directory = path.parent if path.name else path
        writable = await asyncio.to_thread(os.access, directory, os.W_OK)
        if not writable:
            raise RuntimeError(f"sqlite directory {directory} is not writable")
    else:
        raise RuntimeError(f"unknown store URL scheme in {url.split(':', 1)[0]!r}")


async def _check_postgres(url: str) -> None:
    try:
        import asyncpg
    except ImportError:  # no driver here: a TCP connect is the best we can say
        u = urlsplit(url)
        _, writer = await asyncio.open_connection(u.hostname or "127.0.0.1", u.port or 5432)
        await _close(writer)
        return
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        await conn.fetchval("SELECT 1")
    finally:
        await conn.close()
