"""When the policeman gives a burst's memory back (casperd.memtrim, issue #13)."""

from __future__ import annotations

import sys

from casperd import memtrim


def test_start_up_counts_as_a_burst_then_only_a_drained_burst_trims() -> None:
    w = memtrim.DrainWatch(high=100, low=0)
    assert w.drained(0) is True  # start-up's garbage
    assert [w.drained(n) for n in (0, 5, 99, 50, 0)] == [False] * 5  # never reached 100 open
    assert [w.drained(n) for n in (100, 3000, 40, 1)] == [False] * 4  # a burst, not drained yet
    assert w.drained(0) is True
    assert w.drained(0) is False and w.trims == 2


async def test_trim_collects_and_calls_malloc_trim_on_glibc() -> None:
    ran = await memtrim.trim()
    assert ran is (memtrim._TRIM is not None)
    if sys.platform.startswith("linux") and memtrim._TRIM is not None:
        assert memtrim._TRIM(0) in (0, 1)
