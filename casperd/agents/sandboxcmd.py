"""The developer's ``run_command`` tool: a shell command in the worktree, confined.

A mixin of :class:`casperd.agents.sandbox.Sandbox`. The command runs through
:mod:`casperd.subproc` as task code (see :mod:`casperd.taskenv`): the node's task user where it
can switch users, resource limits, every process it started killed when it exits or times out, an
environment without secrets, and a private HOME (removed by :meth:`aclose`) whose ``.gitconfig``
lets git in the command use the worktree although its git data belongs to casperd.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

from casperd import subproc
from casperd.errors import TaskError, TaskTimeoutError
from casperd.taskenv import confinement, grant_tree
from casperd.taskenv import task_env as clean_env


class SandboxCommands:
    root: Path
    command_timeout_s: float
    output_cap: int
    _home: str | None
    _home_finalizer: weakref.finalize[Any, Any] | None
    _granted: bool

    async def _grant(self) -> None:
        if not self._granted:
            await asyncio.to_thread(grant_tree, self.root)
            self._granted = True

    async def _home_dir(self) -> str:
        if self._home is None:
            home = await asyncio.to_thread(tempfile.mkdtemp, prefix="casper-home-")
            # git in a command may use this worktree although its git data belongs to casperd
            gitconfig = f"[safe]\n\tdirectory = {self.root}\n"
            await asyncio.to_thread(Path(home, ".gitconfig").write_text, gitconfig)
            await asyncio.to_thread(grant_tree, Path(home))
            self._home = home
            self._home_finalizer = weakref.finalize(self, shutil.rmtree, home, True)
        return self._home

    async def aclose(self) -> None:
        """Remove the private HOME of commands (the worktree itself is left alone)."""
        if self._home is not None:
            home, self._home = self._home, None
            if self._home_finalizer is not None:
                self._home_finalizer.detach()
            await asyncio.to_thread(shutil.rmtree, home, True)

    async def run_command(self, command: str, timeout_s: float | None = None) -> str:
        """Run ``/bin/sh -c command`` in the root. Returns the tail of the combined output and the
        exit code; a timeout kills the whole process group and raises :class:`TaskTimeoutError`.
        Processes the command left running in its group are killed when it exits."""
        if not isinstance(command, str) or not command.strip():
            raise TaskError("command must be a non-empty string", hint="e.g. 'pytest -q tests/'")
        if "\0" in command:
            raise TaskError("command contains a NUL character", hint="remove it")
        timeout = self.command_timeout_s
        if timeout_s is not None:
            if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float) or not timeout_s > 0:
                raise TaskError(
                    "timeout_s must be a positive number of seconds", hint=f"at most {self.command_timeout_s:g}"
                )
            timeout = min(float(timeout_s), self.command_timeout_s)
        env = clean_env()
        env.update(HOME=await self._home_dir(), PYTHONDONTWRITEBYTECODE="1", GIT_TERMINAL_PROMPT="0")
        await self._grant()
        try:
            run = await subproc.run(
                ["/bin/sh", "-c", command],
                cwd=self.root,
                env=env,
                timeout_s=timeout,
                output_cap=self.output_cap,
                merge_stderr=True,
                confine=confinement(),
            )
        except OSError as exc:
            raise TaskError(f"cannot start /bin/sh: {exc.strerror}", hint="the node cannot run commands") from None
        text = run.stdout.decode("utf-8", "replace")
        if run.stdout_truncated:
            text = f"[output truncated: showing the last {len(run.stdout)} of {run.stdout_total} bytes]\n" + text
        if run.timed_out:
            raise TaskTimeoutError(
                f"command timed out after {timeout:g}s and was killed; output so far:\n{text}",
                hint=f"run something shorter, or pass a larger timeout_s (at most {self.command_timeout_s:g})",
            )
        code = run.returncode
        status = f"exit code {code}" if code is not None and code >= 0 else f"killed by signal {-(code or 0)}"
        return f"{text}{'' if not text or text.endswith(chr(10)) else chr(10)}[{status}]"
