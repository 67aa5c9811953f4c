"""The policeman's shell: sockets, the group commit and asynchronous work around the PolicemanCore.

Theory of operation. Every rule (registration, dispatch, leases, retries, refunds, recovery) lives
in :class:`~casperd.policeman.PolicemanCore`, which takes events and returns actions. This module
reads the clock once per event, feeds the core, and carries its actions out in order
(``ACTIONS``, a table from action type to method):

    rows   -> store.stage(record, event)          (the group commit)
    frames -> send now, or store.after_commit(send) when they announce staged rows
    work   -> a local job, an asynchronous validation, a mesh service, stored attachments,
              inputs that waited in Postgres (loaded for dispatch)

so ACCEPTED, TASK, DONE and CANCEL leave only once the change they announce is committed. A TASK
that cannot be sent goes back to the core (``undelivered``: no attempt spent). The policeman's
plugin (:class:`LocalWork`, the agent service) is attached once with :meth:`Broker.attach`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

from casperd import admission, background
from casperd.background import LocalWork, now
from casperd.enrollment import Enrollment
from casperd.errors import CasperError, StorageError, UnsupportedError
from casperd.handlers import Catalog
from casperd.loopsock import Sock
from casperd.messages import Submit, TaskSpec
from casperd.metrics import Metrics
from casperd.policeman import PolicemanCore, Sender, SenderKind
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
from casperd.policeman.state import Peer
from casperd.quotas import Quotas
from casperd.rejects import announce, drop_refused, rejected_error
from casperd.settings import Settings
from casperd.store import Store, record_from_row
from casperd.storerows import forget_memos
from casperd.taskrecord import TaskRecord
from casperd.transport import send_now

log = logging.getLogger("casperd.broker")


class Broker:
    def __init__(self, settings: Settings, store: Store, metrics: Metrics, catalog: Catalog | None = None) -> None:
        self.s = settings
        self.store = store
        self.metrics = metrics
        self.catalog = catalog if catalog is not None else Catalog()
        self.core = PolicemanCore(settings, self.catalog, metrics, time.monotonic())
        self.mesh: Sock | None = None  # driven by casperd.loopsock
        self.control: Sock | None = None
        self.work: LocalWork | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._tick_armed: float | None = None
        self._dispatch_soon = False
        self._held: dict[bytes, int] = {}
        """Mesh routing id -> its messages waiting for a commit (later ones to it wait behind them)."""
        self.on_tick: Callable[[float], None] | None = None
        """Called after every tick with the monotonic time (the autoscaler, casperd.elastic)."""
        self.finish_listeners: list[Callable[[TaskRecord], None]] = []
        """Called (after the commit) with every task that reaches a terminal state (telemetry)."""
        store.on_reject = self._refused

    def attach(self, work: LocalWork) -> None:
        """Plug the policeman's local work in (jobs, finish notifications, attachment storage)."""
        self.work = work

    def compact(self) -> None:
        """After a burst drained (before the memory trim): drop what the burst left behind that would
        keep its memory — the row encoder's memos, the tables of the per-task dicts grown to the
        burst's peak (a dict never shrinks on its own)."""
        forget_memos()
        self.core.compact()

    # --- what other modules read ----------------------------------------------------------------
    @property
    def tasks(self) -> dict[uuid.UUID, TaskRecord]:
        return self.core.tasks

    @property
    def peers(self) -> dict[str, Peer]:
        return self.core.peers

    @property
    def quotas(self) -> Quotas:
        return self.core.quotas

    @property
    def enrollment(self) -> Enrollment | None:
        return self.core.enrollment

    @enrollment.setter
    def enrollment(self, book: Enrollment | None) -> None:
        self.core.enrollment = book

    @property
    def accepting(self) -> bool:
        return self.core.accepting

    @accepting.setter
    def accepting(self, value: bool) -> None:
        self.core.accepting = value

    # --- events -----------------------------------------------------------------------------------
    async def recover(self) -> int:
        """Load every non-terminal task; queue pending ones; active ones wait for their holder."""
        records: list[TaskRecord] = []
        async for rows in self.store.load_open(self.s.inline_input_bytes):  # batches: a bounded peak
            records.extend(record_from_row(r) for r in rows)
            del rows
        need = self.core.recover(records, now())
        if need and self.work is not None:
            self.core.attach(await self.work.load_attachments(need))
        self.run(self.core.take())
        return len(records)

    def on_mesh(self, route: bytes, frames: list[bytes], key: str | None = None) -> None:
        """One mesh message; ``key``: its connection's authenticated Curve key (ZAP User-Id), if known."""
        self.core.on_mesh(route, frames, now(), key)
        self.run(self.core.take())

    def revoke(self, keys: set[str]) -> list[str]:
        """Keys were revoked: drop their peers at once (their tasks go back to pending)."""
        dropped = self.core.revoke(keys, now())
        self.run(self.core.take())
        return dropped

    def dispatch(self) -> int:
        n = self.core.dispatch(now())
        self.run(self.core.take())
        return n

    def tick(self) -> None:
        """Heartbeats, liveness, leases, due retries. Called four times per heartbeat interval."""
        self.core.tick(now())
        self.run(self.core.take())
        if self.on_tick is not None:
            self.on_tick(time.monotonic())

    async def submit(self, route: bytes, msg: Submit, submitter: str | None) -> None:
        """SUBMIT on the control socket; ACCEPTED goes out after the commit."""
        self._check_store()
        keys = self.core.unknown_keys(msg.tasks)
        found = await self.store.idempotency(keys) if keys else {}
        admission.check_reuse(msg.tasks, await self._keyed_tasks(msg.tasks, found))
        sender = Sender(submitter or "caspectl", "control", SenderKind.CONTROL)
        self.core.submit_from(sender, route, msg, found, now())
        self.run(self.core.take())

    async def _keyed_tasks(
        self, specs: tuple[TaskSpec, ...], found: dict[str, uuid.UUID]
    ) -> dict[str, tuple[uuid.UUID, str, Any]]:
        """key -> (id, type, input) of the tasks the specs' idempotency keys already name."""
        named: dict[str, tuple[uuid.UUID, str, Any]] = {}
        for spec in specs:
            key = spec.idempotency_key
            tid = (self.core.keys.get(key) or found.get(key)) if key else None
            if key is None or tid is None or key in named:
                continue
            rec = self.core.tasks.get(tid)
            if rec is not None and rec.input_loaded:
                named[key] = (tid, rec.type, rec.input)
            elif (row := await self.store.get(tid)) is not None:
                named[key] = (tid, row["type"], row["input"])
        return named

    async def submit_local(
        self,
        spec: TaskSpec,
        attachments: tuple[bytes, ...] = (),
        submitter: str = "policeman",
        holder: str | None = None,
    ) -> tuple[uuid.UUID, bool]:
        """Create one task from inside the policeman (a job's subtasks, a peer's hand-off); returns
        (id, existed). Attachments are committed before the task row, so a TASK never lacks them.
        With ``holder`` (a direct hand-off) the task is assigned to that peer at once if it can."""
        self._check_store("the job continues once Postgres is back")
        key = spec.idempotency_key
        if key and self.core.existing(key) is None:
            for k, tid in (await self.store.idempotency([key])).items():
                self.core.remember_key(k, tid)
        known = self.core.existing(key)
        if known is not None:
            return known, True
        rec = self.core.new_local(spec, submitter)
        if attachments:
            if self.work is None:
                raise UnsupportedError("this policeman cannot store attachments", hint="a bug: report it")
            await self.work.save_attachments(rec.id, "input", attachments)
            rec.attachments = attachments
        known = self.core.existing(key)
        if known is not None:  # created meanwhile by a concurrent caller
            return known, True
        self.core.add_local(rec, holder, now())
        self.run(self.core.take())
        await self.store.committed()
        if rec.rejected:
            raise rejected_error(rec)
        return rec.id, False

    def _check_store(self, hint: str | None = None) -> None:
        if self.core.accepting and not self.store.healthy:
            raise StorageError(
                f"the task store is unavailable ({self.store.last_error}); no new work is accepted",
                hint=hint
                or "the policeman keeps running and accepts work again once Postgres is back; "
                "submit again (with an idempotency key it is safe)",
            )

    def start_local(self, rec: TaskRecord) -> bool:
        started = self.core.start_local(rec, now())
        self.run(self.core.take())
        return started

    def finish_local(self, rec: TaskRecord, output: Any = None, error: CasperError | None = None) -> None:
        self.core.finish_local(rec, now(), output, error)
        self.run(self.core.take())

    def cancel(self, tid: uuid.UUID) -> dict[str, Any]:
        out = self.core.cancel(tid, now())
        self.run(self.core.take())
        return out

    def retry(self, row: dict[str, Any]) -> dict[str, Any]:
        """Run a dead or cancelled task again, as a new task (the old one keeps its history)."""
        out = self.core.retry(row, now())
        self.run(self.core.take())
        return out

    def set_draining(self, node_id: str, draining: bool) -> dict[str, Any]:
        return self.core.set_draining(node_id, draining)

    def directory(self, capability: str | None = None) -> list[dict[str, Any]]:
        return self.core.directory(time.monotonic(), capability)

    def peers_view(self) -> list[dict[str, Any]]:
        return self.core.peers_view(time.monotonic())

    def status_view(self) -> dict[str, Any]:
        core = self.core
        return {
            "node_id": self.s.node_id,
            "role": "policeman",
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - core.started, 1),
            "mesh": self.s.advertise,
            "peers": len(core.peers),
            "open_tasks": core.status_counts(),
            "queued": len(core.dispatcher),
            "inflight": sum(p.slot.inflight for p in core.peers.values()),
            "store": {
                "healthy": self.store.healthy,
                "commits": self.store.commits,
                "rows_written": self.store.rows_written,
                "busy_s": round(self.store.busy_s, 6),
                "encode_s": round(self.store.encode_s, 6),
                "after_s": round(self.store.after_s, 6),
                "staged": self.store.staged,
                "commit_failures": self.store.commit_failures,
                "last_error": self.store.last_error,
            },
            "breakers": {p.node_id: p.slot.breaker.state.value for p in core.peers.values()},
            "dependency_breakers": {"postgres": self.store.breaker.state.value},
        }

    # --- actions ----------------------------------------------------------------------------------
    def run(self, actions: list[Any]) -> None:
        """Carry the core's actions out, in order."""
        for action in actions:
            ACTIONS[type(action)](self, action)

    def _stage(self, a: Stage) -> None:
        self.store.stage(a.rec, a.event)

    def _stage_key(self, a: StageKey) -> None:
        self.store.stage_key(a.key, a.task_id, a.created_at)

    def _refused(self, rec: TaskRecord, reason: str) -> None:
        """The store refused this task's rows (poison isolation; casperd.rejects)."""
        drop_refused(self.core, rec, reason)
        self.run(self.core.take())

    def _send_action(self, a: Send) -> None:
        if a.announces:
            self.store.after_commit(lambda: announce(self._send, a, self.core.tasks))
        elif a.socket is Socket.MESH and (a.after_commit or a.route in self._held):
            # after the commit, a worker's messages go before the submitters' ACCEPTED (the work
            # starts sooner); a TASK that may leave at once still waits behind an earlier message
            # to the same worker that waits for a commit (a CANCEL of the same task's last run)
            self._held[a.route] = self._held.get(a.route, 0) + 1
            self.store.after_commit(lambda: self._send_held(a), first=True)
        elif a.after_commit:
            self.store.after_commit(lambda: self._send(a))
        else:
            self._send(a)

    def _send_held(self, a: Send) -> None:
        left = self._held.pop(a.route, 1) - 1
        if left > 0:
            self._held[a.route] = left
        self._send(a)

    def _send(self, a: Send) -> None:
        sock = self.mesh if a.socket is Socket.MESH else self.control
        assert sock is not None
        why = send_now(sock, [a.route, *a.frames])
        peer = self.core.by_route.get(a.route) if a.socket is Socket.MESH else None
        if why is None:
            if peer is not None:
                peer.send_failing = False
            return
        self.metrics.send_failures.labels(why).inc()
        if peer is not None and not peer.send_failing:  # once per outage, not once per frame
            peer.send_failing = True
            silent = time.monotonic() - peer.clock.last_seen
            log.warning("could not send to %s (%s); it is silent for %.1fs", peer.node_id, why, silent)
        if a.tasks:
            self.core.undelivered(a.node, a.tasks, now())
            self.run(self.core.take())

    def _replay(self, a: Replay) -> None:
        self.store.after_commit(lambda: self._replayed(a))

    def _replayed(self, a: Replay) -> None:
        self.core.replay(a.node_id, a.epoch, a.report, a.attachments, now())
        self.run(self.core.take())
        if not self._dispatch_soon:  # the reports freed slots: one dispatch pass for all of a commit's
            self._dispatch_soon = True
            asyncio.get_running_loop().call_soon(self._dispatch_now)

    def _dispatch_now(self) -> None:
        self._dispatch_soon = False
        self.dispatch()

    def _run_local(self, a: RunLocal) -> None:
        work = self.work
        if work is None:
            return
        if a.delay_s:
            asyncio.get_running_loop().call_later(a.delay_s, work.run_local, a.rec)
        elif a.after_commit:
            self.store.after_commit(lambda: work.run_local(a.rec))
        else:
            work.run_local(a.rec)

    def _finished(self, a: Finished) -> None:
        if self.work is not None or self.finish_listeners:
            self.store.after_commit_each("finished", a.rec, self._notify_finished)

    def _notify_finished(self, recs: list[TaskRecord]) -> None:
        """The tasks one commit finished, to the local work (jobs, usage records) and the finish
        listeners (telemetry): one callback per commit, each listener's failure logged alone."""
        work = self.work
        listeners = list(self.finish_listeners)
        for rec in recs:
            if work is not None:
                try:
                    work.on_finish(rec)
                except Exception:
                    log.exception("finish handling of task %s failed", rec.id)
            for fn in listeners:
                try:
                    fn(rec)
                except Exception:
                    log.exception("a finish listener failed for task %s", rec.id)

    def _load_inputs(self, a: LoadInputs) -> None:
        self._spawn(self._load_inputs_now(a))

    async def _load_inputs_now(self, a: LoadInputs) -> None:
        """Load the inputs that waited in Postgres for tasks just assigned, then let their TASK go."""
        found: dict[uuid.UUID, str] | None
        blobs: dict[uuid.UUID, list[bytes]] = {}
        try:
            found = await self.store.inputs(list(a.task_ids))
            if a.attachments and self.work is not None:
                blobs = await self.work.load_attachments(list(a.attachments))
        except CasperError as exc:
            log.warning("could not load %d task inputs for %s (%s); they go back", len(a.task_ids), a.node, exc)
            await asyncio.sleep(1.0)  # not a tight loop of dispatch and failed loads while Postgres is down
            found = None
        self.core.inputs_loaded(a.node, a.task_ids, found, now(), blobs)
        self.run(self.core.take())

    def _arm(self, a: Arm) -> None:
        if self._tick_armed is not None and self._tick_armed <= a.at:
            return
        self._tick_armed = a.at
        delay = max(0.0, a.at - time.monotonic())
        asyncio.get_running_loop().call_later(delay, self._armed_tick, a.at)

    def _armed_tick(self, at: float) -> None:
        if self._tick_armed == at:
            self._tick_armed = None
        self.tick()
        self.dispatch()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


ACTIONS: dict[type, Callable[[Broker, Any], None]] = {
    Stage: Broker._stage,
    StageKey: Broker._stage_key,
    Send: Broker._send_action,
    RunLocal: Broker._run_local,
    Finished: Broker._finished,
    Validate: background.validate,
    Serve: background.serve,
    SaveAttachments: background.save_attachments,
    DoneFromStore: background.done_from_store,
    Arm: Broker._arm,
    Replay: Broker._replay,
    LoadInputs: Broker._load_inputs,
}
"""Action type -> how the shell carries it out."""
