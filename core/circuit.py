"""Per-channel circuit breaker: a channel that fails `threshold` times within `window_s`
opens for `cooldown_s`; then one trial request is let through (half-open), and its
success closes the circuit again, its failure re-opens it. Channels always come back
by themselves. The clock is injectable so tests drive it without sleeping.

State is per process here; a shared (Redis) backend implements the same methods.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


@dataclass
class _State:
    failures: deque[float] = field(default_factory=deque)
    opened_at: float | None = None
    trial_in_flight: bool = False


class CircuitBreaker:
    def __init__(self, threshold: int = 5, window_s: float = 30.0, cooldown_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = threshold
        self.window_s = window_s
        self.cooldown_s = cooldown_s
        self.clock = clock
        self._states: dict[str, _State] = {}

    def state(self, channel: str) -> str:
        s = self._states.get(channel)
        if s is None or s.opened_at is None:
            return CLOSED
        if self.clock() - s.opened_at < self.cooldown_s:
            return OPEN
        return HALF_OPEN

    def allow(self, channel: str) -> bool:
        """May a request go to this channel now? In half-open, only one trial at a time."""
        st = self.state(channel)
        if st == CLOSED:
            return True
        if st == OPEN:
            return False
        s = self._states[channel]
        if s.trial_in_flight:
            return False
        s.trial_in_flight = True
        return True

    def record_success(self, channel: str) -> None:
        s = self._states.get(channel)
        if s is not None:
            s.failures.clear()
            s.opened_at = None
            s.trial_in_flight = False

    def record_failure(self, channel: str) -> None:
        now = self.clock()
        s = self._states.setdefault(channel, _State())
        if s.opened_at is not None:
            # A failed trial (or a failure while open) starts a new cool-down.
            s.opened_at = now
            s.trial_in_flight = False
            return
        s.failures.append(now)
        while s.failures and now - s.failures[0] > self.window_s:
            s.failures.popleft()
        if len(s.failures) >= self.threshold:
            s.opened_at = now
            s.failures.clear()

    def release_trial(self, channel: str) -> None:
        """A trial that ended without a verdict (e.g. the client cancelled)."""
        s = self._states.get(channel)
        if s is not None:
            s.trial_in_flight = False
