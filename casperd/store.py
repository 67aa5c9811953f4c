"""Durable task state in Postgres (psycopg 3, async pool) with group commit.

Theory of operation: the broker changes a :class:`TaskRecord` in memory, then *stages* it with
``stage(record, event)`` and registers what may only happen once that change is durable with
``after_commit(fn)`` (an ACCEPTED to a submitter, a TASK to a worker, a DONE to a waiter). One
writer coroutine takes everything staged so far — however many changes from however many peers —
writes it in one transaction (COPY into a staging table, one INSERT for new rows, one UPDATE for
changed rows, COPY of the events), commits, and only then runs the callbacks. So every state
change is committed before it is acted on, and a thousand changes cost one fsync.

If a commit fails (Postgres down or restarting), the batch is put back in front of newer changes
and retried with backoff; nothing waiting on it is released until it commits.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.resources
import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from casperd.breaker import CircuitBreaker
from casperd.errors import MigrationError, StorageError
from casperd.lifecycle import TERMINAL, Status
from casperd.messages import task_created_at
from casperd.taskrecord import TaskEvent, TaskRecord

log = logging.getLogger("casperd.store")

# Writes take the whole batch as ONE json parameter, expanded server-side by
# json_populate_recordset: a single round trip per statement whatever the batch size, and the
# rows are serialised by hand-built JSON text (C-speed joins) instead of per-value adapters.
_TASK_COLS = (
    "id",
    "created_at",
    "parent_id",
    "type",
    "status",
    "priority",
    "requires",
    "affinity",
    "idempotency_key",
    "cache",
    "attempts",
    "max_attempts",
    "timeout_s",
    "assigned_to",
    "lease_deadline",
    "not_before",
    "submitted_by",
    "assigned_at",
    "started_at",
    "validating_at",
    "finished_at",
    "updated_at",
    "input",
    "output",
    "error",
)
_MUTABLE = (
    "status",
    "attempts",
    "assigned_to",
    "lease_deadline",
    "not_before",
    "assigned_at",
    "started_at",
    "validating_at",
    "finished_at",
    "updated_at",
    "output",
    "error",
)
_INSERT_NEW = (
    f"INSERT INTO tasks ({', '.join(_TASK_COLS)}) SELECT {', '.join(_TASK_COLS)} "
    "FROM json_populate_recordset(NULL::tasks, %s::json) ON CONFLICT (id, created_at) DO NOTHING"
)
_UPDATE_OLD = (
    "UPDATE tasks t SET "
    + ", ".join(f"{c} = u.{c}" for c in _MUTABLE)
    + " FROM json_populate_recordset(NULL::tasks, %s::json) u WHERE t.id = u.id AND t.created_at = u.created_at"
)
_INSERT_EVENTS = (
    "INSERT INTO task_events (at, task_id, from_status, to_status, peer, attempt, detail) "
    "SELECT at, task_id, from_status, to_status, peer, attempt, detail "
    "FROM json_populate_recordset(NULL::task_events, %s::json)"
)
_INSERT_KEYS = (
    "INSERT INTO task_idempotency (key, task_id, created_at) "
    "SELECT key, task_id, created_at FROM json_populate_recordset(NULL::task_idempotency, %s::json) "
    "ON CONFLICT (key) DO NOTHING"
)
# The whole group commit as ONE statement (data-modifying CTEs run atomically): one round trip per
# commit in autocommit mode. A record is either new or persisted, never both in one batch, so the
# CTEs never touch the same row (they all see the same snapshot).
_COMMIT_ALL = (
    f"WITH new AS ({_INSERT_NEW} RETURNING 1), upd AS ({_UPDATE_OLD} RETURNING 1), "
    f"keys AS ({_INSERT_KEYS} RETURNING 1), ev AS ({_INSERT_EVENTS} RETURNING 1) "
    "SELECT (SELECT count(*) FROM new), (SELECT count(*) FROM upd), (SELECT count(*) FROM keys), "
    "(SELECT count(*) FROM ev)"
)
_OPEN_STATUSES = [s.value for s in Status if s not in TERMINAL]
_dumps = json.dumps


def _s(v: Any) -> str:
    return "null" if v is None else _dumps(v)


@functools.lru_cache(maxsize=8192)
def _iso(v: Any) -> str:
    return f'"{v.isoformat()}"'  # a batch shares a few timestamps: formatted once each


def _t(v: Any) -> str:
    return "null" if v is None else _iso(v)


def _u(v: Any) -> str:
    return "null" if v is None else f'"{v}"'


def _new_json(r: TaskRecord) -> str:
    return (
        f'{{"id":"{r.id}","created_at":{_t(r.created_at)},"parent_id":{_u(r.parent_id)},"type":{_s(r.type)},'
        f'"status":"{r.status.value}","priority":{r.priority},"requires":{_dumps(list(r.requires))},'
        f'"affinity":{_s(r.affinity)},"idempotency_key":{_s(r.idempotency_key)},'
        f'"cache":{"true" if r.cache else "false"},"attempts":{r.attempts},"max_attempts":{r.max_attempts},'
        f'"timeout_s":{_s(r.timeout_s)},"submitted_by":{_s(r.submitted_by)},"input":{r.input_json},'
        + _mutable_json(r)
        + "}"
    )


def _mutable_json(r: TaskRecord) -> str:
    return (
        f'"assigned_to":{_s(r.assigned_to)},"lease_deadline":{_t(r.lease_deadline)},'
        f'"not_before":{_t(r.not_before)},"assigned_at":{_t(r.assigned_at)},"started_at":{_t(r.started_at)},'
        f'"validating_at":{_t(r.validating_at)},"finished_at":{_t(r.finished_at)},"updated_at":{_t(r.updated_at)},'
        f'"output":{r.output_json or "null"},"error":{r.error_json or "null"}'
    )


def _update_json(r: TaskRecord) -> str:
    return (
        f'{{"id":"{r.id}","created_at":{_t(r.created_at)},"status":"{r.status.value}",'
        f'"attempts":{r.attempts},' + _mutable_json(r) + "}"
    )


def _event_json(e: TaskEvent) -> str:
    return (
        f'{{"at":{_t(e.at)},"task_id":"{e.task_id}","from_status":{_s(e.from_status)},'
        f'"to_status":"{e.to_status}","peer":{_s(e.peer)},"attempt":{e.attempt},'
        f'"detail":{e.detail_json or "null"}}}'
    )


@dataclass(slots=True)
class _Batch:
    dirty: dict[uuid.UUID, TaskRecord] = field(default_factory=dict)
    events: list[TaskEvent] = field(default_factory=list)
    keys: list[tuple[str, uuid.UUID, Any]] = field(default_factory=list)
    after: list[Callable[[], None]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.dirty or self.events or self.keys or self.after)


Rows = list[dict[str, Any]]
"""Rows as dicts (an alias: ``Store.list`` would shadow the builtin in annotations inside the class)."""


class Store:
    """Postgres adapter: migrations, group-committed writes, and the queries caspectl needs."""

    def __init__(self, url: str, *, pool_size: int = 4, batch_max: int = 2000, password: str | None = None) -> None:
        self.url = url
        # a password given apart from the URL never appears in it (nor in logs or errors)
        self._conn_kwargs: dict[str, Any] = {"password": password} if password else {}
        self.pool = AsyncConnectionPool(
            url,
            min_size=1,
            max_size=max(2, pool_size),
            open=False,
            kwargs={"autocommit": False, **self._conn_kwargs},
            name="casper",
        )
        self.batch_max = batch_max
        self._batch = _Batch()
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        self.commits = 0
        self.rows_written = 0
        self.commit_failures = 0
        self.healthy = True
        self.last_error: str | None = None
        self.on_commit: Callable[[float], None] | None = None
        self.query_timeout_s = 2.0
        self.breaker = CircuitBreaker(failure_threshold=3, recovery_s=5.0)
        self._wconn: psycopg.AsyncConnection[Any] | None = None

    # --- lifecycle ----------------------------------------------------------------------------
    async def open(self, timeout: float = 30.0) -> None:
        try:
            await self.pool.open(wait=True, timeout=timeout)
        except Exception as exc:
            raise StorageError(
                f"cannot connect to Postgres at {redact_url(self.url)}: {exc}",
                hint="check --database-url / CASPER_DATABASE_URL and that the server is up",
            ) from None
        self._writer = asyncio.create_task(self._write_loop(), name="store-writer")

    async def close(self, timeout: float = 10.0) -> None:
        """Flush what is staged (bounded by ``timeout``), then close the pool."""
        self._closing = True
        self._wake.set()
        if self._writer is not None:
            try:
                await asyncio.wait_for(self._writer, timeout)
            except (TimeoutError, asyncio.CancelledError):
                self._writer.cancel()
                log.warning("store: %d staged changes were not written before shutdown", len(self._batch.dirty))
        if self._wconn is not None:
            await self._wconn.close()
        await self.pool.close()

    # --- migrations ---------------------------------------------------------------------------
    async def migrate(self) -> list[str]:
        """Apply every numbered migration in ``sql/`` not yet recorded; returns those applied."""
        files = sorted(
            (p for p in importlib.resources.files("casperd.sql").iterdir() if re.match(r"^\d{3}_.*\.sql$", p.name)),
            key=lambda p: p.name,
        )
        applied: list[str] = []
        async with self.pool.connection() as conn:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(727379)")
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, name text NOT NULL,"
                    " applied_at timestamptz NOT NULL DEFAULT now())"
                )
                cur = await conn.execute("SELECT version FROM schema_migrations")
                done = {r[0] for r in await cur.fetchall()}
                for path in files:
                    version = int(path.name[:3])
                    if version in done:
                        continue
                    try:
                        await conn.execute(path.read_text())
                    except psycopg.Error as exc:
                        raise MigrationError(
                            f"migration {path.name} failed: {exc}",
                            hint="fix the database or the migration, then run casperd migrate",
                        ) from None
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (version, path.name)
                    )
                    applied.append(path.name)
            await self.ensure_partitions(conn)
        return applied

    async def ensure_partitions(self, conn: psycopg.AsyncConnection[Any] | None = None, months: int = 2) -> int:
        async with contextlib.AsyncExitStack() as stack:
            if conn is None:
                conn = await stack.enter_async_context(self.pool.connection())
            cur = await conn.execute("SELECT casper_ensure_partitions(%s)", (months,))
            row = await cur.fetchone()
            await conn.commit()
            return int(row[0]) if row else 0

    # --- group commit -------------------------------------------------------------------------
    def stage(self, rec: TaskRecord, event: TaskEvent | None = None) -> None:
        self._batch.dirty[rec.id] = rec
        if event is not None:
            self._batch.events.append(event)
        self._wake.set()

    def stage_key(self, key: str, task_id: uuid.UUID, created_at: Any) -> None:
        self._batch.keys.append((key, task_id, created_at))

    def after_commit(self, fn: Callable[[], None]) -> None:
        self._batch.after.append(fn)
        self._wake.set()

    async def committed(self) -> None:
        """Wait until everything staged so far is committed."""
        fut = asyncio.get_running_loop().create_future()
        self.after_commit(lambda: fut.done() or fut.set_result(None))
        await fut

    @property
    def staged(self) -> int:
        return len(self._batch.dirty)

    async def _write_loop(self) -> None:
        delay = 0.05
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._batch:
                if self._closing:
                    return
                continue
            batch, self._batch = self._batch, _Batch()
            t0 = time.perf_counter()
            try:
                await self._write(batch)
            except Exception as exc:
                self.commit_failures += 1
                self.healthy = False
                self.breaker.record_failure(time.monotonic())
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.error(
                    "store: commit of %d changes failed (%s); retrying in %.2fs",
                    len(batch.dirty),
                    self.last_error,
                    delay,
                )
                self._requeue(batch)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                self._wake.set()
                continue
            delay = 0.05
            self.healthy = True
            self.breaker.record_success()
            if self.on_commit is not None:
                self.on_commit(time.perf_counter() - t0)
            for rec in batch.dirty.values():
                rec.persisted = True
            for fn in batch.after:
                try:
                    fn()
                except Exception:
                    log.exception("store: after-commit action failed")
            if self._closing and not self._batch:
                return

    def _requeue(self, batch: _Batch) -> None:
        newer = self._batch
        batch.dirty.update(newer.dirty)
        batch.events.extend(newer.events)
        batch.keys.extend(newer.keys)
        batch.after.extend(newer.after)
        self._batch = batch

    async def _writer_conn(self) -> psycopg.AsyncConnection[Any]:
        """The writer's own connection (no pool round trips on the hot path); remade after a failure."""
        if self._wconn is None or self._wconn.closed or self._wconn.broken:
            # autocommit: each group commit is one statement, hence one transaction and one round trip
            self._wconn = await psycopg.AsyncConnection.connect(self.url, autocommit=True, **self._conn_kwargs)
            # the writer runs the same few statements on a partitioned table thousands of times:
            # plan them once (planning them each time cost more than executing them)
            await self._wconn.execute("SET plan_cache_mode = force_generic_plan")
        return self._wconn

    async def _write(self, batch: _Batch) -> None:
        new = [_new_json(r) for r in batch.dirty.values() if not r.persisted]
        old = [_update_json(r) for r in batch.dirty.values() if r.persisted]
        keys = ",".join(f'{{"key":{_dumps(k)},"task_id":"{t}","created_at":{_t(c)}}}' for k, t, c in batch.keys)
        conn = await self._writer_conn()
        await conn.execute(
            _COMMIT_ALL,
            (
                "[" + ",".join(new) + "]",
                "[" + ",".join(old) + "]",
                "[" + keys + "]",
                "[" + ",".join(map(_event_json, batch.events)) + "]",
            ),
            prepare=True,
        )
        self.commits += 1
        self.rows_written += len(batch.dirty)

    # --- queries ------------------------------------------------------------------------------
    async def load_open(self) -> Rows:
        """Every task not in a terminal state (the broker's restart query)."""
        return await self._fetch(
            "SELECT * FROM tasks WHERE status = ANY(%s) ORDER BY priority DESC, created_at", (_OPEN_STATUSES,)
        )

    async def get(self, task_id: uuid.UUID) -> dict[str, Any] | None:
        if task_id.version != 7:  # not one of ours (any UUID may be asked for): no time to prune by
            rows = await self._fetch("SELECT * FROM tasks WHERE id = %s", (task_id,))
            return rows[0] if rows else None
        try:
            created = datetime.fromtimestamp(task_created_at(task_id), UTC)  # prunes to one partition
        except (ValueError, OverflowError, OSError):
            return None  # a "UUIDv7" whose time is out of range was never created here
        rows = await self._fetch("SELECT * FROM tasks WHERE id = %s AND created_at = %s", (task_id, created))
        return rows[0] if rows else None

    async def list(self, status: str | None, limit: int) -> Rows:
        if status:
            return await self._fetch("SELECT * FROM tasks WHERE status = %s ORDER BY id DESC LIMIT %s", (status, limit))
        return await self._fetch("SELECT * FROM tasks ORDER BY id DESC LIMIT %s", (limit,))

    async def events(self, task_id: uuid.UUID) -> Rows:
        return await self._fetch(
            "SELECT at, from_status, to_status, peer, attempt, detail FROM task_events WHERE task_id = %s ORDER BY id",
            (task_id,),
        )

    async def counts(self) -> dict[str, int]:
        rows = await self._fetch("SELECT status, count(*) AS n FROM tasks GROUP BY status", ())
        return {r["status"]: int(r["n"]) for r in rows}

    async def idempotency(self, keys: list[str]) -> dict[str, uuid.UUID]:
        rows = await self._fetch("SELECT key, task_id FROM task_idempotency WHERE key = ANY(%s)", (keys,))
        return {r["key"]: r["task_id"] for r in rows}

    async def ping(self) -> float:
        t0 = time.perf_counter()
        await self._fetch("SELECT 1 AS one", ())
        return time.perf_counter() - t0

    async def _fetch(self, sql: str, params: tuple[Any, ...]) -> Rows:
        """A read query, guarded by the store's circuit breaker: while Postgres keeps failing,
        queries fail at once (no pile-up of waiting requests) until a half-open probe succeeds."""
        now = time.monotonic()
        if not self.breaker.allow(now):
            raise StorageError(
                "the database is unavailable (circuit breaker open after repeated failures)",
                hint=f"retry in a few seconds; last error: {self.last_error}",
            )
        try:
            rows = await self._query(sql, params)
        except StorageError as exc:
            self.breaker.record_failure(time.monotonic())
            self.last_error = exc.message
            raise
        self.breaker.record_success()
        return rows

    async def execute(self, sql: str, params: tuple[Any, ...] | list[tuple[Any, ...]], *, many: bool = False) -> None:
        """A write outside the group commit (agent records), committed before it returns."""
        now = time.monotonic()
        if not self.breaker.allow(now):
            raise StorageError(
                "the database is unavailable (circuit breaker open after repeated failures)",
                hint=f"retry in a few seconds; last error: {self.last_error}",
            )
        try:
            async with self.pool.connection(timeout=self.query_timeout_s) as conn:
                async with conn.cursor() as cur:
                    if many:
                        await cur.executemany(sql, params)  # type: ignore[arg-type]
                    else:
                        await cur.execute(sql, params)  # type: ignore[arg-type]
                await conn.commit()
        except psycopg.Error as exc:
            self.breaker.record_failure(time.monotonic())
            self.last_error = str(exc)
            raise StorageError(f"write failed: {exc}", hint="is Postgres up? see caspectl health") from None
        except PoolTimeout:
            self.breaker.record_failure(time.monotonic())
            raise StorageError(
                f"no database connection within {self.query_timeout_s:g}s", hint="is Postgres up? see caspectl health"
            ) from None
        self.breaker.record_success()

    async def fetch(self, sql: str, params: tuple[Any, ...]) -> Rows:
        """A read query for other modules (the agents' records), behind the same breaker."""
        return await self._fetch(sql, params)

    async def _query(self, sql: str, params: tuple[Any, ...]) -> Rows:
        try:
            # a short wait for a connection: with Postgres down, answer "unavailable" in seconds,
            # not after the pool's 30 s default (the control loop waits for this answer)
            async with self.pool.connection(timeout=self.query_timeout_s) as conn:
                async with conn.cursor(row_factory=dict_row) as cur:
                    await cur.execute(sql, params)
                    rows = await cur.fetchall()
                await conn.rollback()
                return rows
        except psycopg.Error as exc:
            raise StorageError(f"query failed: {exc}", hint="is Postgres up? see caspectl health") from None
        except PoolTimeout:
            raise StorageError(
                f"no database connection within {self.query_timeout_s:g}s", hint="is Postgres up? see caspectl health"
            ) from None


def redact_url(url: str) -> str:
    """A connection URL with any password replaced, fit for logs and errors."""
    from casperd.logsetup import redact

    return redact(url)


def record_from_row(row: dict[str, Any]) -> TaskRecord:
    def js(v: Any) -> str | None:
        return None if v is None else json.dumps(v, separators=(",", ":"))

    return TaskRecord(
        id=row["id"],
        created_at=row["created_at"],
        type=row["type"],
        input_json=js(row["input"]) or "{}",
        status=Status(row["status"]),
        priority=row["priority"],
        requires=tuple(row["requires"] or ()),
        affinity=row["affinity"],
        idempotency_key=row["idempotency_key"],
        cache=row["cache"],
        attempts=row["attempts"],
        max_attempts=row["max_attempts"],
        timeout_s=row["timeout_s"],
        parent_id=row["parent_id"],
        assigned_to=row["assigned_to"],
        lease_deadline=row["lease_deadline"],
        not_before=row["not_before"],
        submitted_by=row["submitted_by"],
        assigned_at=row["assigned_at"],
        started_at=row["started_at"],
        validating_at=row["validating_at"],
        finished_at=row["finished_at"],
        updated_at=row["updated_at"],
        output_json=js(row["output"]),
        error_json=js(row["error"]),
        persisted=True,
    )
