"""What the policeman measures for ``caspectl top`` and /metrics beyond the broker's own counters.

* :class:`Telemetry` listens to every task that finishes (the broker's finish listeners) and
  keeps the last minute of completions: tasks/s and p50/p99 of submit-to-finish time, per status,
  and the ``casper_task_completion_seconds`` histogram. The minute is kept as one bucket per
  second (a packed array of durations per status, 8 bytes a task): older buckets are dropped as
  new ones start, so a burst's completions are gone a minute later, whether or not anyone looks.
* :func:`watch_api` hooks a node's model client into ``casper_api_response_seconds`` and the
  ``casper_api_breaker_open`` gauge, and :func:`api_check` is the ``api`` health check: the
  client's breaker state and its last call's outcome, never a call made just to check.
"""

from __future__ import annotations

import math
import time
from array import array
from collections import deque
from typing import TYPE_CHECKING, Any

from casperd.breaker import BreakerState
from casperd.lifecycle import Status

if TYPE_CHECKING:
    from casperd.broker import Broker
    from casperd.metrics import Metrics
    from casperd.taskrecord import TaskRecord

WINDOW_S = 60.0
_VALUE = {s: s.value for s in Status}
"""Each status's text (``Enum.value`` is a Python property)."""


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of unsorted values; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


class Telemetry:
    def __init__(self, broker: Broker, metrics: Metrics, clock: Any = time.monotonic) -> None:
        self.metrics = metrics
        self.clock = clock
        self.buckets: deque[tuple[int, dict[str, array[float]]]] = deque()
        """(whole second of the monotonic clock, final status -> seconds from submit to finish)"""
        broker.finish_listeners.append(self.on_finish)

    def _prune(self, now: float) -> None:
        while self.buckets and now - self.buckets[0][0] > WINDOW_S:
            self.buckets.popleft()

    def on_finish(self, rec: TaskRecord) -> None:
        took = 0.0
        if rec.finished_at is not None and rec.created_at is not None:
            took = max(0.0, (rec.finished_at - rec.created_at).total_seconds())
        status = _VALUE[rec.status]
        self.metrics.task_completion_by(status).observe(took)
        now = self.clock()
        buckets = self.buckets
        if not buckets or buckets[-1][0] != int(now):
            self._prune(now)
            buckets.append((int(now), {}))
        by_status = buckets[-1][1]
        durations = by_status.get(status)
        if durations is None:
            durations = by_status[status] = array("d")
        durations.append(took)

    def window(self, now: float | None = None) -> dict[str, Any]:
        """The last minute: finished tasks per second, p50/p99 seconds, counts per status."""
        now = self.clock() if now is None else now
        self._prune(now)
        times: list[float] = []
        by_status: dict[str, int] = {}
        for _, statuses in self.buckets:
            for status, durations in statuses.items():
                times.extend(durations)
                by_status[status] = by_status.get(status, 0) + len(durations)
        p50, p99 = percentile(times, 50), percentile(times, 99)
        return {
            "window_s": WINDOW_S,
            "finished": len(times),
            "tasks_per_s": round(len(times) / WINDOW_S, 2),
            "p50_s": None if p50 is None else round(p50, 4),
            "p99_s": None if p99 is None else round(p99, 4),
            "by_status": by_status,
        }


def watch_api(client: Any, metrics: Metrics) -> None:
    """Every model API request of ``client`` (a ClaudeClient) goes into the metrics."""
    client.on_call = lambda seconds, outcome: metrics.api_response.labels(outcome).observe(seconds)
    metrics.api_breaker_open.set_function(lambda: 1.0 if client.breaker.state is BreakerState.OPEN else 0.0)


def api_check(client: Any | None, has_key: bool) -> dict[str, Any]:
    """The ``api`` health check from what the client already knows (no paid call). ``None``: the
    client is not built yet (the policeman builds its own on the first job): no call, breaker closed."""
    state = BreakerState.CLOSED if client is None else client.breaker.state
    last = None if client is None else client.last_call
    if last is None:
        detail = "no call yet"
    else:
        ago = time.time() - float(last["at"])
        status = f" HTTP {last['status']}" if last.get("status") else ""
        detail = f"last call {last['outcome']}{status} in {last['ms']:.0f} ms, {ago:.0f}s ago"
    detail = f"breaker {state.value}; {detail}" + ("" if has_key else "; no API key configured")
    return {
        "ok": state is not BreakerState.OPEN,
        "degraded": state is not BreakerState.CLOSED or not has_key or (last is not None and last["outcome"] != "ok"),
        "breaker": state.value,
        "last_call": last,
        "detail": detail,
    }
