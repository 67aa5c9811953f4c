"""What held in issue #9 and must keep holding: the control socket, the decoder, parameterised
SQL, private files; plus the config file that used to leak the database password."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from typing import Any

import pytest

from casperd.messages import Error, Heartbeat, TaskSpec
from tests.security.conftest import enroll, policeman_peer
from tests.security.peer import Peer, fresh_epoch
from tests.support.mesh import db_rows


def mode(path: Any) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_private_files_and_the_control_socket(make_mesh: Any) -> None:
    """Config files (they may hold a database URL with its password), secret keys, the allow-list
    and the control socket are this user's only."""
    mesh = make_mesh(developers=1, testers=0)
    configs = list((mesh.state_dir / "config").glob("*.toml"))
    assert configs and all(mode(p) == 0o600 for p in configs)
    assert all(mode(p) == 0o600 for p in (mesh.state_dir / "keys").glob("*.key"))
    assert mode(mesh.state_dir / "authorized_keys") == 0o600
    assert mode(mesh.policeman.control[len("ipc://") :]) == 0o600


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another uid")
def test_another_uid_cannot_use_the_control_socket(make_mesh: Any) -> None:
    mesh = make_mesh(developers=0, testers=0)
    os.chmod(mesh.state_dir, 0o755)  # even with the directory open, the socket file is 0600
    for parent in mesh.state_dir.parents:
        if parent == parent.parent:
            break
        os.chmod(parent, os.stat(parent).st_mode | 0o005)
    ctl = [sys.executable, "-m", "casperd.ctl.main", "--control", mesh.policeman.control, "--timeout", "3", "status"]

    def run(*prefix: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "HOME": "/tmp"}
        return subprocess.run([*prefix, *ctl], capture_output=True, text=True, timeout=60, env=env, cwd="/")

    assert run().returncode == 0  # the same command as the daemon's user works
    proc = run("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")
    # refused: no daemon reachable / no answer (3, 6), or the socket file itself denied (1)
    denied = "Permission denied" in proc.stderr and "policeman.ctl" in proc.stderr
    assert proc.returncode in (3, 6) or (proc.returncode == 1 and denied), proc
    assert "open_tasks" not in proc.stdout


def test_malformed_frames_are_answered_and_the_policeman_stays_up(make_mesh: Any, peers: list[Peer]) -> None:
    mesh = make_mesh(developers=0, testers=0)
    keys = enroll(mesh, "fuzzer", "developer")
    epoch = fresh_epoch()
    p = policeman_peer(mesh, f"fuzzer/{epoch}".encode(), keys)
    peers.append(p)
    assert isinstance(p.ready("fuzzer", epoch=epoch), Heartbeat)
    for frames in ([b"CASP\x01", b"\x02", b"\xc1"], [b"junk"], [b"CASP\x01", b"\xff", b"\x80"]):
        p.send_raw(frames)
        msg, _ = p.recv_until(Error)
        assert msg.code in ("decode", "unknown-command"), frames
    with mesh.client() as c:
        assert c.request("health")["healthy"]


def test_sql_stays_parameterised(make_mesh: Any, database_url: str) -> None:
    mesh = make_mesh(developers=0, testers=0)
    hostile = "k'); DROP TABLE tasks; --"
    spec = TaskSpec(type="echo", input={"q": "'; DELETE FROM tasks; --"}, idempotency_key=hostile, affinity="x' OR '1")
    with mesh.client() as c:
        tid = c.submit_until_accepted([spec]).task_ids[0]
    rows = db_rows(database_url, "SELECT idempotency_key, affinity FROM tasks WHERE id = %s", (tid,))
    assert rows == [(hostile, "x' OR '1")]
