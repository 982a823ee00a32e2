"""Per-channel circuit breakers, judged on a failure *ratio* (docs/failure-contract.md).

Closed: every request's outcome on a channel is counted in a sliding window of
`window_s` seconds (ten buckets). The circuit *opens* when the window holds at least
`min_requests` outcomes and at least `failure_ratio` of them are failures. Open: the
channel gets no normal traffic for `cooldown_s`. Then it is *half-open*: up to
`half_open_requests` trial requests are let through at a time; a trial's success closes
the circuit (with a fresh window), its failure opens it for another cool-down.

Why a ratio with a minimum volume rather than a count: an absolute count means a healthy
channel at 5,000 req/s with a 0.1% error rate opens all the time, while at 1 req/min a
count low enough to matter opens on two unlucky requests. A ratio is the same judgement
at every volume, and the minimum volume keeps a handful of samples from deciding (with
20 samples a channel with a true 20% error rate reaches 50% about 0.3% of the time;
with 10 samples about 3%). Below the minimum volume the breaker never opens: a
low-traffic channel keeps being tried, and failover covers its failures.

What is counted is decided by the router (core/router.py): one outcome per request per
channel, however many attempts it made there; only failures that say something about
the channel (connect errors, 5xx/529, malformed replies, channel timeouts).

The breaker never makes an outage by itself: when every candidate of a request is open,
the router sends it to them anyway ("panic routing", `PANIC_TICKET`, soonest cool-down
end first). A panic request that succeeds closes the circuit like a trial would; one that
fails changes nothing.

`allow()` hands out a ticket that the caller passes back with the verdict:
`CLOSED_TICKET` (normal traffic), a trial ticket (`is_trial`, the half-open probes),
`PANIC_TICKET` or `REFUSED`.

Two implementations with the same async interface:
- `CircuitBreaker`: state in this process (the default);
- `RedisCircuitBreaker`: state shared by every replica through Redis, used when the
  config's `limits` is a `redis://` URL. Each transition is one Lua script, so it is
  atomic across replicas. Successes on a closed circuit are summed locally and sent at
  most once a second (or with the next failure), so the hot path does not write to Redis
  per request. If Redis is unreachable the breaker fails open (lets traffic through)
  rather than taking the gateway down with it.

`configure()` swaps the settings in place (config reload) and keeps the state. The clock
is injectable so tests drive the transitions without sleeping. The Redis variant uses
wall-clock time (shared between hosts), the local one a monotonic clock.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from switchboard.core.config import CircuitSettings, LimitSettings

log = logging.getLogger("switchboard.circuit")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
REFUSED, CLOSED_TICKET, PANIC_TICKET = "", "closed", "panic"
TRIAL_PREFIX = "trial:"

# The sliding window is this many buckets of window_s / BUCKETS seconds each.
BUCKETS = 10
# A trial that never reports back (a crashed replica, a lost task) stops blocking
# further trials after this long.
DEFAULT_TRIAL_TTL_S = 60.0
# Redis variant: socket timeouts, how long to stop asking Redis after it failed, and
# how often locally summed successes are sent.
REDIS_TIMEOUT_S = 0.5
REDIS_RETRY_S = 5.0
SUCCESS_FLUSH_S = 1.0


def is_trial(ticket: str) -> bool:
    return ticket.startswith(TRIAL_PREFIX)


class Breaker(Protocol):
    """What the router needs from a circuit breaker."""

    settings: CircuitSettings

    async def allow(self, channel: str) -> str:
        """A ticket: REFUSED (""), CLOSED_TICKET or a trial ticket (half-open probe)."""
        ...

    async def record_success(self, channel: str, ticket: str) -> None: ...

    async def record_failure(self, channel: str, ticket: str) -> None: ...

    async def release(self, channel: str, ticket: str) -> None:
        """The request ended without a verdict on the channel (cancelled, client error)."""
        ...

    async def state(self, channel: str) -> str: ...

    async def open_for(self, channel: str) -> float:
        """Seconds until the channel's cool-down ends (0 when it is not cooling down)."""
        ...

    def configure(self, settings: CircuitSettings) -> None:
        """New settings from a config reload; the state is kept."""
        ...

    async def close(self) -> None: ...


def _opens(total: float, failures: float, s: CircuitSettings) -> bool:
    return total >= max(1, s.min_requests) and failures >= s.failure_ratio * total


@dataclass
class _State:
    # [bucket index, outcomes, failures], oldest first
    buckets: deque[list[int]] = field(default_factory=deque)
    open_until: float | None = None
    trials: dict[str, float] = field(default_factory=dict)  # ticket -> expiry


class CircuitBreaker:
    """Circuit state kept in this process."""

    def __init__(self, settings: CircuitSettings | None = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 trial_ttl_s: float = DEFAULT_TRIAL_TTL_S) -> None:
        self.settings = settings or CircuitSettings()
        self.trial_ttl_s = trial_ttl_s
        self.clock = clock
        self._states: dict[str, _State] = {}
        self._ids = itertools.count(1)

    @classmethod
    def from_settings(cls, s: CircuitSettings, clock: Callable[[], float] = time.monotonic
                      ) -> CircuitBreaker:
        return cls(s, clock=clock)

    def configure(self, settings: CircuitSettings) -> None:
        self.settings = settings

    @staticmethod
    def _state(s: _State | None, now: float) -> str:
        if s is None or s.open_until is None:
            return CLOSED
        return OPEN if now < s.open_until else HALF_OPEN

    async def state(self, channel: str) -> str:
        return self._state(self._states.get(channel), self.clock())

    async def open_for(self, channel: str) -> float:
        s = self._states.get(channel)
        if s is None or s.open_until is None:
            return 0.0
        return max(0.0, s.open_until - self.clock())

    async def allow(self, channel: str) -> str:
        s = self._states.get(channel)
        now = self.clock()
        st = self._state(s, now)
        if st == CLOSED:
            return CLOSED_TICKET
        assert s is not None
        if st == OPEN:
            return REFUSED
        for ticket, expiry in list(s.trials.items()):
            if expiry <= now:
                del s.trials[ticket]
        if len(s.trials) >= max(1, self.settings.half_open_requests):
            return REFUSED
        ticket = f"{TRIAL_PREFIX}{next(self._ids)}"
        s.trials[ticket] = now + self.trial_ttl_s
        return ticket

    def _count(self, s: _State, now: float, failed: bool) -> tuple[int, int]:
        """Adds one outcome; returns (outcomes, failures) within the window."""
        width = max(self.settings.window_s, 1e-3) / BUCKETS
        idx = math.floor(now / width)
        if s.buckets and s.buckets[-1][0] == idx:
            b = s.buckets[-1]
        else:
            b = [idx, 0, 0]
            s.buckets.append(b)
        b[1] += 1
        b[2] += failed
        while s.buckets and s.buckets[0][0] <= idx - BUCKETS:
            s.buckets.popleft()
        return sum(x[1] for x in s.buckets), sum(x[2] for x in s.buckets)

    async def record_success(self, channel: str, ticket: str) -> None:
        now = self.clock()
        s = self._states.get(channel)
        if s is not None and s.open_until is not None:
            if ticket == PANIC_TICKET or is_trial(ticket):
                del self._states[channel]  # the channel answered: closed, fresh window
                log.info("circuit closed for channel %s", channel)
            return  # a late success from before the circuit opened decides nothing
        if s is None:
            s = self._states[channel] = _State()
        self._count(s, now, False)

    async def record_failure(self, channel: str, ticket: str) -> None:
        now = self.clock()
        s = self._states.setdefault(channel, _State())
        if s.open_until is not None:
            if is_trial(ticket) and now >= s.open_until:
                s.open_until = now + self.settings.cooldown_s  # the probe failed
                s.trials.clear()
            # late failures of older requests and failed panic requests change nothing
            return
        total, failures = self._count(s, now, True)
        if _opens(total, failures, self.settings):
            s.open_until = now + self.settings.cooldown_s
            s.buckets.clear()
            log.warning("circuit opened for channel %s (%d of %d requests failed within %gs)",
                        channel, failures, total, self.settings.window_s)

    async def release(self, channel: str, ticket: str) -> None:
        if is_trial(ticket):
            s = self._states.get(channel)
            if s is not None:
                s.trials.pop(ticket, None)

    async def close(self) -> None:
        return None


# ------------------------------------------------------------------ Redis ----
# KEYS[1] = hash {open_until, seq}; KEYS[2] = zset of trials in flight (score = expiry);
# KEYS[3] = hash of window buckets: t<index> = outcomes, f<index> = failures.

_ALLOW = """
local open_until = redis.call('HGET', KEYS[1], 'open_until')
if not open_until then return 'closed' end
local now = tonumber(ARGV[1])
if now < tonumber(open_until) then return '' end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[3]) then return '' end
local id = redis.call('HINCRBY', KEYS[1], 'seq', 1)
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), id)
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return 'trial:' .. id
"""

# ARGV: now, successes, failures (0|1), ticket kind (closed|trial|panic), trial id,
# window_s, buckets, min_requests, failure_ratio, cooldown_s, ttl_ms
_RECORD = """
local now, ok_n, fail_n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local kind, trial_id = ARGV[4], ARGV[5]
local window, nb = tonumber(ARGV[6]), tonumber(ARGV[7])
local min_req, ratio, cooldown, ttl = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10]), ARGV[11]
local open_until = redis.call('HGET', KEYS[1], 'open_until')
if open_until then
  if trial_id ~= '' then redis.call('ZREM', KEYS[2], trial_id) end
  if kind == 'closed' then return 'late' end
  if fail_n == 0 then
    redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
    return 'closed'
  end
  if kind == 'trial' and now >= tonumber(open_until) then
    redis.call('HSET', KEYS[1], 'open_until', tostring(now + cooldown))
    redis.call('DEL', KEYS[2])
    redis.call('PEXPIRE', KEYS[1], ttl)
    return 'reopened'
  end
  return 'open'
end
local width = math.max(window, 0.001) / nb
local cur = math.floor(now / width)
local fresh = redis.call('HINCRBY', KEYS[3], 't' .. cur, ok_n + fail_n) == ok_n + fail_n
if fail_n > 0 then redis.call('HINCRBY', KEYS[3], 'f' .. cur, fail_n) end
redis.call('PEXPIRE', KEYS[3], ttl)
if fail_n == 0 and not fresh then return 'closed' end
local total, failures = 0, 0
local all = redis.call('HGETALL', KEYS[3])
for i = 1, #all, 2 do
  local name = all[i]
  if tonumber(string.sub(name, 2)) <= cur - nb then
    redis.call('HDEL', KEYS[3], name)
  elseif string.sub(name, 1, 1) == 't' then
    total = total + tonumber(all[i + 1])
  else
    failures = failures + tonumber(all[i + 1])
  end
end
if fail_n > 0 and total >= math.max(1, min_req) and failures >= ratio * total then
  redis.call('HSET', KEYS[1], 'open_until', tostring(now + cooldown))
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('DEL', KEYS[2], KEYS[3])
  return 'opened:' .. failures .. ':' .. total
end
return 'closed'
"""


class RedisCircuitBreaker:
    """Circuit state shared by all replicas through Redis (redis.asyncio)."""

    def __init__(self, url_or_client: str | Any, settings: CircuitSettings, *,
                 prefix: str = "switchboard:circuit:", clock: Callable[[], float] = time.time,
                 trial_ttl_s: float = DEFAULT_TRIAL_TTL_S,
                 pool: LimitSettings | None = None) -> None:
        if isinstance(url_or_client, str):
            from switchboard.core.redis_pool import redis_client

            # Short socket timeouts: a blackholed Redis must not stall requests. A bounded
            # pool that gives idle connections back (core/redis_pool.py), sized by `limits:`.
            p = pool or LimitSettings()
            self.redis = redis_client(url_or_client, decode_responses=True,
                                      timeout_s=REDIS_TIMEOUT_S,
                                      max_connections=p.redis_max_connections,
                                      idle_s=p.redis_idle_s)
            self._owns = True
        else:
            self.redis = url_or_client
            self._owns = False
        self.prefix = prefix
        self.clock = clock
        self.trial_ttl_s = trial_ttl_s
        self.configure(settings)
        self._allow = self.redis.register_script(_ALLOW)
        self._record = self.redis.register_script(_RECORD)
        self._warned_at = 0.0
        self._down_until = 0.0  # after a Redis error, fail open locally for a while
        # Successes on a closed circuit not yet sent: channel -> (count, first at)
        self._pending: dict[str, tuple[int, float]] = {}

    def configure(self, settings: CircuitSettings) -> None:
        self.settings = settings
        # Keys outlive every window they describe, then Redis forgets idle channels.
        self._ttl_ms = int((max(settings.window_s, settings.cooldown_s, self.trial_ttl_s) * 2 + 60)
                           * 1000)

    def _keys(self, channel: str) -> list[str]:
        base = self.prefix + channel
        return [base, base + ":trials", base + ":window"]

    def _redis_down(self, exc: Exception) -> None:
        now = time.monotonic()
        self._down_until = now + REDIS_RETRY_S
        if now - self._warned_at > 10.0:  # do not flood the log while Redis is down
            self._warned_at = now
            log.warning("circuit breaker: Redis unavailable (%s); failing open for %gs", exc,
                        REDIS_RETRY_S)

    async def _call(self, fn: Callable[[], Any]) -> Any:
        import redis.exceptions

        if self._down_until and time.monotonic() < self._down_until:
            return None  # Redis failed recently: do not make every request wait on it
        try:
            return await fn()
        except (redis.exceptions.RedisError, OSError) as exc:
            self._redis_down(exc)
            return None

    async def _run(self, script: Any, channel: str, *args: float | int | str) -> Any:
        argv = [repr(float(a)) if isinstance(a, float) else a for a in args]
        return await self._call(lambda: script(keys=self._keys(channel), args=argv))

    async def allow(self, channel: str) -> str:
        res = await self._run(self._allow, channel, self.clock(), self.trial_ttl_s,
                              max(1, self.settings.half_open_requests), self._ttl_ms)
        return CLOSED_TICKET if res is None else str(res)

    async def _send(self, channel: str, ticket: str, successes: int, failures: int) -> None:
        s = self.settings
        kind = "trial" if is_trial(ticket) else ticket or CLOSED_TICKET
        trial_id = ticket[len(TRIAL_PREFIX):] if is_trial(ticket) else ""
        res = await self._run(self._record, channel, self.clock(), successes, failures, kind,
                              trial_id, float(s.window_s), BUCKETS, s.min_requests,
                              float(s.failure_ratio), float(s.cooldown_s), self._ttl_ms)
        if isinstance(res, str) and res.startswith("opened:"):
            _, failed, total = res.split(":")
            log.warning("circuit opened for channel %s (%s of %s requests failed within %gs)",
                        channel, failed, total, s.window_s)

    def _take_pending(self, channel: str) -> int:
        n, _ = self._pending.pop(channel, (0, 0.0))
        return n

    async def record_success(self, channel: str, ticket: str) -> None:
        if ticket == CLOSED_TICKET:
            n, since = self._pending.get(channel, (0, time.monotonic()))
            if time.monotonic() - since < SUCCESS_FLUSH_S:
                self._pending[channel] = (n + 1, since)
                return
            self._pending.pop(channel, None)
            await self._send(channel, ticket, n + 1, 0)
            return
        await self._send(channel, ticket, 1 + self._take_pending(channel), 0)

    async def record_failure(self, channel: str, ticket: str) -> None:
        await self._send(channel, ticket, self._take_pending(channel), 1)

    async def release(self, channel: str, ticket: str) -> None:
        if not is_trial(ticket):
            return
        key = self._keys(channel)[1]
        await self._call(lambda: self.redis.zrem(key, ticket[len(TRIAL_PREFIX):]))

    async def _open_until(self, channel: str) -> float | None:
        key = self._keys(channel)[0]
        res = await self._call(lambda: self.redis.hget(key, "open_until"))
        return None if res is None else float(res)

    async def state(self, channel: str) -> str:
        until = await self._open_until(channel)
        if until is None:
            return CLOSED
        return OPEN if self.clock() < until else HALF_OPEN

    async def open_for(self, channel: str) -> float:
        until = await self._open_until(channel)
        return 0.0 if until is None else max(0.0, until - self.clock())

    async def close(self) -> None:
        if self._owns:
            await self.redis.aclose()


def make_breaker(limits: str, settings: CircuitSettings,
                 pool: LimitSettings | None = None) -> Breaker:
    """The breaker a config asks for: shared through Redis when `limits` is a Redis URL
    (its connection pool sized by `pool`, the config's `limits:` settings)."""
    if limits.startswith(("redis://", "rediss://")):
        return RedisCircuitBreaker(limits, settings, pool=pool)
    return CircuitBreaker.from_settings(settings)
