"""Timestamps along one task's path on a worker, for ``bench.swarm_speedup`` (off by default).

With ``CASPERD_CALL_TRACE=FILE`` in a node's environment, every :func:`mark` appends one JSON line
``[wall time, mark, task id, pid]`` to ``FILE`` (a benchmark's scratch file, opened once per
process in append mode); without it :func:`mark` returns at once. The task id is the one the
worker's run of the task set (:func:`running`), so the agents code marks its steps without passing
the id around.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from contextvars import ContextVar
from typing import TextIO

ENV = "CASPERD_CALL_TRACE"
_path = os.environ.get(ENV) or None
_task: ContextVar[str | None] = ContextVar("casper_trace_task", default=None)
_file: TextIO | None = None


def enabled() -> bool:
    return _path is not None


def running(task_id: uuid.UUID) -> None:
    """The current asyncio task runs ``task_id`` (marks without an explicit id name it)."""
    if _path is not None:
        _task.set(str(task_id))


def mark(name: str, task_id: uuid.UUID | str | None = None) -> None:
    if _path is None:
        return
    global _file
    tid = str(task_id) if task_id is not None else _task.get()
    line = json.dumps([time.time(), name, tid, os.getpid()]) + "\n"
    if _file is None:  # opened once: an open and a close per mark cost more than the steps they time
        _file = open(_path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - kept for the process's life
    _file.write(line)  # line-buffered, O_APPEND: one write(2) per line, whole lines from every process
