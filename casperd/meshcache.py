"""The result cache's counters over the whole mesh (pure).

Every worker counts its own cache traffic (hits, misses, bypassed, computed); it sends the counters
in its HEARTBEATs and the policeman sums the last ones of its registered peers for
``caspectl status`` (``mesh_cache``). The policeman's own counters only count its own calls.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

COUNTERS = ("hits", "misses", "bypassed", "computed")


def cache_counters(stats: Mapping[str, Any]) -> dict[str, int]:
    """The integer counters of a ResultCache.stats() (what a HEARTBEAT carries)."""
    return {k: int(stats.get(k) or 0) for k in COUNTERS}


def sum_counters(reports: Iterable[Mapping[str, int] | None]) -> dict[str, int]:
    """The counters summed over the peers that reported any, plus ``nodes``: how many did."""
    total = dict.fromkeys(COUNTERS, 0)
    nodes = 0
    for r in reports:
        if r is None:
            continue
        nodes += 1
        for k in COUNTERS:
            v = r.get(k, 0)
            total[k] += v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0
    return {**total, "nodes": nodes}
