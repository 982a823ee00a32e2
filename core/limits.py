"""Rate limits, concurrency and budgets — exact within one process (memory backend) and
across replicas (Redis backend).

Per key, four limits, all optional:
- RPM: requests admitted in the last 60 s (sliding window log: one sorted-set entry
  per admitted request, scored by admission time);
- TPM: tokens in the last 60 s (sliding window log with one entry per request carrying
  its token count, plus a running sum kept in step with it);
- max_concurrent: requests in flight (a sorted set of leases; a replica that dies
  holding one frees it after `limits.lease_s`);
- budget: tokens or US dollars (micro-dollars internally, so counters stay integers)
  per UTC day, UTC month or in total.

Reservation: before the call the gateway reserves `prompt estimate + max tokens`
(× n choices) against TPM and the budget; after it — success, failure, or a stream
finished, failed or cancelled — the reservation is settled to the real usage (the
upstream's usage, or the gateway's estimate when the upstream reported none). So the
window and the budget hold reservations while a call runs and real figures after,
and a budget is never overspent by more than one reservation's misestimate.

Estimate method (`estimate_prompt_tokens`): characters / 4 over message text, names
and tool-call arguments and tool definitions, + 4 tokens per message + 3, with a fixed
765 tokens per image part and 1,000 per audio part; no tokenizer (it would cost more
CPU than the gateway itself). Requests without max_tokens reserve
`limits.default_max_tokens` (default 1024) completion tokens.

Redis backend: every check is ONE server-side Lua script (EVALSHA) over the key's
sorted sets and counters, timed by the Redis server's clock (`TIME`), so replicas with
skewed clocks still agree, and no read-modify-write crosses the network. Settling is a
second single script. All of a key's Redis keys share a hash tag, so the scripts also
work on Redis Cluster. Budget counters are seeded from the usage ledger the first time
a period's counter is missing (Redis restarted or a new period), via SET-if-absent.

Redis unreachable (`limits.on_error`, default "closed"): "closed" refuses the request
with UNAVAILABLE (reason `limits_unavailable`) — budgets are money, and an outage
must not turn into unlimited spend; "open" admits it without limits and logs a
warning at most every 10 s. Redis calls time out after `limits.redis_timeout_s`.

Rate-limit headers, for keys that have the limit (nothing is computed for keys
without limits): OpenAI's x-ratelimit-limit/remaining/reset-requests (RPM) and
-tokens (TPM), plus x-ratelimit-limit-concurrency and
x-ratelimit-remaining-concurrency (max_concurrent; no reset: a slot frees when a
request in flight ends). They go on every 429 (with Retry-After; gRPC:
RESOURCE_EXHAUSTED with RetryInfo and QuotaFailure details and the same names as
trailing metadata) and, as OpenAI does, on every admitted request's response (gRPC:
initial metadata), counting that request. "reset" is the time until the oldest entry
leaves the 60 s window. A budget refusal has code `insufficient_quota`.

Pricing for USD budgets (core/ledger.py PriceTable): a request is charged at the
price of the model that actually served it (after routes and `model_map`), so an
alias cannot spend for free. The reservation before the call, when the serving model
is not yet known, is priced at the most expensive model the request could reach; the
settlement afterwards corrects it to the served model's real cost.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import grpc
import redis.exceptions

from switchboard.core.config import LimitSettings
from switchboard.core.errors import GatewayError
from switchboard.core.keys import KeyRecord
from switchboard.core.ledger import PriceTable
from switchboard.core.usage import UsageRecord
from switchboard.v1 import inference_pb2 as pb

log = logging.getLogger("switchboard.limits")

WINDOW_MS = 60_000
OK, RPM, TPM, CONCURRENCY, BUDGET, SEED = 0, 1, 2, 3, 4, 5
_REASONS = {RPM: "requests per minute", TPM: "tokens per minute",
            CONCURRENCY: "concurrent requests", BUDGET: "budget"}
IMAGE_PART_TOKENS = 765
AUDIO_PART_TOKENS = 1000


# ------------------------------------------------------------- estimates ----

def estimate_prompt_tokens(params: pb.ChatCompletionParams) -> int:
    chars = 0
    fixed = 3
    for m in params.messages:
        fixed += 4
        kind = m.WhichOneof("content")
        if kind == "text":
            chars += len(m.text)
        elif kind == "parts":
            for part in m.parts.parts:
                which = part.WhichOneof("part")
                if which == "image_url":
                    fixed += IMAGE_PART_TOKENS
                elif which == "input_audio":
                    fixed += AUDIO_PART_TOKENS
                elif which is not None:
                    chars += len(getattr(part, which))
        chars += len(m.name) + len(m.reasoning_content)
        for call in m.tool_calls:
            chars += len(call.function.name) + len(call.function.arguments)
    for tool in params.tools:
        chars += tool.ByteSize()
    return fixed + math.ceil(chars / 4)


def completion_reserve(params: pb.ChatCompletionParams, default_max: int) -> int:
    if params.HasField("max_completion_tokens"):
        per_choice = params.max_completion_tokens
    elif params.HasField("max_tokens"):
        per_choice = params.max_tokens
    else:
        per_choice = default_max
    return per_choice * (params.n if params.HasField("n") and params.n > 0 else 1)


def _text_chars(msg: pb.StreamChatCompletionResponse | pb.CreateChatCompletionResponse) -> int:
    """Characters of generated text in a chunk (deltas) or a whole response (messages)."""
    n = 0
    if isinstance(msg, pb.StreamChatCompletionResponse):
        for c in msg.choices:
            d = c.delta
            n += len(d.content) + len(d.refusal) + len(d.reasoning_content)
            n += sum(len(t.function.arguments) + len(t.function.name) for t in d.tool_calls)
    else:
        for r in msg.choices:
            m = r.message
            n += len(m.content) + len(m.refusal) + len(m.reasoning_content)
            n += sum(len(t.function.arguments) + len(t.function.name) for t in m.tool_calls)
    return n


# ------------------------------------------------------------- periods ------

def budget_bucket(period: str, now: float) -> tuple[str, float | None, int]:
    """(bucket id, period start, seconds until the bucket may expire) for a UTC period."""
    t = dt.datetime.fromtimestamp(now, dt.UTC)
    if period == "day":
        start = t.replace(hour=0, minute=0, second=0, microsecond=0)
        end = start + dt.timedelta(days=1)
        bucket = start.strftime("d%Y%m%d")
    elif period == "month":
        start = t.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        end = (start + dt.timedelta(days=32)).replace(day=1)
        bucket = start.strftime("m%Y%m")
    else:
        return "total", None, 0
    # Keep the counter an hour past the period so late settles still find it.
    return bucket, start.timestamp(), int(end.timestamp() - now) + 3600


def _budget_units(key: KeyRecord, tokens: int, cost: float) -> int:
    return math.ceil(cost * 1_000_000) if key.budget_unit == "usd" else tokens


def _budget_limit(key: KeyRecord) -> int:
    if key.budget is None:
        return -1
    return int(key.budget * 1_000_000) if key.budget_unit == "usd" else int(key.budget)


# ------------------------------------------------------------- backends -----

@dataclass(frozen=True)
class Spec:
    """One key's limits, as the backends see them (-1 = unlimited)."""

    key_id: str
    rpm: int
    tpm: int
    concurrency: int
    budget: int
    bucket: str
    bucket_ttl: int


@dataclass
class Decision:
    status: int
    retry_after_ms: int = 0
    rpm_remaining: int = -1
    tpm_remaining: int = -1
    rpm_reset_ms: int = 0
    tpm_reset_ms: int = 0
    conc_remaining: int = -1


class Backend(Protocol):
    async def reserve(self, spec: Spec, rid: str, tokens: int, budget: int, seed: int,
                      lease_ms: int) -> Decision: ...

    async def settle(self, spec: Spec, rid: str, reserved_tokens: int, actual_tokens: int,
                     reserved_budget: int, actual_budget: int) -> None: ...

    async def close(self) -> None: ...


@dataclass
class _KeyState:
    rpm: deque[tuple[float, str]] = field(default_factory=deque)
    tpm: deque[tuple[float, str]] = field(default_factory=deque)
    tpm_tokens: dict[str, int] = field(default_factory=dict)
    tpm_sum: int = 0
    leases: dict[str, float] = field(default_factory=dict)
    budgets: dict[str, int] = field(default_factory=dict)


class MemoryBackend:
    """One process. Each call runs without an await, so it is atomic on the event loop."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._keys: dict[str, _KeyState] = {}

    def _expire(self, s: _KeyState, now_ms: float) -> None:
        cutoff = now_ms - WINDOW_MS
        while s.rpm and s.rpm[0][0] <= cutoff:
            s.rpm.popleft()
        while s.tpm and s.tpm[0][0] <= cutoff:
            _, rid = s.tpm.popleft()
            s.tpm_sum -= s.tpm_tokens.pop(rid, 0)
        for rid in [r for r, exp in s.leases.items() if exp <= now_ms]:
            del s.leases[rid]

    async def reserve(self, spec: Spec, rid: str, tokens: int, budget: int, seed: int,
                      lease_ms: int) -> Decision:
        now = self.clock() * 1000
        s = self._keys.setdefault(spec.key_id, _KeyState())
        self._expire(s, now)
        d = Decision(OK)
        if spec.concurrency >= 0:
            d.conc_remaining = spec.concurrency - len(s.leases)
        if spec.rpm >= 0:
            d.rpm_remaining = spec.rpm - len(s.rpm)
            d.rpm_reset_ms = int(s.rpm[0][0] + WINDOW_MS - now) if s.rpm else 0
            if len(s.rpm) >= spec.rpm:
                d.status, d.retry_after_ms = RPM, max(d.rpm_reset_ms, 1)
                return d
        if spec.tpm >= 0:
            d.tpm_remaining = spec.tpm - s.tpm_sum
            if s.tpm_sum + tokens > spec.tpm:
                need, freed, wait = s.tpm_sum + tokens - spec.tpm, 0, WINDOW_MS
                for ts, r in s.tpm:
                    freed += s.tpm_tokens.get(r, 0)
                    if freed >= need:
                        wait = int(ts + WINDOW_MS - now)
                        break
                d.status, d.retry_after_ms, d.tpm_reset_ms = TPM, max(wait, 1), max(wait, 1)
                return d
        if spec.concurrency >= 0 and len(s.leases) >= spec.concurrency:
            d.status, d.retry_after_ms, d.conc_remaining = CONCURRENCY, 1000, 0
            return d
        if spec.budget >= 0:
            spent = s.budgets.get(spec.bucket)
            if spent is None:
                if seed < 0:
                    d.status = SEED
                    return d
                spent = s.budgets[spec.bucket] = seed
            if spent + budget > spec.budget:
                d.status, d.retry_after_ms = BUDGET, spec.bucket_ttl * 1000
                return d
            s.budgets[spec.bucket] = spent + budget
        if spec.rpm >= 0:
            s.rpm.append((now, rid))
            d.rpm_remaining -= 1
            d.rpm_reset_ms = int(s.rpm[0][0] + WINDOW_MS - now)
        if spec.tpm >= 0:
            s.tpm.append((now, rid))
            s.tpm_tokens[rid] = tokens
            s.tpm_sum += tokens
            d.tpm_remaining -= tokens
            d.tpm_reset_ms = int(s.tpm[0][0] + WINDOW_MS - now)
        if spec.concurrency >= 0:
            s.leases[rid] = now + lease_ms
            d.conc_remaining -= 1
        return d

    async def settle(self, spec: Spec, rid: str, reserved_tokens: int, actual_tokens: int,
                     reserved_budget: int, actual_budget: int) -> None:
        s = self._keys.get(spec.key_id)
        if s is None:
            return
        s.leases.pop(rid, None)
        if rid in s.tpm_tokens:
            s.tpm_sum += actual_tokens - s.tpm_tokens[rid]
            s.tpm_tokens[rid] = actual_tokens
        if spec.budget >= 0 and spec.bucket in s.budgets:
            s.budgets[spec.bucket] += actual_budget - reserved_budget

    async def close(self) -> None:
        return None


# KEYS: rpm zset, tpm zset, tpm sum, concurrency zset, budget counter
# ARGV: rid, rpm, tpm, concurrency, tokens, budget_limit, budget_amount, bucket_ttl_s,
#       lease_ms, seed (-1 = unknown)
_RESERVE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = 60000
local rid = ARGV[1]
local rpm, tpm, conc = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local tokens, blimit, bamount = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local bttl, lease, seed = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
local cutoff = now - window
local rpm_rem, tpm_rem, rpm_reset, tpm_reset, conc_rem = -1, -1, 0, 0, -1
local count = 0
if conc >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
  conc_rem = conc - redis.call('ZCARD', KEYS[4])
end
if rpm >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', cutoff)
  count = redis.call('ZCARD', KEYS[1])
  rpm_rem = rpm - count
  if count > 0 then
    local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    rpm_reset = tonumber(oldest[2]) + window - now
  end
  if count >= rpm then
    return {1, math.max(rpm_reset, 1), rpm_rem, tpm_rem, rpm_reset, tpm_reset, conc_rem}
  end
end
local sum = 0
if tpm >= 0 then
  local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', cutoff)
  if #old > 0 then
    local gone = 0
    for _, m in ipairs(old) do gone = gone + tonumber(string.match(m, ':(%-?%d+)$')) end
    redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', cutoff)
    redis.call('DECRBY', KEYS[3], gone)
  end
  sum = tonumber(redis.call('GET', KEYS[3]) or '0')
  if redis.call('ZCARD', KEYS[2]) == 0 then sum = 0 end
  tpm_rem = tpm - sum
  if sum + tokens > tpm then
    local need, freed, wait = sum + tokens - tpm, 0, window
    local all = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
    for i = 1, #all, 2 do
      freed = freed + tonumber(string.match(all[i], ':(%-?%d+)$'))
      if freed >= need then wait = tonumber(all[i + 1]) + window - now; break end
    end
    wait = math.max(wait, 1)
    return {2, wait, rpm_rem, tpm_rem, rpm_reset, wait, conc_rem}
  end
end
if conc >= 0 and conc_rem <= 0 then
  return {3, 1000, rpm_rem, tpm_rem, rpm_reset, tpm_reset, 0}
end
if blimit >= 0 then
  local spent = redis.call('GET', KEYS[5])
  if not spent then
    if seed < 0 then return {5, 0, rpm_rem, tpm_rem, rpm_reset, tpm_reset, conc_rem} end
    spent = seed
    redis.call('SET', KEYS[5], seed)
    if bttl > 0 then redis.call('EXPIRE', KEYS[5], bttl) end
  end
  spent = tonumber(spent)
  if spent + bamount > blimit then
    return {4, math.max(bttl, 0) * 1000, rpm_rem, tpm_rem, rpm_reset, tpm_reset, conc_rem}
  end
  redis.call('INCRBY', KEYS[5], bamount)
end
if rpm >= 0 then
  redis.call('ZADD', KEYS[1], now, rid)
  redis.call('PEXPIRE', KEYS[1], window * 2)
  rpm_rem = rpm_rem - 1
  if count == 0 then rpm_reset = window end
end
if tpm >= 0 then
  local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  if #first == 0 then
    redis.call('SET', KEYS[3], 0)
    tpm_reset = window
  else
    tpm_reset = tonumber(first[2]) + window - now
  end
  redis.call('ZADD', KEYS[2], now, rid .. ':' .. tokens)
  redis.call('INCRBY', KEYS[3], tokens)
  redis.call('PEXPIRE', KEYS[2], window * 2)
  redis.call('PEXPIRE', KEYS[3], window * 2)
  tpm_rem = tpm_rem - tokens
end
if conc >= 0 then
  redis.call('ZADD', KEYS[4], now + lease, rid)
  redis.call('PEXPIRE', KEYS[4], lease * 2)
  conc_rem = conc_rem - 1
end
return {0, 0, rpm_rem, tpm_rem, rpm_reset, tpm_reset, conc_rem}
"""

# KEYS: as above. ARGV: rid, reserved_tokens, actual_tokens, budget_delta
_SETTLE_LUA = """
redis.call('ZREM', KEYS[4], ARGV[1])
local old = ARGV[1] .. ':' .. ARGV[2]
local score = redis.call('ZSCORE', KEYS[2], old)
if score then
  redis.call('ZREM', KEYS[2], old)
  redis.call('ZADD', KEYS[2], score, ARGV[1] .. ':' .. ARGV[3])
  redis.call('INCRBY', KEYS[3], tonumber(ARGV[3]) - tonumber(ARGV[2]))
end
local delta = tonumber(ARGV[4])
if delta ~= 0 and redis.call('EXISTS', KEYS[5]) == 1 then
  redis.call('INCRBY', KEYS[5], delta)
end
return 0
"""


class RedisBackend:
    """Shared by every replica pointing at the same Redis and `limits.key_prefix`."""

    def __init__(self, url: str, prefix: str, timeout_s: float, *,
                 max_connections: int = LimitSettings().redis_max_connections,
                 idle_s: float = LimitSettings().redis_idle_s) -> None:
        from switchboard.core.redis_pool import redis_client

        # A bounded pool that gives idle connections back (core/redis_pool.py).
        self.client = redis_client(url, timeout_s=timeout_s, max_connections=max_connections,
                                   idle_s=idle_s, health_check_interval=30)
        self.prefix = prefix
        self._reserve = self.client.register_script(_RESERVE_LUA)
        self._settle = self.client.register_script(_SETTLE_LUA)

    def keys(self, spec: Spec) -> list[str]:
        base = f"{self.prefix}:{{{spec.key_id}}}"
        return [f"{base}:rpm", f"{base}:tpm", f"{base}:tpm_sum", f"{base}:conc",
                f"{base}:budget:{spec.bucket}"]

    async def reserve(self, spec: Spec, rid: str, tokens: int, budget: int, seed: int,
                      lease_ms: int) -> Decision:
        r = await self._reserve(keys=self.keys(spec), args=[
            rid, spec.rpm, spec.tpm, spec.concurrency, tokens, spec.budget, budget,
            spec.bucket_ttl, lease_ms, seed])
        return Decision(*(int(x) for x in r))

    async def settle(self, spec: Spec, rid: str, reserved_tokens: int, actual_tokens: int,
                     reserved_budget: int, actual_budget: int) -> None:
        await self._settle(keys=self.keys(spec), args=[
            rid, reserved_tokens, actual_tokens, actual_budget - reserved_budget])

    async def close(self) -> None:
        await self.client.aclose()


# ------------------------------------------------------------- the gate -----

@dataclass
class Ticket:
    """One admitted request's reservation and what was observed of its output."""

    key: KeyRecord
    model: str
    rid: str
    spec: Spec | None  # None: nothing held in the backend
    tokens: int = 0  # reserved TPM tokens
    budget: int = 0  # reserved budget units
    prompt_estimate: int = 0
    images: int = 0
    output_chars: int = 0
    started: bool = False  # the upstream sent something (it will bill the prompt)
    settled: bool = False
    # x-ratelimit-* for the response, when the key has RPM/TPM/concurrency limits.
    headers: dict[str, str] | None = None

    def observe(self, msg: pb.StreamChatCompletionResponse | pb.CreateChatCompletionResponse) -> None:
        """Count generated text, to estimate usage when the upstream reports none."""
        self.started = True
        self.output_chars += _text_chars(msg)


SpentLoader = Callable[[str, float | None, str], Awaitable[float]]
# The (public, upstream) model names that could serve a request (Router.served_names).
ServedNames = Callable[[], Iterable[tuple[str, str]]]


class Limits:
    """What the gateway calls: `reserve` before routing, `finish` after (once)."""

    def __init__(self, backend: Backend, settings: LimitSettings, prices: PriceTable, *,
                 spent: SpentLoader | None = None,
                 saturated: Callable[[], bool] | None = None) -> None:
        self.backend = backend
        self.settings = settings
        self.prices = prices
        self.spent = spent
        self.saturated = saturated
        self._tasks: set[asyncio.Task[None]] = set()
        self._last_warning = 0.0

    # ------------------------------------------------------------ admit ----

    def _reserve_cost(self, key: KeyRecord, model: str, served: ServedNames | None,
                      prompt: int, completion: int, images: int = 0) -> float:
        """USD to reserve: the most expensive model the request could be served by
        (computed only for USD budgets; the settlement prices the one that served)."""
        if key.budget is None or key.budget_unit != "usd":
            return 0.0
        names = list(served()) if served is not None else []
        if not names:
            names = [(model, "")]
        return max(self.prices.cost(public, prompt, completion, images=images, upstream=upstream)
                   for public, upstream in names)

    async def reserve_chat(self, key: KeyRecord, params: pb.ChatCompletionParams,
                           request_id: str, served: ServedNames | None = None) -> Ticket:
        prompt = estimate_prompt_tokens(params)
        completion = completion_reserve(params, self.settings.default_max_tokens)
        cost = self._reserve_cost(key, params.model, served, prompt, completion)
        t = Ticket(key=key, model=params.model, rid=request_id, spec=None,
                   prompt_estimate=prompt)
        await self._reserve(t, prompt + completion, _budget_units(key, prompt + completion, cost))
        return t

    async def reserve_image(self, key: KeyRecord, req: pb.CreateImageRequest,
                            request_id: str, served: ServedNames | None = None) -> Ticket:
        n = req.n if req.HasField("n") else 1
        cost = self._reserve_cost(key, req.model, served, 0, 0, images=n)
        t = Ticket(key=key, model=req.model, rid=request_id, spec=None, images=n)
        await self._reserve(t, 0, _budget_units(key, 0, cost))
        return t

    def _spec(self, key: KeyRecord) -> Spec | None:
        if (key.rpm is None and key.tpm is None and key.max_concurrent is None
                and key.budget is None):
            return None
        bucket, _, ttl = budget_bucket(key.budget_period, time.time())
        bucket = f"{key.budget_unit}-{bucket}"  # a unit change starts a fresh counter
        return Spec(key_id=key.key_id or f"static:{key.name}",
                    rpm=-1 if key.rpm is None else key.rpm,
                    tpm=-1 if key.tpm is None else key.tpm,
                    concurrency=-1 if key.max_concurrent is None else key.max_concurrent,
                    budget=_budget_limit(key), bucket=bucket, bucket_ttl=ttl)

    async def _reserve(self, t: Ticket, tokens: int, budget: int) -> None:
        if self.saturated is not None and self.saturated():
            raise GatewayError(grpc.StatusCode.UNAVAILABLE,
                               "The gateway's usage ledger is backed up; retry shortly.",
                               code="ledger_backpressure", retry_after=1.0)
        spec = self._spec(t.key)
        if spec is None:
            return
        # Unique per reservation even when a client reuses its request id.
        rid = f"{t.rid}.{uuid.uuid4().hex[:8]}"
        lease_ms = int(self.settings.lease_s * 1000)
        try:
            d = await self.backend.reserve(spec, rid, tokens, budget, -1, lease_ms)
            if d.status == SEED:
                seed = await self._seed(t.key, spec)
                d = await self.backend.reserve(spec, rid, tokens, budget, seed, lease_ms)
        except (GatewayError, redis.exceptions.ResponseError):
            raise  # a refusal, or a bug in a script: never mistaken for an outage
        except Exception as exc:
            self._backend_down(exc)
            return  # fail open: nothing held
        if d.status != OK:
            raise self._refusal(t.key, spec, d)
        t.spec, t.rid, t.tokens, t.budget = spec, rid, tokens, budget
        t.headers = ratelimit_headers(spec, d) or None

    async def _seed(self, key: KeyRecord, spec: Spec) -> int:
        if self.spent is None:
            return 0
        _, since, _ = budget_bucket(key.budget_period, time.time())
        used = await self.spent(spec.key_id, since, key.budget_unit)
        return math.ceil(used * 1_000_000) if key.budget_unit == "usd" else int(used)

    def _backend_down(self, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._last_warning > 10:
            self._last_warning = now
            log.warning("limits backend unreachable (%s); failing %s", type(exc).__name__,
                        self.settings.on_error)
        if self.settings.on_error == "closed":
            raise GatewayError(grpc.StatusCode.UNAVAILABLE,
                               "Rate limits cannot be checked right now; retry shortly.",
                               code="limits_unavailable", retry_after=1.0) from None

    def _refusal(self, key: KeyRecord, spec: Spec, d: Decision) -> GatewayError:
        headers = ratelimit_headers(spec, d)
        retry = max(d.retry_after_ms, 1) / 1000.0
        if d.status == BUDGET:
            return GatewayError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"The API key '{key.name}' has used up its {key.budget_period} budget "
                f"({key.budget:g} {key.budget_unit}).",
                code="insufficient_quota", headers=headers,
                retry_after=retry if key.budget_period != "total" else None,
                quota=(f"key:{key.name}", f"{key.budget:g} {key.budget_unit} per "
                                          f"{key.budget_period} budget"))
        limit = {RPM: spec.rpm, TPM: spec.tpm, CONCURRENCY: spec.concurrency}[d.status]
        return GatewayError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"Rate limit reached for API key '{key.name}': {limit} {_REASONS[d.status]}. "
            f"Retry after {retry:.1f}s.",
            code="rate_limit_exceeded", headers=headers, retry_after=retry,
            quota=(f"key:{key.name}", f"{limit} {_REASONS[d.status]}"))

    # ------------------------------------------------------------ settle ----

    def finish(self, t: Ticket | None, rec: UsageRecord, usage: pb.Usage | None) -> None:
        """Fill the record's tokens, cost and `estimated`, and settle the reservation
        (in the background: this runs in `finally` blocks of cancelled requests)."""
        if usage is not None:
            rec.prompt_tokens = usage.prompt_tokens
            rec.completion_tokens = usage.completion_tokens
            rec.cached_tokens = usage.prompt_tokens_details.cached_tokens
            rec.reasoning_tokens = usage.completion_tokens_details.reasoning_tokens
        elif t is not None and (t.started or rec.status == "OK") and not t.images:
            # No usage from the upstream, but it started answering (so it bills): estimate.
            rec.prompt_tokens = t.prompt_estimate
            rec.completion_tokens = math.ceil(t.output_chars / 4)
            rec.estimated = True
        images = t.images if t is not None and rec.status == "OK" else 0
        # Priced by what served it (an alias costs what its target costs); a request no
        # upstream answered has no served model and, normally, no tokens either.
        rec.cost = self.prices.cost(rec.served_model or rec.model, rec.prompt_tokens,
                                    rec.completion_tokens, rec.cached_tokens, images,
                                    upstream=rec.upstream_model)
        if t is None or t.settled:
            return
        t.settled = True
        if t.spec is None:
            return
        actual = rec.prompt_tokens + rec.completion_tokens
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # a stream finalised after its loop ended: leases expire alone
            return
        task = loop.create_task(self._settle(t, actual, _budget_units(t.key, actual, rec.cost)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _settle(self, t: Ticket, tokens: int, budget: int) -> None:
        assert t.spec is not None
        for attempt in range(3):
            try:
                await self.backend.settle(t.spec, t.rid, t.tokens, tokens, t.budget, budget)
                return
            except Exception as exc:
                if attempt == 2:
                    log.warning("could not settle a reservation (%s); its window entry "
                                "keeps the reserved figure", type(exc).__name__)
                else:
                    await asyncio.sleep(0.05 * (attempt + 1))

    async def wait_settled(self) -> None:
        """Wait for the settlements scheduled so far (shutdown, tests)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        await self.wait_settled()
        await self.backend.close()


def ratelimit_headers(spec: Spec, d: Decision) -> dict[str, str]:
    """The x-ratelimit-* headers for the limits `spec` has, from a backend decision."""
    headers: dict[str, str] = {}
    if spec.rpm >= 0:
        headers["x-ratelimit-limit-requests"] = str(spec.rpm)
        headers["x-ratelimit-remaining-requests"] = str(max(d.rpm_remaining, 0))
        headers["x-ratelimit-reset-requests"] = _duration(d.rpm_reset_ms)
    if spec.tpm >= 0:
        headers["x-ratelimit-limit-tokens"] = str(spec.tpm)
        headers["x-ratelimit-remaining-tokens"] = str(max(d.tpm_remaining, 0))
        headers["x-ratelimit-reset-tokens"] = _duration(d.tpm_reset_ms)
    if spec.concurrency >= 0:
        headers["x-ratelimit-limit-concurrency"] = str(spec.concurrency)
        headers["x-ratelimit-remaining-concurrency"] = str(max(d.conc_remaining, 0))
    return headers


def _duration(ms: int) -> str:
    """OpenAI's reset format: '1s', '6m0s', '250ms'."""
    ms = max(int(ms), 0)
    if ms < 1000:
        return f"{ms}ms"
    s = ms / 1000
    if s < 60:
        return f"{s:.3g}s"
    m, rest = divmod(round(s), 60)
    return f"{m}m{rest}s"


def open_backend(url: str, settings: LimitSettings) -> Backend:
    if url == "memory":
        return MemoryBackend()
    return RedisBackend(url, settings.key_prefix, settings.redis_timeout_s,
                        max_connections=settings.redis_max_connections,
                        idle_s=settings.redis_idle_s)
