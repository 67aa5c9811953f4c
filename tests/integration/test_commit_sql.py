"""The group commit's statement and the schema it writes, against a real Postgres: a database made
before migration 003 migrates in place with its rows and keeps refusing what the old CHECKs
refused; a task's rows round-trip through COMMIT_ALL; a re-sent batch (a commit whose outcome was
lost) is a no-op for tasks and idempotency keys; and the statement's untargeted ON CONFLICT means
what it says only because the tasks table has no unique index but its primary key."""

from __future__ import annotations

import importlib.resources
import json
from typing import Any

import psycopg
import pytest

from casperd.lifecycle import Status
from casperd.messages import TaskSpec, new_task_id
from casperd.store import Store
from casperd.storerows import COMMIT_ALL, WRITER_SETTINGS, commit_params, commit_sql, event_json
from casperd.taskrecord import TaskEvent, TaskRecord, utcnow
from tests.support.mesh import db_rows


def _record(**kw: Any) -> TaskRecord:
    rec = TaskRecord.from_spec(
        new_task_id(), TaskSpec(type="noop", input={"v": 'a"b é'}, requires=("gpu",), timeout_s=2.5), 3, "tester"
    )
    for k, v in kw.items():
        setattr(rec, k, v)
    return rec


async def _migrated(url: str) -> list[str]:
    store = Store(url)
    await store.open()
    try:
        return await store.migrate()
    finally:
        await store.close()


def _commit(
    url: str, records: list[TaskRecord], events: list[TaskEvent], keys: list[tuple[str, Any, Any]], times: int = 1
) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for setting in WRITER_SETTINGS:
            conn.execute(setting)
        for _ in range(times):  # a second execution runs the generic plan the writer keeps
            conn.execute(COMMIT_ALL, commit_params(records, events, keys), prepare=True)


async def test_database_from_before_003_migrates_in_place_and_keeps_its_rules(database_url: str) -> None:
    files = sorted(
        p for p in importlib.resources.files("casperd.sql").iterdir() if p.name[:3].isdigit() and p.name < "003"
    )
    with psycopg.connect(database_url, autocommit=True) as conn:  # as casperd 0.1.0 left it
        conn.execute(
            "CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for path in files:
            conn.execute(path.read_text())
            conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (int(path.name[:3]), path.name)
            )
        old = new_task_id()
        conn.execute(
            "INSERT INTO tasks (id, created_at, type, status, priority, attempts, max_attempts)"
            " VALUES (%s, now(), 'noop', 'complete', 7, 1, 3)",
            (old,),
        )
        conn.execute("INSERT INTO task_events (task_id, to_status) VALUES (%s, 'complete')", (old,))

    assert "003_commit_cost.sql" in await _migrated(database_url)
    assert db_rows(database_url, "SELECT status, priority, attempts FROM tasks") == [("complete", 7, 1)]
    assert db_rows(database_url, "SELECT count(*) FROM task_events WHERE task_id = %s", (old,)) == [(1,)]
    # the rules moved from table CHECKs to domains: the same values are refused, with the same SQLSTATE
    for field, value in (("priority", 42), ("attempts", -1), ("max_attempts", 0)):
        with pytest.raises(psycopg.errors.CheckViolation):
            _commit(database_url, [_record(**{field: value})], [], [], times=2)
    with pytest.raises(psycopg.errors.CheckViolation), psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("UPDATE tasks SET status = 'lost' WHERE id = %s", (old,))
    assert db_rows(database_url, "SELECT count(*) FROM tasks") == [(1,)]
    assert await _migrated(database_url) == []  # and a second start applies nothing


async def test_rows_round_trip_and_a_resent_batch_is_a_no_op(database_url: str) -> None:
    await _migrated(database_url)
    rec, now = _record(), utcnow()
    rec.move(Status.ASSIGNED, now)
    rec.attempts, rec.assigned_to, rec.assigned_at = 1, "dev-1", now
    first = [TaskEvent(now, rec.id, None, "pending", "c", 0), TaskEvent(now, rec.id, "pending", "assigned", "dev-1", 1)]
    _commit(database_url, [rec], first, [("idem-1", rec.id, rec.created_at)])
    # the same rows again, as a retry re-sends a batch whose commit outcome was lost: no error, no change
    # (events are append-only and carry no key: a re-sent event is written again, as before 003)
    _commit(database_url, [rec], [], [("idem-1", rec.id, rec.created_at)], times=2)
    assert db_rows(database_url, "SELECT count(*) FROM tasks") == [(1,)]
    assert db_rows(database_url, "SELECT key, task_id FROM task_idempotency") == [("idem-1", rec.id)]

    rec.persisted = True
    rec.move(Status.PROCESSING, now)
    rec.move(Status.COMPLETE, now)
    rec.finished_at, rec.output_json = now, json.dumps({"ok": [1, "é"]})
    _commit(database_url, [rec], [TaskEvent(now, rec.id, "processing", "complete", "dev-1", 1, '{"k": 1}')], [])
    (row,) = db_rows(
        database_url,
        "SELECT status, priority, requires, timeout_s, submitted_by, input, output, attempts, assigned_to,"
        " assigned_at, finished_at, created_at FROM tasks WHERE id = %s",
        (rec.id,),
    )
    assert row == (
        "complete",
        5,
        ["gpu"],
        2.5,
        "tester",
        {"v": 'a"b é'},
        {"ok": [1, "é"]},
        1,
        "dev-1",
        now,
        now,
        rec.created_at,
    )
    events = db_rows(
        database_url,
        "SELECT from_status, to_status, peer, attempt, detail FROM task_events WHERE task_id = %s ORDER BY id",
        (rec.id,),
    )
    assert events[-1] == ("processing", "complete", "dev-1", 1, {"k": 1})
    assert [e[1] for e in events] == ["pending", "assigned", "complete"]


async def test_a_resent_batch_writes_the_latest_state_over_the_row_a_lost_commit_made(database_url: str) -> None:
    """The statement for a batch re-sent after a failed commit (commit_sql(resent=True)): a task
    the lost commit did insert gets its latest state; one it did not is inserted."""
    await _migrated(database_url)
    made, missed, now = _record(), _record(), utcnow()
    _commit(database_url, [made], [], [])  # the commit whose reply was lost
    made.move(Status.CANCELLED, now)  # changed before the retry
    resent = commit_sql((True, False, False, True), resent=True)
    event = TaskEvent(now, made.id, "pending", "cancelled", "operator", 0)
    params = commit_params([made, missed], [event], [])
    with psycopg.connect(database_url, autocommit=True) as conn:
        for setting in WRITER_SETTINGS:
            conn.execute(setting)
        for _ in range(2):  # the generic plan too
            conn.execute(resent, (params[0], params[3]), prepare=True)
    rows = dict(db_rows(database_url, "SELECT id, status FROM tasks"))
    assert rows == {made.id: "cancelled", missed.id: "pending"}
    # the event the lost commit wrote is not written again; a new one is written once
    lost_event = TaskEvent(now, made.id, None, "pending", "c", 0)
    _commit(database_url, [], [lost_event], [])
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(commit_sql((False, False, False, True), resent=True), ("[" + event_json(lost_event) + "]",))
    transitions = db_rows(database_url, "SELECT from_status, to_status FROM task_events WHERE task_id = %s", (made.id,))
    assert sorted(transitions, key=str) == sorted([(None, "pending"), ("pending", "cancelled")], key=str)


async def test_tasks_has_no_unique_index_but_its_primary_key(database_url: str) -> None:
    """COMMIT_ALL's INSERT INTO tasks says ON CONFLICT DO NOTHING without a target, which skips a row
    that conflicts with ANY unique index: a second unique index on tasks would make it drop rows
    silently instead of failing. Add one only with a conflict target back in the statement."""
    await _migrated(database_url)
    unique = db_rows(
        database_url,
        "SELECT c.relname, i.indexrelid::regclass::text FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid"
        " WHERE i.indisunique AND (c.relname = 'tasks' OR c.oid IN"
        " (SELECT inhrelid FROM pg_inherits WHERE inhparent = 'tasks'::regclass)) ORDER BY 1",
    )
    assert unique and all(index == f"{table}_pkey" for table, index in unique)
    assert "INSERT INTO tasks" in COMMIT_ALL and "ON CONFLICT DO NOTHING" in COMMIT_ALL


def _upd_plan(url: str, statement: str = COMMIT_ALL) -> list[str]:
    plain = statement
    for i in range(1, statement.count("%s") + 1):
        plain = plain.replace("%s", f"${i}", 1)
    with psycopg.connect(url, autocommit=True) as conn:
        for setting in WRITER_SETTINGS:
            conn.execute(setting)
        plan = [r[0] for r in conn.execute(f"EXPLAIN (GENERIC_PLAN, COSTS OFF) {plain}")]
    start = next(i for i, line in enumerate(plan) if "CTE upd" in line)
    end = next((i for i, line in enumerate(plan) if "CTE keys" in line), len(plan))
    return plan[start:end]


async def test_update_probes_tasks_by_primary_key_whatever_the_statistics(database_url: str) -> None:
    """The writer keeps one generic plan per connection, made with whatever statistics there are. Its
    UPDATE must look each changed task up by primary key (a nested loop over the json rows), never
    scan a partition: a plan made on an empty partition that scans it (a range condition on
    created_at made one, with a Materialize) costs O(partition) per commit once the month fills."""
    await _migrated(database_url)
    with psycopg.connect(database_url, autocommit=True) as conn:  # an old month, and history analyzed
        conn.execute("CREATE TABLE tasks_2024_03 PARTITION OF tasks FOR VALUES FROM ('2024-03-01') TO ('2024-04-01')")
    update_only = commit_sql((False, True, False, True))  # what the writer runs for a batch of updates
    empty = [_upd_plan(database_url), _upd_plan(database_url, update_only)]
    _commit(database_url, [_record() for _ in range(300)], [], [])
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("ANALYZE tasks")
    for plan in (*empty, _upd_plan(database_url), _upd_plan(database_url, update_only)):
        text = "\n".join(plan)
        assert "Nested Loop" in text and "Function Scan on json_to_recordset u" in text, text
        assert "Materialize" not in text and "Join Filter" not in text and "Seq Scan" not in text, text
        # every partition is probed by the json row's id (on an empty partition analyzed as such, the
        # planner may probe it through tasks_status_idx rather than the primary key: same result)
        scans = [line for line in plan if "Scan using" in line]
        assert scans and all("Index Scan using tasks_" in line for line in scans), text
        conds = [line.strip() for line in plan if "Index Cond" in line]
        assert len(conds) == len(scans) and all(
            c.startswith(("Index Cond: ((id = u.id)", "Index Cond: (id = u.id)")) for c in conds
        ), text

    old, now = _record(), utcnow()  # and a task of an old month is found and updated there
    old.created_at = now.replace(year=2024, month=3, day=15)
    _commit(database_url, [old], [], [])
    old.persisted = True
    old.move(Status.CANCELLED, now)
    _commit(database_url, [old], [TaskEvent(now, old.id, "pending", "cancelled", None, 0)], [], times=2)
    assert db_rows(database_url, "SELECT tableoid::regclass::text, status FROM tasks WHERE id = %s", (old.id,)) == [
        ("tasks_2024_03", "cancelled")
    ]
