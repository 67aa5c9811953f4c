"""The one subprocess module: timeout, output cap, the background-child rule, the sweep of escaped
descendants, resource limits, the task user, and the task environment."""

from __future__ import annotations

import asyncio
import os
import pwd
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from casperd import subproc, taskenv
from casperd.subproc import Confinement, Limits, RunAs


@pytest.fixture(autouse=True)
def _keep_policy() -> object:
    saved = taskenv._POLICY
    yield
    taskenv._POLICY = saved


ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LC_ALL": "C"}
CONFINED = Confinement(Limits())


def _gone_now(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return True
    return data[data.rindex(b")") + 2 :].split()[0] in (b"Z", b"X")


def gone(pid: int) -> bool:
    """The process no longer runs (it does not exist, or is a zombie nobody reaped yet). A killed
    process closes its files before it turns zombie: allow it a moment to finish dying."""
    for _ in range(200):
        if _gone_now(pid):
            return True
        time.sleep(0.01)
    return False


async def sh(cmd: str, **kw: object) -> subproc.Completed:
    kw.setdefault("timeout_s", 20)
    return await subproc.run(["/bin/sh", "-c", cmd], cwd="/", env=ENV, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("confine", [None, CONFINED])
async def test_output_exit_code_and_stdin(confine: Confinement | None) -> None:
    run = await sh("cat; echo err >&2; exit 3", stdin=b"in\n", confine=confine)
    assert (run.returncode, run.stdout, run.stderr, run.timed_out) == (3, b"in\n", b"err\n", False)


@pytest.mark.parametrize("confine", [None, CONFINED])
async def test_timeout_kills_the_command(confine: Confinement | None) -> None:
    run = await sh("echo started; echo $$; exec sleep 60", timeout_s=0.5, confine=confine)
    assert run.timed_out and run.returncode is None
    lines = run.stdout.split()
    assert lines[0] == b"started"
    assert gone(int(lines[1]))


@pytest.mark.parametrize("confine", [None, CONFINED])
async def test_output_cap_keeps_the_tail_and_counts_the_rest(confine: Confinement | None) -> None:
    run = await sh("head -c 100000 /dev/zero | tr '\\0' a; echo END", output_cap=1000, confine=confine)
    assert run.stdout_total == 100004 and len(run.stdout) == 1000
    assert run.stdout.endswith(b"aEND\n") and run.stdout_truncated and not run.stderr_truncated


@pytest.mark.parametrize("confine", [None, CONFINED])
async def test_background_child_rule_returns_at_once_and_kills_the_child(confine: Confinement | None) -> None:
    # If the call waited for the background sleep it would run into its 20 s deadline: timed_out.
    run = await sh("sleep 60 & echo $!; echo hi", confine=confine)
    assert not run.timed_out and run.returncode == 0
    pid, hi = run.stdout.split()
    assert hi == b"hi"
    assert gone(int(pid))


async def test_setsid_and_double_forked_children_are_swept() -> None:
    cmd = "setsid sleep 60 & echo $!; (setsid sh -c 'sleep 61 & echo $!' &) ; sleep 0.2; echo done"
    run = await sh(cmd, confine=CONFINED)
    assert not run.timed_out and run.returncode == 0
    words = run.stdout.split()
    assert words[-1] == b"done" and len(words) == 3
    for pid in words[:2]:
        assert gone(int(pid)), pid


async def test_timeout_sweeps_setsid_children_too() -> None:
    run = await sh("setsid sleep 60 & echo $!; sleep 60", timeout_s=0.5, confine=CONFINED)
    assert run.timed_out
    assert gone(int(run.stdout.split()[0]))


async def test_cancellation_kills_everything(tmp_path: Path) -> None:
    task = asyncio.ensure_future(
        subproc.run(
            ["/bin/sh", "-c", "setsid sleep 60 & echo $! > pid.tmp; mv pid.tmp pid; sleep 60"],
            cwd=tmp_path,
            env=ENV,
            timeout_s=30,
            confine=CONFINED,
        )
    )
    for _ in range(500):
        if (tmp_path / "pid").exists():
            break
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert gone(int((tmp_path / "pid").read_text()))


async def test_resource_limits_are_set_in_the_child() -> None:
    limits = Limits(cpu_s=7, memory_bytes=512 * 1024 * 1024, processes=64, file_bytes=10 * 1024)
    run = await sh("cat /proc/self/limits", confine=Confinement(limits))
    got = {line[:26].strip(): line[26:].split()[:2] for line in run.stdout.decode().splitlines()[1:]}
    assert got["Max cpu time"] == ["7", "7"]
    assert got["Max address space"] == [str(512 * 1024 * 1024)] * 2
    assert got["Max processes"] == ["64", "64"]
    assert got["Max file size"] == [str(10 * 1024)] * 2


async def test_file_size_limit_stops_a_large_write(tmp_path: Path) -> None:
    run = await subproc.run(
        ["/bin/sh", "-c", "head -c 100000 /dev/zero > big; echo rc=$?"],
        cwd=tmp_path,
        env=ENV,
        timeout_s=20,
        confine=Confinement(Limits(file_bytes=4096)),
    )
    assert (tmp_path / "big").stat().st_size <= 4096
    assert b"rc=0" not in run.stdout


async def test_confined_code_has_no_new_privileges_and_no_capabilities() -> None:
    run = await sh("grep -E '^(NoNewPrivs|CapEff|CapAmb)' /proc/self/status", confine=CONFINED)
    fields = dict(line.split(":\t") for line in run.stdout.decode().splitlines())
    assert fields["NoNewPrivs"].strip() == "1"
    assert int(fields["CapAmb"], 16) == 0
    if os.geteuid() != 0:
        assert int(fields["CapEff"], 16) == 0


async def test_a_missing_program() -> None:
    with pytest.raises(FileNotFoundError):
        await subproc.run(["casper-no-such-program"], cwd="/", env=ENV, timeout_s=5)
    run = await subproc.run(["casper-no-such-program"], cwd="/", env=ENV, timeout_s=5, confine=CONFINED)
    assert run.returncode == 127 and run.stderr.startswith(b"casper: cannot start casper-no-such-program")


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")


@needs_root
async def test_run_as_another_user_cannot_read_the_daemons_files(tmp_path: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    secret = tmp_path / "secret.key"
    secret.write_text("s3cr3t-value")
    secret.chmod(0o600)
    tmp_path.chmod(0o755)  # noqa: ASYNC240
    confine = Confinement(Limits(), RunAs(nobody.pw_uid, nobody.pw_gid, "nobody"))
    run = await sh(f"id -u; cat {secret}; cat /proc/$PPID/environ; cat /proc/1/environ", confine=confine)
    assert run.stdout.split()[0] == str(nobody.pw_uid).encode()
    assert b"s3cr3t" not in run.stdout
    assert run.stderr.count(b"Permission denied") == 3


@needs_root
async def test_run_as_user_processes_are_swept() -> None:
    nobody = pwd.getpwnam("nobody")
    confine = Confinement(Limits(), RunAs(nobody.pw_uid, nobody.pw_gid, "nobody"))
    run = await sh("setsid sleep 60 & echo $!", confine=confine)
    assert gone(int(run.stdout.split()[0]))


# --- the task environment -------------------------------------------------------------------------
def test_task_env_scrubs_by_name_and_by_value(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "secrets").mkdir(parents=True)
    pgpass = state / "secrets" / "pgpass"
    pgpass.write_text("127.0.0.1:5432:*:casper:pg-password-123\n")
    keyfile = tmp_path / "api.key"
    keyfile.write_text("sk-ant-file-secret\n")
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": "/home/x",
        "SSL_CERT_FILE": "/etc/ssl/certs/ca-certificates.crt",
        "PGPASSFILE": str(pgpass),
        "ANTHROPIC_API_KEY": "sk-ant-env-secret",
        "CASPER_DATABASE_URL": "postgresql://casper@db/casper",
        "DATABASE_URL": "postgresql://casper:hunter22@db/casper",
        "REDIS_DSN": "redis://db:6379/0?password=hunter22",
        "COPY_OF_KEY": "sk-ant-env-secret",
        "INNOCENT": "pg-password-123",
        "ALSO_INNOCENT": "prefix sk-ant-file-secret suffix",
        "STATE_HINT_FILE": str(state / "secrets" / "pgpass"),
        "WHERE": str(state),
    }
    taskenv.configure(SimpleNamespace(task_user="none", state_dir=state, anthropic_api_key_file=keyfile), env)
    out = taskenv.task_env({"HOME": "/tmp/h"}, environ=env)
    assert out == {"PATH": "/usr/bin:/bin", "HOME": "/tmp/h", "SSL_CERT_FILE": "/etc/ssl/certs/ca-certificates.crt"}


def test_resolve_user() -> None:
    assert taskenv.resolve_user("none") is None
    with pytest.raises(taskenv.ConfigError, match="does not exist"):
        taskenv.resolve_user("casper-no-such-user")
    with pytest.raises(taskenv.ConfigError, match="must not be root"):
        taskenv.resolve_user("root")
    auto = taskenv.resolve_user("auto")
    if os.geteuid() == 0:
        assert auto is not None and auto.uid != 0
    elif not taskenv.can_switch_user():
        assert auto is None


def test_supervisor_starts_with_this_interpreter() -> None:
    assert subproc._supervisor_argv(["true"], CONFINED, 3, 4)[:4] == [sys.executable, "-I", "-S", "-c"]
