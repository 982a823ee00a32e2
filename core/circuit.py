"""Per-channel circuit breakers.

A channel that fails `threshold` times within `window_s` *opens*: no request goes to it
for `cooldown_s`. After the cool-down it is *half-open*: exactly one trial request is let
through; the trial's success closes the circuit, its failure opens it for another
cool-down. Channels therefore always come back by themselves, and a single error never
disables one (a common complaint about other gateways).

Successes do not reset the failure window while closed: a channel failing half its
requests still opens once `threshold` failures fall inside the window.

`allow()` hands out a ticket that the caller passes back with the verdict:
`CLOSED_TICKET` (normal traffic, nothing to report on success), `TRIAL_TICKET` (the one
half-open probe) or `REFUSED`. That keeps the hot path free of writes.

Two implementations with the same async interface:
- `CircuitBreaker`: state in this process (the default);
- `RedisCircuitBreaker`: state shared by every replica through Redis, used when the
  config's `limits` is a `redis://` URL. Each transition is one Lua script, so it is
  atomic across replicas. If Redis is unreachable the breaker fails open (lets traffic
  through) rather than taking the gateway down with it.

The clock is injectable so tests drive the transitions without sleeping. The Redis
variant uses wall-clock time (shared between hosts), the local one a monotonic clock.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from switchboard.core.config import CircuitSettings, LimitSettings

log = logging.getLogger("switchboard.circuit")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
REFUSED, CLOSED_TICKET, TRIAL_TICKET = "", "closed", "trial"

# A trial that never reports back (a crashed replica, a lost task) stops blocking
# further trials after this long.
DEFAULT_TRIAL_TTL_S = 60.0
# Redis variant: socket timeouts, and how long to stop asking Redis after it failed.
REDIS_TIMEOUT_S = 0.5
REDIS_RETRY_S = 5.0


class Breaker(Protocol):
    """What the router needs from a circuit breaker."""

    async def allow(self, channel: str) -> str:
        """A ticket: REFUSED (""), CLOSED_TICKET or TRIAL_TICKET (the half-open probe)."""
        ...

    async def record_success(self, channel: str, ticket: str) -> None: ...

    async def record_failure(self, channel: str, ticket: str) -> None: ...

    async def release(self, channel: str, ticket: str) -> None:
        """The request ended without a verdict on the channel (cancelled, client error)."""
        ...

    async def state(self, channel: str) -> str: ...

    async def close(self) -> None: ...


@dataclass
class _State:
    failures: deque[float] = field(default_factory=deque)
    opened_at: float | None = None
    trial_until: float | None = None  # a trial is in flight until then


class CircuitBreaker:
    """Circuit state kept in this process."""

    def __init__(self, threshold: int = 5, window_s: float = 30.0, cooldown_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic,
                 trial_ttl_s: float = DEFAULT_TRIAL_TTL_S) -> None:
        self.threshold = max(1, threshold)
        self.window_s = window_s
        self.cooldown_s = cooldown_s
        self.trial_ttl_s = trial_ttl_s
        self.clock = clock
        self._states: dict[str, _State] = {}

    @classmethod
    def from_settings(cls, s: CircuitSettings, clock: Callable[[], float] = time.monotonic
                      ) -> CircuitBreaker:
        return cls(s.threshold, s.window_s, s.cooldown_s, clock)

    def _state(self, s: _State | None, now: float) -> str:
        if s is None or s.opened_at is None:
            return CLOSED
        return OPEN if now - s.opened_at < self.cooldown_s else HALF_OPEN

    async def state(self, channel: str) -> str:
        return self._state(self._states.get(channel), self.clock())

    async def allow(self, channel: str) -> str:
        s = self._states.get(channel)
        now = self.clock()
        st = self._state(s, now)
        if st == CLOSED:
            return CLOSED_TICKET
        assert s is not None
        if st == OPEN or (s.trial_until is not None and s.trial_until > now):
            return REFUSED
        s.trial_until = now + self.trial_ttl_s
        return TRIAL_TICKET

    async def record_success(self, channel: str, ticket: str) -> None:
        if ticket == TRIAL_TICKET:
            self._states.pop(channel, None)

    async def record_failure(self, channel: str, ticket: str) -> None:
        now = self.clock()
        s = self._states.setdefault(channel, _State())
        st = self._state(s, now)
        if st == OPEN:
            return  # already cooling down: late failures of older requests change nothing
        if st == HALF_OPEN:
            s.opened_at, s.trial_until = now, None  # the probe failed: another cool-down
            return
        s.failures.append(now)
        while s.failures and now - s.failures[0] > self.window_s:
            s.failures.popleft()
        if len(s.failures) >= self.threshold:
            s.opened_at = now
            s.failures.clear()
            log.warning("circuit opened for channel %s (%d failures within %gs)", channel,
                        self.threshold, self.window_s)

    async def release(self, channel: str, ticket: str) -> None:
        if ticket == TRIAL_TICKET:
            s = self._states.get(channel)
            if s is not None:
                s.trial_until = None

    async def close(self) -> None:
        return None


# ------------------------------------------------------------------ Redis ----
# KEYS[1] = hash {opened_at, trial_until, seq}; KEYS[2] = zset of failure times.

_ALLOW = """
local opened = redis.call('HGET', KEYS[1], 'opened_at')
if not opened then return 'closed' end
local now = tonumber(ARGV[1])
if now - tonumber(opened) < tonumber(ARGV[2]) then return '' end
local trial = redis.call('HGET', KEYS[1], 'trial_until')
if trial and tonumber(trial) > now then return '' end
redis.call('HSET', KEYS[1], 'trial_until', tostring(now + tonumber(ARGV[3])))
return 'trial'
"""

_FAILURE = """
local now = tonumber(ARGV[1])
local window, threshold, cooldown = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local ttl_ms = tonumber(ARGV[5])
local opened = redis.call('HGET', KEYS[1], 'opened_at')
if opened then
  if now - tonumber(opened) < cooldown then return 'open' end
  redis.call('HSET', KEYS[1], 'opened_at', tostring(now))
  redis.call('HDEL', KEYS[1], 'trial_until')
  redis.call('PEXPIRE', KEYS[1], ttl_ms)
  return 'reopened'
end
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
redis.call('PEXPIRE', KEYS[1], ttl_ms)
redis.call('ZADD', KEYS[2], now, seq)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. tostring(now - window))
if redis.call('ZCARD', KEYS[2]) >= threshold then
  redis.call('HSET', KEYS[1], 'opened_at', tostring(now))
  redis.call('DEL', KEYS[2])
  return 'opened'
end
redis.call('PEXPIRE', KEYS[2], ttl_ms)
return 'closed'
"""

# Only a half-open circuit closes on success (a trial that reports back).
_SUCCESS = """
local opened = redis.call('HGET', KEYS[1], 'opened_at')
if not opened then return 0 end
if tonumber(ARGV[1]) - tonumber(opened) < tonumber(ARGV[2]) then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
return 1
"""

_STATE = """
local opened = redis.call('HGET', KEYS[1], 'opened_at')
if not opened then return 'closed' end
if tonumber(ARGV[1]) - tonumber(opened) < tonumber(ARGV[2]) then return 'open' end
return 'half_open'
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
        self.settings = settings
        self.prefix = prefix
        self.clock = clock
        self.trial_ttl_s = trial_ttl_s
        # Keys outlive every window they describe, then Redis forgets idle channels.
        self._ttl_ms = int((max(settings.window_s, settings.cooldown_s, trial_ttl_s) * 2 + 60) * 1000)
        self._allow = self.redis.register_script(_ALLOW)
        self._failure = self.redis.register_script(_FAILURE)
        self._success = self.redis.register_script(_SUCCESS)
        self._state_script = self.redis.register_script(_STATE)
        self._warned_at = 0.0
        self._down_until = 0.0  # after a Redis error, fail open locally for a while

    def _keys(self, channel: str) -> list[str]:
        base = self.prefix + channel
        return [base, base + ":failures"]

    def _redis_down(self, exc: Exception) -> None:
        now = time.monotonic()
        self._down_until = now + REDIS_RETRY_S
        if now - self._warned_at > 10.0:  # do not flood the log while Redis is down
            self._warned_at = now
            log.warning("circuit breaker: Redis unavailable (%s); failing open for %gs", exc,
                        REDIS_RETRY_S)

    async def _run(self, script: Any, channel: str, *args: float | int) -> Any:
        import redis.exceptions

        if self._down_until and time.monotonic() < self._down_until:
            return None  # Redis failed recently: do not make every request wait on it
        try:
            return await script(keys=self._keys(channel), args=[repr(float(a)) if isinstance(a, float)
                                                                 else a for a in args])
        except (redis.exceptions.RedisError, OSError) as exc:
            self._redis_down(exc)
            return None

    async def allow(self, channel: str) -> str:
        res = await self._run(self._allow, channel, self.clock(), self.settings.cooldown_s,
                              self.trial_ttl_s)
        return CLOSED_TICKET if res is None else str(res)

    async def record_success(self, channel: str, ticket: str) -> None:
        if ticket == TRIAL_TICKET:
            await self._run(self._success, channel, self.clock(), self.settings.cooldown_s)

    async def record_failure(self, channel: str, ticket: str) -> None:
        s = self.settings
        res = await self._run(self._failure, channel, self.clock(), s.window_s, max(1, s.threshold),
                              s.cooldown_s, self._ttl_ms)
        if res == "opened":
            log.warning("circuit opened for channel %s (%d failures within %gs)", channel,
                        s.threshold, s.window_s)

    async def release(self, channel: str, ticket: str) -> None:
        if ticket != TRIAL_TICKET:
            return
        import redis.exceptions

        if self._down_until and time.monotonic() < self._down_until:
            return
        try:
            await self.redis.hdel(self._keys(channel)[0], "trial_until")
        except (redis.exceptions.RedisError, OSError) as exc:
            self._redis_down(exc)

    async def state(self, channel: str) -> str:
        res = await self._run(self._state_script, channel, self.clock(), self.settings.cooldown_s)
        return CLOSED if res is None else str(res)

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
