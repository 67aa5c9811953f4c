"""The model SDK, imported on a node's first model call (issue #13: idle memory).

``anthropic`` with httpx and anyio adds ~45 MB RSS to a process; a node that never calls the model
never loads it. :mod:`casperd.agents.apicall` is the one module that imports it at the top.
"""

from __future__ import annotations

import asyncio
import importlib
from types import ModuleType

APICALL = "casperd.agents.apicall"
"""The module that imports the SDK."""

_sdk: ModuleType | None = None
_loading: asyncio.Future[ModuleType] | None = None


async def load_sdk() -> ModuleType:
    """:mod:`casperd.agents.apicall` (and with it the ``anthropic`` SDK), imported on first use in a
    thread: the import takes a second or more on a busy machine and the event loop keeps serving
    meanwhile. A node that never calls the model never pays the SDK's memory.

    Concurrent first calls share the one import: a module still being imported is already in
    ``sys.modules``, and touching it from the loop's thread would block the loop on its import
    lock until the thread is done (long enough for the policeman to declare the node dead)."""
    global _sdk, _loading
    if _sdk is not None:
        return _sdk
    if _loading is None:
        _loading = asyncio.ensure_future(asyncio.to_thread(importlib.import_module, APICALL))
    loading = _loading
    try:
        _sdk = await asyncio.shield(loading)
    except BaseException:
        if loading.done() and (loading.cancelled() or loading.exception() is not None) and _loading is loading:
            _loading = None  # a failed import is tried again by the next call
        raise
    return _sdk
