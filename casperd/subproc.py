"""The one way casperd runs a child process.

Theory of operation. Every runner (shell tasks, the developer's ``run_command`` and ``search``, git,
validation's syntax compile, the tester's test command) calls :func:`run`, so the rules below hold
for all of them:

* **Timeout.** At the deadline everything the call started is killed and ``timed_out`` is set.
  Cancelling the awaiting task kills it the same way before the cancellation propagates.
* **Output cap.** stdout and stderr are drained as they arrive; the last ``output_cap`` bytes of each
  are kept and the totals counted, so a chatty child never grows the daemon.
* **Environment.** Callers pass one; task code gets :func:`casperd.taskenv.task_env` (scrubbed by
  name and by value).
* **The background-child rule.** A call ends when its main process exits (or at its deadline).
  Whatever it left running is killed then, and the output written until then is kept: so
  ``sleep 30 & echo hi`` returns ``hi`` at once, and a test suite that starts a server returns its
  result, not a timeout. Every child gets its own session and process group, which is killed.
* **Confinement** (task code). With a :class:`Confinement` the child runs under a small supervisor
  (``python -I -S``, this module's ``_SUPERVISOR``) that keeps the daemon's identity and is a child
  subreaper (``PR_SET_CHILD_SUBREAPER``): descendants that escape with ``setsid`` or a double fork
  are re-parented to it, and when the main process exits it kills every descendant (by parent and
  by session id) until none is left. The command itself runs in a new session with resource limits
  (``setrlimit``: CPU time, address space, processes, file size), no new privileges, no ambient
  capabilities and, when :class:`RunAs` is given, as that unprivileged user. The supervisor reads a
  *lifeline* pipe: when the daemon closes it (deadline, cancellation) or dies, the supervisor kills
  everything and exits, so nothing outlives the call even when the daemon may not signal the task's
  user.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from casperd.subproc_supervisor import SUPERVISOR_SCRIPT

KILL_GRACE_S = 2.0
"""After the main process exits or is killed, how long the rest of its output may take to arrive."""


@dataclass(frozen=True, slots=True)
class Limits:
    """Resource limits set with ``setrlimit`` in the child (None: inherited)."""

    cpu_s: int | None = None
    memory_bytes: int | None = None
    processes: int | None = None
    file_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class RunAs:
    """The unprivileged user task code runs as."""

    uid: int
    gid: int
    name: str


@dataclass(frozen=True, slots=True)
class Confinement:
    """How task code runs: limits, and the user to switch to (None: the daemon's own)."""

    limits: Limits = field(default_factory=Limits)
    run_as: RunAs | None = None


@dataclass(slots=True)
class Completed:
    """The outcome of :func:`run`. ``returncode`` is negative when a signal killed the process and
    None when it timed out or was never reaped."""

    returncode: int | None
    stdout: bytes
    stderr: bytes
    stdout_total: int
    stderr_total: int
    timed_out: bool
    duration_s: float

    @property
    def stdout_truncated(self) -> bool:
        return self.stdout_total > len(self.stdout)

    @property
    def stderr_truncated(self) -> bool:
        return self.stderr_total > len(self.stderr)


class _Tail:
    """The last ``cap`` bytes of a stream, and how many bytes it carried."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.buf = bytearray()
        self.total = 0

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        self.buf.extend(chunk)
        if len(self.buf) > 2 * self.cap:
            del self.buf[: len(self.buf) - self.cap]

    def value(self) -> bytes:
        return bytes(self.buf[-self.cap :]) if len(self.buf) > self.cap else bytes(self.buf)


async def _drain(stream: asyncio.StreamReader | None, tail: _Tail) -> None:
    if stream is None:
        return
    while chunk := await stream.read(65536):
        tail.add(chunk)


def kill_group(pid: int) -> None:
    """SIGKILL the process group ``pid`` leads (gone already, or not ours: nothing to do)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _supervisor_argv(argv: Sequence[str], confine: Confinement, lifeline: int, status: int) -> list[str]:
    lim = confine.limits
    config = {
        "argv": list(argv),
        "lifeline": lifeline,
        "status": status,
        "limits": {"cpu": lim.cpu_s, "as": lim.memory_bytes, "nproc": lim.processes, "fsize": lim.file_bytes},
        "uid": confine.run_as.uid if confine.run_as else None,
        "gid": confine.run_as.gid if confine.run_as else None,
    }
    return [sys.executable, "-I", "-S", "-c", SUPERVISOR_SCRIPT, json.dumps(config)]


def _read_status(fd: int) -> int | None:
    """The main process's status as the supervisor reported it ("exit N" / "signal N")."""
    try:
        data = os.read(fd, 256).decode("ascii", "replace").split()
    except (BlockingIOError, OSError):
        return None
    if len(data) >= 2 and data[-2] in ("exit", "signal") and data[-1].lstrip("-").isdigit():
        n = int(data[-1])
        return n if data[-2] == "exit" else -n
    return None


async def run(
    argv: Sequence[str],
    *,
    cwd: Path | str,
    env: dict[str, str],
    timeout_s: float,
    stdin: bytes | None = None,
    output_cap: int = 64 * 1024,
    merge_stderr: bool = False,
    confine: Confinement | None = None,
) -> Completed:
    """Run ``argv`` under the rules in the module docstring.

    Raises:
        OSError: the program (or ``cwd``) could not be started; callers turn it into their own
            :class:`~casperd.errors.CasperError` naming what is missing.
    """
    if not argv:
        raise ValueError("argv is empty")
    t0 = time.monotonic()
    fds: list[int] = []
    lifeline_w = status_r = -1
    pass_fds: tuple[int, ...] = ()
    real_argv = list(argv)
    if confine is not None:
        life_r, lifeline_w = os.pipe()
        status_r, status_w = os.pipe()
        os.set_blocking(status_r, False)
        fds = [life_r, lifeline_w, status_r, status_w]
        pass_fds = (life_r, status_w)
        real_argv = _supervisor_argv(argv, confine, life_r, status_w)
    try:
        proc = await asyncio.create_subprocess_exec(
            *real_argv,
            cwd=cwd,
            env=env,
            start_new_session=True,
            pass_fds=pass_fds,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT if merge_stderr else asyncio.subprocess.PIPE,
        )
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    if confine is not None:
        os.close(fds[0])  # the child's ends
        os.close(fds[3])
    out, err = _Tail(output_cap), _Tail(output_cap)
    readers = asyncio.gather(_drain(proc.stdout, out), _drain(proc.stderr, err), return_exceptions=True)
    feeder = asyncio.ensure_future(_feed(proc, stdin))
    timed_out = False
    try:
        timed_out = not await _wait_main(proc, readers, timeout_s)
    except BaseException:
        _abort(proc, lifeline_w)
        lifeline_w = -1
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(_finish(proc, readers, feeder), KILL_GRACE_S + 5)
        if status_r >= 0:
            os.close(status_r)
        raise
    if timed_out:
        _abort(proc, lifeline_w)
        lifeline_w = -1
    elif confine is None:
        kill_group(proc.pid)  # the background-child rule: what the command left behind goes too
    await _finish(proc, readers, feeder)
    code = proc.returncode
    if confine is not None:
        if lifeline_w >= 0:
            os.close(lifeline_w)
        code = _read_status(status_r)
        os.close(status_r)
    return Completed(
        returncode=None if timed_out else code,
        stdout=out.value(),
        stderr=err.value(),
        stdout_total=out.total,
        stderr_total=err.total,
        timed_out=timed_out,
        duration_s=time.monotonic() - t0,
    )


async def _feed(proc: asyncio.subprocess.Process, data: bytes | None) -> None:
    if proc.stdin is None:
        return
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        if data:
            proc.stdin.write(data)
            await proc.stdin.drain()
    with contextlib.suppress(OSError):
        proc.stdin.close()


async def _wait_main(proc: asyncio.subprocess.Process, readers: asyncio.Future[Any], timeout_s: float) -> bool:
    """Wait until the main process exits (True) or the deadline passes (False). The usual case — the
    pipes close as the process exits — costs no polling; a child that holds the pipes open is
    noticed by watching the exit status."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    waiter: asyncio.Future[Any] = asyncio.ensure_future(proc.wait())
    try:
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return proc.returncode is not None
            watched: set[asyncio.Future[Any]] = {readers, waiter}
            done, _ = await asyncio.wait(watched, timeout=min(remaining, 0.05))
            if waiter in done or proc.returncode is not None:
                return True
            if readers in done:
                # Output closed: the exit status follows at once (or the process closed its pipes
                # itself and keeps running; then the deadline applies).
                done, _ = await asyncio.wait({waiter}, timeout=max(0.0, deadline - loop.time()))
                return waiter in done
    finally:
        if not waiter.done():
            waiter.cancel()
            with contextlib.suppress(BaseException):
                await waiter


def _abort(proc: asyncio.subprocess.Process, lifeline_w: int) -> None:
    """Kill everything the call started: close the lifeline (the supervisor sweeps) and kill the
    process group."""
    if lifeline_w >= 0:
        os.close(lifeline_w)
    else:
        kill_group(proc.pid)


async def _finish(proc: asyncio.subprocess.Process, readers: asyncio.Future[Any], feeder: asyncio.Future[None]) -> None:
    """Collect the rest of the output (a grandchild still holding a pipe is cut off after
    KILL_GRACE_S), then the exit status."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(readers), KILL_GRACE_S)
    cut = not readers.done()
    if cut:
        readers.cancel()
    with contextlib.suppress(BaseException):
        await readers
    if not feeder.done():
        feeder.cancel()
    with contextlib.suppress(BaseException):
        await feeder
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    # Not proc.wait(): it may also wait for pipes an escaped grandchild holds.
    while proc.returncode is None and loop.time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    if proc.returncode is None:
        kill_group(proc.pid)  # a supervisor that did not finish its sweep in time
    if cut or proc.returncode is None:
        # Pipes an escaped grandchild still holds would keep wait() from returning.
        transport = getattr(proc, "_transport", None)
        if transport is not None:
            transport.close()
    with contextlib.suppress(BaseException):
        await asyncio.wait_for(proc.wait(), 5)
