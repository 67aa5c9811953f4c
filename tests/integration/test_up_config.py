"""`casperd up` passes the user's settings (--config FILE, CASPER_* variables) to every node."""

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

from tests.support.mesh import free_port_base, server_dir, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.fixture
def state_dir() -> Iterator[Path]:
    path = server_dir("casper-test-upcfg-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def status(control: str) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASPER_")}
    res = subprocess.run(
        [sys.executable, "-m", "casperd.ctl.main", "--control", control, "status", "-o", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_casper_variables_and_config_file_reach_every_node(state_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "mesh.toml"
    config.write_text(
        'llm_tpm = 12345\njob_rounds = 5\nnode_id = "mine"\n\n[models]\ndeveloper = "claude-test-dev"\n\n'
        "[model_prices.claude-test-dev]\ninput = 2.0\noutput = 8.0\ncache_write = 2.5\ncache_read = 0.2\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASPER_") and k != "PGPASSFILE"}
    env.update(CASPER_LLM_RPM="7", CASPER_JOB_ROUNDS="4")  # a variable beats the file
    cmd = [sys.executable, "-m", "casperd", "up", "--state-dir", str(state_dir), "--port-base", str(free_port_base())]
    proc = subprocess.Popen(
        [*cmd, "--no-redis", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        wait_for(lambda: (state_dir / "mesh.json").exists() or proc.poll() is not None, 180, "mesh.json")
        assert proc.poll() is None, proc.communicate()[0]
        mesh = json.loads((state_dir / "mesh.json").read_text())
        assert len(mesh["nodes"]) == 4
        for node in mesh["nodes"]:
            view = status(node["control"])
            assert view["node_id"] == node["node_id"]  # up decides ids: the file's node_id is not used
            got = view["llm"]["settings"]
            assert got["llm_rpm"] == 7, node["node_id"]
            assert got["llm_tpm"] == 12345 and got["job_rounds"] == 4
            assert got["models"]["developer"] == "claude-test-dev"
            assert got["models"]["tester"] == "claude-haiku-4-5"  # merged over the defaults
            assert got["model_prices"]["claude-test-dev"]["output"] == 8.0
        police = status(mesh["policeman"]["control"])
        assert police["llm"]["rate_limit"]["configured_rpm"] == 7
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
    assert proc.returncode == 0, out
    assert "CASPER_NODE_ID" in out and "not used" in out  # the dropped setting is reported


def test_a_bad_config_file_is_reported_before_anything_starts(state_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("llm_rpm = 0\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASPER_")}
    res = subprocess.run(
        [sys.executable, "-m", "casperd", "up", "--state-dir", str(state_dir), "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert res.returncode == 2, res.stdout + res.stderr
    assert "llm_rpm" in res.stdout + res.stderr and "Traceback" not in res.stdout + res.stderr
