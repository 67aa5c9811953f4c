"""The ``shell`` task type: run a command in the node's workspace.

Input: ``cmd`` (a string run by /bin/sh, or a list of argv), optional ``timeout_s``, ``cwd``
(relative to the workspace, never outside it), ``stdin`` and ``expect_exit``. The input is
checked at SUBMIT against :class:`ShellInput`, so a missing ``cmd`` or a ``cwd`` leaving the
workspace is refused at once. Exit codes: without ``expect_exit`` a non-zero exit fails the task
(``exit-code``, retried like any failure); with it, the policeman validates the exit code (a
different one sends the task to error and retry) and any code may be the expected one. The
command runs confined (:mod:`casperd.subproc`, :mod:`casperd.taskenv`): as the node's task user
when it can switch users, with resource limits, an environment scrubbed of secrets by name and by
value, and every process it started killed when it exits. Output: exit code, the tails of stdout
and stderr (capped) with whether each was cut, and duration; a timeout is an error.
"""

from __future__ import annotations

import asyncio
import posixpath
from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from casperd import subproc
from casperd.errors import ShellExitError, TaskError, TaskTimeoutError
from casperd.handlers.types import RunContext, TaskType
from casperd.taskenv import confinement, grant_tree, task_env


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
    """The environment for commands: the node's, scrubbed of secrets by name and by value."""
    return task_env()


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace")


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
    if confinement().run_as is not None:
        await asyncio.to_thread(grant_tree, ctx.workspace, recursive=False)
    try:
        run = await subproc.run(
            argv,
            cwd=cwd,
            env=clean_env(),
            timeout_s=timeout,
            stdin=stdin.encode() if isinstance(stdin, str) else None,
            output_cap=ctx.output_cap,
            confine=confinement(),
        )
    except OSError as exc:
        raise TaskError(
            f"cannot start {argv[0]!r}: {exc.strerror}", hint="is the program installed on this node?"
        ) from None
    if run.timed_out:
        raise TaskTimeoutError(f"command timed out after {timeout:g}s", hint="raise timeout_s or speed it up")
    if run.returncode == 127 and run.stderr.startswith(b"casper: cannot start"):
        raise TaskError(
            _text(run.stderr).strip().removeprefix("casper: "), hint="is the program installed on this node?"
        )
    stdout, stderr = _text(run.stdout), _text(run.stderr)
    if run.returncode != 0 and data.get("expect_exit") is None:
        last = stderr.strip().splitlines()[-1][:200] if stderr.strip() else "no stderr"
        raise ShellExitError(
            f"command exited with code {run.returncode} ({last})",
            hint="fix the command, or set input.expect_exit to the exit code you expect",
        )
    return {
        "exit_code": run.returncode,
        "stdout": stdout,
        "stderr": stderr,
        "stdout_truncated": run.stdout_truncated,
        "stderr_truncated": run.stderr_truncated,
        "duration_s": round(run.duration_s, 4),
    }


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
