"""Giving memory back to the OS once a burst of work has drained (issue #13: idle RSS).

A burst leaves the policeman holding its peak: tens of thousands of open task records, their
rows and messages were freed by Python, but the C allocator keeps the pages (glibc returns the top
of its heap only, and freed blocks in the middle stay in its free lists). ``gc.collect()`` frees
what reference cycles still hold, then glibc's ``malloc_trim(0)`` hands every free page back.

:class:`DrainWatch` decides when: once the open-task count has been at least ``high`` and has
fallen to ``low`` or below (the queue drained). It is a pure state machine; :func:`trim` does the
work off the hot path — called from the node's timer only when a burst has just drained, the trim
itself in a worker thread (ctypes releases the GIL), the collection on the loop (tens of ms after
a burst, once).

On a libc without ``malloc_trim`` (musl, macOS) only the collection runs.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
import sys
from collections.abc import Callable

from casperd import procstats

log = logging.getLogger("casperd.memtrim")


def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    fn = getattr(libc, "malloc_trim", None)
    if fn is None:  # musl
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


_TRIM = _malloc_trim()


class DrainWatch:
    """True from :meth:`drained` once per burst: the open count reached ``high``, then fell to ``low``.
    Start-up counts as a burst (its imports, migrations and recovery leave garbage too): the first
    time the count is ``low`` or below is a drain."""

    def __init__(self, high: int = 1000, low: int = 0) -> None:
        self.high = high
        self.low = low
        self.peak = high
        self.trims = 0

    def drained(self, open_tasks: int) -> bool:
        self.peak = max(self.peak, open_tasks)
        if self.peak >= self.high and open_tasks <= self.low:
            self.peak = open_tasks
            self.trims += 1
            return True
        return False


async def trim() -> bool:
    """Collect garbage, then return free heap pages to the OS (True if ``malloc_trim`` ran)."""
    proc = procstats.shared().proc
    before = proc.memory_info().rss
    found = gc.collect()
    if _TRIM is not None:
        await asyncio.to_thread(_TRIM, 0)
    after = proc.memory_info().rss
    log.info(
        "a burst drained: %d unreachable objects collected, RSS %.0f -> %.0f MB%s",
        found,
        before / 2**20,
        after / 2**20,
        "" if _TRIM is not None else " (no malloc_trim on this libc)",
    )
    return _TRIM is not None
