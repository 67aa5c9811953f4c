"""Circuit breaker as a pure state machine driven by an injected clock.

    closed --(failure_threshold consecutive failures)--> open
    open   --(recovery_s elapsed, on the next allow())--> half-open (admits ``probes`` calls)
    half-open --success--> closed        half-open --failure--> open (timer restarts)

The broker keeps one per peer (an open peer gets no tasks); nodes keep one per dependency
(Postgres, Redis) so a failing dependency fails fast instead of piling up calls.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


@dataclass(slots=True)
class CircuitBreaker:
    failure_threshold: int = 5
    recovery_s: float = 60.0
    probes: int = 1
    state: BreakerState = BreakerState.CLOSED
    failures: int = 0
    opened_at: float = 0.0
    in_flight_probes: int = field(default=0)
    trips: int = 0

    def allow(self, now: float) -> bool:
        """May a call (a task, a query) go through now? Half-open admits ``probes`` calls."""
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN:
            if now - self.opened_at < self.recovery_s:
                return False
            self.state = BreakerState.HALF_OPEN
            self.in_flight_probes = 0
        if self.in_flight_probes < self.probes:
            self.in_flight_probes += 1
            return True
        return False

    def would_allow(self, now: float) -> bool:
        """Like allow() but without taking a probe slot."""
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN:
            return now - self.opened_at >= self.recovery_s
        return self.in_flight_probes < self.probes

    def trip(self, now: float) -> None:
        """Open at once (the peer was lost: no need to count failures)."""
        if self.state is not BreakerState.OPEN:
            self.trips += 1
        self.state = BreakerState.OPEN
        self.opened_at = now
        self.in_flight_probes = 0

    def release_probe(self) -> None:
        """A probe ended with no verdict (handed back, cancelled): let another probe through."""
        if self.state is BreakerState.HALF_OPEN and self.in_flight_probes > 0:
            self.in_flight_probes -= 1

    def record_success(self) -> None:
        self.failures = 0
        self.in_flight_probes = 0
        self.state = BreakerState.CLOSED

    def record_failure(self, now: float) -> None:
        self.failures += 1
        if self.state is BreakerState.HALF_OPEN or self.failures >= self.failure_threshold:
            if self.state is not BreakerState.OPEN:
                self.trips += 1
            self.state = BreakerState.OPEN
            self.opened_at = now
            self.in_flight_probes = 0
