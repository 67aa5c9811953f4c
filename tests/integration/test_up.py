"""`casperd up`: the one-command local mesh, through the real binary."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import free_port_base, server_dir, wait_for


@pytest.fixture
def state_dir() -> Iterator[Path]:
    path = server_dir("casper-test-up-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def ctl(state: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASPER_")}
    return subprocess.run(
        [sys.executable, "-m", "casperd.ctl.main", "--state-dir", str(state), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def start_up(state: Path, port: int, *extra: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASPER_") and k != "PGPASSFILE"}
    return subprocess.Popen(
        [sys.executable, "-m", "casperd", "up", "--state-dir", str(state), "--port-base", str(port), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )


def stop(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
    return out


def test_up_demo_then_restart_keeps_the_data(state_dir: Path) -> None:
    port = free_port_base()
    proc = start_up(state_dir, port, "--demo", "--demo-tasks", "60", "--duration", "1")
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out
    assert "demo finished: {'complete': 60}" in out
    for word in ("policeman", "developer-1", "developer-2", "tester", "caspectl status"):
        assert word in out
    assert "Traceback" not in out
    assert not (state_dir / "mesh.json").exists(), "a stopped mesh leaves no mesh.json behind"

    # second start: the same state dir, the data is still there, caspectl finds the mesh by itself
    proc = start_up(state_dir, port)
    try:
        wait_for(lambda: (state_dir / "mesh.json").exists(), 120, "mesh.json")
        res = wait_for(
            lambda: (r := ctl(state_dir, "tasks", "--limit", "5", "-o", "json")).returncode == 0 and r,
            60,
            "caspectl tasks",
        )
        counts = json.loads(res.stdout)["counts"]
        assert counts.get("complete") == 60, counts
        peers = json.loads(ctl(state_dir, "peers", "-o", "json").stdout)["peers"]
        assert sorted(p["node_id"] for p in peers) == ["developer-1", "developer-2", "tester"]
        assert all(p["liveness"] == "alive" for p in peers)
        res = ctl(state_dir, "submit", "echo", "--input", '{"again": true}', "--wait", "-o", "json")
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["output"] == {"again": True}
        # a second `up` on the same state dir refuses to start
        dup = start_up(state_dir, port + 50)
        dup_out, _ = dup.communicate(timeout=60)
        assert dup.returncode == 2 and "already running" in dup_out
    finally:
        out = stop(proc)
    assert proc.returncode == 0, out
    assert "mesh stopped" in out


def test_up_reports_a_bad_argument_without_a_traceback(state_dir: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "casperd", "up", "--developers", "0", "--testers", "0", "--state-dir", str(state_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2
    assert "Traceback" not in res.stdout + res.stderr
