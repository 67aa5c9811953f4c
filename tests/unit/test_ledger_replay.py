"""The fault tier's ledger check replays each task's events through the lifecycle table and
reconciles attempts (tests/faults/scenarios.py, ``Ledger.assert_histories_replay``)."""

from __future__ import annotations

from collections import Counter

import pytest

from casperd.errors import IllegalTransitionError
from tests.faults.scenarios import Ledger

GOOD = [
    (None, "pending", 0, ""),
    ("pending", "assigned", 1, ""),
    ("assigned", "pending", 0, "handed-back by developer-1"),
    ("pending", "assigned", 1, ""),
    ("assigned", "processing", 1, ""),
    ("processing", "pending", 1, "peer developer-2 dead"),
    ("pending", "assigned", 2, ""),
    ("assigned", "processing", 2, ""),
    ("processing", "complete", 2, ""),
]


def ledger(history: list[tuple[str | None, str, int, str]], attempts: int) -> Ledger:
    return Ledger(
        ids={"t"},
        status={"t": "complete"},
        attempts={"t": attempts},
        completes=Counter({"t": 1}),
        finisher={"t": "developer-2"},
        complete_at={},
        assignments=[],
        requeues=[],
        errors=[],
        all_task_ids={"t"},
        histories={"t": history},
    )


def test_a_history_through_the_table_with_matching_attempts_passes() -> None:
    ledger(GOOD, 2).assert_all_complete()


def test_attempts_that_do_not_add_up_fail() -> None:
    with pytest.raises(AssertionError, match="attempts"):
        ledger(GOOD, 3).assert_histories_replay()


def test_a_refund_under_a_lost_holder_reason_fails() -> None:
    bad = [*GOOD[:5], ("processing", "pending", 0, "peer developer-2 dead"), *GOOD[6:]]
    with pytest.raises((AssertionError, IllegalTransitionError)):
        ledger(bad, 2).assert_histories_replay()


def test_a_kept_attempt_under_a_refund_reason_fails() -> None:
    bad = [*GOOD[:2], ("assigned", "pending", 1, "handed-back by developer-1"), *GOOD[3:]]
    with pytest.raises((AssertionError, IllegalTransitionError)):
        ledger(bad, 2).assert_histories_replay()


def test_an_illegal_move_fails() -> None:
    bad = [*GOOD[:2], ("assigned", "complete", 1, "")]
    with pytest.raises(IllegalTransitionError):
        ledger(bad, 1).assert_histories_replay()
