"""Task types and the typed plugin interface.

Each :class:`TaskType` says which capabilities a peer needs to run it (the policeman adds them to
the task's requirements), how to run it (on a worker), and optionally how to validate its result
(on the policeman, in the ``validating`` state). The generic types (``noop``, ``echo``, ``sleep``,
``shell``) are the built-ins in ``REGISTRY``. Everything else plugs in through a :class:`Catalog`:
a node builds one and hands it to its core; a plugin package (``casperd.agents``) adds its task
types, its asynchronous validators (run by the policeman) and its mesh services (with the roles
that may call them). This package imports no plugin.

A type may carry an ``input_model`` (a pydantic model of its input): the policeman checks every
submitted input against it (:func:`check_input`) and refuses a bad one at SUBMIT with
``bad-input``, so bad input is never dispatched, run or retried.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from casperd.errors import BadInputError, UnknownTaskTypeError
from casperd.handlers import basic, shell
from casperd.handlers.types import (
    AsyncValidator,
    Attached,
    InlineRunner,
    MeshOp,
    MeshService,
    RunContext,
    Runner,
    TaskType,
    Validator,
)
from casperd.handlers.types import Catalog as _Catalog

__all__ = [
    "REGISTRY",
    "AsyncValidator",
    "Attached",
    "Catalog",
    "InlineRunner",
    "MeshOp",
    "MeshService",
    "RunContext",
    "Runner",
    "TaskType",
    "Validator",
    "check_input",
    "get",
    "register",
]

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


def check_input(ttype: TaskType, data: dict[str, Any], where: str = "") -> None:
    """Check a task's input against its type's ``input_model``.

    Raises:
        BadInputError: the input does not fit the type's schema (field paths and reasons, never values).
    """
    name = ttype.name
    if ttype.input_model is None:
        return
    try:
        ttype.input_model.model_validate(data)
    except ValidationError as exc:
        parts = []
        for err in exc.errors(include_input=False, include_url=False)[:3]:
            loc = ".".join(str(p) for p in err["loc"]) or "(input)"
            parts.append(f"{loc}: {err['msg']}")
        example = getattr(ttype.input_model, "EXAMPLE", "")
        raise BadInputError(
            f"{where}bad input for a {name} task: {'; '.join(parts)}",
            hint=f"fix the input{f', e.g. {example}' if example else ''}; nothing was run",
        ) from None


class Catalog(_Catalog):
    """A node's catalog, starting from the built-in types (``REGISTRY``)."""

    def __init__(self, types: dict[str, TaskType] | None = None) -> None:
        super().__init__(REGISTRY if types is None else types)


for _t in (*basic.TYPES, *shell.TYPES):
    register(_t)
