"""The ``shell`` task type: run a command in the node's workspace.

Input: ``cmd`` (a string run by /bin/sh, or a list of argv), optional ``timeout_s``, ``cwd``
(relative to the workspace, never outside it), ``stdin`` and ``expect_exit``. The input is
checked at SUBMIT against :class:`ShellInput`, so a missing ``cmd`` or a ``cwd`` leaving the
workspace is refused at once. Exit codes: without ``expect_exit`` a non-zero exit fails the task
(``exit-code``, retried like any failure); with it, the policeman validates the exit code (a
different one sends the task to error and retry) and any code may be the expected one. The
command's environment is the node's minus anything that looks like a secret. Output: exit code,
the tails of stdout and stderr (capped), duration, and whether it timed out.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import posixpath
import re
import signal
import time
from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from casperd.errors import ShellExitError, TaskError, TaskTimeoutError
from casperd.handlers.types import RunContext, TaskType

_SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH)", re.I)


class ShellInput(BaseModel):
    """``shell``'s input, checked at SUBMIT (unknown fields too: a typo is refused, not ignored)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    EXAMPLE: ClassVar[str] = '{"cmd": "pytest -q"} or {"cmd": ["ls", "-la"]}'
    cmd: Annotated[str, StringConstraints(pattern=r"\S")] | Annotated[list[str], Field(min_length=1)]
    timeout_s: float | None = Field(default=None, gt=0, le=86400, allow_inf_nan=False)
    cwd: str | None = None
    stdin: str | None = None
    expect_exit: int | None = None

    @field_validator("cwd")
    @classmethod
    def _inside(cls, cwd: str | None) -> str | None:
        if cwd is not None:
            norm = posixpath.normpath(cwd)
            if posixpath.isabs(cwd) or norm == ".." or norm.startswith("../"):
                raise ValueError("must be a path relative to the workspace, not leaving it")
        return cwd


def clean_env() -> dict[str, str]:
    """The environment for commands: everything but variables whose names look secret."""
    return {k: v for k, v in os.environ.items() if not _SECRET_NAME.search(k) and not k.startswith("CASPER_")}


def _tail(data: bytes, cap: int) -> tuple[str, bool]:
    if len(data) <= cap:
        return data.decode("utf-8", "replace"), False
    return data[-cap:].decode("utf-8", "replace"), True


def _resolve_cwd(workspace: Path, cwd: Any) -> Path:
    base = workspace.resolve()
    if cwd is None:
        return base
    target = (base / str(cwd)).resolve()
    if target != base and base not in target.parents:
        raise TaskError(f"cwd {cwd!r} leaves the workspace", hint="use a path relative to the workspace")
    if not target.is_dir():
        raise TaskError(f"cwd {cwd!r} is not a directory in the workspace", hint="create it first, or fix the path")
    return target


async def run_shell(ctx: RunContext, data: dict[str, Any]) -> dict[str, Any]:
    cmd = data.get("cmd")
    if isinstance(cmd, str) and cmd.strip():
        argv = ["/bin/sh", "-c", cmd]
    elif isinstance(cmd, list) and cmd and all(isinstance(a, str) for a in cmd):
        argv = list(cmd)
    else:
        raise TaskError(
            "shell needs 'cmd': a non-empty string or a list of strings",
            hint='e.g. {"cmd": "pytest -q"} or {"cmd": ["ls", "-la"]}',
        )
    timeout = data.get("timeout_s") or ctx.timeout_s or ctx.shell_timeout_s
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= 86400:
        raise TaskError("shell 'timeout_s' must be a number of seconds between 0 and 86400", hint="e.g. 30")
    timeout = float(timeout)
    stdin = data.get("stdin")
    if stdin is not None and not isinstance(stdin, str):
        raise TaskError("shell 'stdin' must be a string", hint="pass the text to feed the command")
    ctx.workspace.mkdir(parents=True, exist_ok=True)
    cwd = _resolve_cwd(ctx.workspace, data.get("cwd"))
    t0 = time.monotonic()
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=cwd,
            env=clean_env(),
            start_new_session=True,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        raise TaskError(
            f"cannot start {argv[0]!r}: {exc.strerror}", hint="is the program installed on this node?"
        ) from None
    timed_out = False
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin.encode() if isinstance(stdin, str) else None), timeout)
    except TimeoutError:
        timed_out = True
        _kill_group(proc)
        out, err = await proc.communicate()
    except asyncio.CancelledError:
        _kill_group(proc)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(proc.wait(), 5)
        raise
    duration = time.monotonic() - t0
    if timed_out:
        raise TaskTimeoutError(f"command timed out after {timeout:g}s", hint="raise timeout_s or speed it up")
    stdout, out_cut = _tail(out, ctx.output_cap)
    stderr, err_cut = _tail(err, ctx.output_cap)
    if proc.returncode != 0 and data.get("expect_exit") is None:
        last = stderr.strip().splitlines()[-1][:200] if stderr.strip() else "no stderr"
        raise ShellExitError(
            f"command exited with code {proc.returncode} ({last})",
            hint="fix the command, or set input.expect_exit to the exit code you expect",
        )
    return {
        "exit_code": proc.returncode,
        "stdout": stdout,
        "stderr": stderr,
        "stdout_truncated": out_cut,
        "stderr_truncated": err_cut,
        "duration_s": round(duration, 4),
    }


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def validate_shell(data: dict[str, Any], output: Any) -> str | None:
    expected = data.get("expect_exit")
    if expected is None:
        return None
    got = output.get("exit_code") if isinstance(output, dict) else None
    return None if got == expected else f"exit code {got}, expected {expected}"


TYPES: tuple[TaskType, ...] = (
    TaskType(
        "shell",
        run_shell,
        requires=("shell",),
        validate=validate_shell,
        validate_when=lambda data: "expect_exit" in data,
        description="runs input.cmd in the workspace; a non-zero exit fails it unless input.expect_exit says so",
        input_model=ShellInput,
    ),
)
