"""Secrets out of a task's reach (issue #9 item 5), replayed as the attacks were made.

A shell task and the developer's run_command tried to read the Postgres passfile, the Curve secret
keys, secret files and ``/proc/$PPID/environ``; run_command children escaped with ``setsid``;
write_file wrote through a hard link run_command had made; git ran a hook of the push target and
a smudge filter run_command planted in the node's shared mirror. Each must now fail, on a local
mesh started by root (task code as its own user) and in the container's configuration (casperd as
an unprivileged user holding only SETUID, SETGID, CHOWN and KILL).
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from casperd import taskenv
from casperd.agents import gitwork
from casperd.agents.sandbox import Sandbox
from casperd.errors import SandboxError
from casperd.messages import TaskSpec
from tests.integration.test_mesh import submit_and_wait

ROOT = Path(__file__).resolve().parents[2]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="a separate task user needs a root daemon")
API_KEY = "sk-ant-isolation-test-0123456789"
DB_PASSWORD = "pg-isolation-password-42"


def alive(pid: int) -> bool:
    for _ in range(200):
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except FileNotFoundError:
            return False
        if state in (b"Z", b"X"):
            return False
        time.sleep(0.01)
    return True


@pytest.fixture
def isolated(tmp_path: Path) -> Any:
    """This process's task policy: task code as a separate user (restored afterwards)."""
    saved = taskenv._POLICY
    state = tmp_path / "state"
    (state / "keys").mkdir(parents=True)
    taskenv.configure(SimpleNamespace(task_user="auto", state_dir=state))
    yield state
    taskenv._POLICY = saved


def _secret(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o600)
    return path


# --- shell tasks on a root local mesh ------------------------------------------------------------
@needs_root
def test_shell_task_cannot_read_secrets_or_the_daemons_environment(
    make_mesh: Any, postgres: Any, tmp_path: Path
) -> None:
    passfile = Path(postgres.passfile)  # the real one: every node of the mesh gets PGPASSFILE
    db_password = passfile.read_text().strip().rsplit(":", 1)[1]
    mesh = make_mesh(
        developers=1,
        testers=0,
        extra_env={
            "CASPER_TASK_USER": "auto",
            "PGPASSFILE": str(passfile),
            "ANTHROPIC_API_KEY": API_KEY,
            "ORDINARY_LOOKING": API_KEY,
            "STATS_URL": f"postgresql://casper:{DB_PASSWORD}@127.0.0.1/stats",
        },
    )
    keys = sorted(str(p) for p in (mesh.state_dir / "keys").glob("*.key"))
    assert keys, "the mesh has Curve secret keys"
    key_text = "".join(Path(k).read_text() for k in keys)
    daemon = next(n for n in mesh.nodes.values() if n.role == "developer")
    assert daemon.proc is not None
    reads = [str(passfile), *keys, "/proc/$PPID/environ", f"/proc/{daemon.proc.pid}/environ"]
    cmd = "id -u; env; " + "; ".join(f"cat {p}" for p in reads) + "; echo END"
    done = submit_and_wait(mesh, [TaskSpec(type="shell", input={"cmd": cmd})], timeout=120)
    out = next(iter(done.values())).output
    assert out is not None and out["stdout"].endswith("END\n"), out
    assert out["stdout"].split()[0] != "0", "task code ran as root"
    everything = out["stdout"] + out["stderr"]
    for secret in (db_password, DB_PASSWORD, API_KEY, *key_text.split()):
        assert secret not in everything
    assert "PGPASSFILE" not in out["stdout"] and "STATS_URL" not in out["stdout"]
    assert out["stderr"].count("Permission denied") == len(reads), out["stderr"]


# --- the developer's run_command ----------------------------------------------------------------
@needs_root
async def test_run_command_cannot_read_secrets(isolated: Path, tmp_path: Path) -> None:
    key = _secret(isolated / "keys" / "developer-1.key", "curve-secret-key-text\n")
    pgpass = _secret(isolated / "secrets" / "pgpass", f"*:*:*:casper:{DB_PASSWORD}\n")
    wt = tmp_path / "wt"
    wt.mkdir()
    sandbox = Sandbox(wt, command_timeout_s=30)
    try:
        out = await sandbox.run_command(f"id -u; cat {key}; cat {pgpass}; cat /proc/$PPID/environ; echo END")
    finally:
        await sandbox.aclose()
    assert out.splitlines()[0] != "0"
    assert "curve-secret-key-text" not in out and DB_PASSWORD not in out
    assert out.count("Permission denied") == 3, out


async def test_run_command_setsid_children_do_not_outlive_the_call(tmp_path: Path) -> None:
    sandbox = Sandbox(tmp_path, command_timeout_s=30)
    try:
        out = await sandbox.run_command("setsid sleep 60 & echo $!; (setsid sh -c 'sleep 61 & echo $!' &); sleep 0.2")
    finally:
        await sandbox.aclose()
    pids = [int(w) for w in out.split() if w.isdigit()]
    assert len(pids) == 2, out
    assert not any(alive(p) for p in pids)


@needs_root
async def test_write_file_refuses_a_hard_link_made_by_a_command(isolated: Path, tmp_path: Path) -> None:
    wt = tmp_path / "wt"
    wt.mkdir()
    sandbox = Sandbox(wt, command_timeout_s=30)
    try:
        # The command's own file outside the worktree (its HOME), linked into the worktree.
        await sandbox.run_command('echo original > "$HOME/outside"; ln "$HOME/outside" linked; echo ok')
        outside = Path(sandbox._home or "") / "outside"
        assert (wt / "linked").stat().st_nlink == 2
        with pytest.raises(SandboxError, match="hard links"):
            await sandbox.write_file("linked", "overwritten\n")
        with pytest.raises(SandboxError, match="hard links"):
            await sandbox.replace_in_file("linked", "original", "changed")
        with pytest.raises(SandboxError, match="hard links"):
            await sandbox.read_file("linked")
        assert outside.read_text() == "original\n"
    finally:
        await sandbox.aclose()


# --- git ----------------------------------------------------------------------------------------
def _git(cwd: Path, *args: str) -> str:
    env = {"PATH": os.environ["PATH"], "HOME": str(cwd), "GIT_CONFIG_NOSYSTEM": "1"}
    ident = ["-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
    res = subprocess.run(["git", *ident, *args], cwd=cwd, env=env, capture_output=True, text=True, check=True)
    return res.stdout


def _repo(path: Path) -> Path:
    path.mkdir()
    _git(path, "init", "-q")
    (path / ".gitattributes").write_text("*.txt filter=evil\n")
    (path / "a.txt").write_text("hello\n")
    _git(path, "add", "-A")
    _git(path, "commit", "-qm", "base")
    return path


async def test_push_runs_no_hook_of_the_target_repository(tmp_path: Path) -> None:
    repo = _repo(tmp_path / "repo")
    marker = tmp_path / "HOOK-RAN"
    hooks = tmp_path / "evil-hooks"
    hooks.mkdir()
    for name in ("pre-receive", "update", "post-receive", "post-update", "reference-transaction"):
        (hooks / name).write_text(f"#!/bin/sh\necho {name} >> {marker}\n")
        (hooks / name).chmod(0o755)
        (repo / ".git" / "hooks" / name).write_text(f"#!/bin/sh\necho {name} >> {marker}\n")
        (repo / ".git" / "hooks" / name).chmod(0o755)
    _git(repo, "config", "core.hooksPath", str(hooks))
    wt = await gitwork.make_worktree(repo, "HEAD", tmp_path / "wt", tmp_path / "mirrors")
    (wt / "b.txt").write_text("new\n")
    await gitwork.commit_all(wt, "change")
    await gitwork.push_ref(wt, repo, "casper/test")
    assert _git(repo, "rev-parse", "refs/heads/casper/test").strip()
    assert not marker.exists(), marker.read_text()


async def test_filters_planted_in_the_mirror_or_the_worktree_do_not_run(isolated: Path, tmp_path: Path) -> None:
    repo = _repo(tmp_path / "repo")
    mirrors = tmp_path / "mirrors"
    marker = tmp_path / "FILTER-RAN"
    wt = await gitwork.make_worktree(repo, "HEAD", tmp_path / "wt1", mirrors)
    mirror = next(mirrors.glob("*.git"))
    # The attack: task code plants a filter in the shared mirror (refused for a separate task user)...
    sandbox = Sandbox(wt, command_timeout_s=30)
    try:
        out = await sandbox.run_command(f"git config filter.evil.smudge 'touch {marker}; cat'; echo rc=$?")
    finally:
        await sandbox.aclose()
    if taskenv.confinement().run_as is not None:
        assert "rc=0" not in out, out
        assert "evil" not in (mirror / "config").read_text()
    # ...and whatever is in the config (planted before, or through a .git file task code rewrote),
    # no driver runs during casperd's own git commands.
    for key in ("smudge", "clean", "process"):
        _git(mirror, "config", f"filter.evil.{key}", f"touch {marker}; cat")
    _git(mirror, "config", "merge.evil.driver", f"touch {marker}; false")
    wt2 = await gitwork.make_worktree(repo, "HEAD", tmp_path / "wt2", mirrors)
    (wt2 / "a.txt").write_text("changed\n")
    patch = await gitwork.diff(wt2, "HEAD")
    assert b"+changed" in patch
    await gitwork.commit_all(wt2, "x")
    wt3 = await gitwork.make_worktree(repo, "HEAD", tmp_path / "wt3", mirrors)
    await gitwork.apply(wt3, patch)
    assert not marker.exists()


# --- the container's configuration ------------------------------------------------------------------
def test_dockerfile_has_a_task_user_and_no_global_safe_directory() -> None:
    text = (ROOT / "containers" / "Dockerfile").read_text()
    entry = (ROOT / "containers" / "entrypoint.sh").read_text()
    assert "git config --system" not in text and "safe.directory '*'" not in text
    assert "useradd --uid 10002 --gid 10002" in text and "casper-task" in text
    assert 'ENTRYPOINT ["casper-entrypoint"]' in text
    assert "caps=-all,+setuid,+setgid,+chown,+kill" in entry
    assert '--bounding-set="$caps"' in entry and "--reuid=casper" in entry


_CONTAINER_PROBE = r"""
import asyncio, json, sys
from pathlib import Path
from types import SimpleNamespace
from casperd import taskenv
from casperd.agents.sandbox import Sandbox

state, secret, task_user = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
taskenv.configure(SimpleNamespace(task_user=task_user, state_dir=state))

async def main():
    wt = state / "workspaces" / "developer-1.worktrees" / "t1"
    wt.mkdir(parents=True)
    sb = Sandbox(wt, command_timeout_s=30)
    out = await sb.run_command(
        f"id -u; grep -E '^Cap(Eff|Amb)' /proc/self/status; cat {secret}; cat /proc/$PPID/environ; "
        "echo made > file.txt; setsid sleep 60 & echo SLEEP=$!"
    )
    await sb.write_file("new.txt", "x\n")
    await sb.aclose()
    print(json.dumps({"out": out, "uid": __import__("os").getuid()}))

asyncio.run(main())
"""


@needs_root
def test_container_configuration_unprivileged_daemon_with_four_capabilities(tmp_path: Path) -> None:
    """casperd as an unprivileged user holding only SETUID, SETGID, CHOWN and KILL (what the
    entrypoint gives it) runs task code as another user that cannot read its secrets."""
    daemon_user, task_user = pwd.getpwnam("daemon"), pwd.getpwnam("nobody")
    python = "/usr/bin/python3"
    if not Path(python).exists() or sys.version_info[:2] != (3, 11):
        pytest.skip("needs a system python3.11 that the daemon user can run")
    state = tmp_path / "state"
    state.mkdir()
    tmp_path.chmod(0o755)
    secret = _secret(state / "keys" / "developer-1.key", "container-secret-key\n")
    for p in (state, state / "keys", secret):
        os.chown(p, daemon_user.pw_uid, daemon_user.pw_gid)
    state.chmod(0o711)
    caps = "-all,+setuid,+setgid,+chown,+kill"
    res = subprocess.run(
        [
            "setpriv",
            f"--reuid={daemon_user.pw_uid}",
            f"--regid={daemon_user.pw_gid}",
            "--clear-groups",
            f"--inh-caps={caps}",
            f"--ambient-caps={caps}",
            f"--bounding-set={caps}",
            "--",
            python,
            "-c",
            _CONTAINER_PROBE,
            str(state),
            str(secret),
            task_user.pw_name,
        ],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": str(state)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    probe = json.loads(res.stdout.strip().splitlines()[-1])
    out = probe["out"]
    assert probe["uid"] == daemon_user.pw_uid
    assert out.splitlines()[0] == str(task_user.pw_uid), out
    assert "container-secret-key" not in out and out.count("Permission denied") == 2, out
    caps_lines = {line.split(":")[0]: int(line.split()[1], 16) for line in out.splitlines() if line.startswith("Cap")}
    assert caps_lines == {"CapEff": 0, "CapAmb": 0}
    wt = state / "workspaces" / "developer-1.worktrees" / "t1"
    assert (wt / "file.txt").stat().st_uid == task_user.pw_uid
    assert (wt / "new.txt").stat().st_uid == task_user.pw_uid
    sleeper = int(out.split("SLEEP=")[1].split()[0])
    assert not alive(sleeper)


def test_the_security_tier_is_marked(request: pytest.FixtureRequest) -> None:
    assert request.node.get_closest_marker("security") is not None
    assert asyncio.iscoroutinefunction(test_run_command_cannot_read_secrets)
