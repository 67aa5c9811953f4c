"""``commit_batch_max``: a backlog larger than it (e.g. after a store outage) is written in several
statements of at most that many tasks, and what waits on it runs only once the last is committed,
also when the connection drops between two of them. Against a real Postgres."""

from __future__ import annotations

from typing import Any

import psycopg

from casperd.lifecycle import Status
from casperd.messages import TaskSpec, new_task_id
from casperd.store import Store
from casperd.taskrecord import TaskEvent, TaskRecord, utcnow
from tests.support.mesh import db_rows


def _stage_new(store: Store, n: int) -> list[TaskRecord]:
    recs = [TaskRecord.from_spec(new_task_id(), TaskSpec(type="noop", input={"i": i}), 3, "test") for i in range(n)]
    for rec in recs:
        store.stage(rec, TaskEvent(utcnow(), rec.id, None, Status.PENDING.value, "test", 0, None))
    return recs


def _count(url: str, table: str) -> int:
    ((n,),) = db_rows(url, f"SELECT count(*) FROM {table}")
    return int(n)


async def test_a_backlog_is_written_in_statements_of_batch_max_tasks(database_url: str) -> None:
    store = Store(database_url, batch_max=3)
    await store.open()
    try:
        await store.migrate()
        ran: list[int] = []
        recs = _stage_new(store, 10)
        store.after_commit(lambda: ran.append(_count(database_url, "tasks")))
        await store.committed()
        assert store.commits == 4  # 3 + 3 + 3 + 1
        assert ran == [10]  # the callback ran once, after the last part
        assert store.rows_written == 10
        # the writer's time (status -> store, bench.peers): encoding is part of a commit in flight
        assert 0 < store.encode_s < store.busy_s and store.after_s > 0
        assert _count(database_url, "task_events") == 10 and all(r.persisted for r in recs)
    finally:
        await store.close()


async def test_a_connection_lost_between_parts_keeps_the_callbacks_for_the_retry(database_url: str) -> None:
    store = Store(database_url, batch_max=4)
    await store.open()
    try:
        await store.migrate()
        real_write = store._write
        writes = 0

        async def flaky(batch: Any) -> None:
            nonlocal writes
            writes += 1
            if writes == 2:  # the first part is committed, the second is not
                raise psycopg.OperationalError("server closed the connection unexpectedly")
            await real_write(batch)

        store._write = flaky  # type: ignore[method-assign]
        seen: list[int] = []
        recs = _stage_new(store, 10)
        store.after_commit(lambda: seen.append(_count(database_url, "tasks")))
        await store.committed()
        assert seen == [10] and store.commit_failures == 1 and store.healthy
        assert {r[0] for r in db_rows(database_url, "SELECT id FROM tasks")} == {r.id for r in recs}
        assert _count(database_url, "task_events") == 10  # the committed part's events were not re-sent
    finally:
        await store.close()
