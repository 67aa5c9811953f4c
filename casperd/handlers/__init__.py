"""Task types: a registry keyed by type name.

Each :class:`TaskType` says which capabilities a peer needs to run it (the broker adds them to the
task's requirements), how to run it (on a worker), and optionally how to validate its result (on
the policeman, in the ``validating`` state). The Claude-backed types plug in here the same way.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from casperd.errors import UnknownTaskTypeError


@dataclass(frozen=True, slots=True)
class RunContext:
    """What a handler may use: its node's workspace and limits, the task's identity and attachments,
    and (for Claude-backed types) the node's agent services. Never secrets."""

    node_id: str
    workspace: Path
    shell_timeout_s: float
    output_cap: int
    timeout_s: float | None = None
    task_id: uuid.UUID | None = None
    attempt: int = 1
    attachments: tuple[bytes, ...] = ()
    services: Any = None  # casperd.agents.services.WorkerServices on developer/tester nodes


@dataclass(frozen=True, slots=True)
class Attached:
    """A handler's output plus binary attachments (a patch): they travel as frames of the RESULT
    message, never inside the JSON output, which refers to them by index."""

    output: Any
    attachments: tuple[bytes, ...] = ()


Runner = Callable[[RunContext, dict[str, Any]], Awaitable[Any]]
Validator = Callable[[dict[str, Any], Any], str | None]
"""Returns None when the output is acceptable, else the reason it is not."""
AsyncValidator = Callable[[uuid.UUID, dict[str, Any], Any, tuple[bytes, ...]], Awaitable[str | None]]
"""The policeman's check of a result in the ``validating`` state (task id, input, output, attachments)."""


@dataclass(frozen=True, slots=True)
class TaskType:
    name: str
    run: Runner
    requires: tuple[str, ...] = ()
    validate: Validator | None = None
    description: str = ""
    local: bool = False  # run by the policeman itself (a job), never dispatched to a worker
    input_attachments: bool = False  # its TASK messages carry binary attachments (kept in task_attachments)

    def needs_validation(self, task_input: dict[str, Any]) -> bool:
        return self.validate is not None and "expect_exit" in task_input


ASYNC_VALIDATORS: dict[str, AsyncValidator] = {}
"""Validators that need I/O, registered by the policeman's agent service (type name → check)."""


REGISTRY: dict[str, TaskType] = {}


def register(task_type: TaskType) -> TaskType:
    REGISTRY[task_type.name] = task_type
    return task_type


def get(name: str) -> TaskType:
    try:
        return REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(REGISTRY))
        raise UnknownTaskTypeError(f"unknown task type {name!r}", hint=f"known types: {known}") from None


def _load_builtins() -> None:
    from casperd.agents import tasktypes  # noqa: F401  (the Claude-backed types: ask, code, test, job)
    from casperd.handlers import basic, shell  # noqa: F401  (registers on import)


_load_builtins()
