"""Quotas and back-pressure (protocol/SPEC.md, "Trust"). Pure: counts in, decisions out.

* open tasks, mesh-wide and per submitter: past either, a submission is refused ``overloaded``;
* tasks created per mesh peer per second (a token bucket per peer): past it, ``overloaded``;
* bytes per saved turn and per attachment: past them, ``overloaded`` is wrong (waiting does not
  help), so they are refused ``invalid-body``.

An ``overloaded`` refusal names the wait in its hint as ``retry after N.Ns`` (:func:`retry_after`
reads it back), so caspectl waits and submits again.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from casperd.errors import InvalidBodyError, OverloadedError

_RETRY = re.compile(r"retry after (\d+(?:\.\d+)?)s")


@dataclass(frozen=True, slots=True)
class Limits:
    open_tasks: int = 1_000_000
    open_per_submitter: int = 250_000
    peer_rate_per_s: float = 50.0
    peer_burst: int = 200
    turn_bytes: int = 8 * 1024 * 1024
    attachment_bytes: int = 4 * 1024 * 1024


def overloaded(message: str, wait_s: float) -> OverloadedError:
    wait_s = max(0.1, round(wait_s, 1))
    return OverloadedError(message, hint=f"retry after {wait_s:.1f}s", retry_after_s=wait_s)


def retry_after(hint: str | None) -> float | None:
    """The wait an ``overloaded`` refusal asks for (None: not said)."""
    m = _RETRY.search(hint or "")
    return float(m.group(1)) if m else None


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


@dataclass
class Quotas:
    limits: Limits = field(default_factory=Limits)
    open_by: Counter[str] = field(default_factory=Counter)
    _buckets: dict[str, _Bucket] = field(default_factory=dict)

    def check_open(self, submitter: str, new: int, open_total: int) -> None:
        """Room for ``new`` more open tasks, mesh-wide and for this submitter?"""
        lim = self.limits
        if open_total + new > lim.open_tasks:
            raise overloaded(f"the mesh holds {open_total} open tasks (limit {lim.open_tasks})", 5.0)
        mine = self.open_by[submitter]
        if mine + new > lim.open_per_submitter:
            raise overloaded(f"{submitter} has {mine} open tasks (limit {lim.open_per_submitter})", 5.0)

    def opened(self, submitter: str) -> None:
        self.open_by[submitter] += 1

    def closed(self, submitter: str) -> None:
        left = self.open_by[submitter] - 1
        if left > 0:
            self.open_by[submitter] = left
        else:
            self.open_by.pop(submitter, None)

    def take(self, peer: str, now: float) -> None:
        """One task created by mesh peer ``peer`` at ``now`` (token bucket)."""
        lim = self.limits
        b = self._buckets.get(peer)
        if b is None:
            if len(self._buckets) > 10_000:
                self._buckets.clear()
            b = self._buckets[peer] = _Bucket(float(lim.peer_burst), now)
        b.tokens = min(float(lim.peer_burst), b.tokens + (now - b.at) * lim.peer_rate_per_s)
        b.at = now
        if b.tokens < 1.0:
            raise overloaded(
                f"{peer} creates tasks faster than {lim.peer_rate_per_s:g} a second",
                (1.0 - b.tokens) / lim.peer_rate_per_s,
            )
        b.tokens -= 1.0

    def check_bytes(self, what: str, size: int, limit: int) -> None:
        if size > limit:
            raise InvalidBodyError(f"{what} of {size} bytes exceeds the limit of {limit} bytes", hint="send less")
