"""The broker's in-memory record of one task, mirrored row for row in Postgres ``tasks``."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

from casperd import lifecycle
from casperd.lifecycle import Status
from casperd.messages import TaskSpec, task_created_at

_NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


def to_json(value: Any) -> str:
    """Compact JSON that Postgres jsonb accepts: no NaN/Infinity, no NUL characters, bounded depth.

    Raises:
        ValueError: the value cannot be stored (the message says why; it never contains the value).
    """
    try:
        text = json.dumps(value, separators=(",", ":"), allow_nan=False)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except (TypeError, ValueError) as exc:
        raise ValueError(
            "not JSON-compatible (binary values, NaN or Infinity)"
            if "JSON" in str(exc) or "float" in str(exc)
            else f"not JSON-compatible: {type(exc).__name__}"
        ) from None
    if "\\u0000" in text and _NUL_ESCAPE.search(text):
        raise ValueError("contains a NUL character, which Postgres cannot store")
    return text


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True, eq=False)
class TaskRecord:
    id: uuid.UUID
    created_at: datetime
    type: str
    input_json: str
    status: Status = Status.PENDING
    priority: int = 5
    requires: tuple[str, ...] = ()
    affinity: str | None = None
    idempotency_key: str | None = None
    cache: bool = False
    attempts: int = 0
    max_attempts: int = 3
    timeout_s: float | None = None
    parent_id: uuid.UUID | None = None
    assigned_to: str | None = None
    lease_deadline: datetime | None = None
    not_before: datetime | None = None
    submitted_by: str | None = None
    assigned_at: datetime | None = None
    started_at: datetime | None = None
    validating_at: datetime | None = None
    finished_at: datetime | None = None
    updated_at: datetime = field(default_factory=utcnow)
    output_json: str | None = None
    error_json: str | None = None
    persisted: bool = False
    rejected: str | None = None  # why Postgres refused its rows (SQLSTATE, never the data); see groupcommit
    input_obj: dict[str, Any] | None = None
    waiters: list[bytes] = field(default_factory=list)
    attachments: tuple[bytes, ...] = ()  # input attachments, sent with the TASK (kept in task_attachments)

    @classmethod
    def from_spec(
        cls,
        task_id: uuid.UUID,
        spec: TaskSpec,
        max_attempts: int,
        submitted_by: str | None,
        input_json: str | None = None,
    ) -> TaskRecord:
        """``input_json``: the input already encoded by :func:`to_json` (a SUBMIT checks every input
        before it creates anything; encoding it once is a tenth of the policeman's CPU per task)."""
        created = datetime.fromtimestamp(task_created_at(task_id), UTC)
        return cls(
            id=task_id,
            created_at=created,
            type=spec.type,
            input_json=to_json(spec.input) if input_json is None else input_json,
            priority=spec.priority,
            requires=tuple(sorted(set(spec.requires))),
            affinity=spec.affinity,
            idempotency_key=spec.idempotency_key,
            cache=spec.cache,
            max_attempts=spec.max_attempts or max_attempts,
            timeout_s=spec.timeout_s,
            parent_id=spec.parent_id,
            submitted_by=submitted_by,
            updated_at=created,
            input_obj=spec.input,
        )

    def move(self, new: Status, now: datetime) -> Status:
        """Apply a lifecycle transition (checked against the table); returns the old status."""
        lifecycle.check(self.id, self.status, new)
        old, self.status, self.updated_at = self.status, new, now
        return old

    def apply(self, trigger: lifecycle.Trigger, now: datetime) -> Status:
        """Apply a lifecycle trigger (a row of ``lifecycle.STEPS``): the new status and the attempt
        count change the table gives. Returns the old status."""
        new, delta = lifecycle.step(self.id, self.status, trigger)
        old = self.move(new, now)
        self.attempts += delta
        return old

    @property
    def terminal(self) -> bool:
        return self.status in lifecycle.TERMINAL

    @property
    def input(self) -> dict[str, Any]:
        if self.input_obj is None:
            self.input_obj = json.loads(self.input_json)
        return self.input_obj

    def summary(self) -> dict[str, Any]:
        """The public view of a task, as caspectl shows it."""
        return {
            "id": str(self.id),
            "type": self.type,
            "status": self.status.value,
            "priority": self.priority,
            "attempts": self.attempts,
            "max_attempts": self.max_attempts,
            "assigned_to": self.assigned_to,
            "requires": list(self.requires),
            "affinity": self.affinity,
            "idempotency_key": self.idempotency_key,
            "parent_id": str(self.parent_id) if self.parent_id else None,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
            "input": self.input,
            "output": json.loads(self.output_json) if self.output_json else None,
            "error": json.loads(self.error_json) if self.error_json else None,
        }


class TaskEvent(NamedTuple):
    """One row of the append-only task_events table (a tuple: cheap to make on the hot path)."""

    at: datetime
    task_id: uuid.UUID
    from_status: str | None
    to_status: str
    peer: str | None
    attempt: int
    detail_json: str | None = None
