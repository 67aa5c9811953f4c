"""Task types: a registry keyed by type name.

Each :class:`TaskType` says which capabilities a peer needs to run it (the broker adds them to the
task's requirements), how to run it (on a worker), and optionally how to validate its result (on
the policeman, in the ``validating`` state). The Claude-backed types plug in here the same way.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from casperd.errors import UnknownTaskTypeError


@dataclass(frozen=True, slots=True)
class RunContext:
    """What a handler may use: its node's workspace and limits. Never secrets."""

    node_id: str
    workspace: Path
    shell_timeout_s: float
    output_cap: int
    timeout_s: float | None = None


Runner = Callable[[RunContext, dict[str, Any]], Awaitable[Any]]
Validator = Callable[[dict[str, Any], Any], str | None]
"""Returns None when the output is acceptable, else the reason it is not."""


@dataclass(frozen=True, slots=True)
class TaskType:
    name: str
    run: Runner
    requires: tuple[str, ...] = ()
    validate: Validator | None = None
    description: str = ""

    def needs_validation(self, task_input: dict[str, Any]) -> bool:
        return self.validate is not None and "expect_exit" in task_input


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
    from casperd.handlers import basic, shell  # noqa: F401  (registers on import)


_load_builtins()
