"""The ``api`` health check of a policeman that has run no job: it reports from the settings and
does not build the model client (issue #13: the client and its module load with the first job, and
a health check — LocalMesh and compose poll it at start — must not load them)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from casperd.control import OPS
from casperd.settings import load_settings


class _PoliceWithoutClient:
    built_claude = None

    @property
    def claude(self) -> Any:
        raise AssertionError("the health check built the policeman's model client")


def _health(tmp_path: Path, key: str | None) -> dict[str, Any]:
    key_file = None
    if key is not None:
        key_file = tmp_path / "anthropic_key"
        key_file.write_text(key)
    s = load_settings({"role": "policeman", "state_dir": tmp_path, "anthropic_api_key_file": key_file})
    node = SimpleNamespace(s=s, store=None, cache=None, worker=None, police=_PoliceWithoutClient())
    return dict(asyncio.run(OPS["health"][0](node, {})))  # type: ignore[arg-type]


def test_the_policeman_reports_its_api_check_without_building_its_model_client(tmp_path: Path) -> None:
    api = _health(tmp_path, "sk-test-not-real")["checks"]["api"]
    assert api["ok"] and not api["degraded"] and api["breaker"] == "closed" and api["last_call"] is None
    assert "no call yet" in api["detail"] and "no API key" not in api["detail"]


def test_without_a_key_the_policeman_api_check_is_degraded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    api = _health(tmp_path, None)["checks"]["api"]
    assert api["ok"] and api["degraded"] and "no API key configured" in api["detail"]
