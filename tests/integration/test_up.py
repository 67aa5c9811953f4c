"""`casperd up`: the one-command local mesh, through the real binary."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.mesh import free_port_base, server_dir, wait_for


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


def test_up_demo_runs_to_its_end_then_a_restart_keeps_the_ledger(state_dir: Path) -> None:
    port = free_port_base()
    proc = start_up(state_dir, port, "--demo", "--demo-scale", "0.2", "--demo-exit")
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out
    assert "Traceback" not in out
    # every act was announced and happened; the summary names the failover times and the ledger
    for words in (
        "killing developer-1 on purpose (SIGKILL)",
        "finished elsewhere",
        "developer-1 restarted",
        "killing the policeman (SIGKILL)",
        "policeman back after",
        "answered from the cache",
        "retrying the dead letter",
        "demo summary",
        "ledger:     every task accounted for in Postgres: none lost",
    ):
        assert words in out, f"{words!r} missing from:\n{out}"
    summary = json.loads((state_dir / "demo-summary.json").read_text())
    assert summary["problems"] == [] and summary["lost"] == [] and summary["dead_letter_ok"] is True
    assert summary["killed_holding"] >= 1 and summary["failover_done_s"] is not None
    assert summary["policeman_down_s"] is not None and summary["cache_hits"] >= 1
    assert summary["cache_repeat_s"] < summary["cache_first_s"], "the repeats came from the cache"
    assert len(summary["by_node"]) >= 2, "the work spread over several peers"
    # not the default state dir: the exact caspectl line to reach it is printed
    assert f"caspectl --state-dir {state_dir} status" in out and f"CASPER_STATE_DIR={state_dir}" in out
    # the stop said what it waited for, removed the sockets and the mesh description
    assert "stopping the policeman" in out and "mesh stopped" in out
    assert not (state_dir / "mesh.json").exists(), "a stopped mesh leaves no mesh.json behind"
    assert not list((state_dir / "run").glob("*.ctl")), "a stopped mesh leaves no control sockets behind"

    # second start: the same state dir; the ledger, checked through caspectl, is whole
    proc = start_up(state_dir, port)
    try:
        wait_for(lambda: (state_dir / "mesh.json").exists(), 120, "mesh.json")
        res = wait_for(
            lambda: (r := ctl(state_dir, "tasks", "--limit", "1000", "-o", "json")).returncode == 0 and r,
            60,
            "caspectl tasks",
        )
        status = {t["id"]: t["status"] for t in json.loads(res.stdout)["tasks"]}
        for tid in summary["ids"]:
            want = "dead" if tid == summary["dead_letter"] else "complete"
            assert status.get(tid) == want, (tid, status.get(tid), want)
        peers = json.loads(ctl(state_dir, "peers", "-o", "json").stdout)["peers"]
        assert sorted(p["node_id"] for p in peers) == ["developer-1", "developer-2", "tester"]
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


def test_up_with_a_port_taken_says_which_before_starting_anything(state_dir: Path) -> None:
    port = free_port_base()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port + 100))  # where the embedded Postgres would go
        holder.listen()
        proc = start_up(state_dir, port)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2, out
    assert f"port {port + 100}" in out and "the embedded Postgres" in out and "already in use" in out
    assert f"pid {os.getpid()}" in out, "the holder is named when the system shows it"
    assert "--port-base" in out and "Traceback" not in out
    assert not (state_dir / "postgres").exists() and not (state_dir / "mesh.json").exists(), "nothing started"


def test_up_stop_says_what_it_waits_for_and_a_second_signal_forces(state_dir: Path) -> None:
    proc = start_up(state_dir, free_port_base(), "--no-redis")
    try:
        wait_for(lambda: (state_dir / "mesh.json").exists(), 120, "mesh.json")
        res = ctl(state_dir, "submit", "sleep", "--input", '{"seconds": 60}')
        assert res.returncode == 0, res.stderr
        wait_for(lambda: '"inflight": 1' in ctl(state_dir, "status", "-o", "json").stdout, 30, "the sleep task running")
        os.killpg(proc.pid, 0)
        proc.send_signal(signal.SIGINT)
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:  # read until the stop says it waits for the workers
            lines.append(line)
            if "running tasks finish or are handed back" in line:
                break
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        out = "".join(lines) + out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert "stopping the mesh (Ctrl-C again to kill the nodes at once)" in out
    assert "second signal: killing the nodes now" in out and "mesh stopped" in out
    assert "Traceback" not in out
    assert not list((state_dir / "run").glob("*.ctl"))


def test_up_reports_a_bad_argument_without_a_traceback(state_dir: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "casperd", "up", "--developers", "0", "--testers", "0", "--state-dir", str(state_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2
    assert "Traceback" not in res.stdout + res.stderr
