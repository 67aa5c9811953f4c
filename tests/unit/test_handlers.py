"""Task types: the shell handler for real (asyncio subprocesses), its validator, basic types, registry."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from casperd import handlers
from casperd.errors import ShellExitError, TaskError, TaskTimeoutError, UnknownTaskTypeError
from casperd.handlers import RunContext, TaskType
from casperd.handlers.shell import clean_env, run_shell, validate_shell


@pytest.fixture
def ctx(tmp_path: Path) -> RunContext:
    return RunContext(node_id="dev-1", workspace=tmp_path / "ws", shell_timeout_s=20.0, output_cap=256)


def _dead(pid: int) -> bool:
    """Gone, or a zombie nobody reaped yet (PID 1 in a container may not reap)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


async def _wait_dead(pid: int, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if _dead(pid):
            return True
        await asyncio.sleep(0.02)
    return _dead(pid)


# --- shell: results -----------------------------------------------------------------------------
async def test_exit_code_and_output(ctx: RunContext) -> None:
    out = await run_shell(ctx, {"cmd": "echo hello; echo oops >&2; exit 3", "expect_exit": 3})
    assert out["exit_code"] == 3
    assert out["stdout"] == "hello\n"
    assert out["stderr"] == "oops\n"
    assert out["stdout_truncated"] is False and out["stderr_truncated"] is False
    assert isinstance(out["duration_s"], float) and 0 <= out["duration_s"] < 10


async def test_non_zero_exit_fails_without_expect_exit(ctx: RunContext) -> None:
    with pytest.raises(ShellExitError) as info:
        await run_shell(ctx, {"cmd": "echo oops >&2; exit 2"})
    assert "code 2" in info.value.message and "oops" in info.value.message
    assert "expect_exit" in (info.value.hint or "")


async def test_success_exit_code(ctx: RunContext) -> None:
    out = await run_shell(ctx, {"cmd": "true"})
    assert out["exit_code"] == 0 and out["stdout"] == "" and out["stderr"] == ""


async def test_output_is_tailed_and_truncated_at_the_cap(ctx: RunContext) -> None:
    cmd = "i=0; while [ $i -lt 100 ]; do printf 0123456789; i=$((i+1)); done; printf END"
    out = await run_shell(ctx, {"cmd": f"{cmd}; {{ {cmd}; }} >&2"})
    for stream in ("stdout", "stderr"):
        text = out[stream]
        assert len(text) == ctx.output_cap == 256
        assert text.endswith("END")  # the tail is kept, not the head
        assert out[f"{stream}_truncated"] is True
        assert text == ("0123456789" * 100 + "END")[-256:]


async def test_output_exactly_at_the_cap_is_not_truncated(ctx: RunContext) -> None:
    out = await run_shell(ctx, {"cmd": "head -c 256 /dev/zero | tr '\\0' x"})
    assert out["stdout"] == "x" * 256 and out["stdout_truncated"] is False
    out = await run_shell(ctx, {"cmd": "head -c 257 /dev/zero | tr '\\0' x"})
    assert out["stdout"] == "x" * 256 and out["stdout_truncated"] is True


async def test_argv_list_is_not_run_through_a_shell(ctx: RunContext) -> None:
    out = await run_shell(ctx, {"cmd": ["printf", "%s|", "a b", "$HOME", "; rm -rf /"]})
    assert out["exit_code"] == 0
    assert out["stdout"] == "a b|$HOME|; rm -rf /|"


async def test_argv_list_with_a_missing_program(ctx: RunContext) -> None:
    with pytest.raises(TaskError, match="cannot start"):
        await run_shell(ctx, {"cmd": ["definitely-not-a-program-casper"]})


async def test_stdin_is_fed(ctx: RunContext) -> None:
    out = await run_shell(ctx, {"cmd": "tr a-z A-Z", "stdin": "hello mesh"})
    assert out["stdout"] == "HELLO MESH"


async def test_without_stdin_the_command_reads_nothing(ctx: RunContext) -> None:
    out = await run_shell(ctx, {"cmd": "cat; echo done", "timeout_s": 10})
    assert out["stdout"] == "done\n"


async def test_runs_in_the_workspace_which_is_created(ctx: RunContext) -> None:
    assert not ctx.workspace.exists()
    out = await run_shell(ctx, {"cmd": "pwd -P; touch made-here"})
    assert ctx.workspace.is_dir()
    assert out["stdout"].strip() == str(ctx.workspace.resolve())
    assert (ctx.workspace / "made-here").exists()


@pytest.mark.parametrize("cwd", ["sub", "sub/deeper", "./sub", "sub/../sub", "."])
async def test_cwd_inside_the_workspace(ctx: RunContext, cwd: str) -> None:
    (ctx.workspace / "sub" / "deeper").mkdir(parents=True)
    out = await run_shell(ctx, {"cmd": "pwd -P", "cwd": cwd})
    assert out["stdout"].strip() == str((ctx.workspace / cwd).resolve())


@pytest.mark.parametrize("cwd", ["..", "../", "../other", "sub/../..", "/", "/etc", "/tmp", "sub/../../ws2"])
async def test_cwd_escape_is_refused(ctx: RunContext, cwd: str) -> None:
    (ctx.workspace / "sub").mkdir(parents=True)
    marker = ctx.workspace.parent / "ran-outside"
    with pytest.raises(TaskError, match="leaves the workspace"):
        await run_shell(ctx, {"cmd": f"touch {marker}", "cwd": cwd})
    assert not marker.exists()


async def test_cwd_symlink_out_of_the_workspace_is_refused(ctx: RunContext, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    ctx.workspace.mkdir(parents=True)
    (ctx.workspace / "link").symlink_to(outside)
    with pytest.raises(TaskError, match="leaves the workspace"):
        await run_shell(ctx, {"cmd": "pwd", "cwd": "link"})


async def test_workspace_prefix_sibling_is_not_inside(ctx: RunContext, tmp_path: Path) -> None:
    (tmp_path / "ws-evil").mkdir()  # shares the "ws" prefix, but is not under it
    with pytest.raises(TaskError, match="leaves the workspace"):
        await run_shell(ctx, {"cmd": "pwd", "cwd": "../ws-evil"})


async def test_missing_cwd_error_names_the_directory(ctx: RunContext) -> None:
    with pytest.raises(TaskError) as info:
        await run_shell(ctx, {"cmd": "pwd", "cwd": "no-such-dir"})
    assert "no-such-dir" in str(info.value)


# --- shell: environment -------------------------------------------------------------------------
SECRET_VARS = {
    "FOO_API_KEY": "sk-foo-1234567890",
    "CASPER_X": "casper-internal-value",
    "GITHUB_TOKEN": "ghp_abcdefghijklmnop",
    "DB_PASSWORD": "hunter2hunter2",
    "my_secret": "lowercase-secret-value",
    "AWS_SECRET_ACCESS_KEY": "aws-secret-zzzz",
    "SOME_CREDENTIALS": "cred-value-yyyy",
    "HTTP_AUTH": "basic-auth-xxxx",
    "PGPASSWD": "pg-passwd-wwww",
}


async def test_secrets_are_stripped_from_the_environment(ctx: RunContext, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in SECRET_VARS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("PLAIN_SETTING", "visible-value")
    roomy = RunContext(ctx.node_id, ctx.workspace, ctx.shell_timeout_s, output_cap=1 << 20)
    out = await run_shell(roomy, {"cmd": ["env"]})
    assert out["exit_code"] == 0
    env_names = {line.split("=", 1)[0] for line in out["stdout"].splitlines() if "=" in line}
    for k, v in SECRET_VARS.items():
        assert k not in env_names
        assert v not in out["stdout"]
    assert out["stdout_truncated"] is False
    assert "PLAIN_SETTING=visible-value" in out["stdout"]
    assert "PATH" in env_names


def test_clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in SECRET_VARS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("HOME_DIRECTORY", "/h")
    env = clean_env()
    assert not set(SECRET_VARS) & set(env)
    assert env["HOME_DIRECTORY"] == "/h"
    assert not [k for k in env if k.startswith("CASPER_")]
    assert os.environ["FOO_API_KEY"] == SECRET_VARS["FOO_API_KEY"]  # the node's own env is untouched


# --- shell: timeouts and cancellation -----------------------------------------------------------
async def test_timeout_kills_the_process_group(ctx: RunContext) -> None:
    ctx.workspace.mkdir(parents=True)
    cmd = "echo $$ > sh.pid; sleep 30 & echo $! > bg.pid; wait"
    t0 = time.monotonic()
    with pytest.raises(TaskTimeoutError) as info:
        await run_shell(ctx, {"cmd": cmd, "timeout_s": 0.5})
    assert time.monotonic() - t0 < 5
    assert "timed out" in info.value.message and "0.5" in info.value.message
    assert isinstance(info.value, TaskError) and info.value.code == "timeout"
    for name in ("sh.pid", "bg.pid"):
        pid = int((ctx.workspace / name).read_text())
        assert await _wait_dead(pid), f"{name} process {pid} survived the timeout"


async def test_timeout_from_the_context(ctx: RunContext, tmp_path: Path) -> None:
    short = RunContext("n", tmp_path / "w2", shell_timeout_s=60.0, output_cap=256, timeout_s=0.3)
    with pytest.raises(TaskTimeoutError):
        await run_shell(short, {"cmd": "sleep 10"})
    default = RunContext("n", tmp_path / "w3", shell_timeout_s=0.3, output_cap=256)
    t0 = time.monotonic()
    with pytest.raises(TaskTimeoutError):
        await run_shell(default, {"cmd": "sleep 10"})
    assert time.monotonic() - t0 < 5


async def test_input_timeout_beats_the_context(tmp_path: Path) -> None:
    c = RunContext("n", tmp_path / "w", shell_timeout_s=0.2, output_cap=256, timeout_s=0.2)
    out = await run_shell(c, {"cmd": "sleep 0.5; echo late", "timeout_s": 10})
    assert out["stdout"] == "late\n"


async def test_cancel_kills_the_process_group(ctx: RunContext) -> None:
    ctx.workspace.mkdir(parents=True)
    task = asyncio.create_task(run_shell(ctx, {"cmd": "sleep 30 & echo $! > bg.pid; wait"}))
    pid_file = ctx.workspace / "bg.pid"
    for _ in range(200):
        if pid_file.exists() and pid_file.read_text().strip():
            break
        await asyncio.sleep(0.02)
    pid = int(pid_file.read_text())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await _wait_dead(pid)


# --- shell: bad input ---------------------------------------------------------------------------
@pytest.mark.parametrize("cmd", [None, "", "   ", [], [1, 2], ["ls", 3], {"a": 1}, 5, b"ls"])
async def test_bad_cmd_raises_task_error(ctx: RunContext, cmd: object) -> None:
    with pytest.raises(TaskError, match="cmd") as info:
        await run_shell(ctx, {"cmd": cmd} if cmd is not None else {})
    assert info.value.hint


@pytest.mark.parametrize("timeout", ["soon", [1]])
async def test_bad_timeout_raises_task_error(ctx: RunContext, timeout: object) -> None:
    with pytest.raises(TaskError):
        await run_shell(ctx, {"cmd": "true", "timeout_s": timeout})


async def test_non_string_stdin_is_refused_not_hung(ctx: RunContext) -> None:
    with pytest.raises(TaskError, match="stdin"):
        await asyncio.wait_for(run_shell(ctx, {"cmd": "cat", "stdin": 5, "timeout_s": 1.5}), 5)


# --- shell validator ----------------------------------------------------------------------------
def test_validate_shell() -> None:
    assert validate_shell({"cmd": "x"}, {"exit_code": 1}) is None  # nothing expected
    assert validate_shell({"expect_exit": 0}, {"exit_code": 0}) is None
    assert validate_shell({"expect_exit": 2}, {"exit_code": 2}) is None
    reason = validate_shell({"expect_exit": 0}, {"exit_code": 1})
    assert reason is not None and "1" in reason and "0" in reason
    assert validate_shell({"expect_exit": 0}, None) == "exit code None, expected 0"
    assert validate_shell({"expect_exit": 0}, "not a dict") is not None


def test_shell_type_needs_validation_only_with_expect_exit() -> None:
    shell = handlers.get("shell")
    assert shell.requires == ("shell",)
    assert shell.validate is validate_shell
    assert shell.needs_validation({"cmd": "x", "expect_exit": 0})
    assert not shell.needs_validation({"cmd": "x"})
    assert not handlers.get("echo").needs_validation({"expect_exit": 0})


async def test_shell_output_validates_end_to_end(ctx: RunContext) -> None:
    data = {"cmd": "exit 4", "expect_exit": 0}
    out = await run_shell(ctx, data)
    assert validate_shell(data, out) == "exit code 4, expected 0"
    data = {"cmd": "exit 4", "expect_exit": 4}
    assert validate_shell(data, await run_shell(ctx, data)) is None


# --- basic types --------------------------------------------------------------------------------
async def test_echo_returns_its_input(ctx: RunContext) -> None:
    data = {"hello": "mesh", "n": [1, 2, {"x": None}]}
    assert await handlers.get("echo").run(ctx, data) == data


async def test_noop(ctx: RunContext) -> None:
    assert await handlers.get("noop").run(ctx, {"anything": 1}) is None


async def test_sleep(ctx: RunContext) -> None:
    t0 = time.monotonic()
    out = await handlers.get("sleep").run(ctx, {"seconds": 0.05})
    assert time.monotonic() - t0 >= 0.05
    assert 0.05 <= out["slept_s"] < 2
    assert (await handlers.get("sleep").run(ctx, {"seconds": 0}))["slept_s"] >= 0


@pytest.mark.parametrize("seconds", [-1, 86401, "1", None, [1]])
async def test_sleep_bad_seconds(ctx: RunContext, seconds: object) -> None:
    with pytest.raises(TaskError, match="seconds"):
        await handlers.get("sleep").run(ctx, {"seconds": seconds})


async def test_sleep_fail(ctx: RunContext) -> None:
    with pytest.raises(TaskError, match="asked to go wrong") as info:
        await handlers.get("sleep").run(ctx, {"seconds": 0.01, "fail": "asked to go wrong"})
    assert info.value.hint


async def test_sleep_is_cancellable(ctx: RunContext) -> None:
    task = asyncio.create_task(handlers.get("sleep").run(ctx, {"seconds": 30}))
    await asyncio.sleep(0.01)
    t0 = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - t0 < 1


# --- registry -----------------------------------------------------------------------------------
def test_builtin_types_are_registered() -> None:
    assert {"noop", "echo", "sleep", "shell"} <= set(handlers.REGISTRY)
    for name, ttype in handlers.REGISTRY.items():
        assert ttype.name == name
        assert ttype.description


def test_unknown_type_lists_the_known_ones() -> None:
    with pytest.raises(UnknownTaskTypeError) as info:
        handlers.get("no-such-type")
    err = info.value
    assert "no-such-type" in err.message
    assert err.code == "unknown-task-type"
    assert isinstance(err, TaskError)
    for name in handlers.REGISTRY:
        assert name in (err.hint or "")
    assert err.hint == "known types: " + ", ".join(sorted(handlers.REGISTRY))


def test_register_adds_and_replaces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(handlers, "REGISTRY", dict(handlers.REGISTRY))

    async def run(ctx: RunContext, data: dict[str, object]) -> str:
        return "v1"

    t = handlers.register(TaskType("custom-x", run, requires=("gpu",)))
    assert handlers.get("custom-x") is t
    t2 = handlers.register(TaskType("custom-x", run, description="v2"))
    assert handlers.get("custom-x") is t2
