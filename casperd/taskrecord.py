"""The broker's in-memory record of one task, mirrored row for row in Postgres ``tasks``.

Memory per queued task is bounded (issue #9: at most 1 KB each, ``bench.queue_memory``): a record
keeps its input once, as the JSON text its row was written from (decoded on demand, when it is
dispatched; a SUBMIT's decoded input is kept only until its row is committed), shares its type and
submitter strings (interned), and makes its waiter list only when someone waits. A *spilled*
record (``spill``: an input larger than ``inline_input_bytes``) drops even that text once its row
is committed and while it is queued; the policeman loads it back from Postgres when it dispatches
the task (the core's ``LoadInputs`` action, :mod:`casperd.policeman`).
"""

from __future__ import annotations

import functools
import json
import re
import sys
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

from casperd import lifecycle
from casperd.errors import StorageError
from casperd.lifecycle import Status
from casperd.messages import TaskSpec, task_created_ms

_STEPS = lifecycle.STEPS
_NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
_encode = _ENCODER.encode
"""One encoder for every call: ``json.dumps`` with non-default options builds a new one each time."""
_make_c = getattr(json.encoder, "c_make_encoder", None)  # None: CPython without its _json module
_fast: Any = (
    None
    if _make_c is None
    else _make_c(None, _ENCODER.default, json.encoder.encode_basestring_ascii, None, ":", ",", False, False, False)
)
"""The C encoder ``_encode`` makes on every call, made once, without the circular-reference check
(half of to_json's cost): a value it cannot encode is encoded again by ``_encode``, whose error
(a cycle, too deep, not JSON) is the one reported."""


def to_json(value: Any) -> str:
    """Compact JSON that Postgres jsonb accepts: no NaN/Infinity, no NUL characters, bounded depth.

    Raises:
        ValueError: the value cannot be stored (the message says why; it never contains the value).
    """
    try:
        text = "".join(_fast(value, 0)) if _fast is not None else _encode(value)
    except (RecursionError, TypeError, ValueError):
        text = None
    try:
        text = _encode(value) if text is None else text
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


@functools.lru_cache(maxsize=4)
def _created_at(ms: int) -> datetime:
    """The creation time of a task id's millisecond: one shared object for the tasks of a burst
    (a SUBMIT of 500 is made in a few milliseconds)."""
    return datetime.fromtimestamp(ms / 1000.0, UTC)


def shared_times(task_id: uuid.UUID, created: datetime, updated: datetime) -> tuple[datetime, datetime]:
    """A stored row's ``created_at`` and ``updated_at`` as shared objects where they can be: the
    id's creation time (one per millisecond), and ``updated_at`` the same object while equal (a
    task never moved). A restart recovers queued tasks as compactly as they were made."""
    try:
        mine = _created_at(task_created_ms(task_id))
    except (ValueError, OverflowError, OSError):
        mine = created
    if mine == created:
        created = mine
    return created, created if updated == created else updated


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True, eq=False)
class TaskRecord:
    id: uuid.UUID
    created_at: datetime
    type: str
    input_json: str | None
    """The input as JSON text (None: spilled, in Postgres only; see :meth:`drop_input`)."""
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
    """The decoded input: a SUBMIT's from creation until its row is committed, else made on first
    use (dispatch, validation); dropped while the task waits once its row is committed."""
    waiters: list[bytes] | None = None
    """Control routes waiting for the task's DONE (made by the first :meth:`wait`)."""
    attachments: tuple[bytes, ...] | None = ()
    """Input attachments, sent with the TASK (kept in ``task_attachments``); None: spilled with the
    input, in Postgres only until the task is dispatched."""
    spill: bool = False
    """A large input (its JSON text and attachments together): held in memory only until the row is
    committed and while the task is held."""

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
        created = _created_at(task_created_ms(task_id))
        return cls(
            id=task_id,
            created_at=created,
            type=sys.intern(spec.type),
            input_json=to_json(spec.input) if input_json is None else input_json,
            priority=spec.priority,
            requires=tuple(sorted(set(spec.requires))) if spec.requires else (),
            affinity=spec.affinity,
            idempotency_key=spec.idempotency_key,
            cache=spec.cache,
            max_attempts=spec.max_attempts or max_attempts,
            timeout_s=spec.timeout_s,
            parent_id=spec.parent_id,
            submitted_by=None if submitted_by is None else sys.intern(submitted_by),
            updated_at=created,
        )

    def move(self, new: Status, now: datetime) -> Status:
        """Apply a lifecycle transition (checked against the table); returns the old status."""
        lifecycle.check(self.id, self.status, new)
        old, self.status, self.updated_at = self.status, new, now
        return old

    def apply(self, trigger: lifecycle.Trigger, now: datetime) -> Status:
        """Apply a lifecycle trigger (a row of ``lifecycle.STEPS``): the new status and the attempt
        count change the table gives. Returns the old status."""
        old = self.status
        row = _STEPS.get((old, trigger))
        if row is None:
            row = lifecycle.step(self.id, old, trigger)  # raises IllegalTransitionError: no such row
        # every row of the table is a legal transition (tests/unit/test_lifecycle.py): no second check
        self.status, self.updated_at = row[0], now
        self.attempts += row[1]
        return old

    @property
    def terminal(self) -> bool:
        return self.status in lifecycle.TERMINAL

    @property
    def input(self) -> dict[str, Any]:
        """The decoded input (cached until the task is queued again).

        Raises:
            StorageError: the input is spilled (in Postgres only) and was not loaded back.
        """
        if self.input_obj is None:
            if self.input_json is None:
                raise StorageError(f"the input of task {self.id} is in the task store only", hint="a bug: report it")
            self.input_obj = json.loads(self.input_json)
        return self.input_obj

    @property
    def input_loaded(self) -> bool:
        return self.input_json is not None

    @property
    def sendable(self) -> bool:
        """Its input and its attachments are in memory: a TASK can be built from it."""
        return self.input_json is not None and self.attachments is not None

    def wait(self, route: bytes) -> None:
        """``route`` waits for the task's DONE."""
        if self.waiters is None:
            self.waiters = [route]
        else:
            self.waiters.append(route)

    def take_waiters(self) -> list[bytes]:
        waiters, self.waiters = self.waiters or [], None
        return waiters

    def drop_input(self) -> None:
        """Forget what can be had again: the decoded input always; for a spilled record whose row is
        committed, the input text too (loaded back from Postgres for dispatch)."""
        self.input_obj = None
        if self.spill and self.persisted:
            self.input_json = None
            if self.attachments:
                self.attachments = None

    def mark_persisted(self) -> None:
        """The row is committed; a record that waits (pending, retry) lets go of what it can have
        again: its decoded input, and a spilled input's text (in Postgres now)."""
        self.persisted = True
        if self.status in lifecycle.QUEUED:
            self.drop_input()

    def load_input(self, input_json: str) -> None:
        """The input of a spilled record, loaded back from Postgres."""
        self.input_json = input_json

    def load_attachments(self, blobs: list[bytes]) -> None:
        """The input attachments of a spilled record, loaded back from Postgres."""
        self.attachments = tuple(blobs)

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
            "input": self.input if self.input_loaded else None,  # spilled: the caller reads the row
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
