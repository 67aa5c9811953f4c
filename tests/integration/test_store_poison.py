"""Poison isolation in the group-commit writer: a row Postgres refuses is split off by halving, the
other rows commit, the refused task is reported by SQLSTATE (never by its data), and the writer
goes on. Against a real Postgres, both through the Store and through a running mesh."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from casperd.errors import StorageRejectedError
from casperd.groupcommit import describe, is_retryable
from casperd.lifecycle import Status
from casperd.messages import TaskSpec, new_task_id
from casperd.store import Store
from casperd.taskrecord import TaskEvent, TaskRecord, utcnow
from tests.support.mesh import db_rows, wait_for

SECRET = "s3cr3t-row-data"


def _record(**kw: Any) -> TaskRecord:
    rec = TaskRecord.from_spec(new_task_id(), TaskSpec(type="noop", input={"v": SECRET}), 3, "test")
    for k, v in kw.items():
        setattr(rec, k, v)
    return rec


def _stage(store: Store, rec: TaskRecord) -> None:
    store.stage(rec, TaskEvent(utcnow(), rec.id, None, Status.PENDING.value, "test", 0, None))


@pytest.mark.parametrize(
    ("poison", "sqlstate"),
    [({"affinity": f"{SECRET}\x00"}, "22P05"), ({"priority": 42}, "23514")],
    ids=["nul-character", "check-violation"],
)
async def test_refused_row_is_isolated_and_the_rest_commit(
    database_url: str, poison: dict[str, Any], sqlstate: str
) -> None:
    store = Store(database_url)
    await store.open()
    try:
        await store.migrate()
        refused: list[tuple[TaskRecord, str]] = []
        store.on_reject = lambda rec, why: refused.append((rec, why))
        ran: list[int] = []
        good = [_record() for _ in range(6)]
        bad = _record(**poison)
        for rec in good[:4]:
            _stage(store, rec)
        _stage(store, bad)
        store.stage_key("k-bad", bad.id, bad.created_at)
        for rec in good[4:]:
            _stage(store, rec)
        store.after_commit(lambda: ran.append(1))
        await store.committed()

        assert ran == [1]  # the batch's actions ran once, after the good rows committed
        assert [r for r, _ in refused] == [bad] and bad.rejected == refused[0][1]
        assert f"SQLSTATE {sqlstate}" in bad.rejected
        assert SECRET not in bad.rejected and SECRET not in (store.last_error or "")
        assert store.healthy and store.rejected == 1
        assert all(r.persisted for r in good) and not bad.persisted
        ids = {r[0] for r in db_rows(database_url, "SELECT id FROM tasks")}
        assert ids == {r.id for r in good}
        events = {r[0] for r in db_rows(database_url, "SELECT task_id FROM task_events")}
        assert events == {r.id for r in good}
        assert db_rows(database_url, "SELECT count(*) FROM task_idempotency") == [(0,)]

        # the writer is not wedged: later changes commit as usual, updates included
        good[0].move(Status.ASSIGNED, utcnow())
        store.stage(good[0])
        late = _record()
        _stage(store, late)
        await store.committed()
        assert db_rows(database_url, "SELECT status FROM tasks WHERE id = %s", (good[0].id,)) == [("assigned",)]
        assert db_rows(database_url, "SELECT count(*) FROM tasks WHERE id = %s", (late.id,)) == [(1,)]
        assert len(refused) == 1
    finally:
        await store.close()


async def test_one_refused_row_alone_is_refused_without_retrying(database_url: str) -> None:
    store = Store(database_url)
    await store.open()
    try:
        await store.migrate()
        refused: list[TaskRecord] = []
        store.on_reject = lambda rec, why: refused.append(rec)
        bad = _record(priority=-1)
        _stage(store, bad)
        await store.committed()
        assert refused == [bad] and store.commit_failures == 0 and store.healthy
    finally:
        await store.close()


async def test_connection_lost_while_isolating_keeps_what_was_found(database_url: str) -> None:
    """A retryable failure in the middle of the halving: the batch's rest goes back, is retried,
    and the refused task is still handed over once, after the batch's actions ran."""
    store = Store(database_url)
    await store.open()
    try:
        await store.migrate()
        calls = 0
        real_write = store._write

        async def flaky_write(batch: Any) -> None:
            nonlocal calls
            calls += 1
            if calls == 6:  # after the refused row was isolated (5th write), the connection drops
                raise psycopg.OperationalError("server closed the connection unexpectedly")
            await real_write(batch)

        store._write = flaky_write  # type: ignore[method-assign]
        order: list[str] = []
        store.on_reject = lambda rec, why: order.append(f"refused {rec.id}")
        good = [_record() for _ in range(5)]
        bad = _record(priority=99)
        for rec in [*good[:1], bad, *good[1:]]:
            _stage(store, rec)
        store.after_commit(lambda: order.append("after"))
        await store.committed()
        assert order == ["after", f"refused {bad.id}"]
        assert store.commit_failures == 1 and store.healthy and store.rejected == 1
        ids = {r[0] for r in db_rows(database_url, "SELECT id FROM tasks")}
        assert ids == {r.id for r in good}
    finally:
        await store.close()


def test_failures_are_classified_retryable_or_permanent() -> None:
    assert is_retryable(psycopg.OperationalError("connection lost"))
    assert is_retryable(psycopg.errors.SerializationFailure())
    assert is_retryable(psycopg.errors.DeadlockDetected())
    assert is_retryable(ConnectionResetError())
    assert not is_retryable(psycopg.errors.UntranslatableCharacter())
    assert not is_retryable(psycopg.errors.CheckViolation())
    assert not is_retryable(psycopg.errors.UndefinedColumn())
    assert describe(psycopg.errors.CheckViolation(f"row contains {SECRET}")) == "CheckViolation (SQLSTATE 23514)"


def test_mesh_refuses_the_poisoned_task_and_runs_the_rest(make_mesh: Any, database_url: str) -> None:
    mesh = make_mesh(developers=1, testers=0)
    with psycopg.connect(database_url, autocommit=True) as conn:  # a row Postgres will refuse
        conn.execute("ALTER TABLE tasks ADD CONSTRAINT test_poison CHECK (input->>'poison' IS NULL)")
    specs = [TaskSpec(type="echo", input={"i": i}) for i in range(3)]
    specs.insert(1, TaskSpec(type="echo", input={"poison": SECRET}, idempotency_key="poisoned"))
    with mesh.client(timeout_s=30) as c:
        with pytest.raises(StorageRejectedError) as err:
            c.submit(specs, wait=False)
        assert "23514" in err.value.message and SECRET not in str(err.value)
        # the other three tasks were stored and run; the writer goes on
        wait_for(
            lambda: db_rows(database_url, "SELECT count(*) FROM tasks WHERE status = 'complete'") == [(3,)],
            30,
            "the three good tasks to complete",
        )
        accepted = c.submit([TaskSpec(type="noop")], wait=True)
        done = next(iter(c.done_events(timeout_s=30)))
        assert done.task_id == accepted.task_ids[0] and done.status == "complete"
        status = c.request("status")
        assert status["store"]["healthy"] is True
    assert db_rows(database_url, "SELECT count(*) FROM tasks WHERE input->>'poison' IS NOT NULL") == [(0,)]
    assert db_rows(database_url, "SELECT count(*) FROM task_idempotency WHERE key = 'poisoned'") == [(0,)]


async def test_a_lost_commit_reply_keeps_the_changes_made_before_the_retry(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The commit reached Postgres but its reply was lost (the connection dropped after COMMIT), and
    the task changed again before the writer's retry (an operator's cancel): the retry re-sends the
    task as new, and must write its latest state over the row the lost commit made, not leave it."""
    from casperd.pgraw import PreparedStatement

    store = Store(database_url)
    await store.open()
    try:
        await store.migrate()
        rec = _record()
        real_run = PreparedStatement.run
        lost: list[int] = []

        async def reply_lost(stmt: PreparedStatement, params: Any) -> Any:
            result = await real_run(stmt, params)  # committed on the server
            if not lost:
                lost.append(1)
                old = rec.move(Status.CANCELLED, utcnow())
                store.stage(rec, TaskEvent(utcnow(), rec.id, old.value, Status.CANCELLED.value, "operator", 0, None))
                stmt.broken = True
                raise psycopg.OperationalError("server closed the connection unexpectedly")
            return result

        monkeypatch.setattr(PreparedStatement, "run", reply_lost)
        _stage(store, rec)
        await store.committed()
        assert lost == [1] and store.commit_failures == 1 and store.healthy
        assert db_rows(database_url, "SELECT status FROM tasks WHERE id = %s", (rec.id,)) == [("cancelled",)]
        events = db_rows(database_url, "SELECT to_status FROM task_events WHERE task_id = %s ORDER BY id", (rec.id,))
        assert events == [("pending",), ("cancelled",)]  # the lost commit's event is not written twice
        # the next change of the task is an UPDATE of that row, as for any committed task
        assert rec.persisted
    finally:
        await store.close()
