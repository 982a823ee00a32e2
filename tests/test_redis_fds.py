"""A real gateway process on Redis limits holds a bounded number of Redis connections
under a burst of concurrent limited requests, and gives them back afterwards (issue 10,
item 5): its open file descriptors return to the baseline (core/redis_pool.py)."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from bench.stalled_streams import gateway_process, open_fds
from tests.conftest import REDIS_URL, needs_redis

KEY = "sk-fd-test-0123456789"
MAX_CONNECTIONS = 16  # per pool: the limiter's and the circuit breaker's


def redis_connections(pid: int, redis_port: int) -> int:
    """Sockets of process `pid` connected to `redis_port` (fd inodes ∩ /proc/net/tcp)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    n = 0
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            if remote_port == redis_port and fields[3] == "01" and fields[9] in inodes:
                n += 1  # 01: ESTABLISHED
    return n


@dataclass
class Figures:
    baseline_fds: int
    baseline_redis: int
    peak_fds: int
    peak_redis: int
    after_fds: int
    after_redis: int
    failed: int  # requests of the bursts that did not get 200


async def burst(redis_url: str, prefix: str, *, max_connections: int = MAX_CONNECTIONS,
                concurrency: int = 200, rounds: int = 3, settle_s: float = 15.0) -> Figures:
    """Descriptors of a real gateway: after one request (and 2.5 s idle), at the peak of
    `rounds` bursts of `concurrency` concurrent limited streams, and once its Redis
    connections are gone (or `settle_s` has passed)."""
    redis_port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    config = (f'store: "sqlite://:memory:"\nshutdown_grace_s: 1\n'
              f"observability: {{access_log: false, log_level: warning}}\n"
              f"limits: {{backend: '{redis_url}', key_prefix: {prefix}, "
              f"redis_max_connections: {max_connections}, redis_idle_s: 1, "
              f"redis_timeout_s: 2}}\n"
              f"keys: [{{name: fd, key: {KEY}, rpm: 1000000, tpm: 100000000, "
              f"max_concurrent: 10000}}]\n"
              f"channels:\n  - {{name: echo, provider: echo, models: [echo], "
              f"options: {{delay_ms: 20}}}}\n")
    body = {"model": "echo", "messages": [{"role": "user", "content": "count my descriptors"}]}
    headers = {"Authorization": f"Bearer {KEY}"}
    async with gateway_process(config) as (proc, http):
        url = f"http://{http}/v1/chat/completions"
        async with aiohttp.ClientSession() as session:
            async with session.post(url, json=body, headers=headers) as r:
                assert r.status == 200, await r.text()
        await asyncio.sleep(2.5)  # the warm-up's Redis connections go idle (and close)
        baseline_fds, baseline_redis = open_fds(proc.pid), redis_connections(proc.pid, redis_port)
        peak_fds = peak_redis = 0
        sampling = True

        async def sample() -> None:
            nonlocal peak_fds, peak_redis
            while sampling:
                peak_fds = max(peak_fds, open_fds(proc.pid))
                peak_redis = max(peak_redis, redis_connections(proc.pid, redis_port))
                await asyncio.sleep(0.02)

        sampler = asyncio.create_task(sample())
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:
            async def one() -> int:
                async with session.post(url, json={**body, "stream": True},
                                        headers=headers) as r:
                    await r.read()
                    return r.status

            failed = 0
            for _ in range(rounds):
                statuses = await asyncio.gather(*(one() for _ in range(concurrency)))
                failed += sum(1 for s in statuses if s != 200)
        sampling = False
        await sampler
        deadline = time.monotonic() + settle_s
        while time.monotonic() < deadline:
            if (redis_connections(proc.pid, redis_port) == 0
                    and open_fds(proc.pid) <= baseline_fds):
                break
            await asyncio.sleep(0.25)
        return Figures(baseline_fds, baseline_redis, peak_fds, peak_redis, open_fds(proc.pid),
                       redis_connections(proc.pid, redis_port), failed)


@needs_redis
async def test_redis_connections_are_bounded_and_given_back(redis_prefix: str) -> None:
    f = await burst(REDIS_URL, redis_prefix)
    assert f.failed == 0, f
    assert f.baseline_redis == 0, f  # idle connections are closed after redis_idle_s
    # Two pools (limiter, breaker), each at most MAX_CONNECTIONS; before the bound a
    # burst like this left well over a hundred Redis connections open.
    assert 0 < f.peak_redis <= 2 * MAX_CONNECTIONS, f
    assert f.after_redis == 0, f
    assert f.after_fds <= f.baseline_fds, f
