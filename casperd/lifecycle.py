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

Every change the policeman makes is a :class:`Trigger` (what happened) looked up in ``STEPS``:
the row gives the new status and what happens to the attempt count. Refunds (a clean hand-back, a
TASK that never left) are rows here, not arithmetic in the broker; every row is an edge of
``TRANSITIONS``.
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
QUEUED: frozenset[Status] = frozenset({S.PENDING, S.RETRY})
"""Statuses in which a task waits for a holder (a spilled input stays in Postgres meanwhile)."""


class Trigger(enum.StrEnum):
    DISPATCH = "dispatch"  # a peer is given the task (an attempt starts)
    START = "start"  # the holder reports it running
    VALIDATE = "validate"  # a result arrived that the policeman checks first
    COMPLETE = "complete"  # a result arrived (and passed validation)
    FAIL = "fail"  # the holder, validation or the policeman reports a failure
    BACKOFF = "backoff"  # a failed attempt with attempts left waits
    EXHAUST = "exhaust"  # a failure with no attempt left (or not retryable)
    RETRY_DUE = "retry-due"  # the backoff elapsed
    HOLDER_LOST = "holder-lost"  # peer dead, lease expired, re-registered without it: attempt stays counted
    HAND_BACK = "hand-back"  # the holder gave it back unrun (shutdown, draining): attempt refunded
    UNDELIVERED = "undelivered"  # the TASK frame could not be sent: attempt refunded
    CANCEL = "cancel"  # the operator (or a job) cancelled it


T = Trigger
STEPS: dict[tuple[Status, Trigger], tuple[Status, int]] = {
    (S.PENDING, T.DISPATCH): (S.ASSIGNED, +1),
    (S.ASSIGNED, T.START): (S.PROCESSING, 0),
    (S.PROCESSING, T.VALIDATE): (S.VALIDATING, 0),
    (S.PROCESSING, T.COMPLETE): (S.COMPLETE, 0),
    (S.VALIDATING, T.COMPLETE): (S.COMPLETE, 0),
    (S.ASSIGNED, T.FAIL): (S.ERROR, 0),
    (S.PROCESSING, T.FAIL): (S.ERROR, 0),
    (S.VALIDATING, T.FAIL): (S.ERROR, 0),
    (S.ERROR, T.BACKOFF): (S.RETRY, 0),
    (S.ERROR, T.EXHAUST): (S.DEAD, 0),
    (S.RETRY, T.RETRY_DUE): (S.PENDING, 0),
    (S.ASSIGNED, T.HOLDER_LOST): (S.PENDING, 0),
    (S.PROCESSING, T.HOLDER_LOST): (S.PENDING, 0),
    (S.ASSIGNED, T.HAND_BACK): (S.PENDING, -1),
    (S.PROCESSING, T.HAND_BACK): (S.PENDING, -1),
    (S.ASSIGNED, T.UNDELIVERED): (S.PENDING, -1),
    (S.PENDING, T.CANCEL): (S.CANCELLED, 0),
    (S.ASSIGNED, T.CANCEL): (S.CANCELLED, 0),
    (S.PROCESSING, T.CANCEL): (S.CANCELLED, 0),
    (S.VALIDATING, T.CANCEL): (S.CANCELLED, 0),
    (S.RETRY, T.CANCEL): (S.CANCELLED, 0),
}
"""(status, trigger) -> (new status, change of the attempt count). Anything else is illegal."""


def step(task_id: object, current: Status, trigger: Trigger) -> tuple[Status, int]:
    """The row for ``trigger`` in ``current``; IllegalTransitionError if there is none."""
    row = STEPS.get((current, trigger))
    if row is None:
        allowed = ", ".join(sorted(t.value for (s, t) in STEPS if s is current)) or "none (terminal)"
        raise IllegalTransitionError(
            f"task {task_id}: {trigger.value} is not legal in {current}",
            hint=f"in {current} the legal triggers are: {allowed}",
        )
    return row


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


def replay(task_id: object, events: list[tuple[str | None, str, int]]) -> int:
    """Check a task's history against the table: each event ``(from, to, attempt after)`` must
    continue from the previous one and be a row of ``STEPS`` whose attempt change matches. Returns
    the attempts the history ends with; raises IllegalTransitionError at the first event that is
    not. The first event must be the creation (``None -> pending``, attempt 0)."""
    if not events or events[0][0] is not None or events[0][1] != S.PENDING or events[0][2] != 0:
        raise IllegalTransitionError(f"task {task_id}: history does not start with its creation (None -> pending)")
    status, attempts = S.PENDING, 0
    for n, (frm, to, attempt) in enumerate(events[1:], 1):
        if frm != status:
            raise IllegalTransitionError(f"task {task_id}: event {n} moves from {frm} but the task was {status}")
        delta = attempt - attempts
        if not any(row == (Status(to), delta) for (s, _t), row in STEPS.items() if s is status):
            raise IllegalTransitionError(
                f"task {task_id}: event {n} ({frm} -> {to}, attempts {attempts} -> {attempt}) is no row of the table"
            )
        status, attempts = Status(to), attempt
    return attempts
