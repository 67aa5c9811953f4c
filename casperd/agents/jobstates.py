"""Job and subtask states: one enum each and one transition table each (pure: no I/O).

Everything that decides which state a job or a subtask may move to lives here; the job runner
(:mod:`casperd.agents.jobs`) moves through :func:`job_step` and :func:`subtask_step`, and
``caspectl`` (:mod:`casperd.ctl.jobrender`) orders, colours and ends its watch by the same enums.
A move that is not in the table raises :class:`~casperd.errors.IllegalTransitionError` naming the
thing, its state and the refused one. Staying in a state (saving progress) is always allowed.

Job: ``planning`` → ``running`` → (``testing``: the final test run) → ``done`` | ``failed`` |
``budget-exhausted``; ``cancelled`` and ``failed`` from any state that has not ended.

Subtask: ``pending`` → ``coding`` → ``testing`` (with a test command) → ``tested`` →
``integrated``. A failed test run sends it back to ``coding`` (another round), and so does a patch
that conflicts on integration (a rebase round, from ``tested``). ``failed`` when its rounds are
used up or its developer failed; ``skipped`` (from ``pending``) when a dependency was not
integrated or the budget is spent.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from casperd.errors import IllegalTransitionError

DEFAULT_MAX_PARALLEL = 4
"""Subtasks of one job running at once when the job does not say."""
MAX_PARALLEL = 64


class JobState(StrEnum):
    PLANNING = "planning"
    RUNNING = "running"
    TESTING = "testing"
    DONE = "done"
    FAILED = "failed"
    BUDGET_EXHAUSTED = "budget-exhausted"
    CANCELLED = "cancelled"


class SubtaskState(StrEnum):
    PENDING = "pending"
    CODING = "coding"
    TESTING = "testing"
    TESTED = "tested"
    INTEGRATED = "integrated"
    FAILED = "failed"
    SKIPPED = "skipped"


J, S = JobState, SubtaskState
TERMINAL_JOB: frozenset[JobState] = frozenset({J.DONE, J.FAILED, J.BUDGET_EXHAUSTED, J.CANCELLED})
SUBTASK_DONE: frozenset[SubtaskState] = frozenset({S.INTEGRATED, S.FAILED, S.SKIPPED})
SUBTASK_ACTIVE: frozenset[SubtaskState] = frozenset({S.CODING, S.TESTING, S.TESTED})
"""Subtasks that count against the job's ``max_parallel``."""

JOB_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    J.PLANNING: frozenset({J.RUNNING, J.FAILED, J.CANCELLED}),
    J.RUNNING: frozenset({J.TESTING, J.DONE, J.FAILED, J.BUDGET_EXHAUSTED, J.CANCELLED}),
    J.TESTING: frozenset({J.DONE, J.FAILED, J.BUDGET_EXHAUSTED, J.CANCELLED}),
    **{t: frozenset() for t in TERMINAL_JOB},
}
SUBTASK_TRANSITIONS: dict[SubtaskState, frozenset[SubtaskState]] = {
    S.PENDING: frozenset({S.CODING, S.SKIPPED}),
    S.CODING: frozenset({S.TESTING, S.TESTED, S.FAILED}),
    S.TESTING: frozenset({S.TESTED, S.CODING, S.FAILED}),
    S.TESTED: frozenset({S.INTEGRATED, S.CODING, S.FAILED}),
    **{t: frozenset() for t in SUBTASK_DONE},
}


def job_step(current: str | JobState, new: JobState) -> JobState:
    """``new`` when a job in ``current`` may move there (or stays); else IllegalTransitionError."""
    old = JobState(current)
    if new != old and new not in JOB_TRANSITIONS[old]:
        raise IllegalTransitionError(
            f"a job cannot go from {old.value} to {new.value}",
            hint="a bug in the job runner: report it with the job id",
        )
    return new


def subtask_step(sub: dict[str, Any], new: SubtaskState, note: str | None = None) -> None:
    """Move the subtask record ``sub`` to ``new`` (with an optional note), by the table."""
    old = SubtaskState(sub.get("state", S.PENDING))
    if new != old and new not in SUBTASK_TRANSITIONS[old]:
        raise IllegalTransitionError(
            f"subtask {sub.get('id')!r} cannot go from {old.value} to {new.value}",
            hint="a bug in the job runner: report it with the job id",
        )
    sub["state"] = new.value
    if note is not None:
        sub["note"] = note


def is_terminal(state: str | None) -> bool:
    """Whether a job in this state has ended (nothing more will happen to it)."""
    return state in TERMINAL_JOB
