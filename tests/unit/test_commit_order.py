"""After a group commit, messages to mesh peers (TASK, CANCEL) go before those to control clients,
each group in the order registered (SPEC 11), also when a failed batch is retried."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

from casperd.commitbatch import Batch
from casperd.groupcommit import GroupCommitWriter


def test_first_callbacks_run_before_the_others_each_in_order() -> None:
    ran: list[str] = []
    failures = [psycopg.OperationalError("connection lost")]

    async def fake_write(self: GroupCommitWriter, batch: Batch) -> None:
        if failures:
            raise failures.pop()  # retryable: the batch waits and is written again, callbacks kept

    async def go() -> None:
        w = GroupCommitWriter("postgresql://unused", {})
        w._write = fake_write.__get__(w)  # type: ignore[method-assign]
        w.start_writer()
        w._batch.keys.append("a row")  # type: ignore[arg-type]  # a batch with rows: it is written
        w.after_commit(lambda: ran.append("ACCEPTED a"))
        w.after_commit(lambda: ran.append("TASK a"), first=True)
        w.after_commit(lambda: ran.append("DONE x"))
        w.after_commit(lambda: ran.append("TASK b"), first=True)
        await asyncio.wait_for(w.committed(), 5)
        await w.stop_writer(5)

    asyncio.run(go())
    assert ran == ["TASK a", "TASK b", "ACCEPTED a", "DONE x"]


def test_a_batch_absorbs_both_kinds_of_callbacks() -> None:
    older, newer = Batch(), Batch()
    calls: list[Any] = [lambda: 1, lambda: 2, lambda: 3, lambda: 4]
    older.first.append(calls[0])
    older.after.append(calls[1])
    newer.first.append(calls[2])
    newer.after.append(calls[3])
    older.absorb(newer)
    assert older.first == [calls[0], calls[2]] and older.after == [calls[1], calls[3]]
    assert Batch(first=[calls[0]])


@pytest.mark.parametrize("fail", [False, True])
def test_grouped_callbacks_run_once_per_commit_after_the_others(fail: bool) -> None:
    """``after_commit_each``: one call per commit with every item of that commit, after the other
    callbacks; items given while a commit is in flight go to the next one, unless that commit fails:
    the failed batch is retried with the newer changes, and its items with theirs."""
    calls: list[Any] = []
    failures = [psycopg.OperationalError("connection lost")] if fail else []
    gate = asyncio.Event()

    async def fake_write(self: GroupCommitWriter, batch: Batch) -> None:
        await gate.wait()
        if failures:
            raise failures.pop()

    async def go() -> None:
        w = GroupCommitWriter("postgresql://unused", {})
        w._write = fake_write.__get__(w)  # type: ignore[method-assign]
        w.start_writer()
        w._batch.keys.append("a row")  # type: ignore[arg-type]  # a batch with rows: it is written
        w.after_commit_each("finished", "a", lambda items: calls.append(("finished", list(items))))
        w.after_commit(lambda: calls.append("DONE a"))
        w.after_commit_each("finished", "b", lambda items: calls.append(("never called", items)))
        await asyncio.sleep(0)  # the writer takes the batch (a, b) and waits in its write
        w._batch.keys.append("another row")  # type: ignore[arg-type]
        w.after_commit_each("finished", "c", lambda items: calls.append(("finished", list(items))))
        gate.set()
        await asyncio.wait_for(w.committed(), 5)
        await w.stop_writer(5)

    asyncio.run(go())
    if fail:
        assert calls == ["DONE a", ("finished", ["a", "b", "c"])]
    else:
        assert calls == ["DONE a", ("finished", ["a", "b"]), ("finished", ["c"])]


def test_a_batch_absorbs_grouped_items() -> None:
    older, newer = Batch(), Batch()
    fn = print
    older.groups["finished"] = (fn, [1])
    newer.groups["finished"] = (fn, [2])
    newer.groups["other"] = (fn, [3])
    older.absorb(newer)
    assert older.groups == {"finished": (fn, [1, 2]), "other": (fn, [3])}
    assert Batch(groups={"k": (fn, [])})


def _started(fake_write: Any) -> GroupCommitWriter:
    """A writer whose ``_write`` is ``fake_write``, its loop started."""
    w = GroupCommitWriter("postgresql://unused", {})
    w._write = fake_write.__get__(w)  # type: ignore[method-assign]
    w.start_writer()
    return w


def _stage_row(w: GroupCommitWriter, name: str, log: list[str]) -> None:
    """A row to write (an idempotency key named ``name``) and the ACCEPTED that waits for it."""
    w._batch.keys.append(name)  # type: ignore[arg-type]
    w.after_commit(lambda: log.append(f"ACCEPTED {name}"))


def test_a_commits_actions_run_once_the_next_commit_is_sent() -> None:
    """The writer's chain is serial: while one commit's actions run, Postgres already executes the
    next batch (staged meanwhile); with nothing staged, the actions run at once. Either way they
    run after their own commit and before the next commit's actions."""
    log: list[str] = []
    gate = asyncio.Event()

    async def fake_write(self: GroupCommitWriter, batch: Batch) -> None:
        name = ",".join(str(r) for r in batch.keys)
        log.append(f"send {name}")
        if name == "a":
            await gate.wait()
        else:
            await asyncio.sleep(0.01)
        log.append(f"done {name}")

    async def go() -> None:
        w = _started(fake_write)
        _stage_row(w, "a", log)
        await asyncio.sleep(0)  # the writer sends a and waits for it
        _stage_row(w, "b", log)
        gate.set()
        await asyncio.wait_for(w.committed(), 5)
        await w.stop_writer(5)

    asyncio.run(go())
    assert log == ["send a", "done a", "send b", "ACCEPTED a", "done b", "ACCEPTED b"]


def test_a_cancelled_writer_takes_its_commit_in_flight_with_it() -> None:
    """stop_writer gives up by cancelling the writer; a commit it had just started (while it yields
    for that commit to send its statement) is cancelled too, never left running on its own."""
    log: list[str] = []

    async def fake_write(self: GroupCommitWriter, batch: Batch) -> None:
        name = ",".join(str(r) for r in batch.keys)
        log.append(f"send {name}")
        if name == "b":
            assert self._writer is not None
            self._writer.cancel()  # the writer is in its yield right after starting this commit
        try:
            await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            log.append(f"cancelled {name}")
            raise
        log.append(f"done {name}")

    async def go() -> None:
        w = _started(fake_write)
        _stage_row(w, "a", log)
        await asyncio.sleep(0)  # the writer sends a and waits for it
        _stage_row(w, "b", log)
        await asyncio.sleep(0.1)
        assert w._writer is not None and w._writer.cancelled()

    asyncio.run(go())
    assert log == ["send a", "done a", "send b", "cancelled b"]


def test_a_batch_of_actions_only_runs_at_once_without_a_commit() -> None:
    """A batch with no rows (a report that waited for the commit in flight, ``committed()``) is not
    written: its actions run as soon as the commit before it returns, right after that commit's
    actions, and it adds no commit to the metrics."""
    log: list[str] = []
    durations: list[float] = []
    gate = asyncio.Event()

    async def fake_write(self: GroupCommitWriter, batch: Batch) -> None:
        log.append(f"write {len(batch.keys)}")
        await gate.wait()

    async def go() -> None:
        w = _started(fake_write)
        w.on_commit = durations.append
        _stage_row(w, "a", log)
        await asyncio.sleep(0)  # the writer writes a and waits
        w.after_commit(lambda: log.append("replay RESULT a"))  # actions only
        gate.set()
        await asyncio.wait_for(w.committed(), 5)
        await w.stop_writer(5)

    asyncio.run(go())
    assert log == ["write 1", "ACCEPTED a", "replay RESULT a"]
    assert len(durations) == 1
