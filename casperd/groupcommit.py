"""The group-commit writer: every staged change committed before anything acts on it.

Theory of operation: the broker changes a :class:`TaskRecord` in memory, then *stages* it with
``stage(record, event)`` and registers what may only happen once that change is durable with
``after_commit(fn)`` (an ACCEPTED to a submitter, a TASK to a worker, a DONE to a waiter). One
writer coroutine takes everything staged so far — however many changes from however many peers —
and writes it as ONE statement (data-modifying CTEs: insert new task rows, update changed ones,
insert idempotency keys and events, each from one json parameter; see :mod:`casperd.storerows`),
committed in autocommit mode (prepared once per connection and run on libpq directly, casperd.pgraw),
and only then runs the callbacks. So every state change is committed
before it is acted on, and a thousand changes cost one fsync. There is no fixed wait: a batch is
written as soon as the previous commit returns (no added latency at low load, large batches under
load).

Failures are of two kinds:

* *retryable* (the connection is lost, Postgres restarts, a serialization failure or deadlock): the
  batch is put back in front of newer changes and retried with backoff; nothing waiting on it is
  released until it commits, and the store reports itself unhealthy meanwhile;
* *permanent* (Postgres refuses a row: a character it cannot store, a constraint): the batch is
  split in halves, per task, and each half written on its own, so every other task commits and the
  one that Postgres refuses is isolated in a few round trips. A refused task is marked
  ``rejected`` (with a reason naming the SQLSTATE, never the row's data) and handed to
  ``on_reject``; the writer goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import errors as pgerr

from casperd.breaker import CircuitBreaker
from casperd.commitbatch import Batch
from casperd.pgraw import PreparedStatement
from casperd.storerows import WRITER_SETTINGS, commit_params, commit_sql
from casperd.taskrecord import TaskEvent, TaskRecord

log = logging.getLogger("casperd.store")

# Failures that say nothing about the rows: the same batch may commit on a later attempt.
RETRYABLE: tuple[type[BaseException], ...] = (
    psycopg.OperationalError,  # connection lost or refused, server shutting down, query cancelled
    psycopg.InterfaceError,  # the connection object is closed or broken
    pgerr.TransactionRollback,  # serialization failure, deadlock
    pgerr.InsufficientResources,  # disk full, out of memory, too many connections
    OSError,
    TimeoutError,
)


def is_retryable(exc: BaseException) -> bool:
    """Whether a failed commit may succeed unchanged later (else a row is at fault)."""
    return isinstance(exc, RETRYABLE) or not isinstance(exc, psycopg.Error)


def describe(exc: BaseException) -> str:
    """A failure named by class and SQLSTATE (and the constraint or column, if Postgres names one),
    never by message: Postgres messages may quote the row's data."""
    if not isinstance(exc, psycopg.Error):
        return type(exc).__name__
    out = f"{type(exc).__name__}"
    if exc.sqlstate:
        out += f" (SQLSTATE {exc.sqlstate})"
    diag = exc.diag
    for what, name in (("constraint", diag.constraint_name), ("column", diag.column_name)):
        if name:
            out += f", {what} {name}"
    return out


class PendingRetry(Exception):
    """A retryable failure after part of a batch committed: ``rest`` is what did not."""

    def __init__(self, cause: BaseException, rest: Batch) -> None:
        super().__init__(describe(cause))
        self.cause = cause
        self.rest = rest


class GroupCommitWriter:
    """Stages changes and writes them in group commits on its own autocommit connection."""

    def __init__(self, url: str, conn_kwargs: dict[str, Any], *, batch_max: int = 2000) -> None:
        self.url = url
        self._conn_kwargs = conn_kwargs
        self.batch_max = batch_max
        self._batch = Batch()
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        self._wconn: psycopg.AsyncConnection[Any] | None = None
        self._stmts: dict[tuple[bool, bool, bool, bool, bool], PreparedStatement] = {}
        self.commits = 0
        self.rows_written = 0
        # the writer's time, cumulative seconds: a commit in flight (its rows' encoding included),
        # the encoding alone, and the after-commit actions (run while the next commit is in flight)
        self.busy_s = 0.0
        self.encode_s = 0.0
        self.after_s = 0.0
        self.commit_failures = 0
        self.rejected = 0
        self.healthy = True
        self.last_error: str | None = None
        self.on_commit: Callable[[float], None] | None = None
        self.on_reject: Callable[[TaskRecord, str], None] | None = None
        self.breaker = CircuitBreaker(failure_threshold=3, recovery_s=5.0)

    # --- staging ------------------------------------------------------------------------------
    def stage(self, rec: TaskRecord, event: TaskEvent | None = None) -> None:
        self._batch.dirty[rec.id] = rec
        if event is not None:
            self._batch.events.append(event)
        self._wake.set()

    def stage_key(self, key: str, task_id: uuid.UUID, created_at: Any) -> None:
        self._batch.keys.append((key, task_id, created_at))

    def after_commit(self, fn: Callable[[], None], *, first: bool = False) -> None:
        """Run ``fn`` once everything staged so far is committed; ``first`` callbacks run before
        the others of the same commit (each kind in the order registered)."""
        (self._batch.first if first else self._batch.after).append(fn)
        self._wake.set()

    def after_commit_each(self, key: str, item: Any, fn: Callable[[list[Any]], None]) -> None:
        """Once everything staged so far is committed, call ``fn`` once with every item given under
        ``key`` for the same commit (after the ``after_commit`` callbacks): one callback per commit,
        not one closure per item."""
        group = self._batch.groups.get(key)
        if group is None:
            self._batch.groups[key] = (fn, [item])
            self._wake.set()
        else:
            group[1].append(item)

    async def committed(self) -> None:
        """Wait until everything staged so far is committed (or refused)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def settle() -> None:
            if not fut.done():
                fut.set_result(None)

        self.after_commit(settle)
        await fut

    @property
    def staged(self) -> int:
        return len(self._batch.dirty)

    # --- the writer ---------------------------------------------------------------------------
    def start_writer(self) -> None:
        self._writer = asyncio.create_task(self._write_loop(), name="store-writer")

    async def stop_writer(self, timeout: float) -> None:
        self._closing = True
        self._wake.set()
        if self._writer is not None:
            try:
                await asyncio.wait_for(self._writer, timeout)
            except (TimeoutError, asyncio.CancelledError):
                self._writer.cancel()
                log.warning("store: %d staged changes were not written before shutdown", len(self._batch.dirty))
        await self._drop_writer_conn()

    async def _write_loop(self) -> None:
        """Commit what is staged as soon as the previous commit returns. The actions of a commit
        run once the next commit's statement is sent (or at once, when nothing new is staged): the
        writer's chain is serial, so Postgres executes the next batch while they run."""
        delay = 0.05
        done: Batch | None = None  # committed; its actions not run yet
        while True:
            if done is None:
                await self._wake.wait()
            self._wake.clear()
            batch, self._batch = self._batch, Batch()
            if not batch.has_rows():
                # nothing to write, at most actions (a report that waited for a commit,
                # ``committed()``): what was staged before them is committed, so they run now,
                # after the previous commit's; what they stage sets the wake event again
                if done is not None:
                    self._run_actions(done)
                    done = None
                self._run_actions(batch)
                if self._closing and not self._batch:
                    return
                continue
            t0 = time.perf_counter()
            commit = asyncio.ensure_future(self._commit(batch))
            try:
                if done is not None:
                    await asyncio.sleep(0)  # the commit encodes and sends its statement first
                    self._run_actions(done)
                    done = None
                await commit
            except asyncio.CancelledError:
                commit.cancel()  # stop_writer gave up: the commit goes with the writer
                raise
            except PendingRetry as exc:
                self._failed(exc.rest, exc.cause, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                self._wake.set()
                continue
            delay = 0.05
            self.healthy = True
            self.breaker.record_success()
            t1 = time.perf_counter()
            self.busy_s += t1 - t0
            if self.on_commit is not None:
                self.on_commit(t1 - t0)
            done = batch

    def _run_actions(self, batch: Batch) -> None:
        """What waited for ``batch``'s commit, in order (SPEC 11), then its refused tasks."""
        t0 = time.perf_counter()
        for fn in (*batch.first, *batch.after):
            try:
                fn()
            except Exception:
                log.exception("store: after-commit action failed")
        for each, items in batch.groups.values():
            try:
                each(items)
            except Exception:
                log.exception("store: after-commit action failed")
        for rec in batch.refused:
            if self.on_reject is not None:
                try:
                    self.on_reject(rec, rec.rejected or "refused")
                except Exception:
                    log.exception("store: handling a refused task failed")
        self.after_s += time.perf_counter() - t0

    def _failed(self, rest: Batch, cause: BaseException, delay: float) -> None:
        self.commit_failures += 1
        self.healthy = False
        self.breaker.record_failure(time.monotonic())
        self.last_error = describe(cause)
        log.error("store: commit of %d changes failed (%s); retrying in %.2fs", len(rest.dirty), self.last_error, delay)
        rest.absorb(self._batch)
        rest.resent = True  # the failed commit may have been made: its reply is what was lost
        self._batch = rest

    async def _commit(self, batch: Batch) -> None:
        """Write ``batch``, in statements of at most ``batch_max`` tasks' rows each (a backlog left
        by a store outage is not one huge statement); the records Postgres refused go to
        ``batch.refused`` (their rows left out). Its callbacks run only once every part is written.

        Raises:
            PendingRetry: a retryable failure; ``rest`` holds every row not yet committed, with
                the batch's callbacks.
        """
        if len(batch.dirty) <= self.batch_max:
            await self._commit_rows(batch, batch)
            return
        ids = batch.task_ids()
        for start in range(0, len(ids), self.batch_max):
            try:
                await self._commit_rows(batch.subset(ids[start : start + self.batch_max]), batch)
            except PendingRetry as exc:  # this part's uncommitted rows, and every later part's
                exc.rest.absorb(batch.subset(ids[start + self.batch_max :]))
                raise

    async def _commit_rows(self, rows: Batch, batch: Batch) -> None:
        """Write ``rows`` (``batch`` or a part of it), isolating any row Postgres refuses; refused
        records go to ``batch.refused``. A retryable failure raises :class:`PendingRetry` whose
        ``rest`` holds the rows of ``rows`` not committed and ``batch``'s callbacks."""
        try:
            await self._write(rows)
            return
        except Exception as exc:
            if is_retryable(exc):
                raise PendingRetry(exc, self._with_callbacks(rows, batch)) from exc
            first = describe(exc)
        ids = rows.task_ids()
        log.warning("store: a group commit of %d tasks was refused (%s); isolating the row", len(ids), first)
        todo = [ids[len(ids) // 2 :], ids[: len(ids) // 2]] if len(ids) > 1 else []
        if len(ids) == 1:
            self._refuse(batch, ids[0], first)
        while todo:
            part = todo.pop()  # the earlier half first
            if not part:
                continue
            try:
                await self._write(rows.subset(part))
            except Exception as exc:
                if is_retryable(exc):
                    rest = rows.subset([t for chunk in (*todo, part) for t in chunk])
                    raise PendingRetry(exc, self._with_callbacks(rest, batch)) from exc
                if len(part) > 1:
                    todo += [part[len(part) // 2 :], part[: len(part) // 2]]
                else:
                    self._refuse(batch, part[0], describe(exc))

    @staticmethod
    def _with_callbacks(rest: Batch, batch: Batch) -> Batch:
        """``rest`` (rows of ``batch`` not committed) carrying ``batch``'s callbacks and refusals."""
        if rest is not batch:
            rest.first, rest.after, rest.refused, rest.groups = batch.first, batch.after, batch.refused, batch.groups
        return rest

    def _refuse(self, batch: Batch, task_id: uuid.UUID, reason: str) -> None:
        self.rejected += 1
        log.error("store: Postgres refused the rows of task %s (%s); the task is dropped", task_id, reason)
        rec = batch.dirty.get(task_id)
        if rec is not None:
            rec.rejected = reason
            batch.refused.append(rec)

    async def _writer_stmt(self, parts: tuple[bool, bool, bool, bool], resent: bool = False) -> PreparedStatement:
        """The group commit with these parts (storerows.commit_sql), prepared on the writer's own
        connection (no pool round trips on the hot path, no psycopg cursor per commit:
        casperd.pgraw) on its first use; the connection is remade after a failure."""
        conn = self._wconn
        if conn is None or conn.closed or conn.broken or any(s.broken for s in self._stmts.values()):
            await self._drop_writer_conn()
            # autocommit: each group commit is one statement, hence one transaction and one round trip
            conn = self._wconn = await psycopg.AsyncConnection.connect(self.url, autocommit=True, **self._conn_kwargs)
            for setting in WRITER_SETTINGS:
                await conn.execute(setting)
        key = (*parts, resent)
        stmt = self._stmts.get(key)
        if stmt is None:
            name = "casper_commit_" + "".join("1" if p else "0" for p in parts) + ("_resent" if resent else "")
            stmt = self._stmts[key] = await PreparedStatement.prepare(conn, name, commit_sql(parts, resent=resent))
        return stmt

    async def _drop_writer_conn(self) -> None:
        conn, self._wconn, self._stmts = self._wconn, None, {}
        if conn is not None and not conn.closed:
            with contextlib.suppress(Exception):
                await conn.close()

    async def _write(self, batch: Batch) -> None:
        t0 = time.perf_counter()
        records = list(batch.dirty.values())
        params = commit_params(records, batch.events, batch.keys)
        self.encode_s += time.perf_counter() - t0
        parts = (params[0] != "[]", params[1] != "[]", params[2] != "[]", params[3] != "[]")
        if not any(parts):
            return  # nothing to write (the write loop runs such a batch's actions without a commit)
        stmt = await self._writer_stmt(parts, batch.resent)
        try:
            await stmt.run([p for p, on in zip(params, parts, strict=True) if on])
        finally:
            if stmt.broken:  # its protocol state is unknown: the next commit gets a new connection
                await self._drop_writer_conn()
        self.commits += 1
        self.rows_written += len(records)
        for rec in records:
            rec.mark_persisted()  # a queued spilled input now waits in Postgres only
