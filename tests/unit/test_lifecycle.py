"""The task lifecycle table: every (current, new) pair, terminal states, TaskRecord.move, SQL CHECK."""

from __future__ import annotations

import inspect
import itertools
import re
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from casperd.errors import IllegalTransitionError, TaskError
from casperd.lifecycle import ACTIVE, STEPS, TERMINAL, TRANSITIONS, Status, Trigger, can, check
from casperd.messages import TaskSpec, new_task_id
from casperd.taskrecord import TaskRecord

S = Status
ALL_PAIRS = list(itertools.product(list(Status), repeat=2))

# The lifecycle as documented in casperd/lifecycle.py, written out independently of the table, so a
# silent edit of TRANSITIONS (an added or a dropped edge) fails here.
EXPECTED_EDGES = {
    (S.PENDING, S.ASSIGNED),
    (S.PENDING, S.CANCELLED),
    (S.ASSIGNED, S.PROCESSING),
    (S.ASSIGNED, S.PENDING),
    (S.ASSIGNED, S.ERROR),
    (S.ASSIGNED, S.CANCELLED),
    (S.PROCESSING, S.VALIDATING),
    (S.PROCESSING, S.COMPLETE),
    (S.PROCESSING, S.PENDING),
    (S.PROCESSING, S.ERROR),
    (S.PROCESSING, S.CANCELLED),
    (S.VALIDATING, S.COMPLETE),
    (S.VALIDATING, S.ERROR),
    (S.VALIDATING, S.CANCELLED),
    (S.ERROR, S.RETRY),
    (S.ERROR, S.DEAD),
    (S.RETRY, S.PENDING),
    (S.RETRY, S.CANCELLED),
}
LEGAL = sorted(EXPECTED_EDGES)
ILLEGAL = sorted(set(ALL_PAIRS) - EXPECTED_EDGES)
SQL_DIR = Path(__file__).resolve().parents[2] / "sql"


def _pair_id(pair: tuple[Status, Status]) -> str:
    return f"{pair[0].value}->{pair[1].value}"


def test_table_covers_every_status() -> None:
    assert set(TRANSITIONS) == set(Status)
    for targets in TRANSITIONS.values():
        assert targets <= set(Status)


def test_table_is_exactly_the_documented_lifecycle() -> None:
    actual = {(a, b) for a, targets in TRANSITIONS.items() for b in targets}
    assert actual == EXPECTED_EDGES
    assert len(LEGAL) + len(ILLEGAL) == len(Status) ** 2


@pytest.mark.parametrize("pair", LEGAL, ids=_pair_id)
def test_legal_transition_passes(pair: tuple[Status, Status]) -> None:
    current, new = pair
    assert can(current, new)
    assert check("t-legal", current, new) is None


@pytest.mark.parametrize("pair", ILLEGAL, ids=_pair_id)
def test_illegal_transition_raises_naming_task_and_statuses(pair: tuple[Status, Status]) -> None:
    current, new = pair
    task_id = uuid.UUID("01890a5d-ac96-774b-bcce-b302099a8057")
    assert not can(current, new)
    with pytest.raises(IllegalTransitionError) as info:
        check(task_id, current, new)
    err = info.value
    assert isinstance(err, TaskError)
    assert err.code == "illegal-transition"
    text = str(err)
    assert str(task_id) in err.message
    assert f"{current.value} -> {new.value}" in err.message
    # the hint names the legal ways out (or says there are none)
    assert err.hint is not None
    if TRANSITIONS[current]:
        for legal in TRANSITIONS[current]:
            assert legal.value in err.hint
    else:
        assert "terminal" in err.hint
    assert current.value in text and new.value in text


def test_self_transitions_are_all_illegal() -> None:
    for s in Status:
        assert not can(s, s)
        with pytest.raises(IllegalTransitionError):
            check("self", s, s)


def test_terminal_set_is_exactly_complete_dead_cancelled() -> None:
    assert {S.COMPLETE, S.DEAD, S.CANCELLED} == TERMINAL
    for s in TERMINAL:
        assert TRANSITIONS[s] == frozenset()
    for s in set(Status) - TERMINAL:
        assert TRANSITIONS[s], f"{s} is not terminal but has no way out"


def test_active_statuses_are_the_held_ones() -> None:
    assert {S.ASSIGNED, S.PROCESSING, S.VALIDATING} == ACTIVE
    assert not ACTIVE & TERMINAL


def test_every_non_terminal_status_can_reach_a_terminal_one() -> None:
    for start in Status:
        seen, frontier = {start}, [start]
        while frontier:
            for nxt in TRANSITIONS[frontier.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    frontier.append(nxt)
        assert seen & TERMINAL, f"{start} can never finish"


def test_status_values_are_lowercase_names() -> None:
    for s in Status:
        assert s.value == s.name.lower()
        assert Status(s.value) is s


# --- TaskRecord.move ----------------------------------------------------------------------------
def _record(status: Status = S.PENDING) -> TaskRecord:
    tid = new_task_id()
    rec = TaskRecord.from_spec(tid, TaskSpec(type="echo", input={"a": 1}), max_attempts=3, submitted_by="me")
    rec.status = status
    return rec


@pytest.mark.parametrize("pair", ALL_PAIRS, ids=_pair_id)
def test_record_move_applies_or_refuses(pair: tuple[Status, Status]) -> None:
    current, new = pair
    rec = _record(current)
    before = rec.updated_at
    later = before + timedelta(seconds=5)
    if (current, new) in EXPECTED_EDGES:
        old = rec.move(new, later)
        assert old is current
        assert rec.status is new
        assert rec.updated_at == later
        assert rec.terminal == (new in TERMINAL)
    else:
        with pytest.raises(IllegalTransitionError) as info:
            rec.move(new, later)
        assert str(rec.id) in info.value.message
        # refused: nothing changed
        assert rec.status is current
        assert rec.updated_at == before


def test_every_trigger_row_is_a_legal_transition() -> None:
    """TaskRecord.apply takes a row of STEPS without checking TRANSITIONS again."""
    assert all((current, new) in EXPECTED_EDGES for (current, _), (new, _) in STEPS.items())


@pytest.mark.parametrize("current", list(Status), ids=str)
@pytest.mark.parametrize("trigger", list(Trigger), ids=str)
def test_record_apply_follows_the_trigger_table_or_refuses(current: Status, trigger: Trigger) -> None:
    rec = _record(current)
    rec.attempts = 1
    before = rec.updated_at
    later = before + timedelta(seconds=5)
    row = STEPS.get((current, trigger))
    if row is not None:
        assert rec.apply(trigger, later) is current
        assert (rec.status, rec.attempts, rec.updated_at) == (row[0], 1 + row[1], later)
    else:
        with pytest.raises(IllegalTransitionError) as info:
            rec.apply(trigger, later)
        assert str(rec.id) in info.value.message and trigger.value in info.value.message
        assert (rec.status, rec.attempts, rec.updated_at) == (current, 1, before)


def test_record_walks_the_happy_path_and_the_retry_loop() -> None:
    rec = _record()
    now = datetime.now(UTC)
    path = [S.ASSIGNED, S.PROCESSING, S.ERROR, S.RETRY, S.PENDING, S.ASSIGNED, S.PROCESSING, S.VALIDATING, S.COMPLETE]
    for step in path:
        rec.move(step, now)
    assert rec.terminal
    with pytest.raises(IllegalTransitionError):
        rec.move(S.PENDING, now)


def test_record_from_spec_fields() -> None:
    tid = new_task_id()
    spec = TaskSpec(
        type="shell",
        input={"cmd": "ls"},
        priority=8,
        requires=("b", "a", "b"),
        affinity="k",
        idempotency_key="idem",
        timeout_s=3.5,
    )
    rec = TaskRecord.from_spec(tid, spec, max_attempts=7, submitted_by="client-1")
    assert rec.status is S.PENDING
    assert rec.requires == ("a", "b")
    assert rec.max_attempts == 7
    assert rec.input == {"cmd": "ls"}
    assert rec.priority == 8 and rec.affinity == "k" and rec.idempotency_key == "idem"
    assert abs(rec.created_at.timestamp() - datetime.now(UTC).timestamp()) < 5
    assert rec.updated_at == rec.created_at
    spec2 = TaskSpec(type="echo", max_attempts=2)
    assert TaskRecord.from_spec(tid, spec2, max_attempts=7, submitted_by=None).max_attempts == 2
    summary = rec.summary()
    assert summary["id"] == str(tid) and summary["status"] == "pending" and summary["input"] == {"cmd": "ls"}


# --- the SQL schema -----------------------------------------------------------------------------
def _sql_status_values() -> list[str]:
    """The statuses the newest migration that states the rule allows: the table's CHECK in 001, the
    domain's constraint since 003."""
    rule = re.compile(
        r"CONSTRAINT\s+(?:tasks_status_check\s+CHECK\s*\(\s*status|casper_task_status_check\s+CHECK\s*\(\s*VALUE)"
        r"\s+IN\s*\((.*?)\)\s*\)",
        re.S | re.I,
    )
    found = [m.group(1) for p in sorted(SQL_DIR.glob("[0-9][0-9][0-9]_*.sql")) for m in rule.finditer(p.read_text())]
    assert found, "the status rule was not found in sql/*.sql"
    return re.findall(r"'([^']*)'", found[-1])


def test_sql_status_check_lists_exactly_the_statuses() -> None:
    values = _sql_status_values()
    assert len(values) == len(set(values)), "duplicate status in the CHECK"
    assert set(values) == {s.value for s in Status}


def test_restart_query_loads_exactly_the_open_statuses() -> None:
    from casperd import store

    assert set(store._OPEN_STATUSES) == {s.value for s in Status} - {s.value for s in TERMINAL}
    assert "status = ANY(%s)" in inspect.getsource(store.Store.load_open)
