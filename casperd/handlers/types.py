"""The types of the plugin interface: what a task type is, what its handler gets, what a mesh
service is, and the :class:`Catalog` a node keeps them in. Imports nothing of casperd but errors."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

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
InlineRunner = Callable[[RunContext, dict[str, Any]], Any]
"""A synchronous handler that returns at once (no I/O, no waiting): see ``TaskType.run_inline``."""
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
    validate_when: Callable[[dict[str, Any]], bool] | None = None
    """Whether a task's input asks for ``validate`` (None: always, when there is a validator)."""
    input_model: type[BaseModel] | None = None  # the input's schema, checked at SUBMIT
    run_inline: InlineRunner | None = None
    """The same work as ``run``, done synchronously and at once. A worker with a free slot calls it
    in place (no asyncio task: a timeout or a cancellation could not interrupt it at any await
    anyway); it waits for a slot, or consults the result cache, through ``run``."""

    def needs_validation(self, task_input: dict[str, Any]) -> bool:
        if self.validate is None:
            return False
        return self.validate_when is None or self.validate_when(task_input)


MeshOp = Callable[[str, dict[str, Any], tuple[bytes, ...]], Awaitable[tuple[Any, tuple[bytes, ...]]]]
"""A service the policeman offers peers over the mesh (REQUEST op): (node id, args, attachments) →
(data, attachments)."""


@dataclass(frozen=True, slots=True)
class MeshService:
    name: str
    run: MeshOp
    roles: frozenset[str]
    """The roles that may call it (checked before it runs)."""


class Catalog:
    """What one node knows: task types (the built-ins plus those plugins add), the policeman's
    asynchronous validators, and the mesh services it offers."""

    def __init__(self, types: dict[str, TaskType] | None = None) -> None:
        self._types: dict[str, TaskType] = dict(types or {})
        self._validators: dict[str, AsyncValidator] = {}
        self._services: dict[str, MeshService] = {}

    def add_type(self, task_type: TaskType) -> TaskType:
        self._types[task_type.name] = task_type
        return task_type

    def add_validator(self, type_name: str, check: AsyncValidator) -> None:
        """The policeman's check of a result of ``type_name`` in the ``validating`` state."""
        self.get(type_name)
        self._validators[type_name] = check

    def add_service(self, name: str, run: MeshOp, *, roles: frozenset[str]) -> None:
        self._services[name] = MeshService(name, run, roles)

    def find(self, name: str) -> TaskType | None:
        return self._types.get(name)

    def get(self, name: str) -> TaskType:
        try:
            return self._types[name]
        except KeyError:
            known = ", ".join(sorted(self._types))
            raise UnknownTaskTypeError(f"unknown task type {name!r}", hint=f"known types: {known}") from None

    def validator(self, name: str) -> AsyncValidator | None:
        return self._validators.get(name)

    def service(self, name: str) -> MeshService | None:
        return self._services.get(name)

    @property
    def service_names(self) -> list[str]:
        return sorted(self._services)

    @property
    def type_names(self) -> list[str]:
        return sorted(self._types)
