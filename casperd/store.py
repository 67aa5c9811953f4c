"""Durable task state in Postgres (psycopg 3): migrations, the group-committed writer, and queries.

Writes go through the group-commit writer (:mod:`casperd.groupcommit`, which this class extends):
every state change is committed before it is acted on. Reads (caspectl, the restart query, agent
records) use a small connection pool behind a circuit breaker.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import json
import logging
import re
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from casperd.errors import MigrationError, StorageError
from casperd.groupcommit import GroupCommitWriter
from casperd.lifecycle import QUEUED, TERMINAL, Status
from casperd.messages import task_created_at
from casperd.taskrecord import TaskRecord, shared_times

log = logging.getLogger("casperd.store")

_OPEN_STATUSES = [s.value for s in Status if s not in TERMINAL]
_QUEUED_STATUSES = [s.value for s in QUEUED]
_ROW_BUT_INPUT = (
    "t.id, t.created_at, t.parent_id, t.type, t.status, t.priority, t.requires, t.affinity, t.idempotency_key,"
    " t.cache, t.attempts, t.max_attempts, t.timeout_s, t.assigned_to, t.lease_deadline, t.not_before,"
    " t.submitted_by, t.assigned_at, t.started_at, t.validating_at, t.finished_at, t.updated_at, t.output, t.error"
)
"""Every column of ``tasks`` but ``input`` (a restart leaves large queued inputs in Postgres)."""


Rows = list[dict[str, Any]]
"""Rows as dicts (an alias: ``Store.list`` would shadow the builtin in annotations inside the class)."""


class Store(GroupCommitWriter):
    """Postgres adapter: migrations, group-committed writes, and the queries caspectl needs."""

    def __init__(self, url: str, *, pool_size: int = 4, batch_max: int = 2000, password: str | None = None) -> None:
        # a password given apart from the URL never appears in it (nor in logs or errors)
        conn_kwargs: dict[str, Any] = {"password": password} if password else {}
        super().__init__(url, conn_kwargs, batch_max=batch_max)
        self.pool = AsyncConnectionPool(
            url,
            min_size=1,
            max_size=max(2, pool_size),
            open=False,
            kwargs={"autocommit": False, **conn_kwargs},
            name="casper",
        )
        self.query_timeout_s = 2.0

    # --- lifecycle ----------------------------------------------------------------------------
    async def open(self, timeout: float = 30.0) -> None:
        try:
            await self.pool.open(wait=True, timeout=timeout)
        except Exception as exc:
            raise StorageError(
                f"cannot connect to Postgres at {redact_url(self.url)}: {exc}",
                hint="check --database-url / CASPER_DATABASE_URL and that the server is up",
            ) from None
        self.start_writer()

    async def close(self, timeout: float = 10.0) -> None:
        """Flush what is staged (bounded by ``timeout``), then close the pool."""
        await self.stop_writer(timeout)
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

    # --- queries ------------------------------------------------------------------------------
    async def load_open(self, inline_input_bytes: int, batch: int = 5000) -> AsyncIterator[Rows]:
        """Every task not in a terminal state (the broker's restart query), ``batch`` rows at a time
        from a server-side cursor: the caller turns each batch into records before the next is
        read, so a restart's memory peak is one batch of rows, not the whole queue's. A queued task's
        input larger than ``inline_input_bytes`` is left in Postgres (``input`` NULL,
        ``input_spilled`` true): it is read when the task is dispatched (:meth:`inputs`).

        Raises:
            StorageError: Postgres is unavailable or the query failed.
        """
        sql = (
            f"SELECT {_ROW_BUT_INPUT}, s.spilled AS input_spilled, CASE WHEN s.spilled THEN NULL ELSE t.input END"
            " AS input FROM tasks t CROSS JOIN LATERAL (SELECT t.status = ANY(%s)"
            " AND octet_length(t.input::text) > %s AS spilled) s"
            " WHERE t.status = ANY(%s) ORDER BY t.priority DESC, t.created_at"
        )
        with self._guarded("query"):
            async with (
                self.pool.connection(timeout=self.query_timeout_s) as conn,
                conn.transaction(),
                conn.cursor(name="casper_load_open", row_factory=dict_row) as cur,
            ):
                await cur.execute(sql, (_QUEUED_STATUSES, inline_input_bytes, _OPEN_STATUSES))
                while rows := await cur.fetchmany(batch):
                    yield rows

    async def inputs(self, task_ids: list[uuid.UUID]) -> dict[uuid.UUID, str]:
        """The inputs (JSON text) of these tasks, for dispatching those whose input waited here."""
        if not task_ids:
            return {}
        times = [datetime.fromtimestamp(task_created_at(t), UTC) for t in task_ids]  # prunes partitions
        rows = await self._fetch(
            "SELECT id, input::text AS input FROM tasks WHERE id = ANY(%s) AND created_at BETWEEN %s AND %s",
            (task_ids, min(times), max(times)),
        )
        return {r["id"]: r["input"] for r in rows if r["input"] is not None}

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

    @contextlib.contextmanager
    def _guarded(self, what: str) -> Iterator[None]:
        """Postgres work behind the store's circuit breaker: while Postgres keeps failing, it fails
        at once (no pile-up of waiting requests) until a half-open probe succeeds; psycopg's
        failures become :class:`StorageError` and count against the breaker."""
        if not self.breaker.allow(time.monotonic()):
            raise StorageError(
                "the database is unavailable (circuit breaker open after repeated failures)",
                hint=f"retry in a few seconds; last error: {self.last_error}",
            )
        hint = "is Postgres up? see caspectl health"
        try:
            yield
        except psycopg.Error as exc:
            err = StorageError(f"{what} failed: {exc}", hint=hint)
        except PoolTimeout:
            # a short wait for a connection: with Postgres down, answer "unavailable" in seconds,
            # not after the pool's 30 s default (the control loop waits for this answer)
            err = StorageError(f"no database connection within {self.query_timeout_s:g}s", hint=hint)
        else:
            self.breaker.record_success()
            return
        self.breaker.record_failure(time.monotonic())
        self.last_error = err.message
        raise err from None

    async def _fetch(self, sql: str, params: tuple[Any, ...]) -> Rows:
        """A read query, guarded by the store's circuit breaker (:meth:`_guarded`)."""
        with self._guarded("query"):
            async with self.pool.connection(timeout=self.query_timeout_s) as conn:
                async with conn.cursor(row_factory=dict_row) as cur:
                    await cur.execute(sql, params)
                    rows = await cur.fetchall()
                await conn.rollback()
        return rows

    async def execute(self, sql: str, params: tuple[Any, ...] | list[tuple[Any, ...]], *, many: bool = False) -> None:
        """A write outside the group commit (agent records), committed before it returns."""
        with self._guarded("write"):
            async with self.pool.connection(timeout=self.query_timeout_s) as conn:
                async with conn.cursor() as cur:
                    if many:
                        await cur.executemany(sql, params)  # type: ignore[arg-type]
                    else:
                        await cur.execute(sql, params)  # type: ignore[arg-type]
                await conn.commit()

    async def fetch(self, sql: str, params: tuple[Any, ...]) -> Rows:
        """A read query for other modules (the agents' records), behind the same breaker."""
        return await self._fetch(sql, params)


def redact_url(url: str) -> str:
    """A connection URL with any password replaced, fit for logs and errors."""
    from casperd.logsetup import redact

    return redact(url)


def record_from_row(row: dict[str, Any]) -> TaskRecord:
    def js(v: Any) -> str | None:
        return None if v is None else json.dumps(v, separators=(",", ":"))

    created, updated = shared_times(row["id"], row["created_at"], row["updated_at"])
    return TaskRecord(
        id=row["id"],
        created_at=created,
        type=sys.intern(row["type"]),
        input_json=None if row.get("input_spilled") else js(row["input"]) or "{}",
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
        submitted_by=None if row["submitted_by"] is None else sys.intern(row["submitted_by"]),
        assigned_at=row["assigned_at"],
        started_at=row["started_at"],
        validating_at=row["validating_at"],
        finished_at=row["finished_at"],
        updated_at=updated,
        output_json=js(row["output"]),
        error_json=js(row["error"]),
        persisted=True,
    )
