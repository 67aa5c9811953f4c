"""What the policeman checks in a SUBMIT before it creates anything (pure: no I/O).

* every task's input fits its type's schema (``handlers.check_input`` with the node's catalog):
  else ``bad-input``, or ``unknown-task-type`` for a type nobody registered;
* an idempotency key names one task: submitting it again with the same type and input returns
  that task, with a different type or input it is refused with ``idempotency-conflict`` (as
  payment APIs do), and so are two specs in one SUBMIT sharing a key but not their input.

The policeman's core calls :func:`check_specs`; its shell calls :func:`check_reuse` with what it
knows about the keys (tasks in memory, or rows fetched from the store), so the whole SUBMIT is
refused or accepted.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from casperd import handlers
from casperd.errors import IdempotencyConflictError
from casperd.handlers import Catalog
from casperd.messages import TaskSpec


def check_specs(specs: Sequence[TaskSpec], catalog: Catalog) -> None:
    """Every spec's type exists and its input fits the type's schema; also the keys within the SUBMIT agree."""
    many = len(specs) > 1
    seen: dict[str, TaskSpec] = {}
    for n, spec in enumerate(specs):
        handlers.check_input(catalog.get(spec.type), spec.input, f"task {n}: " if many else "")
        key = spec.idempotency_key
        if key is None:
            continue
        first = seen.setdefault(key, spec)
        if first is not spec and not same_task(first.type, first.input, spec):
            raise _conflict(key, None, f"task {n}: ")


def same_task(existing_type: str, existing_input: Any, spec: TaskSpec) -> bool:
    return existing_type == spec.type and (existing_input or {}) == spec.input


def check_reuse(specs: Sequence[TaskSpec], existing: Mapping[str, tuple[uuid.UUID, str, Any]]) -> None:
    """Refuse a key that already names a task of another type or input.

    Args:
        existing: idempotency key -> (task id, type, input) of the task the key already names.
    """
    for n, spec in enumerate(specs):
        key = spec.idempotency_key
        if key is None or key not in existing:
            continue
        tid, ttype, tinput = existing[key]
        if not same_task(ttype, tinput, spec):
            raise _conflict(key, tid, f"task {n}: " if len(specs) > 1 else "")


def _conflict(key: str, tid: uuid.UUID | None, where: str) -> IdempotencyConflictError:
    names = f"task {tid}" if tid else "an earlier task in this submission"
    return IdempotencyConflictError(
        f"{where}conflict: idempotency key {key!r} already names {names}, submitted with a different type or input",
        hint="use a new idempotency key for different work, or submit the same input to get the same task",
    )
