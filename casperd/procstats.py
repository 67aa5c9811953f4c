"""This process's CPU and memory (psutil), for heartbeats, ``caspectl health`` and /metrics."""

from __future__ import annotations

import psutil

STATS_EVERY_S = 5.0
"""A busy worker (whose other traffic makes heartbeats unnecessary) still reports this often."""


class ProcStats:
    """CPU use since the previous sample (percent of one core) and resident memory."""

    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.proc.cpu_percent(None)  # the first call only starts the interval
        self.cpu_pct = 0.0
        self.rss_bytes = self.proc.memory_info().rss
        self.sampled_at = 0.0

    def sample(self, now: float = 0.0) -> tuple[float, int]:
        self.sampled_at = now
        self.cpu_pct = round(self.proc.cpu_percent(None), 1)
        self.rss_bytes = int(self.proc.memory_info().rss)
        return self.cpu_pct, self.rss_bytes


_SHARED: ProcStats | None = None


def shared() -> ProcStats:
    """One sampler per process (psutil's CPU interval is per Process object)."""
    global _SHARED
    if _SHARED is None:
        _SHARED = ProcStats()
    return _SHARED
