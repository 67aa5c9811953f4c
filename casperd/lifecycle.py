"""The task lifecycle: one explicit transition table.

Rules this module keeps for itself: every status a task can have is a :class:`Status`; every
legal move is a row of ``TRANSITIONS``; anything else raises :class:`IllegalTransitionError`
naming the task, the current status and the requested one. The broker asks ``check`` before it
changes any task, and the Postgres schema's CHECK constraint lists exactly these statuses.

    pending -> assigned -> processing -> [validating ->] complete
    assigned/processing/validating -> error -> retry -> pending   (backoff, attempts left)
                                            -> dead              (attempts exhausted)
    assigned/processing -> pending      (holder lost: peer dead, lease expired; attempt counted)
    pending/assigned/processing/validating/retry -> cancelled
"""

from __future__ import annotations

import enum

from casperd.errors import IllegalTransitionError


class Status(enum.StrEnum):
    PENDING = "pending"
    ASSIGNED = "assigned"
    PROCESSING = "processing"
    VALIDATING = "validating"
    COMPLETE = "complete"
    ERROR = "error"
    RETRY = "retry"
    DEAD = "dead"
    CANCELLED = "cancelled"


S = Status
TRANSITIONS: dict[Status, frozenset[Status]] = {
    S.PENDING: frozenset({S.ASSIGNED, S.CANCELLED}),
    S.ASSIGNED: frozenset({S.PROCESSING, S.PENDING, S.ERROR, S.CANCELLED}),
    S.PROCESSING: frozenset({S.VALIDATING, S.COMPLETE, S.PENDING, S.ERROR, S.CANCELLED}),
    S.VALIDATING: frozenset({S.COMPLETE, S.ERROR, S.CANCELLED}),
    S.ERROR: frozenset({S.RETRY, S.DEAD}),
    S.RETRY: frozenset({S.PENDING, S.CANCELLED}),
    S.COMPLETE: frozenset(),
    S.DEAD: frozenset(),
    S.CANCELLED: frozenset(),
}

TERMINAL: frozenset[Status] = frozenset(s for s, nxt in TRANSITIONS.items() if not nxt)
ACTIVE: frozenset[Status] = frozenset({S.ASSIGNED, S.PROCESSING, S.VALIDATING})
"""Statuses in which a peer holds the task."""


def can(current: Status, new: Status) -> bool:
    return new in TRANSITIONS[current]


def check(task_id: object, current: Status, new: Status) -> None:
    """Raise IllegalTransitionError unless ``current -> new`` is in the table."""
    if new not in TRANSITIONS[current]:
        allowed = ", ".join(sorted(TRANSITIONS[current])) or "none (terminal)"
        raise IllegalTransitionError(
            f"task {task_id}: illegal transition {current} -> {new}",
            hint=f"from {current} the legal next states are: {allowed}",
        )
