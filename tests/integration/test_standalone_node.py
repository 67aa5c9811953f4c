"""A node started on its own (not by ``casperd up``) removes its control socket file when it stops,
so ``caspectl`` never finds a stale socket of a node that is gone."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from tests.support.mesh import free_port_base, wait_for

CASPERD = str(Path(sys.executable).parent / "casperd")


def test_a_stopped_node_leaves_no_control_socket(tmp_path: Path) -> None:
    base = free_port_base()
    state = tmp_path / "state"
    proc = subprocess.Popen(
        [
            CASPERD,
            "--role",
            "developer",
            "--node-id",
            "solo-1",
            "--state-dir",
            str(state),
            "--no-curve",
            "--broker",
            f"tcp://127.0.0.1:{base}",
            "--bind",
            f"tcp://127.0.0.1:{base + 1}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    sock = state / "solo-1.ctl"
    try:
        wait_for(sock.exists, 60, "the node's control socket")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "stopped cleanly" in err
    assert not sock.exists(), "the control socket file was left behind"
