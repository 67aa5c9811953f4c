"""The event loop a node runs on (``--event-loop``): asyncio's, or uvloop as an optional fast path."""

from __future__ import annotations

import asyncio
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
