"""The tester runs its command through the one subprocess module: a suite that starts a server in
the background gets its result (not a timeout), a failing suite is a result (not a tester error),
and the server does not outlive the run."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from pathlib import Path

from casperd.agents.tester import run_test
from casperd.handlers import RunContext


def _repo(path: Path) -> Path:
    path.mkdir()
    env = {"PATH": os.environ["PATH"], "HOME": str(path), "GIT_CONFIG_NOSYSTEM": "1"}
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "base"]):
        if args[0] == "add":
            (path / "README").write_text("x\n")
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=path, env=env, check=True)
    return path


def _gone(pid: int) -> bool:
    for _ in range(200):
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X"):
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.01)
    return False


async def test_a_suite_with_a_background_server_and_failures_is_a_result(tmp_path: Path) -> None:
    repo = _repo(tmp_path / "repo")
    ctx = RunContext("tester-1", tmp_path / "ws", 60.0, 65536, task_id=uuid.uuid4())
    cmd = "sleep 60 & echo SERVER=$!; echo '1 failed, 2 passed in 0.10s'; exit 1"
    # With the old rule the run would wait for the server until its 20 s timeout.
    out = await run_test(ctx, {"repo": str(repo), "base": "HEAD", "test_cmd": cmd, "timeout_s": 20})
    assert (out["exit_code"], out["ok"], out["failed"], out["passed"]) == (1, False, 1, 2), out
    assert all("timed out" not in str(f.get("message")) for f in out.get("failures", []))
    server = int(out["output_tail"].split("SERVER=")[1].split()[0])
    assert _gone(server)
