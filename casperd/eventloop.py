"""The event loop a node runs on (``--event-loop``): asyncio's, or uvloop as an optional fast path."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable

from casperd.errors import ConfigError


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop a node runs on: uvloop (an optional fast path: less CPU per message in the
    selector and in callbacks) when chosen or, with ``auto``, when installed; else asyncio's."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ConfigError(
                "event_loop is uvloop but uvloop is not installed", hint="pip install 'casper-mesh[fast]'"
            ) from None
        return None
    return uvloop.new_event_loop


GC_YOUNG = 10_000
"""Allocations between two young collections once a node has started (CPython's default: 700)."""


def tune_gc() -> None:
    """Called once a node has started. Everything made so far (modules, classes, settings, the
    bulk of the heap, none of it garbage) is moved out of the cyclic collector's sight
    (``gc.freeze``), and young collections run every ``GC_YOUNG`` allocations. With 20,000 open
    tasks on the policeman the default collector spent a quarter of the core's time in full
    collections of 30-50 ms each, every one a pause of the whole loop (``bench.core_events``)."""
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG, older, oldest)
