"""Bounded, self-trimming Redis clients for the limiter and the circuit breaker.

redis.asyncio's default pool opens one more connection for every command that finds the
others busy and keeps all of them for good: after a burst of concurrent limited requests
a gateway held 154 file descriptors against 26 at start (issue 10). Each client here
sits on a `TrimmingPool`:

- at most `limits.redis_max_connections` connections; a command that finds them all busy
  waits for one (up to `max(5 s, 4 × redis_timeout_s)`, then it is a Redis error, which
  the limiter's `on_error` policy answers) instead of opening another;
- a connection left idle for `limits.redis_idle_s` is closed by a sweeper task (and
  reopened when next needed), so the descriptors a burst opened are given back.

The pool keeps redis-py's own bookkeeping; it only notes when each connection went idle.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection, BlockingConnectionPool


class TrimmingPool(BlockingConnectionPool):
    """A BlockingConnectionPool that closes connections idle for `idle_s` (0: never)."""

    def __init__(self, *, idle_s: float = 60.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.idle_s = idle_s
        self._idle_since: dict[AbstractConnection, float] = {}
        self._sweeper: asyncio.Task[None] | None = None

    def get_available_connection(self) -> AbstractConnection:
        # Called with the pool's condition held: a connection handed out is no longer idle.
        connection = super().get_available_connection()
        self._idle_since.pop(connection, None)
        return connection

    async def release(self, connection: AbstractConnection) -> None:
        self._idle_since[connection] = time.monotonic()
        await super().release(connection)
        if self.idle_s > 0 and (self._sweeper is None or self._sweeper.done()):
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    def open_connections(self) -> int:
        """Connections holding a socket (idle or in use)."""
        return sum(1 for c in self._available_connections if c.is_connected) + len(
            self._in_use_connections)

    async def _sweep(self) -> None:
        """Close what has been idle long enough; ends when nothing is idle any more (the
        next release starts it again)."""
        while self._idle_since:
            await asyncio.sleep(max(self.idle_s / 2, 0.05))
            now = time.monotonic()
            # Under the pool's condition: no connection is handed out while we close it.
            async with self._condition:
                stale = [c for c, t in self._idle_since.items() if now - t >= self.idle_s]
                for c in stale:
                    del self._idle_since[c]
                await asyncio.gather(*(c.disconnect() for c in stale), return_exceptions=True)

    async def disconnect(self, inuse_connections: bool = True) -> None:
        if inuse_connections and self._sweeper is not None:
            self._sweeper.cancel()  # the client is closing
            self._sweeper = None
        await super().disconnect(inuse_connections)


def redis_client(url: str, *, timeout_s: float, max_connections: int, idle_s: float,
                 decode_responses: bool = False, health_check_interval: int = 0
                 ) -> aioredis.Redis:
    """A client owning its own bounded pool (closed with the client)."""
    pool = TrimmingPool.from_url(
        url, max_connections=max(1, max_connections), timeout=max(5.0, 4 * timeout_s),
        idle_s=idle_s, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
        decode_responses=decode_responses, health_check_interval=health_check_interval)
    return aioredis.Redis.from_pool(pool)
