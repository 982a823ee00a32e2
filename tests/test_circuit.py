"""Circuit breaking: closed → open → half-open → closed on a failure ratio, driven by an
injected clock (no sleeps), both for the in-process breaker and the Redis-shared one, and
through the real gateway: a failing channel stops being called, comes back by itself,
and a model whose every channel is open is still served (panic routing). Also: what
counts as a failure (not 429s, not the caller's deadline), one verdict per request per
channel, and `router.circuit` applied on reload.

The Redis tests run against a real server when SWITCHBOARD_TEST_REDIS_URL is set
(e.g. redis://127.0.0.1:6379/15) and are skipped otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop

from switchboard.core.circuit import (
    CLOSED_TICKET,
    REFUSED,
    Breaker,
    CircuitBreaker,
    RedisCircuitBreaker,
    is_trial,
    make_breaker,
)
from switchboard.core.config import CircuitSettings, ConfigError, load_config
from tests.fakes.faulty_upstream import Fault
from tests.harness import channel_yaml, make_config, running_stack
from tests.test_metrics import scrape, value
from tests.test_resilience import ask, faulty_config, grpc_chat, rest_chat, upstreams

REDIS_URL = os.environ.get("SWITCHBOARD_TEST_REDIS_URL", "")
needs_redis = pytest.mark.skipif(not REDIS_URL, reason="set SWITCHBOARD_TEST_REDIS_URL to run the "
                                                       "Redis-shared breaker against a real Redis")
SETTINGS = CircuitSettings(failure_ratio=0.5, min_requests=4, window_s=10.0, cooldown_s=30.0)


class Clock:
    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def _redis_breaker(clock: Clock, prefix: str | None = None,
                         settings: CircuitSettings = SETTINGS) -> RedisCircuitBreaker:
    return RedisCircuitBreaker(REDIS_URL, settings, clock=clock,
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


async def _fail(b: Breaker, n: int, channel: str = "ch") -> None:
    for _ in range(n):
        await b.record_failure(channel, CLOSED_TICKET)


async def _succeed(b: Breaker, n: int, channel: str = "ch") -> None:
    for _ in range(n):
        await b.record_success(channel, CLOSED_TICKET)


async def test_full_cycle(breaker_and_clock: tuple[Breaker, Clock]) -> None:
    b, clock = breaker_and_clock
    assert await b.allow("ch") == CLOSED_TICKET
    await _fail(b, SETTINGS.min_requests - 1)
    assert await b.state("ch") == "closed"  # every request failed, but too few to judge
    await _fail(b, 1)
    assert await b.state("ch") == "open"
    assert await b.allow("ch") == REFUSED
    assert await b.allow("other") == CLOSED_TICKET  # channels are independent
    assert 29.9 < await b.open_for("ch") <= 30.0
    clock.advance(SETTINGS.cooldown_s - 0.1)
    assert await b.allow("ch") == REFUSED
    clock.advance(0.2)
    assert await b.state("ch") == "half_open"
    trial = await b.allow("ch")
    assert is_trial(trial)
    assert await b.allow("ch") == REFUSED  # half_open_requests = 1: one trial at a time
    await b.record_success("ch", trial)
    assert await b.state("ch") == "closed"
    assert await b.allow("ch") == CLOSED_TICKET


async def test_opens_on_the_ratio_not_the_count(breaker_and_clock: tuple[Breaker, Clock]) -> None:
    b, _ = breaker_and_clock
    await _succeed(b, 11)
    await _fail(b, 10)  # 10 of 21 < 50%
    assert await b.state("ch") == "closed"
    await _fail(b, 1)  # 11 of 22
    assert await b.state("ch") == "open"


async def test_failed_trial_reopens(breaker_and_clock: tuple[Breaker, Clock]) -> None:
    b, clock = breaker_and_clock
    await _fail(b, SETTINGS.min_requests)
    clock.advance(SETTINGS.cooldown_s)
    trial = await b.allow("ch")
    assert is_trial(trial)
    await b.record_failure("ch", trial)
    assert await b.state("ch") == "open"
    clock.advance(SETTINGS.cooldown_s / 2)
    assert await b.allow("ch") == REFUSED  # a new, full cool-down started at the failure
    clock.advance(SETTINGS.cooldown_s / 2)
    assert is_trial(await b.allow("ch"))


async def test_trial_without_verdict_is_released(breaker_and_clock: tuple[Breaker, Clock]) -> None:
    b, clock = breaker_and_clock
    await _fail(b, SETTINGS.min_requests)
    clock.advance(SETTINGS.cooldown_s)
    trial = await b.allow("ch")
    assert is_trial(trial)
    await b.release("ch", trial)  # e.g. the client cancelled the trial request
    assert is_trial(await b.allow("ch"))
    clock.advance(120)  # a trial that never reports back stops blocking after its TTL
    assert is_trial(await b.allow("ch"))


@pytest.mark.parametrize("backend", ["memory", pytest.param("redis", marks=needs_redis)])
async def test_half_open_lets_a_bounded_number_of_trials_through(backend: str) -> None:
    clock = Clock()
    settings = CircuitSettings(min_requests=1, cooldown_s=5.0, half_open_requests=3)
    b: Breaker = (CircuitBreaker(settings, clock=clock) if backend == "memory"
                  else await _redis_breaker(clock, settings=settings))
    try:
        await _fail(b, 1)
        clock.advance(5)
        tickets = await asyncio.gather(*(b.allow("ch") for _ in range(10)))
        trials = [t for t in tickets if is_trial(t)]
        assert len(trials) == 3 and tickets.count(REFUSED) == 7
        await b.release("ch", trials[0])
        assert is_trial(await b.allow("ch"))  # a released slot is free again
        await b.record_success("ch", trials[1])  # one success closes the circuit
        assert await b.state("ch") == "closed"
    finally:
        await b.close()


async def test_failures_outside_the_window_do_not_count(breaker_and_clock: tuple[Breaker, Clock]
                                                        ) -> None:
    b, clock = breaker_and_clock
    await _fail(b, SETTINGS.min_requests - 1)
    clock.advance(SETTINGS.window_s + 1)
    await _fail(b, 1)
    assert await b.state("ch") == "closed"
    # …and a few successes in between do not hide a channel that keeps failing
    await _succeed(b, 1)
    await _fail(b, SETTINGS.min_requests - 2)
    assert await b.state("ch") == "open"


async def test_late_failures_while_open_do_not_extend_the_cooldown(
        breaker_and_clock: tuple[Breaker, Clock]) -> None:
    b, clock = breaker_and_clock
    await _fail(b, SETTINGS.min_requests)
    clock.advance(SETTINGS.cooldown_s - 1)
    await _fail(b, 1)  # a request admitted before the circuit opened
    clock.advance(1)
    assert is_trial(await b.allow("ch"))


@pytest.mark.parametrize("backend", ["memory", pytest.param("redis", marks=needs_redis)])
async def test_default_settings_judge_the_ratio_at_high_volume(backend: str) -> None:
    """5,000 req/s for 30 s (simulated clock) with a 0.1% error rate: never opens; the
    same volume at 60% errors opens within the first second."""
    clock = Clock()
    settings = CircuitSettings()  # the defaults
    b: Breaker = (CircuitBreaker(settings, clock=clock) if backend == "memory"
                  else await _redis_breaker(clock, settings=settings))
    try:
        for i in range(150_000):
            clock.advance(1 / 5000)
            if i % 1000 == 999:
                await b.record_failure("healthy", CLOSED_TICKET)
            else:
                await b.record_success("healthy", CLOSED_TICKET)
        assert await b.state("healthy") == "closed"
        for i in range(5000):
            clock.advance(1 / 5000)
            if i % 5 < 3:
                await b.record_failure("sick", CLOSED_TICKET)
            else:
                await b.record_success("sick", CLOSED_TICKET)
            if await b.state("sick") == "open":
                break
        assert await b.state("sick") == "open"
        assert i < 100  # judged on the minimum volume, not after thousands of failures
    finally:
        await b.close()


def test_circuit_config_and_defaults() -> None:
    d = make_config("channels: [{name: e, provider: echo, models: [echo]}]").router.circuit
    assert (d.failure_ratio, d.min_requests, d.window_s, d.cooldown_s, d.half_open_requests) == (
        0.5, 20, 30.0, 30.0, 1)
    c = make_config("router: {circuit: {failure_ratio: 0.25, min_requests: 50, window_s: 10, "
                    "cooldown_s: 5, half_open_requests: 3}}\n"
                    "channels: [{name: e, provider: echo, models: [echo]}]").router.circuit
    assert (c.failure_ratio, c.min_requests, c.window_s, c.cooldown_s, c.half_open_requests) == (
        0.25, 50, 10.0, 5.0, 3)
    for bad, where in (("{threshold: 5}", "router.circuit.threshold"),
                       ("{failure_ratio: 0}", "router.circuit.failure_ratio"),
                       ("{failure_ratio: 1.5}", "router.circuit.failure_ratio")):
        with pytest.raises(ConfigError, match=where):
            make_config(f"router: {{circuit: {bad}}}\nchannels: [{{name: e, provider: echo, "
                        "models: [echo]}]")


# ------------------------------------------------------------ through the gateway ----

@pytest.mark.parametrize("backend", ["memory", pytest.param("redis", marks=needs_redis)])
async def test_channel_cools_down_and_comes_back_by_itself(backend: str) -> None:
    clock = Clock()
    settings = CircuitSettings(min_requests=2, window_s=60, cooldown_s=30)
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
        await a.record_success("ch", CLOSED_TICKET)  # sent with a's next failure
        for r in (a, b):
            await r.record_failure("ch", CLOSED_TICKET)
        assert await b.allow("ch") == CLOSED_TICKET  # 2 of 3 failed, but below min_requests
        await a.record_failure("ch", CLOSED_TICKET)  # 3 of 4
        assert await b.allow("ch") == REFUSED  # opened by outcomes seen on both replicas
        clock.advance(SETTINGS.cooldown_s)
        tickets = await asyncio.gather(*(r.allow("ch") for r in (a, b) for _ in range(10)))
        trials = [t for t in tickets if is_trial(t)]
        assert len(trials) == 1  # one trial across all replicas
        await b.record_success("ch", trials[0])
        assert await a.state("ch") == "closed"
    finally:
        await a.close()
        await b.close()


@needs_redis
async def test_redis_concurrent_failures_are_counted_exactly() -> None:
    clock = Clock()
    settings = CircuitSettings(min_requests=50, window_s=10.0, cooldown_s=30.0)
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
                                   "circuit: {min_requests: 2, window_s: 60, cooldown_s: 60}}",
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


# ------------------------------------------------- what counts, and how often ----

def _only_channel(url: str, circuit: str = "", timeouts: str = "") -> str:
    router = ("router: {max_attempts: 3, backoff_ms: 5, max_retry_after_s: 1"
              + (f", circuit: {circuit}" if circuit else "") + "}")
    extra = {"timeouts": timeouts} if timeouts else {}
    return f"{router}\nchannels:\n" + channel_yaml("only", "openai", url, ["m"], **extra)


async def test_a_request_counts_once_per_channel_however_many_retries() -> None:
    """One request, three attempts on its one channel: one failure for the breaker."""
    async with upstreams() as ups:
        await ups.add("only", Fault("status", 503))
        cfg = make_config(_only_channel(ups.urls["only"], "{min_requests: 2, cooldown_s: 60}"))
        async with running_stack(cfg) as stack:
            assert (await ask("rest", stack, False)).status == "502"
            assert len(ups.journal) == 3  # retried three times on the channel…
            assert await stack.gateway.router.breaker.state("only") == "closed"  # …counted once
            assert (await ask("grpc", stack, True)).status == "UNAVAILABLE"
            assert await stack.gateway.router.breaker.state("only") == "open"  # 2 of 2 requests


async def test_a_success_after_retries_counts_as_one_success() -> None:
    async with upstreams() as ups:
        await ups.add("only", Fault("status", 503, times=2))
        cfg = make_config(_only_channel(ups.urls["only"], "{min_requests: 1, failure_ratio: 0.5}"))
        async with running_stack(cfg) as stack:
            assert (await ask("grpc", stack, False)).ok
            assert len(ups.journal) == 3
            # Had each failed attempt counted, 2 of 3 (or 1 of 1 at once) would have opened it.
            assert await stack.gateway.router.breaker.state("only") == "closed"


@pytest.mark.parametrize("fault", [Fault("status", 429), Fault("status", 429, retry_after="0.05"),
                                   Fault("status", 400), Fault("status", 404)],
                         ids=["429", "429-retry-after", "400", "404"])
async def test_rate_limits_and_client_errors_never_open_the_circuit(fault: Fault) -> None:
    async with upstreams() as ups:
        await ups.add("only", fault)
        cfg = make_config(_only_channel(ups.urls["only"], "{min_requests: 1, failure_ratio: 0.1}"))
        async with running_stack(cfg) as stack:
            for surface in ("rest", "grpc", "rest", "grpc"):
                reply = await ask(surface, stack, surface == "grpc")
                assert not reply.ok and reply.status not in ("500", "INTERNAL"), reply
            assert len(ups.journal) >= 4  # every request reached the channel
            assert await stack.gateway.router.breaker.state("only") == "closed"


# --------------------------------------------------------------- panic routing ----

async def test_single_channel_model_stays_served_with_default_settings(
        caplog: pytest.LogCaptureFixture) -> None:
    """Default breaker settings, one channel: enough failures open its circuit, yet every
    later request still reaches it (panic routing) and gets the upstream's answer — the
    breaker alone never turns a recovered channel into an outage."""
    async with upstreams() as ups:
        await ups.add("only", Fault("status", 500))
        async with running_stack(faulty_config([("only", ups.urls["only"], {})])) as stack:
            router = stack.gateway.router
            assert router.breaker.settings == CircuitSettings()
            for i in range(CircuitSettings().min_requests):
                reply = await ask("rest" if i % 2 else "grpc", stack, bool(i % 3 == 0))
                assert reply.status in ("502", "UNAVAILABLE"), reply
            assert await router.breaker.state("only") == "open"
            seen = len(ups.journal)
            caplog.set_level(logging.WARNING, logger="switchboard.router")
            for surface in ("rest", "grpc"):  # still failing: the upstream's error, not "cooling down"
                reply = await ask(surface, stack, False)
                assert reply.status in ("502", "UNAVAILABLE") and "HTTP 500" in reply.raw, reply
                assert "cooling down" not in reply.raw
            assert len(ups.journal) > seen
            ups.fakes["only"].fault = Fault()  # the upstream recovers, mid cool-down
            for surface in ("rest", "grpc"):
                for stream in (False, True):
                    reply = await ask(surface, stack, stream)
                    assert reply.ok and reply.text == ups.fakes["only"].answer(), reply
            # the first panic request that succeeded closed the circuit
            assert await router.breaker.state("only") == "closed"
            panics = [r for r in caplog.records if "panic routing" in r.getMessage()]
            assert len(panics) == 1  # one log line for the episode, not one per request
            m = await scrape(stack)
            assert value(m, "switchboard_circuit_panic_total", model="m") == 3


async def test_panic_routing_tries_the_soonest_cool_down_end_first() -> None:
    clock = Clock()
    async with upstreams() as ups:
        await ups.add("early", Fault("status", 503))
        await ups.add("late", Fault("status", 503))
        cfg = faulty_config([("late", ups.urls["late"], {"priority": 1}),
                             ("early", ups.urls["early"], {})])
        async with running_stack(cfg) as stack:
            router = stack.gateway.router
            router.breaker = CircuitBreaker(CircuitSettings(min_requests=1, cooldown_s=30),
                                            clock=clock)
            await router.breaker.record_failure("early", CLOSED_TICKET)
            clock.advance(10)
            await router.breaker.record_failure("late", CLOSED_TICKET)
            assert await router.breaker.open_for("early") < await router.breaker.open_for("late")
            ups.fakes["early"].fault = Fault()
            reply = await ask("grpc", stack, True)
            assert reply.ok and reply.text == ups.fakes["early"].answer()
            assert ups.order() == ["early"]  # not `late`, though its tier comes first
            assert await router.breaker.state("early") == "closed"
            assert await router.breaker.state("late") == "open"
            reply = await ask("rest", stack, False)  # `early` is closed again: no panic
            assert reply.ok and ups.order() == ["early", "early"]


# ------------------------------------------------------------ caller deadlines ----

def _run_on_uvloop(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """The gateway runs on uvloop in production (core/composition/cli.py), whose timers may fire up
    to a millisecond early; the deadline bug only showed there."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(test())


@pytest.mark.parametrize("timeouts", ["{connect: 5, first_token: 30, idle: 30, total: 60}",
                                      "{connect: 5, first_token: 0.2, idle: 0.2, total: 0.2}"],
                         ids=["channel-patient", "channel-same-instant"])
def test_short_deadlines_are_deadlines_and_never_blame_the_channel(timeouts: str) -> None:
    """30 calls per surface × unary/stream with a 200 ms deadline on a slow upstream:
    every one is DEADLINE_EXCEEDED / 504 `timeout`, and the breaker (default settings,
    which would open on 20 counted failures) stays closed."""
    async def run() -> None:
        async with upstreams() as ups:
            await ups.add("only", Fault("slow_first_byte", delay_s=1.0))
            cfg = make_config(_only_channel(ups.urls["only"], timeouts=timeouts))
            async with running_stack(cfg) as stack:
                got: Counter[tuple[str, bool, str]] = Counter()
                for surface in ("rest", "grpc"):
                    for stream in (False, True):
                        for _ in range(3):
                            replies = await asyncio.gather(*(
                                rest_chat(stack, stream, timeout_header=0.2) if surface == "rest"
                                else grpc_chat(stack, stream, deadline_s=0.2) for _ in range(10)))
                            for r in replies:
                                got[(surface, stream, f"{r.status} {r.error_code} {r.raw[:90]}"
                                     if r.status not in ("504", "DEADLINE_EXCEEDED")
                                     else r.status)] += 1
                expected = {(s, st, "504" if s == "rest" else "DEADLINE_EXCEEDED"): 30
                            for s in ("rest", "grpc") for st in (False, True)}
                assert dict(got) == expected
                assert await stack.gateway.router.breaker.state("only") == "closed"
                m = await scrape(stack)
                assert value(m, "switchboard_circuit_panic_total", model="m") == 0
    _run_on_uvloop(run)


# ----------------------------------------------------------------------- reload ----

async def test_reload_applies_new_circuit_settings(tmp_path: Path) -> None:
    async with upstreams() as ups:
        await ups.add("only", Fault("status", 503))
        path = tmp_path / "sb.yaml"
        body = ("shutdown_grace_s: 1\nstore: 'sqlite://:memory:'\n"
                "keys: [{name: test, key: sk-test-key-0123456789}]\n")
        path.write_text(body + _only_channel(ups.urls["only"], "{min_requests: 100}"))
        async with running_stack(load_config(path)) as stack:
            breaker = stack.gateway.router.breaker
            for _ in range(3):
                await ask("rest", stack, False)
            assert await breaker.state("only") == "closed"  # 3 of 3 failed, 100 needed
            path.write_text(body + _only_channel(
                ups.urls["only"], "{min_requests: 4, cooldown_s: 120, half_open_requests: 2}"))
            await stack.runtime.reload()
            assert stack.gateway.router.breaker is breaker  # state kept…
            assert breaker.settings == CircuitSettings(min_requests=4, cooldown_s=120,
                                                       half_open_requests=2)  # …new settings
            await ask("grpc", stack, False)
            assert await breaker.state("only") == "open"  # the 4th request, judged by the new ones
            assert 100 < await breaker.open_for("only") <= 120
