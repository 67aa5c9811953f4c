"""An in-memory mesh for the sans-io cores: one PolicemanCore and any number of WorkerCores joined
by in-memory links, a store that commits when told, and a clock that moves only when told.

Everything is deterministic: no sockets, no threads, no asyncio, no real time. Frames are the real
codec's frames, so the cores are driven exactly as the shells drive them. A worker's "handler" is
the test: a started run stays running until the test finishes, fails or abandons it.
"""

from __future__ import annotations

import json
import random
import uuid
from collections import defaultdict, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from casperd import codec
from casperd.handlers import Catalog
from casperd.lifecycle import Status
from casperd.messages import Assignment, Done, DoneBatch, Heartbeat, Message, Submit, TaskSpec
from casperd.metrics import Metrics
from casperd.policeman import Now, PolicemanCore, Sender
from casperd.policeman.actions import (
    Arm,
    DoneFromStore,
    Finished,
    LoadInputs,
    Replay,
    RunLocal,
    SaveAttachments,
    Send,
    Serve,
    Socket,
    Stage,
    StageKey,
    Validate,
)
from casperd.settings import load_settings
from casperd.store import record_from_row
from casperd.taskrecord import TaskEvent, TaskRecord
from casperd.workercore import (
    AbortRun,
    Identity,
    ReadyLater,
    Reconnect,
    Resolve,
    SendFrames,
    StartRun,
    WorkerCore,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
POLICE_DEFAULTS: dict[str, Any] = {
    "role": "policeman",
    "node_id": "policeman",
    "heartbeat_s": 1.0,
    "heartbeat_misses": 3,
    "lease_s": 10.0,
    "max_attempts": 3,
    "backoff_base_s": 1.0,
    "backoff_cap_s": 4.0,
    "breaker_failures": 3,
    "breaker_recovery_s": 2.0,
}


@dataclass
class Row:
    """A committed row: what Postgres would hold."""

    rec: dict[str, Any]
    events: list[TaskEvent] = field(default_factory=list)


class LabWorker:
    def __init__(self, lab: Lab, node_id: str, capacity: int, epoch: str, caps: tuple[str, ...] = ()) -> None:
        self.lab = lab
        self.node_id = node_id
        self.epoch = epoch
        self.capacity = capacity
        self.settings = load_settings(
            {
                "role": "developer",
                "node_id": node_id,
                "capacity": capacity,
                "prefetch": 0,
                "heartbeat_s": lab.s.heartbeat_s,
                "heartbeat_misses": lab.s.heartbeat_misses,
                "lease_s": lab.s.lease_s,
                "capabilities": list(caps),
            }
        )
        self.route = f"{node_id}/{epoch}".encode()
        self.core = WorkerCore(
            self.settings, Identity(epoch, 1, "lab", "0.1.0", None), Metrics(), lab.rng.random, lab.mono
        )
        self.runs: dict[uuid.UUID, Assignment] = {}
        self.blobs: dict[uuid.UUID, tuple[bytes, ...]] = {}  # the input attachments each TASK carried
        self.waiting: list[tuple[Assignment, tuple[bytes, ...]]] = []  # new attempts behind a cancelled run
        self.inbox: deque[list[bytes]] = deque()
        self.up = True
        self.max_running = 0
        self.auto_slot = True  # a started run takes its slot at once (PROGRESS); False: it stays queued
        self.renew = True  # False: the worker heartbeats but never renews its leases (a stuck handler)

    def carry_out(self) -> None:
        while self.core.out:
            self._carry_out()
        self.max_running = max(self.max_running, len(self.core.running))
        if self.core.flush_needed:
            self.core.flush(self.lab.mono)
            self.carry_out()

    def _carry_out(self) -> None:
        for a in self.core.take():
            if isinstance(a, SendFrames):
                if self.up:
                    self.lab.to_police.append((self.route, a.frames))
            elif isinstance(a, StartRun):
                if a.after:
                    self.waiting.append((a.assignment, a.attachments))
                else:
                    self.runs[a.assignment.task_id] = a.assignment
                    self.blobs[a.assignment.task_id] = a.attachments
                    if self.auto_slot:
                        self.core.in_slot(a.assignment.task_id)
            elif isinstance(a, AbortRun):
                run = self.runs.pop(a.task_id, None)
                if run is not None:
                    self.core.interrupted(run)
                    self.core.ended(a.task_id)
                    self._start_waiting(a.task_id)
            elif isinstance(a, ReadyLater):
                self.core.ready_due(self.lab.mono)
            elif isinstance(a, Resolve | Reconnect):
                pass

    def _start_waiting(self, tid: uuid.UUID) -> None:
        for item in [w for w in self.waiting if w[0].task_id == tid]:
            self.waiting.remove(item)
            self.core.assign(item[0], item[1], self.lab.mono)

    def connect(self) -> None:
        self.up = True
        self.core.connected(self.lab.mono)
        self.carry_out()

    def receive(self) -> None:
        while self.inbox:
            self.core.on_frames(self.inbox.popleft(), self.lab.mono)
        self.carry_out()

    def finish(self, tid: uuid.UUID, output: Any = None) -> None:
        a = self.runs.pop(tid)
        self.core.succeeded(a, output, 1.0, None)
        self.core.ended(tid)
        self._start_waiting(tid)
        self.carry_out()

    def finish_attached(self, tid: uuid.UUID, output: Any, attachments: tuple[bytes, ...]) -> None:
        a = self.runs.pop(tid)
        self.core.succeeded(a, output, 1.0, attachments)
        self.core.ended(tid)
        self.carry_out()

    def fail(self, tid: uuid.UUID, code: str = "task", retryable: bool = True) -> None:
        a = self.runs.pop(tid)
        self.core.failed_run(a, code, f"{code} failure", retryable)
        self.core.ended(tid)
        self._start_waiting(tid)
        self.carry_out()

    def shut_down(self) -> None:
        """Draining shutdown: every run is handed back, then DISCONNECT."""
        self.core.set_draining(True, self.lab.mono)
        for tid, a in list(self.runs.items()):
            self.core.interrupted(a)
            self.core.ended(tid)
        self.runs.clear()
        self.core.flush(self.lab.mono)
        self.core.disconnect(self.lab.mono)
        self.carry_out()
        self.up = False

    def tick(self) -> None:
        if not self.up:
            return
        if self.renew:
            self.core.tick(self.lab.mono, bool(self.inbox))
        else:
            self.lab.to_police.append((self.route, codec.encode(Heartbeat(load=len(self.runs)))))
        self.carry_out()


class Lab:
    def __init__(self, seed: int = 0, **settings: Any) -> None:
        self.rng = random.Random(seed)
        self.mono = 1000.0
        self.s = load_settings({**POLICE_DEFAULTS, **settings})
        self.catalog = Catalog()
        self._ids = 0
        self.core = self.new_core()
        self.db: dict[uuid.UUID, Row] = {}
        self.staged: list[Stage] = []
        self.after: list[Any] = []
        self.to_police: deque[tuple[bytes, list[bytes]]] = deque()
        self.workers: dict[str, LabWorker] = {}
        self.control: dict[bytes, list[Message | Done]] = defaultdict(list)
        self.control_messages: dict[bytes, int] = defaultdict(int)
        """Messages sent to each control route (a DONE with many items counts once)."""
        self.validations: list[Validate] = []
        self.saves: list[SaveAttachments] = []
        self.local_runs: list[TaskRecord] = []
        self.finished: list[uuid.UUID] = []
        self.accepted: set[uuid.UUID] = set()
        self.loads: list[LoadInputs] = []
        self.blobs: dict[uuid.UUID, list[bytes]] = {}
        """The store's ``task_attachments`` (kind ``input``): what a test saved for a task."""
        self.store_down = False
        """While True, loading spilled inputs fails (as the store's breaker would)."""
        self._epochs = 0

    def new_core(self, **kwargs: Any) -> PolicemanCore:
        return PolicemanCore(self.s, self.catalog, Metrics(), self.mono, new_id=self.new_id, **kwargs)

    def new_id(self) -> uuid.UUID:
        """Deterministic UUIDv7s: the lab's wall clock in milliseconds, then a counter."""
        self._ids += 1
        ms = int(self.now().wall.timestamp() * 1000)
        return uuid.UUID(int=(ms << 80) | (0x7 << 76) | (0x2 << 62) | self._ids)

    def now(self) -> Now:
        return Now(self.mono, T0 + timedelta(seconds=self.mono))

    # --- the policeman's shell, in memory ----------------------------------------------------------
    def run(self, actions: list[Any]) -> None:
        for a in actions:
            if isinstance(a, Stage):
                self.staged.append(a)
            elif isinstance(a, Send | RunLocal | Finished | DoneFromStore | Replay) and getattr(
                a, "after_commit", True
            ):
                self.after.append(a)
            elif isinstance(a, Send) and any(
                isinstance(b, Send) and b.route == a.route and b.socket is a.socket for b in self.after
            ):
                self.after.append(a)  # behind an earlier message to the same worker that waits (SPEC 11)
            elif isinstance(a, Send):
                self.deliver(a)
            elif isinstance(a, Validate):
                self.validations.append(a)
            elif isinstance(a, RunLocal):
                self.local_runs.append(a.rec)
            elif isinstance(a, SaveAttachments):
                self.saves.append(a)
            elif isinstance(a, LoadInputs):
                self.loads.append(a)
            elif isinstance(a, StageKey | Arm | Serve):
                pass
            else:
                raise AssertionError(f"unexpected action {a!r}")

    def deliver(self, send: Send) -> None:
        if send.socket is Socket.CONTROL:
            msg = codec.decode(send.frames).message
            self.control_messages[send.route] += 1
            if isinstance(msg, DoneBatch):  # as the client does: one Done per task
                self.control[send.route].extend(msg.done)
            else:
                self.control[send.route].append(msg)
            return
        worker = next((w for w in self.workers.values() if w.route == send.route), None)
        if worker is None or not worker.up:
            if send.tasks:
                self.core.undelivered(send.node, send.tasks, self.now())
                self.run(self.core.take())
            return
        worker.inbox.append(send.frames)

    def commit(self) -> None:
        staged, self.staged = self.staged, []
        for st in staged:
            row = self.db.setdefault(st.rec.id, Row({}))
            row.rec = _snapshot(st.rec, row.rec.get("input"))
            row.events.append(st.event)
        for st in staged:
            st.rec.mark_persisted()  # as the group-commit writer does (a queued spilled input lets go)
        after, self.after = self.after, []
        for a in after:
            if isinstance(a, Send):
                self.deliver(a)
            elif isinstance(a, Finished):
                self.finished.append(a.rec.id)
            elif isinstance(a, RunLocal):
                self.local_runs.append(a.rec)
            elif isinstance(a, Replay):  # a report that waited for this commit (SPEC 11)
                self.core.replay(a.node_id, a.epoch, a.report, a.attachments, self.now())
                self.run(self.core.take())

    def load_inputs(self) -> None:
        """Carry out the core's LoadInputs: the inputs from the committed rows (none while
        ``store_down``)."""
        loads, self.loads = self.loads, []
        for a in loads:
            found = None if self.store_down else {t: json.dumps(self.db[t].rec["input"]) for t in a.task_ids}
            blobs = {t: self.blobs[t] for t in a.attachments if t in self.blobs}
            self.core.inputs_loaded(a.node, a.task_ids, found, self.now(), blobs)
            self.run(self.core.take())

    # --- driving -----------------------------------------------------------------------------------
    def add_worker(self, node_id: str, capacity: int = 2, caps: tuple[str, ...] = ()) -> LabWorker:
        self._epochs += 1
        w = LabWorker(self, node_id, capacity, f"e{self._epochs}", caps)
        self.workers[node_id] = w
        w.connect()
        return w

    def submit(self, *specs: TaskSpec, wait: bool = False, route: bytes = b"ctl") -> list[uuid.UUID]:
        msg = Submit(req_id=1, tasks=specs, wait=wait)
        found = {}
        for key in self.core.unknown_keys(msg.tasks):
            for row in self.db.values():
                if row.rec["idempotency_key"] == key:
                    found[key] = row.rec["id"]
        ids = self.core.submit_from(Sender.control(), route, msg, found, self.now())
        self.run(self.core.take())
        self.accepted.update(ids)
        return ids

    def pump(self, rounds: int = 50) -> None:
        """Dispatch, commit and deliver until nothing moves."""
        for _ in range(rounds):
            self.core.dispatch(self.now())
            self.run(self.core.take())
            self.commit()
            moved = bool(self.to_police or self.loads)
            self.load_inputs()
            while self.to_police:
                route, frames = self.to_police.popleft()
                self.core.on_mesh(route, frames, self.now())
                self.run(self.core.take())
            for w in list(self.workers.values()):
                if w.inbox:
                    moved = True
                    w.receive()
            if not moved and not self.staged and not self.after and not self.to_police and not self.loads:
                return
        raise AssertionError("the lab did not settle")

    def advance(self, seconds: float, step: float = 0.25) -> None:
        """Let time pass, ticking both sides as the shells do (workers heartbeat, renew leases)."""
        end = self.mono + seconds
        while self.mono < end:
            self.mono = min(end, self.mono + step)
            for w in list(self.workers.values()):
                w.tick()
            self.core.tick(self.now())
            self.run(self.core.take())
            self.pump()

    def restart_policeman(self) -> None:
        """The policeman dies (uncommitted rows and queued frames lost) and recovers from the store."""
        self.staged.clear()
        self.after.clear()
        self.to_police.clear()
        self.core = self.new_core()
        open_rows = [_as_loaded(r.rec, self.s.inline_input_bytes) for r in self.db.values()]
        self.core.recover([record_from_row(r) for r in open_rows if r["status"] not in _TERMINAL], self.now())
        self.run(self.core.take())

    def status(self, tid: uuid.UUID) -> Status:
        return Status(self.db[tid].rec["status"])

    def history(self, tid: uuid.UUID) -> list[tuple[str | None, str, int]]:
        return [(e.from_status, e.to_status, e.attempt) for e in self.db[tid].events]


_TERMINAL = {"complete", "dead", "cancelled"}


def _as_loaded(row: dict[str, Any], inline_input_bytes: int) -> dict[str, Any]:
    """The row as Store.load_open returns it: a queued task's large input left in the store."""
    spilled = row["status"] in ("pending", "retry") and len(json.dumps(row["input"])) > inline_input_bytes
    return {**row, "input": None if spilled else row["input"], "input_spilled": spilled}


def _snapshot(rec: TaskRecord, stored_input: Any) -> dict[str, Any]:
    """The row as the store would write it (the columns record_from_row reads back); an update
    does not write the input (a spilled record has none in memory)."""
    return {
        "id": rec.id,
        "created_at": rec.created_at,
        "type": rec.type,
        "input": json.loads(rec.input_json) if rec.input_json is not None else stored_input,
        "status": rec.status.value,
        "priority": rec.priority,
        "requires": list(rec.requires),
        "affinity": rec.affinity,
        "idempotency_key": rec.idempotency_key,
        "cache": rec.cache,
        "attempts": rec.attempts,
        "max_attempts": rec.max_attempts,
        "timeout_s": rec.timeout_s,
        "parent_id": rec.parent_id,
        "assigned_to": rec.assigned_to,
        "lease_deadline": rec.lease_deadline,
        "not_before": rec.not_before,
        "submitted_by": rec.submitted_by,
        "assigned_at": rec.assigned_at,
        "started_at": rec.started_at,
        "validating_at": rec.validating_at,
        "finished_at": rec.finished_at,
        "updated_at": rec.updated_at,
        "output": json.loads(rec.output_json) if rec.output_json else None,
        "error": json.loads(rec.error_json) if rec.error_json else None,
    }
