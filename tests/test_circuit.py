"""Circuit breaking: closed → open → half-open → closed, driven by an injected clock
(no sleeps), both for the in-process breaker and the Redis-shared one, and through the
real gateway: a failing channel stops being called, then comes back by itself.

The Redis tests run against a real server when SWITCHBOARD_TEST_REDIS_URL is set
(e.g. redis://127.0.0.1:6379/15) and are skipped otherwise.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator

import pytest

from switchboard.core.circuit import (
    CLOSED_TICKET,
    REFUSED,
    TRIAL_TICKET,
    Breaker,
    CircuitBreaker,
    RedisCircuitBreaker,
    make_breaker,
)
from switchboard.core.config import CircuitSettings
from tests.fakes.faulty_upstream import Fault
from tests.harness import running_stack
from tests.test_resilience import ask, faulty_config, upstreams

REDIS_URL = os.environ.get("SWITCHBOARD_TEST_REDIS_URL", "")
needs_redis = pytest.mark.skipif(not REDIS_URL, reason="set SWITCHBOARD_TEST_REDIS_URL to run the "
                                                       "Redis-shared breaker against a real Redis")
SETTINGS = CircuitSettings(threshold=3, window_s=10.0, cooldown_s=30.0)


class Clock:
    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def _redis_breaker(clock: Clock, prefix: str | None = None) -> RedisCircuitBreaker:
    return RedisCircuitBreaker(REDIS_URL, SETTINGS, clock=clock,
                               prefix=prefix or f"test:circuit:{uuid.uuid4().hex}:")


@pytest.fixture(params=["memory", pytest.param("redis", marks=needs_redis)])
async def breaker_and_clock(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Breaker, Clock]]:
    clock = Clock()
    breaker: Breaker
    if request.param == "memory":
        breaker = CircuitBreaker.from_settings(SETTINGS, clock=clock)
    else:
        breaker = await _redis_breaker(clock)
    yield breaker, clock
    await breaker.close()


async def test_full_cycle(breaker_and_clock: tuple[Breaker, Clock]) -> None:
    b, clock = breaker_and_clock
    assert await b.allow("ch") == CLOSED_TICKET
    for _ in range(SETTINGS.threshold - 1):
        await b.record_failure("ch", CLOSED_TICKET)
    assert await b.state("ch") == "closed"
    await b.record_failure("ch", CLOSED_TICKET)
    assert await b.state("ch") == "open"
    assert await b.allow("ch") == REFUSED
    assert await b.allow("other") == CLOSED_TICKET  # channels are independent
    clock.advance(SETTINGS.cooldown_s - 0.1)
    assert await b.allow("ch") == REFUSED
    clock.advance(0.2)
    assert await b.state("ch") == "half_open"
    assert await b.allow("ch") == TRIAL_TICKET
    assert await b.allow("ch") == REFUSED  # one trial at a time
    await b.record_success("ch", TRIAL_TICKET)
    assert await b.state("ch") == "closed"
    assert await b.allow("ch") == CLOSED_TICKET


async def test_failed_trial_reopens(breaker_and_clock: tuple[Breaker, Clock]) -> None:
    b, clock = breaker_and_clock
    for _ in range(SETTINGS.threshold):
        await b.record_failure("ch", CLOSED_TICKET)
    clock.advance(SETTINGS.cooldown_s)
    assert await b.allow("ch") == TRIAL_TICKET
    await b.record_failure("ch", TRIAL_TICKET)
    assert await b.state("ch") == "open"
    clock.advance(SETTINGS.cooldown_s / 2)
    assert await b.allow("ch") == REFUSED  # a new, full cool-down started at the failure
    clock.advance(SETTINGS.cooldown_s / 2)
    assert await b.allow("ch") == TRIAL_TICKET


async def test_trial_without_verdict_is_released(breaker_and_clock: tuple[Breaker, Clock]) -> None:
    b, clock = breaker_and_clock
    for _ in range(SETTINGS.threshold):
        await b.record_failure("ch", CLOSED_TICKET)
    clock.advance(SETTINGS.cooldown_s)
    assert await b.allow("ch") == TRIAL_TICKET
    await b.release("ch", TRIAL_TICKET)  # e.g. the client cancelled the trial request
    assert await b.allow("ch") == TRIAL_TICKET
    clock.advance(120)  # a trial that never reports back stops blocking after its TTL
    assert await b.allow("ch") == TRIAL_TICKET


async def test_failures_outside_the_window_do_not_count(breaker_and_clock: tuple[Breaker, Clock]
                                                        ) -> None:
    b, clock = breaker_and_clock
    for _ in range(SETTINGS.threshold - 1):
        await b.record_failure("ch", CLOSED_TICKET)
    clock.advance(SETTINGS.window_s + 1)
    await b.record_failure("ch", CLOSED_TICKET)
    assert await b.state("ch") == "closed"
    # …and successes in between do not hide a channel that keeps failing
    await b.record_success("ch", CLOSED_TICKET)
    for _ in range(SETTINGS.threshold - 1):
        await b.record_failure("ch", CLOSED_TICKET)
    assert await b.state("ch") == "open"


async def test_late_failures_while_open_do_not_extend_the_cooldown(
        breaker_and_clock: tuple[Breaker, Clock]) -> None:
    b, clock = breaker_and_clock
    for _ in range(SETTINGS.threshold):
        await b.record_failure("ch", CLOSED_TICKET)
    clock.advance(SETTINGS.cooldown_s - 1)
    await b.record_failure("ch", CLOSED_TICKET)  # a request admitted before the circuit opened
    clock.advance(1)
    assert await b.allow("ch") == TRIAL_TICKET


# ------------------------------------------------------------ through the gateway ----

@pytest.mark.parametrize("backend", ["memory", pytest.param("redis", marks=needs_redis)])
async def test_channel_cools_down_and_comes_back_by_itself(backend: str) -> None:
    clock = Clock()
    settings = CircuitSettings(threshold=2, window_s=60, cooldown_s=30)
    async with upstreams() as ups:
        await ups.add("flaky", Fault("status", 503))
        await ups.add("steady", Fault())
        cfg = faulty_config([("flaky", ups.urls["flaky"], {"priority": 1}),
                             ("steady", ups.urls["steady"], {})])
        async with running_stack(cfg) as stack:
            router = stack.gateway.router
            await router.breaker.close()
            router.breaker = (CircuitBreaker.from_settings(settings, clock=clock) if backend == "memory"
                              else RedisCircuitBreaker(REDIS_URL, settings, clock=clock,
                                                       prefix=f"test:circuit:{uuid.uuid4().hex}:"))
            flaky = ups.fakes["flaky"]
            for surface in ("rest", "grpc"):  # two failures (failed over): the circuit opens
                assert (await ask(surface, stack, False)).ok
            assert len(flaky.requests) == 2
            assert await router.breaker.state("flaky") == "open"
            for surface in ("rest", "grpc"):  # open: flaky is not even tried
                for stream in (False, True):
                    assert (await ask(surface, stack, stream)).ok
            assert len(flaky.requests) == 2
            clock.advance(30)  # cool-down over: half-open, the next request is the trial
            assert await router.breaker.state("flaky") == "half_open"
            assert (await ask("rest", stack, True)).ok
            assert len(flaky.requests) == 3  # the trial failed: open again
            assert await router.breaker.state("flaky") == "open"
            flaky.fault = Fault()  # the upstream recovers
            clock.advance(30)
            reply = await ask("grpc", stack, False)
            assert reply.text == flaky.answer()  # the trial went to flaky and succeeded
            assert await router.breaker.state("flaky") == "closed"
            assert (await ask("rest", stack, False)).text == flaky.answer()


async def test_every_channel_open_fails_fast() -> None:
    clock = Clock()
    async with upstreams() as ups:
        await ups.add("only", Fault("status", 500))
        async with running_stack(faulty_config([("only", ups.urls["only"], {})])) as stack:
            stack.gateway.router.breaker = CircuitBreaker(threshold=1, cooldown_s=30, clock=clock)
            first = await ask("rest", stack, False)
            assert first.status == "502"
            assert len(ups.journal) == 1  # opened on the first failure: no retries after it
            second = await ask("grpc", stack, True)
            assert second.status == "UNAVAILABLE" and "cooling down" in second.raw
            assert len(ups.journal) == 1


async def test_redis_unreachable_fails_open() -> None:
    b = RedisCircuitBreaker("redis://127.0.0.1:1/0", SETTINGS)
    assert await b.allow("ch") == CLOSED_TICKET
    await b.record_failure("ch", CLOSED_TICKET)  # logged, not raised
    assert await b.state("ch") == "closed"
    await b.close()


def test_limits_backend_picks_the_breaker() -> None:
    assert isinstance(make_breaker("memory", SETTINGS), CircuitBreaker)
    assert isinstance(make_breaker("redis://127.0.0.1:6379/0", SETTINGS), RedisCircuitBreaker)


# ------------------------------------------------------------- shared state ----

@needs_redis
async def test_redis_state_is_shared_between_replicas() -> None:
    clock = Clock()
    prefix = f"test:circuit:{uuid.uuid4().hex}:"
    a, b = await _redis_breaker(clock, prefix), await _redis_breaker(clock, prefix)
    try:
        await a.record_failure("ch", CLOSED_TICKET)
        await b.record_failure("ch", CLOSED_TICKET)
        await a.record_failure("ch", CLOSED_TICKET)
        assert await b.allow("ch") == REFUSED  # opened by failures seen on both replicas
        clock.advance(SETTINGS.cooldown_s)
        tickets = await asyncio.gather(*(r.allow("ch") for r in (a, b) for _ in range(10)))
        assert tickets.count(TRIAL_TICKET) == 1  # one trial across all replicas
        await b.record_success("ch", TRIAL_TICKET)
        assert await a.state("ch") == "closed"
    finally:
        await a.close()
        await b.close()


@needs_redis
async def test_redis_concurrent_failures_are_counted_exactly() -> None:
    clock = Clock()
    settings = CircuitSettings(threshold=50, window_s=10.0, cooldown_s=30.0)
    prefix = f"test:circuit:{uuid.uuid4().hex}:"
    replicas = [RedisCircuitBreaker(REDIS_URL, settings, clock=clock, prefix=prefix)
                for _ in range(5)]
    try:
        await asyncio.gather(*(r.record_failure("ch", CLOSED_TICKET)
                               for r in replicas for _ in range(9)))  # 45 < 50
        assert await replicas[0].state("ch") == "closed"
        await asyncio.gather(*(r.record_failure("ch", CLOSED_TICKET) for r in replicas))  # 50
        assert await replicas[0].state("ch") == "open"
    finally:
        for r in replicas:
            await r.close()


@needs_redis
async def test_gateway_with_redis_limits_shares_circuit_state() -> None:
    """`limits: redis://…` gives the gateway the Redis breaker: a circuit one replica
    opens is open for every other replica reading the same Redis."""
    name = f"flaky{uuid.uuid4().hex[:8]}"
    async with upstreams() as ups:
        await ups.add(name, Fault("status", 503))
        await ups.add("steady", Fault())
        cfg = faulty_config([(name, ups.urls[name], {"priority": 1}), ("steady", ups.urls["steady"], {})],
                            router="router: {max_attempts: 3, backoff_ms: 5, "
                                   "circuit: {threshold: 2, window_s: 60, cooldown_s: 60}}",
                            extra=f"limits: {REDIS_URL}")
        async with running_stack(cfg) as stack:
            assert isinstance(stack.gateway.router.breaker, RedisCircuitBreaker)
            for surface in ("rest", "grpc"):
                assert (await ask(surface, stack, False)).ok
            other_replica = RedisCircuitBreaker(REDIS_URL, cfg.router.circuit)
            try:
                assert await other_replica.state(name) == "open"
                assert await other_replica.allow(name) == REFUSED
            finally:
                await other_replica.redis.delete(*other_replica._keys(name))
                await other_replica.close()
