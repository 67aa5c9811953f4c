"""The node's event loop choice: uvloop as an optional fast path, asyncio always available."""

from __future__ import annotations

import asyncio
import sys

import pytest

from casperd.errors import ConfigError
from casperd.eventloop import loop_factory


def test_asyncio_is_chosen_explicitly() -> None:
    assert loop_factory("asyncio") is None


def test_without_uvloop_auto_falls_back_and_uvloop_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop raises ImportError
    assert loop_factory("auto") is None
    with pytest.raises(ConfigError) as err:
        loop_factory("uvloop")
    assert "casper-mesh[fast]" in (err.value.hint or "")


@pytest.mark.parametrize("choice", ["auto", "uvloop"])
def test_with_uvloop_installed_the_node_runs_on_it(choice: str) -> None:
    uvloop = pytest.importorskip("uvloop")
    factory = loop_factory(choice)
    assert factory is not None
    with asyncio.Runner(loop_factory=factory) as runner:
        assert runner.run(_loop_type()) is uvloop.Loop


async def _loop_type() -> type:
    return type(asyncio.get_running_loop())


def test_tune_gc_freezes_the_started_heap_and_spaces_young_collections() -> None:
    import gc

    from casperd.eventloop import GC_YOUNG, tune_gc

    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (GC_YOUNG, before[1], before[2])
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
