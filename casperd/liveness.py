"""Peer liveness as a pure state machine: alive -> suspect -> dead, on an injected clock.

Any traffic from a peer counts as a heartbeat (``seen``). A peer silent for more than one
interval plus half an interval's grace is *suspect*; silent for ``misses`` intervals it is *dead*.
The caller supplies monotonic time, so tests drive it without sleeping.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Liveness(enum.StrEnum):
    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"


@dataclass(slots=True)
class PeerClock:
    interval_s: float = 1.0
    misses: int = 3
    last_seen: float = 0.0
    last_sent: float = 0.0

    def seen(self, now: float) -> None:
        self.last_seen = now

    def sent(self, now: float) -> None:
        self.last_sent = now

    def state(self, now: float) -> Liveness:
        silent = now - self.last_seen
        if silent > self.interval_s * self.misses:
            return Liveness.DEAD
        if silent > self.interval_s * 1.5:
            return Liveness.SUSPECT
        return Liveness.ALIVE

    def heartbeat_due(self, now: float) -> bool:
        """True when nothing was sent to the peer for a whole interval."""
        return now - self.last_sent >= self.interval_s
