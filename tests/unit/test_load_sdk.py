"""The model SDK's lazy import (casperd.agents.lazysdk.load_sdk): concurrent first calls share one
import in a worker thread, and a failed import is tried again."""

from __future__ import annotations

import asyncio
import threading
import types
from typing import Any

import pytest

from casperd.agents import lazysdk as claude


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(claude, "_sdk", None)
    monkeypatch.setattr(claude, "_loading", None)


async def test_concurrent_first_calls_share_one_import_made_off_the_loop_thread(
    fresh: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = types.ModuleType("fake_apicall")
    calls: list[str] = []
    release = threading.Event()
    loop_thread = threading.get_ident()

    def slow_import(name: str) -> Any:
        calls.append(name)
        assert threading.get_ident() != loop_thread  # never on the event loop's thread
        release.wait(10)
        return fake

    monkeypatch.setattr(claude.importlib, "import_module", slow_import)
    waiters = [asyncio.ensure_future(claude.load_sdk()) for _ in range(8)]
    await asyncio.sleep(0.05)
    assert not any(w.done() for w in waiters)  # all wait for the one import
    release.set()
    assert await asyncio.gather(*waiters) == [fake] * 8
    assert calls == [claude.APICALL]
    assert await claude.load_sdk() is fake and calls == [claude.APICALL]


async def test_a_failed_import_is_tried_again(fresh: None, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("fake_apicall")
    outcomes: list[Any] = [ImportError("no SDK"), fake]

    def flaky(name: str) -> Any:
        out = outcomes.pop(0)
        if isinstance(out, BaseException):
            raise out
        return out

    monkeypatch.setattr(claude.importlib, "import_module", flaky)
    with pytest.raises(ImportError):
        await claude.load_sdk()
    assert await claude.load_sdk() is fake
