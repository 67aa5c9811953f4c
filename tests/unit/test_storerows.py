"""The group commit's hand-built JSON rows parse back to the record's values (casperd.storerows)."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from casperd import storerows
from casperd.lifecycle import Status
from casperd.messages import TaskSpec, new_task_id
from casperd.storerows import commit_params
from casperd.taskrecord import TaskEvent, TaskRecord

NOW = datetime(2026, 11, 30, 12, 0, 0, 123456, tzinfo=UTC)


def test_rows_parse_back_with_awkward_text_and_repeated_values() -> None:
    plain = TaskRecord.from_spec(new_task_id(), TaskSpec(type="noop"), 3, None)
    odd = TaskRecord.from_spec(
        new_task_id(),
        TaskSpec(type="shell", input={"q": 'a"b\\c é'}, requires=("y", "x"), affinity='k"1', timeout_s=2),
        3,
        'sub"mitter',
    )
    odd.persisted, odd.assigned_to, odd.error_json = True, 'dev"1', '[{"code":"x"}]'
    events = [
        TaskEvent(NOW, plain.id, None, "pending", None, 0),
        TaskEvent(NOW, odd.id, "pending", "assigned", 'dev"1', 1, '{"k":1}'),
    ]
    for _ in range(2):  # the second time from the encoders' caches
        new, upd, keys, ev = (json.loads(p) for p in commit_params([plain, odd], events, [("k\u00fc", plain.id, NOW)]))
        assert [r["id"] for r in new] == [str(plain.id)] and new[0]["type"] == "noop"
        assert new[0]["submitted_by"] is None and new[0]["timeout_s"] is None and new[0]["requires"] == []
        assert [r["id"] for r in upd] == [str(odd.id)] and upd[0]["assigned_to"] == 'dev"1'
        assert upd[0]["error"] == [{"code": "x"}]
        assert keys == [{"key": "k\u00fc", "task_id": str(plain.id), "created_at": NOW.isoformat()}]
        assert [(e["task_id"], e["from_status"], e["peer"], e["detail"]) for e in ev] == [
            (str(plain.id), None, None, None),
            (str(odd.id), "pending", 'dev"1', {"k": 1}),
        ]
    spec_rec = TaskRecord.from_spec(new_task_id(), TaskSpec(type="shell", requires=("y", "x"), timeout_s=2), 3, "s")
    (row,) = json.loads(commit_params([spec_rec], [], [])[0])
    assert row["requires"] == ["x", "y"] and row["timeout_s"] == 2.0 and row["submitted_by"] == "s"


def _expected(r: TaskRecord, new: bool) -> dict[str, Any]:
    def t(v: datetime | None) -> str | None:
        return None if v is None else v.isoformat()

    row: dict[str, Any] = {"id": str(r.id), "created_at": t(r.created_at)}
    if new:
        row |= {
            "parent_id": None if r.parent_id is None else str(r.parent_id),
            "type": r.type,
            "priority": r.priority,
            "requires": list(r.requires),
            "affinity": r.affinity,
            "idempotency_key": r.idempotency_key,
            "cache": r.cache,
            "max_attempts": r.max_attempts,
            "timeout_s": r.timeout_s,
            "submitted_by": r.submitted_by,
            "input": json.loads(r.input_json or "null"),
        }
    return row | {
        "status": r.status.value,
        "attempts": r.attempts,
        "assigned_to": r.assigned_to,
        **{c: t(getattr(r, c)) for c in storerows.MUTABLE if c.endswith(("_at", "_deadline", "_before"))},
        "output": json.loads(r.output_json or "null"),
        "error": json.loads(r.error_json or "null"),
    }


@pytest.mark.parametrize("status", list(Status))
def test_every_field_of_a_row_and_an_event_parses_back_to_the_records_value(status: Status) -> None:
    later = NOW + timedelta(seconds=1, microseconds=7)
    parent = uuid.UUID(int=(1 << 127) | 0xABC)
    spec = TaskSpec(
        type="shell",
        input={"q": 'é\\u0000"\\', "n": [1.5, -0.0]},
        requires=("b", "a"),
        affinity="affü",
        idempotency_key='k"\u2028',
        timeout_s=2.5,
        parent_id=parent,
        cache=True,
        max_attempts=7,
    )
    r = TaskRecord.from_spec(uuid.UUID(int=0x0123456789ABCDEF0123456789ABCDEF), spec, 3, "subé")
    r.status, r.attempts, r.assigned_to = status, 2, "developer-1"
    r.lease_deadline, r.not_before, r.assigned_at, r.started_at = later, NOW, NOW, later
    r.validating_at, r.finished_at, r.updated_at = later, later, later
    r.output_json, r.error_json = '{"o":"\u00e9"}', '[{"code":"x"}]'
    plain = TaskRecord.from_spec(new_task_id(), TaskSpec(type="noop"), 3, None)
    plain.status = status
    events = [
        TaskEvent(later, r.id, "assigned", status.value, "developer-1", 2, '{"backoff_s":1.5}'),
        TaskEvent(NOW, plain.id, None, "pending", None, 0),
    ]
    for _ in range(2):  # the second time from the encoders' caches
        (new,) = json.loads(commit_params([r], [], [])[0])
        assert new == _expected(r, True)
        (plain_row,) = json.loads(commit_params([plain], [], [])[0])
        assert plain_row == _expected(plain, True)
        r.persisted = True
        (upd,) = json.loads(commit_params([r], [], [])[1])
        assert upd == _expected(r, False)
        r.persisted = False
        ev = json.loads(commit_params([], events, [])[3])
        assert ev == [
            {"at": later.isoformat(), "task_id": str(r.id), "from_status": "assigned", "to_status": status.value}
            | {"peer": "developer-1", "attempt": 2, "detail": {"backoff_s": 1.5}},
            {"at": NOW.isoformat(), "task_id": str(plain.id), "from_status": None, "to_status": "pending"}
            | {"peer": None, "attempt": 0, "detail": None},
        ]


def _keys(text: str) -> list[str]:
    (row,) = json.loads(text)
    return sorted(row)


def test_statement_reads_every_field_the_encoders_write() -> None:
    """``json_to_recordset`` drops a key its column list does not name, silently: a field added to an
    encoder but not to COMMIT_ALL's column lists (or the reverse) would never reach the table."""
    rec = TaskRecord.from_spec(new_task_id(), TaskSpec(type="noop"), 3, None)
    done = TaskRecord.from_spec(new_task_id(), TaskSpec(type="noop"), 3, None)
    done.persisted = True
    new, upd, keys, ev = commit_params(
        [rec, done], [TaskEvent(NOW, rec.id, None, "pending", None, 0)], [("k", rec.id, NOW)]
    )
    assert _keys(new) == sorted(storerows.TASK_COLS) == sorted(c for c, _ in storerows._TASK)
    assert _keys(upd) == sorted(["id", "created_at", *storerows.MUTABLE]) == sorted(c for c, _ in storerows._CHANGE)
    assert _keys(keys) == sorted(c for c, _ in storerows.KEY_COLS)
    assert _keys(ev) == sorted(c for c, _ in storerows.EVENT_COLS)
    for part, cols in (
        (storerows._INSERT_NEW, storerows._TASK),
        (storerows._UPDATE_OLD, storerows._CHANGE),
        (storerows._INSERT_KEYS, storerows.KEY_COLS),
        (storerows._INSERT_EVENTS, storerows.EVENT_COLS),
    ):
        assert ", ".join(f"{c} {t}" for c, t in cols) in part and part in storerows.COMMIT_ALL
    # one positional parameter per json array, in commit_params' order
    assert storerows.COMMIT_ALL.count("%s") == 4
    order = [storerows.COMMIT_ALL.index(p) for p in ("AS r(", "AS u(", "AS k(", "AS e(")]
    assert order == sorted(order)


def test_commit_sql_has_only_the_parts_asked_for_with_their_parameters_in_order() -> None:
    from casperd.storerows import COMMIT_ALL, commit_sql

    assert commit_sql((True, True, True, True)) == COMMIT_ALL
    only_events = commit_sql((False, False, False, True))
    assert only_events.startswith("INSERT INTO task_events") and only_events.count("%s") == 1
    update = commit_sql((False, True, False, True))
    assert update.startswith("WITH upd AS (UPDATE tasks") and "INSERT INTO tasks" not in update
    assert update.count("%s") == 2 and update.index("UPDATE") < update.index("INSERT INTO task_events")
    keys_only = commit_sql((False, False, True, False))
    assert keys_only.startswith("INSERT INTO task_idempotency") and "WITH" not in keys_only
    with pytest.raises(ValueError):
        commit_sql((False, False, False, False))


def test_only_a_resent_batch_overwrites_existing_rows() -> None:
    from casperd.storerows import COMMIT_ALL, MUTABLE, commit_sql

    resent = commit_sql((True, True, True, True), resent=True)
    assert "ON CONFLICT (id, created_at) DO UPDATE SET" in resent and "ON CONFLICT (id, created_at)" not in COMMIT_ALL
    assert all(f"{c} = EXCLUDED.{c}" in resent for c in MUTABLE)
    assert resent.count("%s") == COMMIT_ALL.count("%s") == 4
    assert "NOT EXISTS" in commit_sql((False, False, False, True), resent=True) and "NOT EXISTS" not in COMMIT_ALL
    assert commit_sql((False, True, True, False), resent=True) == commit_sql((False, True, True, False))
