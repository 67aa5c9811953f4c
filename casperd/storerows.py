"""The group commit's statement and row encoding (pure: no I/O).

A whole group commit is ONE statement: data-modifying CTEs run atomically, so in autocommit mode a
commit is one round trip. Each table's rows come as ONE json parameter, expanded server-side by
``json_to_recordset``; the rows are serialised by hand-built JSON text (C-speed joins)
instead of per-value adapters. A record is either new or persisted, never both in one batch, so
the CTEs never touch the same row (they all see the same snapshot).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from casperd.lifecycle import Status
from casperd.taskrecord import TaskEvent, TaskRecord

TASK_COLS = (
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
MUTABLE = (
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
# Postgres types of the row columns, for the column definition lists of ``json_to_recordset``: a
# record type spelled out in the statement costs less per commit than ``json_populate_recordset``'s
# ``NULL::tasks``, whose row type (25 columns, with the table's defaults and constraints) is copied
# at every execution; the UPDATE reads only the columns it sets.
COL_TYPES = {
    "id": "uuid",
    "created_at": "timestamptz",
    "parent_id": "uuid",
    "type": "text",
    "status": "text",
    "priority": "smallint",
    "requires": "text[]",
    "affinity": "text",
    "idempotency_key": "text",
    "cache": "boolean",
    "attempts": "integer",
    "max_attempts": "integer",
    "timeout_s": "double precision",
    "assigned_to": "text",
    "lease_deadline": "timestamptz",
    "not_before": "timestamptz",
    "submitted_by": "text",
    "assigned_at": "timestamptz",
    "started_at": "timestamptz",
    "validating_at": "timestamptz",
    "finished_at": "timestamptz",
    "updated_at": "timestamptz",
    "input": "jsonb",
    "output": "jsonb",
    "error": "jsonb",
}
EVENT_COLS = (
    ("at", "timestamptz"),
    ("task_id", "uuid"),
    ("from_status", "text"),
    ("to_status", "text"),
    ("peer", "text"),
    ("attempt", "integer"),
    ("detail", "jsonb"),
)
KEY_COLS = (("key", "text"), ("task_id", "uuid"), ("created_at", "timestamptz"))


def _recordset(alias: str, cols: tuple[tuple[str, str], ...]) -> str:
    return f"json_to_recordset(%s::json) AS {alias}({', '.join(f'{c} {t}' for c, t in cols)})"


def _names(cols: tuple[tuple[str, str], ...]) -> str:
    return ", ".join(c for c, _ in cols)


_TASK = tuple((c, COL_TYPES[c]) for c in TASK_COLS)
_CHANGE = tuple((c, COL_TYPES[c]) for c in ("id", "created_at", *MUTABLE))
# No conflict target: the conflict is then checked against every unique index of the partition
# routed to, which for ``tasks`` is its primary key alone (tests/integration/test_commit_sql.py
# checks that). Naming the target made Postgres map it to each partition's indexes through
# pg_inherits at every execution. A first send never meets an existing row (a batch re-sent after a
# failed commit uses _UPSERT_NEW below); DO NOTHING keeps a stray duplicate from failing the batch.
_NEW_ROWS = f"INSERT INTO tasks ({_names(_TASK)}) SELECT {_names(_TASK)} FROM {_recordset('r', _TASK)}"
_INSERT_NEW = _NEW_ROWS + " ON CONFLICT DO NOTHING"
# A batch re-sent after a failure that may have hidden a commit (the connection dropped after COMMIT
# but before its reply) holds tasks whose rows may already exist, some changed since: their latest
# state must replace the row the lost commit made, not be skipped. Only re-sent batches pay for the
# conflict target.
_UPSERT_NEW = (
    _NEW_ROWS + " ON CONFLICT (id, created_at) DO UPDATE SET " + ", ".join(f"{c} = EXCLUDED.{c}" for c in MUTABLE)
)
_UPDATE_OLD = (
    "UPDATE tasks t SET "
    + ", ".join(f"{c} = u.{c}" for c in MUTABLE)
    + f" FROM {_recordset('u', _CHANGE)} WHERE t.id = u.id AND t.created_at = u.created_at"
)
_INSERT_KEYS = (
    f"INSERT INTO task_idempotency ({_names(KEY_COLS)}) SELECT {_names(KEY_COLS)} "
    f"FROM {_recordset('k', KEY_COLS)} ON CONFLICT (key) DO NOTHING"
)
_INSERT_EVENTS = (
    f"INSERT INTO task_events ({_names(EVENT_COLS)}) SELECT {_names(EVENT_COLS)} FROM {_recordset('e', EVENT_COLS)}"
)
# A re-sent batch's events may be in the table already (written by the commit whose reply was
# lost): each is written only if its task has no event of the same time and transition (a probe of
# task_events_task_idx per event, paid by re-sent batches only).
_INSERT_EVENTS_ONCE = (
    _INSERT_EVENTS + " WHERE NOT EXISTS (SELECT 1 FROM task_events o WHERE o.task_id = e.task_id AND o.at = e.at "
    "AND o.to_status = e.to_status AND o.from_status IS NOT DISTINCT FROM e.from_status AND o.attempt = e.attempt)"
)
# The data-modifying CTEs run to completion whether or not anything reads them, so the statement
# returns no row: counting each part's rows (RETURNING into count(*) subqueries) cost an eighth of
# a small commit's CPU in Postgres.
_PARTS = (("new", _INSERT_NEW), ("upd", _UPDATE_OLD), ("keys", _INSERT_KEYS), ("ev", _INSERT_EVENTS))


def commit_sql(parts: tuple[bool, bool, bool, bool], *, resent: bool = False) -> str:
    """The group commit with only the parts a batch has (new tasks, updates, keys, events; their
    parameters in that order): Postgres starts every part of a statement whether or not its
    recordset is empty, 12-20% of a small commit's CPU for the two or three parts one task's
    commit leaves empty. ``resent``: the batch follows a commit whose outcome is unknown, so its new
    tasks' rows may exist already and are overwritten with their latest state, and an event already
    written is not written again."""
    named = (("new", _UPSERT_NEW), *_PARTS[1:3], ("ev", _INSERT_EVENTS_ONCE)) if resent else _PARTS
    chosen = [(name, sql) for (name, sql), on in zip(named, parts, strict=True) if on]
    if not chosen:
        raise ValueError("a group commit needs at least one part")
    *ctes, (_, main) = chosen
    return (f"WITH {', '.join(f'{name} AS ({sql})' for name, sql in ctes)} " if ctes else "") + main


COMMIT_ALL = commit_sql((True, True, True, True))
# The writer's session settings. Its statements join a json recordset to the partitioned tasks table
# by primary key. The plan must not depend on table statistics: a plan made while the current
# partition was empty (a fresh database, a new month) chose a hash join over a sequential scan of
# the partition, which after a burst of 20,000 tasks scanned every row and dead tuple on each commit
# until autoanalyze ran ("latency doubles after a burst"). With hash and merge joins off the only
# plan is a nested loop of primary-key probes, pruned to one partition per row at run time: cost
# O(batch x log(table)) whatever the statistics say. Generic plans are kept (planning this statement
# on a partitioned table costs more than executing it).
WRITER_SETTINGS = (
    "SET plan_cache_mode = force_generic_plan",
    "SET enable_hashjoin = off",
    "SET enable_mergejoin = off",
    "SET enable_seqscan = off",
)

_dumps = json.dumps
_STATUS = {s: s.value for s in Status}
"""Each status's text (``Enum.value`` is a Python property: a dict lookup is a sixth of its cost)."""


def _s(v: Any) -> str:
    return "null" if v is None else _dumps(v)


class _Memo(dict[Any, str]):
    """A value's JSON text, made once per value: a batch's rows share a few timestamps, types,
    statuses, node ids and submitters, and a task's rows and events share its id. A hit is a plain
    dict lookup (an ``lru_cache`` hit costs five times as much: its order list, its key tuple); when
    full it starts again empty."""

    __slots__ = ("limit", "make")

    def __init__(self, make: Callable[[Any], str], limit: int) -> None:
        super().__init__()
        self.make = make
        self.limit = limit

    def __missing__(self, key: Any) -> str:
        if len(self) >= self.limit:
            self.clear()
        text = self[key] = self.make(key)
        return text


def _id_of(v: int) -> str:
    """A task id's text (``str(uuid)``) from its integer: keyed by the int, whose hash is C code
    (a UUID's is Python)."""
    h = f"{v:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _time_of(v: Any) -> str:
    return "null" if v is None else f'"{v.isoformat()}"'


_MEMOS: list[_Memo] = []


def _memo(make: Callable[[Any], str], limit: int) -> Callable[[Any], str]:
    m = _Memo(make, limit)
    _MEMOS.append(m)
    return m.__getitem__


def forget_memos() -> None:
    """Empty every memo (when a burst has drained): their entries, made during the burst, are
    scattered over the allocator's arenas and would keep each arena's memory from going back to the
    OS (issue #13: idle RSS after a burst). Under load they fill again within a few commits."""
    for m in _MEMOS:
        m.clear()


_q = _memo(_s, 4096)
""":func:`_s` of a value from a small set (a type, a status, a node id, a submitter, a timeout)."""
_t = _memo(_time_of, 8192)
"""A timestamp's JSON text (``null`` for None)."""
_id_text = _memo(_id_of, 8192)
"""A task id's text, by ``uuid.int``."""
_req = _memo(lambda v: _dumps(list(v)), 1024)
"""A requirement tuple's JSON array."""


def _u(v: Any) -> str:
    return "null" if v is None else f'"{v}"'


def _event_tail_of(key: tuple[str | None, str, str | None, int, str | None]) -> str:
    from_status, to_status, peer, attempt, detail = key
    return (
        f'"from_status":{_q(from_status)},"to_status":"{to_status}","peer":{_q(peer)},"attempt":{attempt},'
        f'"detail":{detail or "null"}}}'
    )


_event_tail = _memo(_event_tail_of, 4096)
"""An event's fields after its task id, by (from, to, peer, attempt, detail): a few hundred
combinations between them, each formatted once."""


def new_json(r: TaskRecord) -> str:
    return (
        f'{{"id":"{_id_text(r.id.int)}","created_at":{_t(r.created_at)},'
        f'"parent_id":{"null" if r.parent_id is None else _u(r.parent_id)},"type":{_q(r.type)},'
        f'"status":"{_STATUS[r.status]}","priority":{r.priority},"requires":{_req(r.requires)},'
        f'"affinity":{"null" if r.affinity is None else _dumps(r.affinity)},'
        f'"idempotency_key":{"null" if r.idempotency_key is None else _dumps(r.idempotency_key)},'
        f'"cache":{"true" if r.cache else "false"},"attempts":{r.attempts},"max_attempts":{r.max_attempts},'
        f'"timeout_s":{_q(r.timeout_s)},"submitted_by":{_q(r.submitted_by)},"input":{r.input_json},'
        f'"assigned_to":{_q(r.assigned_to)},"lease_deadline":{_t(r.lease_deadline)},'
        f'"not_before":{_t(r.not_before)},"assigned_at":{_t(r.assigned_at)},"started_at":{_t(r.started_at)},'
        f'"validating_at":{_t(r.validating_at)},"finished_at":{_t(r.finished_at)},"updated_at":{_t(r.updated_at)},'
        f'"output":{r.output_json or "null"},"error":{r.error_json or "null"}}}'
    )


def update_json(r: TaskRecord) -> str:
    return (
        f'{{"id":"{_id_text(r.id.int)}","created_at":{_t(r.created_at)},"status":"{_STATUS[r.status]}",'
        f'"attempts":{r.attempts},'
        f'"assigned_to":{_q(r.assigned_to)},"lease_deadline":{_t(r.lease_deadline)},'
        f'"not_before":{_t(r.not_before)},"assigned_at":{_t(r.assigned_at)},"started_at":{_t(r.started_at)},'
        f'"validating_at":{_t(r.validating_at)},"finished_at":{_t(r.finished_at)},"updated_at":{_t(r.updated_at)},'
        f'"output":{r.output_json or "null"},"error":{r.error_json or "null"}}}'
    )


def event_json(e: TaskEvent) -> str:
    return f'{{"at":{_t(e[0])},"task_id":"{_id_text(e[1].int)}",' + _event_tail(e[2:])


def key_json(key: str, task_id: Any, created_at: Any) -> str:
    return f'{{"key":{_dumps(key)},"task_id":"{task_id}","created_at":{_t(created_at)}}}'


def commit_params(
    records: list[TaskRecord], events: list[TaskEvent], keys: list[tuple[str, Any, Any]]
) -> tuple[str, str, str, str]:
    """The four json parameters of :data:`COMMIT_ALL` for one batch."""
    return (
        "[" + ",".join([new_json(r) for r in records if not r.persisted]) + "]",
        "[" + ",".join([update_json(r) for r in records if r.persisted]) + "]",
        "[" + ",".join([key_json(k, t, c) for k, t, c in keys]) + "]",
        "[" + ",".join(map(event_json, events)) + "]",
    )
