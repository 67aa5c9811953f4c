"""The policeman's broker: peer registry, dispatch, heartbeats, and the durable task lifecycle.

Theory of operation. The broker owns every non-terminal task in memory (``self.tasks``), mirrored
in Postgres through :class:`~casperd.store.Store`. Every change goes the same way:

    record.move(new)  ->  store.stage(record, event)  ->  store.after_commit(action)

so the action (ACCEPTED to a submitter, TASK to a worker, DONE to a waiter, CANCEL to a holder)
leaves only once the change is committed. Dispatch runs after every batch of incoming frames:
the pure :class:`~casperd.dispatch.Dispatcher` picks (task, peer) pairs within each peer's credit,
and the TASK frames for one peer go out as one message after the commit.

Peers are registered by READY. Their routing id must be ``node_id/epoch`` (a frame claiming
another peer's identity is refused). Any frame from a peer is a heartbeat; the broker heartbeats
every peer it has not sent to for an interval; a peer silent for ``misses`` intervals is dead and
its tasks go back to pending (the attempt counted). A frame from an unknown peer is answered
with ERROR ``unknown-peer``, on which the peer sends READY again with the tasks it holds (MDP
style), and the broker reconciles them against the store.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import logging
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import zmq.asyncio

from casperd import codec, handlers
from casperd.breaker import CircuitBreaker
from casperd.dispatch import Dispatcher, PeerSlot
from casperd.errors import (
    CasperError,
    IdentityError,
    InvalidBodyError,
    ProtocolError,
    StorageError,
    TaskNotFoundError,
    UnknownPeerError,
    UnsupportedError,
)
from casperd.lifecycle import ACTIVE, Status
from casperd.liveness import Liveness, PeerClock
from casperd.messages import (
    RENEW,
    Accepted,
    Cancel,
    Command,
    Disconnect,
    Done,
    ErrorBody,
    FailedBatch,
    Heartbeat,
    Progress,
    Ready,
    Reply,
    Request,
    ResultBatch,
    Submit,
    TaskSpec,
    assignment_body,
    done_body,
    new_task_id,
)
from casperd.messages import (
    Error as ErrorMsg,
)
from casperd.metrics import Metrics
from casperd.retry import RetryPolicy
from casperd.settings import Settings
from casperd.store import Store, record_from_row
from casperd.taskrecord import TaskEvent, TaskRecord, to_json, utcnow
from casperd.transport import send_now

log = logging.getLogger("casperd.broker")

MeshOp = Callable[[str, dict[str, Any], tuple[bytes, ...]], Awaitable[tuple[Any, tuple[bytes, ...]]]]
"""A service the policeman offers peers over the mesh (REQUEST op): (node id, args, attachments) →
(data, attachments). Registered by the agent service: rate-limit permits, saved turns."""


@dataclass(slots=True)
class Peer:
    node_id: str
    epoch: str
    route: bytes
    role: str
    endpoint: str
    host: str
    pid: int
    version: str
    slot: PeerSlot
    clock: PeerClock
    held: set[uuid.UUID] = field(default_factory=set)
    registered_at: float = field(default_factory=time.time)
    drained_by_operator: bool = False
    send_failing: bool = False
    draining_itself: bool = False
    public_key: str | None = None

    def update_draining(self) -> None:
        self.slot.draining = self.drained_by_operator or self.draining_itself

    def view(self, now: float) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "role": self.role,
            "endpoint": self.endpoint,
            "host": self.host,
            "pid": self.pid,
            "epoch": self.epoch,
            "version": self.version,
            "capabilities": sorted(self.slot.capabilities),
            "capacity": self.slot.capacity,
            "inflight": self.slot.inflight,
            "draining": self.slot.draining,
            "liveness": self.clock.state(now).value,
            "breaker": self.slot.breaker.state.value,
            "last_seen_s": round(now - self.clock.last_seen, 3),
            "public_key": self.public_key,
        }


class Broker:
    def __init__(self, settings: Settings, store: Store, metrics: Metrics) -> None:
        self.s = settings
        self.store = store
        self.metrics = metrics
        self.mesh: zmq.asyncio.Socket | None = None
        self.control: zmq.asyncio.Socket | None = None
        self.tasks: dict[uuid.UUID, TaskRecord] = {}
        self.dispatcher = Dispatcher()
        self.peers: dict[str, Peer] = {}
        self.by_route: dict[bytes, Peer] = {}
        self.retry_heap: list[tuple[float, uuid.UUID]] = []
        self.keys: OrderedDict[str, uuid.UUID] = OrderedDict()
        self._transition_counter = {s: metrics.transitions.labels(s.value) for s in Status}
        self.breakers: dict[str, CircuitBreaker] = {}
        self._policies: dict[str, RetryPolicy] = {}
        self.leases: dict[uuid.UUID, float] = {}
        """Lease deadline (monotonic) of every task a peer holds, renewed by its PROGRESS."""
        self.policy = RetryPolicy(
            settings.max_attempts, settings.backoff_base_s, settings.backoff_factor, settings.backoff_cap_s
        )
        self.started = time.monotonic()
        self.accepting = True
        self._logged_errors: set[tuple[bytes, str]] = set()
        self._dirty_dispatch = False
        self.mesh_ops: dict[str, MeshOp] = {}
        self.local_runner: Callable[[TaskRecord], None] | None = None
        """Starts a task of a ``local`` type (a job) on the policeman itself."""
        self.finish_listeners: list[Callable[[TaskRecord], None]] = []
        """Called (after the commit) with every task that reaches a terminal state."""
        self.save_attachments: Callable[[uuid.UUID, str, tuple[bytes, ...]], Awaitable[None]] | None = None
        self.load_attachments: Callable[[list[uuid.UUID]], Awaitable[dict[uuid.UUID, list[bytes]]]] | None = None
        self._background: set[asyncio.Task[Any]] = set()

    # --- startup: rebuild from Postgres -------------------------------------------------------
    async def recover(self) -> int:
        """Load every non-terminal task; queue pending ones; active ones wait for their holder."""
        rows = await self.store.load_open()
        for row in rows:
            rec = record_from_row(row)
            self.tasks[rec.id] = rec
            if rec.status is Status.PENDING:
                self._queue(rec)
            elif rec.status is Status.RETRY:
                due = rec.not_before.timestamp() if rec.not_before else time.time()
                heapq.heappush(self.retry_heap, (time.monotonic() + max(0.0, due - time.time()), rec.id))
            elif rec.status is Status.ERROR:
                self._after_error(rec, utcnow(), None)
        if rows:
            log.info("recovered %d open tasks from Postgres", len(rows))
        # jobs the policeman was running when it stopped: run them again (they resume from the jobs table)
        for rec in self.tasks.values():
            if (
                rec.status in ACTIVE
                and rec.assigned_to == self.s.node_id
                and _ttype_flag(rec.type, "local")
                and self.local_runner is not None
            ):
                asyncio.get_running_loop().call_later(0.5, self.local_runner, rec)
        need = [tid for tid, rec in self.tasks.items() if _ttype_flag(rec.type, "input_attachments")]
        if need and self.load_attachments is not None:
            for tid, blobs in (await self.load_attachments(need)).items():
                self.tasks[tid].attachments = tuple(blobs)
        return len(rows)

    # --- mesh traffic ---------------------------------------------------------------------------
    def on_mesh(self, route: bytes, frames: list[bytes]) -> None:
        now = time.monotonic()
        peer = self.by_route.get(route)
        if peer is not None:
            peer.clock.seen(now)
        try:
            decoded = codec.decode(frames, max_bytes=self.s.max_message_bytes)
        except ProtocolError as exc:
            self._reject(route, exc, frames[1][0] if len(frames) > 1 and len(frames[1]) == 1 else None)
            return
        msg = decoded.message
        self.metrics.messages.labels(msg.COMMAND.name, "in").inc()
        if isinstance(msg, Ready):
            self._on_ready(route, msg, now)
            return
        if peer is None:
            self._reject(route, UnknownPeerError("unknown peer: send READY first", hint="re-register"), None)
            return
        try:
            if isinstance(msg, Heartbeat):
                if msg.draining != peer.draining_itself:
                    peer.draining_itself = msg.draining
                    peer.update_draining()
                    log.info("peer %s is %s", peer.node_id, "draining" if msg.draining else "serving again")
            elif isinstance(msg, Progress):
                self._on_progress(peer, msg)
            elif isinstance(msg, ResultBatch):
                if decoded.attachments:
                    self._spawn(self._on_attached_result(peer, msg, decoded.attachments))
                else:
                    self._on_results(peer, msg)
            elif isinstance(msg, Request):
                self._spawn(self._on_request(route, peer.node_id, msg, decoded.attachments))
            elif isinstance(msg, FailedBatch):
                self._on_failures(peer, msg)
            elif isinstance(msg, Disconnect):
                log.info("peer %s disconnects: %s", peer.node_id, msg.reason)
                self._drop_peer(peer, f"disconnected: {msg.reason}")
            elif isinstance(msg, Submit):
                self._on_submit_from_peer(route, peer, msg)
            else:
                self._reject(
                    route,
                    UnsupportedError(
                        f"{msg.COMMAND.name} is not accepted on the mesh socket",
                        hint="see protocol/SPEC.md for who sends what",
                    ),
                    msg.COMMAND.value,
                )
        except CasperError as exc:
            self._reject(route, exc, msg.COMMAND.value)

    def _reject(self, route: bytes, exc: CasperError, ref: int | None, *, code: str | None = None) -> None:
        code = code or exc.code
        self.metrics.rejected.labels(code).inc()
        key = (route[:64], code)
        if key not in self._logged_errors:  # log once per peer and cause; count every time
            if len(self._logged_errors) > 10_000:
                self._logged_errors.clear()
            self._logged_errors.add(key)
            log.warning("rejected a frame from %r: [%s] %s", route[:64], code, exc.message)
        body = ErrorMsg(code=code, message=exc.message[:4000], hint=exc.hint, ref=ref)
        self._send_mesh(route, codec.encode(body))

    def _send_mesh(self, route: bytes, frames: list[bytes]) -> bool:
        assert self.mesh is not None
        why = send_now(self.mesh, [route, *frames])
        if why is None:
            peer = self.by_route.get(route)
            if peer is not None:
                peer.clock.sent(time.monotonic())
                peer.send_failing = False
            return True
        self.metrics.send_failures.labels(why).inc()
        peer = self.by_route.get(route)
        if peer is not None and not peer.send_failing:  # once per outage, not once per frame
            peer.send_failing = True
            log.warning(
                "could not send to %s (%s); it is silent for %.1fs",
                peer.node_id,
                why,
                time.monotonic() - peer.clock.last_seen,
            )
        return False

    # --- registration -------------------------------------------------------------------------
    def _on_ready(self, route: bytes, msg: Ready, now: float) -> None:
        expected = f"{msg.node_id}/{msg.epoch}".encode()
        if route != expected:
            self._reject(
                route,
                IdentityError(
                    f"READY claims node {msg.node_id!r} but arrives from routing id {route[:64]!r}",
                    hint="a node's routing id must be NODE_ID/EPOCH",
                ),
                msg.COMMAND.value,
            )
            return
        old = self.peers.get(msg.node_id)
        if old is not None and old.epoch != msg.epoch:
            log.info("peer %s restarted (epoch %s -> %s)", msg.node_id, old.epoch, msg.epoch)
            self._drop_peer(old, "restarted")
            old = None
        clock = PeerClock(interval_s=self.s.heartbeat_s, misses=self.s.heartbeat_misses, last_seen=now)
        breaker = self.breaker_for(msg.node_id)  # a node's breaker outlives its registrations
        slot = PeerSlot(msg.node_id, frozenset(msg.capabilities), msg.capacity, breaker=breaker)
        peer = Peer(
            msg.node_id,
            msg.epoch,
            route,
            msg.role.value,
            msg.endpoint,
            msg.host,
            msg.pid,
            msg.version,
            slot,
            clock,
            public_key=msg.public_key,
        )
        if old is not None:
            peer.drained_by_operator = old.drained_by_operator
            peer.update_draining()
        self.peers[msg.node_id] = peer
        self.by_route[route] = peer
        # reconcile: what the peer says it holds against what the store says it holds
        claimed = set(msg.tasks)
        unknown: list[uuid.UUID] = []
        for tid in claimed:
            rec = self.tasks.get(tid)
            if rec is not None and rec.status in ACTIVE and rec.assigned_to == msg.node_id:
                peer.held.add(tid)
                self.leases[tid] = now + self.s.lease_s
            else:
                unknown.append(tid)
        slot.inflight = len(peer.held)
        stamp = utcnow()
        for rec in list(self.tasks.values()):
            if rec.status in ACTIVE and rec.assigned_to == msg.node_id and rec.id not in peer.held:
                self._requeue(rec, stamp, "holder re-registered without it")
        if unknown:
            self._send_mesh(route, codec.encode(Cancel(task_ids=tuple(unknown[:10_000]), reason="not assigned to you")))
        log.info(
            "peer %s registered: role=%s endpoint=%s capacity=%d capabilities=%s holding=%d",
            msg.node_id,
            msg.role.value,
            msg.endpoint,
            msg.capacity,
            ",".join(msg.capabilities),
            len(peer.held),
        )
        self.metrics.peers.set(len(self.peers))
        self._send_mesh(route, codec.encode(Heartbeat()))
        self._dirty_dispatch = True

    def policy_for(self, task_type: str) -> RetryPolicy:
        """The retry policy of a task type: its own settings over the mesh defaults (cached)."""
        policy = self._policies.get(task_type)
        if policy is None:
            own = self.s.task_policies.get(task_type)
            policy = (
                self.policy
                if own is None
                else RetryPolicy(
                    own.max_attempts or self.policy.max_attempts,
                    self.policy.base_s if own.backoff_base_s is None else own.backoff_base_s,
                    own.backoff_factor or self.policy.factor,
                    self.policy.cap_s if own.backoff_cap_s is None else own.backoff_cap_s,
                )
            )
            self._policies[task_type] = policy
        return policy

    def breaker_for(self, node_id: str) -> CircuitBreaker:
        breaker = self.breakers.get(node_id)
        if breaker is None:
            breaker = self.breakers[node_id] = CircuitBreaker(self.s.breaker_failures, self.s.breaker_recovery_s)
        return breaker

    def _drop_peer(self, peer: Peer, reason: str) -> None:
        if self.peers.get(peer.node_id) is peer:
            del self.peers[peer.node_id]
        self.by_route.pop(peer.route, None)
        self.dispatcher.forget_peer(peer.node_id)
        stamp = utcnow()
        for tid in list(peer.held):
            rec = self.tasks.get(tid)
            if rec is not None and rec.status in ACTIVE and rec.assigned_to == peer.node_id:
                self._requeue(rec, stamp, f"peer {peer.node_id} {reason}")
        peer.held.clear()
        self.metrics.peers.set(len(self.peers))
        self._dirty_dispatch = True

    # --- task progress from workers -----------------------------------------------------------
    def _held(self, peer: Peer, tid: uuid.UUID, attempt: int | None) -> TaskRecord | None:
        rec = self.tasks.get(tid)
        # an older attempt from the node that holds the task now is the same work (the new TASK may
        # never have reached it, e.g. lost in a reconnect): its result counts
        if (
            rec is None
            or rec.assigned_to != peer.node_id
            or rec.status not in ACTIVE
            or (attempt is not None and attempt > rec.attempts)
        ):
            self.metrics.duplicates.inc()
            log.debug("ignoring stale report for %s from %s", tid, peer.node_id)
            return None
        return rec

    def _on_progress(self, peer: Peer, msg: Progress) -> None:
        stamp = utcnow()
        renewal = msg.note == RENEW
        until = time.monotonic() + self.s.lease_s
        for tid in msg.task_ids:
            rec = self._held(peer, tid, None)
            if rec is None:
                continue
            self.leases[tid] = until
            if not renewal and rec.status is Status.ASSIGNED:
                self._change(rec, Status.PROCESSING, stamp, peer.node_id)
                rec.started_at = stamp

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _on_request(self, route: bytes, node_id: str, msg: Request, attachments: tuple[bytes, ...]) -> None:
        fn = self.mesh_ops.get(msg.op)
        try:
            if fn is None:
                raise UnsupportedError(
                    f"the policeman offers no mesh service {msg.op!r}",
                    hint=f"known: {', '.join(sorted(self.mesh_ops)) or 'none'}",
                )
            data, extra = await fn(node_id, msg.args, attachments)
            frames = codec.encode(Reply(req_id=msg.req_id, ok=True, data=data), extra)
        except CasperError as exc:
            frames = codec.encode(Reply(req_id=msg.req_id, ok=False, error=ErrorBody(**exc.to_wire())))
        except Exception as exc:  # a bug in a service: answer, log, keep serving
            log.exception("mesh service %s failed", msg.op)
            frames = codec.encode(
                Reply(
                    req_id=msg.req_id,
                    ok=False,
                    error=ErrorBody(code="internal", message=f"{msg.op} failed: {type(exc).__name__}"),
                )
            )
        self._send_mesh(route, frames)

    async def _on_attached_result(self, peer: Peer, msg: ResultBatch, attachments: tuple[bytes, ...]) -> None:
        """A RESULT carrying attachments (a patch): the attachments are committed first, then the
        result goes the usual way."""
        if len(msg.results) != 1:
            self._reject(
                peer.route,
                InvalidBodyError(
                    "a RESULT with attachments must carry exactly one outcome", hint="send attached results alone"
                ),
                Command.RESULT.value,
            )
            return
        out = msg.results[0]
        rec = self._held(peer, out.task_id, out.attempt)
        if rec is None:
            return
        if self.save_attachments is not None:
            try:
                await self.save_attachments(out.task_id, "output", attachments)
            except CasperError as exc:
                log.warning("could not store the attachments of task %s: %s; it will run again", out.task_id, exc)
                if self._held(peer, out.task_id, out.attempt) is rec:
                    self._release(peer, rec)
                    self._fail(rec, utcnow(), peer.node_id, "storage", exc.message, True)
                return
        self._on_results(peer, msg, attachments)  # still ours unless the lease was lost meanwhile

    async def _validate(
        self, rec: TaskRecord, peer: str, check: handlers.AsyncValidator, output: Any, attachments: tuple[bytes, ...]
    ) -> None:
        """The ``validating`` state of a type whose check needs I/O (a patch applied and compiled)."""
        try:
            problem = await check(rec.id, rec.input, output, attachments)
        except CasperError as exc:
            problem = f"the policeman could not validate it: {exc}"
        if rec.status is not Status.VALIDATING:
            return  # cancelled meanwhile
        if problem is not None:
            self._fail(rec, utcnow(), peer, "validation", problem, True)
        else:
            self._finish(rec, Status.COMPLETE, utcnow(), peer)
        self._dirty_dispatch = True

    def _take_output(self, peer: Peer, rec: TaskRecord, out: Any, stamp: datetime) -> bool:
        """A holder's result arrived: release the task and keep its output (False: not storable)."""
        if rec.status is Status.ASSIGNED:
            self._change(rec, Status.PROCESSING, stamp, peer.node_id)
            rec.started_at = stamp - timedelta(milliseconds=out.duration_ms)
        self._release(peer, rec)
        peer.slot.breaker.record_success()
        try:
            rec.output_json = to_json(out.output)
        except ValueError as exc:
            self._fail(rec, stamp, peer.node_id, "invalid-output", f"task output {exc}", False)
            return False
        return True

    def _on_results(self, peer: Peer, msg: ResultBatch, attachments: tuple[bytes, ...] = ()) -> None:
        stamp = utcnow()
        for out in msg.results:
            rec = self._held(peer, out.task_id, out.attempt)
            if rec is None or not self._take_output(peer, rec, out, stamp):
                continue
            ttype = handlers.REGISTRY.get(rec.type)
            check = handlers.ASYNC_VALIDATORS.get(rec.type)
            if check is not None:
                self._change(rec, Status.VALIDATING, stamp, peer.node_id)
                rec.validating_at = stamp
                self._spawn(self._validate(rec, peer.node_id, check, out.output, attachments))
                continue
            if ttype is not None and ttype.needs_validation(rec.input):
                self._change(rec, Status.VALIDATING, stamp, peer.node_id)
                rec.validating_at = stamp
                assert ttype.validate is not None
                problem = ttype.validate(rec.input, out.output)
                if problem is not None:
                    self._fail(rec, stamp, peer.node_id, "validation", problem, True)
                    continue
            self._finish(rec, Status.COMPLETE, stamp, peer.node_id)

    def _on_failures(self, peer: Peer, msg: FailedBatch) -> None:
        stamp = utcnow()
        for f in msg.failures:
            rec = self._held(peer, f.task_id, f.attempt)
            if rec is None:
                continue
            self._release(peer, rec)
            if f.error.code in _HANDED_BACK:
                # a clean hand-back (shutdown, draining) is not a failure: it costs no attempt,
                # and a half-open breaker's probe slot is free again
                peer.slot.breaker.release_probe()
                rec.attempts -= 1
                self._requeue(rec, stamp, f"{f.error.code} by {peer.node_id}")
                continue
            peer.slot.breaker.record_failure(time.monotonic())
            self._fail(rec, stamp, peer.node_id, f.error.code, f.error.message, f.retryable)

    def _release(self, peer: Peer, rec: TaskRecord) -> None:
        self.leases.pop(rec.id, None)
        if rec.id in peer.held:
            peer.held.discard(rec.id)
            peer.slot.inflight -= 1
            self._dirty_dispatch = True

    # --- state changes --------------------------------------------------------------------------
    def _change(
        self, rec: TaskRecord, new: Status, stamp: datetime, peer: str | None, detail: dict[str, Any] | None = None
    ) -> None:
        old = rec.move(new, stamp)
        self.store.stage(
            rec,
            TaskEvent(stamp, rec.id, old.value, new.value, peer, rec.attempts, json.dumps(detail) if detail else None),
        )
        self._transition_counter[new].inc()

    def _finish(
        self, rec: TaskRecord, status: Status, stamp: datetime, peer: str | None, detail: dict[str, Any] | None = None
    ) -> None:
        self._change(rec, status, stamp, peer, detail)
        rec.finished_at = stamp
        self.tasks.pop(rec.id, None)
        self.dispatcher.remove(rec.id)
        if self.finish_listeners:
            self.store.after_commit(lambda: [fn(rec) for fn in self.finish_listeners])
        if rec.waiters:
            waiters, rec.waiters = rec.waiters, []
            last = _last_error(rec)
            frames = codec.encode_raw(
                Command.DONE,
                done_body(
                    rec.id,
                    rec.status.value,
                    json.loads(rec.output_json) if rec.output_json else None,
                    last.model_dump() if last else None,
                ),
            )
            self.store.after_commit(lambda: [self._send_control(w, frames) for w in waiters])

    def _fail(
        self, rec: TaskRecord, stamp: datetime, peer: str | None, code: str, message: str, retryable: bool
    ) -> None:
        history = json.loads(rec.error_json) if rec.error_json else []
        history.append(
            {"attempt": rec.attempts, "peer": peer, "code": code, "message": message[:2000], "at": stamp.isoformat()}
        )
        rec.error_json = json.dumps(history)
        self._change(rec, Status.ERROR, stamp, peer, {"code": code})
        self._after_error(rec, stamp, peer, retryable)

    def _after_error(self, rec: TaskRecord, stamp: datetime, peer: str | None, retryable: bool = True) -> None:
        policy = self.policy_for(rec.type)
        if retryable and not policy.exhausted(rec.attempts, rec.max_attempts):
            delay = policy.backoff(rec.attempts)
            rec.not_before = stamp + timedelta(seconds=delay)
            rec.assigned_to = None
            self._change(rec, Status.RETRY, stamp, peer, {"backoff_s": delay})
            heapq.heappush(self.retry_heap, (time.monotonic() + delay, rec.id))
        else:
            self._finish(
                rec, Status.DEAD, stamp, peer, {"reason": "attempts exhausted" if retryable else "not retryable"}
            )

    def _requeue(self, rec: TaskRecord, stamp: datetime, reason: str) -> None:
        """A holder was lost: back to pending (the attempt stays counted), or dead if none are left."""
        holder = rec.assigned_to
        self.leases.pop(rec.id, None)
        if self.policy_for(rec.type).exhausted(rec.attempts, rec.max_attempts):
            self._fail(rec, stamp, holder, "holder-lost", reason, False)
            return
        rec.assigned_to = None
        rec.lease_deadline = None
        self._change(rec, Status.PENDING, stamp, holder, {"reason": reason})
        self._queue(rec)

    def _queue(self, rec: TaskRecord) -> None:
        ttype = handlers.REGISTRY.get(rec.type)
        if ttype is not None and ttype.local:
            runner = self.local_runner
            if runner is not None:
                self.store.after_commit(lambda: runner(rec))
            return
        requires = set(rec.requires) | set(ttype.requires if ttype else ())
        self.dispatcher.push(rec.id, rec.priority, requires, rec.affinity)
        self._dirty_dispatch = True

    # --- dispatch -------------------------------------------------------------------------------
    def dispatch(self) -> int:
        if not self._dirty_dispatch or not self.accepting:
            return 0
        self._dirty_dispatch = False
        now = time.monotonic()
        slots = {p.node_id: p.slot for p in self.peers.values() if p.clock.state(now) is Liveness.ALIVE}
        pairs = self.dispatcher.assign(slots, now)
        if not pairs:
            return 0
        stamp = utcnow()
        lease = stamp + timedelta(seconds=self.s.lease_s)
        lease_ms = int(self.s.lease_s * 1000)
        lease_until = now + self.s.lease_s
        per_peer: dict[str, list[dict[str, Any]]] = {}
        for tid, node in pairs:
            rec = self.tasks[tid]
            peer = self.peers[node]
            rec.attempts += 1
            rec.assigned_to = node
            rec.assigned_at = stamp
            rec.lease_deadline = lease
            rec.not_before = None
            self._change(rec, Status.ASSIGNED, stamp, node)
            peer.held.add(tid)
            self.leases[tid] = lease_until
            body = assignment_body(tid, rec.type, rec.input, rec.attempts, lease_ms, rec.timeout_s, rec.cache)
            if rec.attachments:  # alone in its TASK message, the attachments as frames after the body
                frames = codec.encode_raw(Command.TASK, {"tasks": [body]}, rec.attachments)
                self.store.after_commit(lambda n=node, f=frames, t=tid: self._send_tasks(n, f, [t]))
                continue
            per_peer.setdefault(node, []).append(body)
        for node, assignments in per_peer.items():
            for frames, chunk in self._task_frames(assignments):
                self.store.after_commit(lambda n=node, f=frames, c=chunk: self._send_tasks(n, f, c))
        self.metrics.dispatched.inc(len(pairs))
        return len(pairs)

    def _task_frames(self, assignments: list[dict[str, Any]]) -> list[tuple[list[bytes], list[uuid.UUID]]]:
        """TASK messages of at most 1000 assignments and within the size limit."""
        batches, too_big = codec.encode_batches(Command.TASK, "tasks", assignments, self.s.max_message_bytes)
        stamp = utcnow()
        for a in too_big:  # cannot happen for inputs that came in a SUBMIT of the same limit
            rec = self.tasks.get(a["task_id"])
            if rec is not None and rec.status is Status.ASSIGNED and rec.assigned_to in self.peers:
                self._release(self.peers[rec.assigned_to], rec)
                self._fail(rec, stamp, rec.assigned_to, "too-large", "task message exceeds max_message_bytes", False)
        return [(frames, [a["task_id"] for a in chunk]) for frames, chunk in batches]

    def _send_tasks(self, node: str, frames: list[bytes], task_ids: list[uuid.UUID]) -> None:
        peer = self.peers.get(node)
        if peer is not None and self._send_mesh(peer.route, frames):
            return
        # not delivered (peer gone, unroutable, queue full): the tasks go back at once, no attempt spent
        peer_now = self.peers.get(node)
        if peer_now is not None:
            peer_now.slot.breaker.record_failure(time.monotonic())
        stamp = utcnow()
        for tid in task_ids:
            rec = self.tasks.get(tid)
            if rec is not None and rec.status is Status.ASSIGNED and rec.assigned_to == node:
                if peer_now is not None:
                    self._release(peer_now, rec)
                rec.attempts -= 1
                self._requeue(rec, stamp, f"TASK could not be delivered to {node}")

    # --- timers -----------------------------------------------------------------------------------
    def tick(self) -> None:
        """Heartbeats, liveness, due retries. Called four times per heartbeat interval."""
        now = time.monotonic()
        hb = codec.encode(Heartbeat())
        for peer in list(self.peers.values()):
            state = peer.clock.state(now)
            if state is Liveness.DEAD:
                log.warning(
                    "peer %s is dead (silent %.1fs); returning its %d tasks",
                    peer.node_id,
                    now - peer.clock.last_seen,
                    len(peer.held),
                )
                peer.slot.breaker.trip(now)  # back from the dead, it must earn its work again (half-open)
                self._drop_peer(peer, "dead")
                continue
            if peer.clock.heartbeat_due(now):
                self._send_mesh(peer.route, hb)
        stamp = None
        expired = [tid for tid, until in self.leases.items() if until < now]
        for tid in expired:
            rec = self.tasks.get(tid)
            self.leases.pop(tid, None)
            if rec is None or rec.status not in ACTIVE:
                continue
            holder = self.peers.get(rec.assigned_to or "")
            log.warning("lease of task %s on %s expired; returning it", tid, rec.assigned_to)
            if holder is not None:
                self._release(holder, rec)
                holder.slot.breaker.record_failure(now)  # a holder that goes quiet on a task is failing
                frames = codec.encode(Cancel(task_ids=(tid,), reason="lease expired"))
                self.store.after_commit(lambda r=holder.route, f=frames: self._send_mesh(r, f))
            stamp = stamp or utcnow()
            self._requeue(rec, stamp, f"lease expired on {rec.assigned_to}")
        while self.retry_heap and self.retry_heap[0][0] <= now:
            _, tid = heapq.heappop(self.retry_heap)
            rec = self.tasks.get(tid)
            if rec is not None and rec.status is Status.RETRY:
                stamp = stamp or utcnow()
                self._change(rec, Status.PENDING, stamp, None, {"reason": "backoff elapsed"})
                self._queue(rec)
        # tasks whose holder never came back after a broker restart
        grace = self.s.heartbeat_s * self.s.heartbeat_misses * 2
        if now - self.started > grace:
            for rec in list(self.tasks.values()):
                if rec.status in ACTIVE and rec.assigned_to not in self.peers and rec.assigned_to != self.s.node_id:
                    self._requeue(rec, stamp or utcnow(), f"holder {rec.assigned_to} did not re-register")
        self.metrics.pending.set(len(self.dispatcher))
        self.metrics.open_tasks.set(len(self.tasks))
        self._dirty_dispatch = True

    # --- submissions ------------------------------------------------------------------------------
    async def submit(self, route: bytes, msg: Submit, submitter: str | None) -> None:
        """Create tasks (or find them by idempotency key); ACCEPTED goes out after the commit."""
        if not self.accepting:
            raise CasperError(
                "the policeman is shutting down and accepts no new work", hint="submit again once it is back"
            )
        if not self.store.healthy:
            raise StorageError(
                f"the task store is unavailable ({self.store.last_error}); no new work is accepted",
                hint="the policeman keeps running and accepts work again once Postgres is back; "
                "submit again (with an idempotency key it is safe)",
            )
        specs = msg.tasks
        for spec in specs:
            handlers.get(spec.type)  # unknown type: an error for the whole submit, nothing half-done
        keys = [s.idempotency_key for s in specs if s.idempotency_key and s.idempotency_key not in self.keys]
        if keys:
            for key, tid in (await self.store.idempotency(keys)).items():
                self._remember_key(key, tid)
        inputs: list[str] = []
        for n, spec in enumerate(specs):
            try:
                inputs.append(to_json(spec.input))  # all checked before anything is created
            except ValueError as exc:
                raise InvalidBodyError(f"task {n}: input {exc}", hint="inputs must be plain JSON objects") from None
        ids: list[uuid.UUID] = []
        existing: list[bool] = []
        terminal_waits: list[uuid.UUID] = []
        stamp = utcnow()
        for spec in specs:
            key = spec.idempotency_key
            if key and key in self.keys:
                tid = self.keys[key]
                ids.append(tid)
                existing.append(True)
                rec = self.tasks.get(tid)
                if msg.wait:
                    if rec is not None:
                        rec.waiters.append(route)
                    else:
                        terminal_waits.append(tid)
                continue
            rec = self._create(spec, submitter, stamp)
            if msg.wait:
                rec.waiters.append(route)
            ids.append(rec.id)
            existing.append(False)
        frames = codec.encode(Accepted(req_id=msg.req_id, task_ids=tuple(ids), existing=tuple(existing)))
        self.store.after_commit(lambda: self._send_control(route, frames))
        self.metrics.submitted.inc(existing.count(False))
        for tid in terminal_waits:
            asyncio.get_running_loop().create_task(self._done_from_store(route, tid))

    def _create(
        self, spec: TaskSpec, submitter: str | None, stamp: datetime, detail: dict[str, Any] | None = None
    ) -> TaskRecord:
        rec = TaskRecord.from_spec(new_task_id(), spec, self.policy_for(spec.type).max_attempts, submitter)
        own = self.s.task_policies.get(spec.type)
        if rec.timeout_s is None and own is not None and own.timeout_s is not None:
            rec.timeout_s = own.timeout_s  # the type's default timeout
        self.tasks[rec.id] = rec
        self.store.stage(
            rec,
            TaskEvent(stamp, rec.id, None, Status.PENDING.value, submitter, 0, json.dumps(detail) if detail else None),
        )
        if spec.idempotency_key:
            self._remember_key(spec.idempotency_key, rec.id)
            self.store.stage_key(spec.idempotency_key, rec.id, rec.created_at)
        self._queue(rec)
        return rec

    def _remember_key(self, key: str, tid: uuid.UUID) -> None:
        self.keys[key] = tid
        self.keys.move_to_end(key)
        while len(self.keys) > 200_000:
            self.keys.popitem(last=False)

    def _on_submit_from_peer(self, route: bytes, peer: Peer, msg: Submit) -> None:
        raise UnsupportedError(
            "SUBMIT is not accepted on the mesh socket in this version",
            hint="submit through the policeman's control socket",
        )

    # --- work the policeman creates or runs itself (jobs) ----------------------------------------
    async def submit_local(
        self,
        spec: TaskSpec,
        attachments: tuple[bytes, ...] = (),
        submitter: str = "policeman",
        holder: str | None = None,
    ) -> tuple[uuid.UUID, bool]:
        """Create one task from inside the policeman (a job's subtasks, a peer's hand-off); returns
        (id, existed). Attachments are committed before the task row, so a TASK never lacks them.
        With ``holder`` (a direct hand-off) the task is assigned to that peer at once if it can take
        it — registered, alive, capable, with credit, breaker closed — else queued as usual."""
        if not self.store.healthy:
            raise StorageError(
                f"the task store is unavailable ({self.store.last_error})",
                hint="the job continues once Postgres is back",
            )
        key = spec.idempotency_key
        if key and key not in self.keys:
            for k, tid in (await self.store.idempotency([key])).items():
                self._remember_key(k, tid)
        if key and key in self.keys:
            return self.keys[key], True
        handlers.get(spec.type)
        rec = TaskRecord.from_spec(new_task_id(), spec, self.policy_for(spec.type).max_attempts, submitter)
        if attachments:
            if self.save_attachments is None:
                raise UnsupportedError("this policeman cannot store attachments", hint="a bug: report it")
            await self.save_attachments(rec.id, "input", attachments)
            rec.attachments = attachments
        if key and key in self.keys:  # created meanwhile by a concurrent caller
            return self.keys[key], True
        self.tasks[rec.id] = rec
        stamp = utcnow()
        self.store.stage(rec, TaskEvent(stamp, rec.id, None, Status.PENDING.value, submitter, 0, None))
        if key:
            self._remember_key(key, rec.id)
            self.store.stage_key(key, rec.id, rec.created_at)
        if not (holder and self._assign_to_holder(rec, holder, stamp)):
            self._queue(rec)
        self.metrics.submitted.inc()
        await self.store.committed()
        return rec.id, False

    def _assign_to_holder(self, rec: TaskRecord, holder: str, stamp: datetime) -> bool:
        peer = self.peers.get(holder)
        now = time.monotonic()
        ttype = handlers.REGISTRY.get(rec.type)
        needs = set(rec.requires) | set(ttype.requires if ttype else ())
        if (
            peer is None
            or peer.clock.state(now) is not Liveness.ALIVE
            or not peer.slot.can_take(now)
            or not needs <= peer.slot.capabilities
        ):
            return False
        rec.attempts = 1
        rec.assigned_to = holder
        rec.assigned_at = stamp
        rec.lease_deadline = stamp + timedelta(seconds=self.s.lease_s)
        self._change(rec, Status.ASSIGNED, stamp, holder, {"handoff": True})
        peer.held.add(rec.id)
        peer.slot.inflight += 1
        self.leases[rec.id] = now + self.s.lease_s
        self.metrics.dispatched.inc()
        return True

    def directory(self, capability: str | None = None) -> list[dict[str, Any]]:
        """Live peers as other peers should reach them (for direct hand-off), least loaded first."""
        now = time.monotonic()
        out = [
            {
                "node_id": p.node_id,
                "role": p.role,
                "endpoint": p.endpoint,
                "public_key": p.public_key,
                "capabilities": sorted(p.slot.capabilities),
                "capacity": p.slot.capacity,
                "inflight": p.slot.inflight,
            }
            for p in self.peers.values()
            if p.clock.state(now) is Liveness.ALIVE
            and p.slot.can_take(now)
            and (capability is None or capability in p.slot.capabilities)
        ]
        return sorted(out, key=lambda d: (d["inflight"] / max(1, d["capacity"]), d["node_id"]))

    def start_local(self, rec: TaskRecord) -> bool:
        """Mark a local task as running on the policeman; False if it is not pending any more."""
        if rec.status is not Status.PENDING or self.tasks.get(rec.id) is not rec:
            return rec.status is Status.PROCESSING and rec.assigned_to == self.s.node_id
        stamp = utcnow()
        rec.attempts += 1
        rec.assigned_to = self.s.node_id
        rec.assigned_at = stamp
        self._change(rec, Status.ASSIGNED, stamp, self.s.node_id)
        self._change(rec, Status.PROCESSING, stamp, self.s.node_id)
        rec.started_at = stamp
        return True

    def finish_local(self, rec: TaskRecord, output: Any = None, error: CasperError | None = None) -> None:
        if self.tasks.get(rec.id) is not rec or rec.terminal:
            return
        stamp = utcnow()
        if error is None:
            rec.output_json = to_json(output)
            self._finish(rec, Status.COMPLETE, stamp, self.s.node_id)
        else:
            if output is not None:
                rec.output_json = to_json(output)
            self._fail(rec, stamp, self.s.node_id, error.code, error.message, False)

    async def _done_from_store(self, route: bytes, tid: uuid.UUID) -> None:
        await self.store.committed()  # the ACCEPTED of the same submit goes out first
        row = await self.store.get(tid)
        if row is None:
            return
        rec = record_from_row(row)
        self._send_control(
            route,
            codec.encode(Done(task_id=tid, status=rec.status.value, output=row["output"], error=_last_error(rec))),
        )

    def _send_control(self, route: bytes, frames: list[bytes]) -> None:
        assert self.control is not None
        why = send_now(self.control, [route, *frames])
        if why is not None:
            self.metrics.send_failures.labels(why).inc()

    # --- admin operations -------------------------------------------------------------------------
    def cancel(self, tid: uuid.UUID) -> dict[str, Any]:
        rec = self.tasks.get(tid)
        if rec is None:
            raise TaskNotFoundError(
                f"task {tid} is not open (already finished, or no such task)", hint="caspectl get ID shows its state"
            )
        stamp = utcnow()
        holder = rec.assigned_to if rec.status in ACTIVE else None
        if holder is not None and holder in self.peers:
            peer = self.peers[holder]
            self._release(peer, rec)
            peer.slot.breaker.release_probe()
            frames = codec.encode(Cancel(task_ids=(tid,), reason="cancelled by operator"))
            self.store.after_commit(lambda: self._send_mesh(peer.route, frames))
        self._finish(rec, Status.CANCELLED, stamp, holder, {"by": "operator"})
        return {"id": str(tid), "status": Status.CANCELLED.value, "was_running_on": holder}

    def retry(self, row: dict[str, Any]) -> dict[str, Any]:
        """Run a dead or cancelled task again, as a new task (the old one keeps its history)."""
        if row["status"] not in (Status.DEAD.value, Status.CANCELLED.value):
            raise InvalidBodyError(
                f"task {row['id']} is {row['status']}; only dead or cancelled tasks are retried",
                hint="caspectl cancel ID first, or wait for it to finish",
            )
        spec = TaskSpec(
            type=row["type"],
            input=row["input"] or {},
            priority=row["priority"],
            requires=tuple(row["requires"] or ()),
            affinity=row["affinity"],
            max_attempts=row["max_attempts"],
            timeout_s=row["timeout_s"],
            parent_id=row["parent_id"],
            cache=row["cache"],
        )
        rec = self._create(spec, "caspectl retry", utcnow(), {"retry_of": str(row["id"])})
        return {"id": str(rec.id), "retry_of": str(row["id"]), "status": rec.status.value}

    def set_draining(self, node_id: str, draining: bool) -> dict[str, Any]:
        peer = self.peers.get(node_id)
        if peer is None:
            known = ", ".join(sorted(self.peers)) or "none"
            raise TaskNotFoundError(f"no peer named {node_id!r}", hint=f"registered peers: {known}")
        peer.drained_by_operator = draining
        peer.update_draining()
        self._dirty_dispatch = True
        log.info("peer %s %s by operator", node_id, "drained" if draining else "resumed")
        return {"peer": node_id, "draining": draining, "inflight": peer.slot.inflight}

    def peers_view(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [p.view(now) for p in sorted(self.peers.values(), key=lambda p: p.node_id)]

    def status_view(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for rec in self.tasks.values():
            counts[rec.status.value] = counts.get(rec.status.value, 0) + 1
        return {
            "node_id": self.s.node_id,
            "role": "policeman",
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.started, 1),
            "mesh": self.s.advertise,
            "peers": len(self.peers),
            "open_tasks": counts,
            "queued": len(self.dispatcher),
            "inflight": sum(p.slot.inflight for p in self.peers.values()),
            "store": {
                "healthy": self.store.healthy,
                "commits": self.store.commits,
                "staged": self.store.staged,
                "commit_failures": self.store.commit_failures,
                "last_error": self.store.last_error,
            },
            "breakers": {p.node_id: p.slot.breaker.state.value for p in self.peers.values()},
            "dependency_breakers": {"postgres": self.store.breaker.state.value},
        }


_HANDED_BACK = frozenset({"handed-back", "draining"})


def _ttype_flag(name: str, flag: str) -> bool:
    ttype = handlers.REGISTRY.get(name)
    return bool(ttype is not None and getattr(ttype, flag))


def _last_error(rec: TaskRecord) -> ErrorBody | None:
    if not rec.error_json:
        return None
    history = json.loads(rec.error_json)
    if not history:
        return None
    last = history[-1]
    return ErrorBody(code=str(last.get("code") or "task")[:64], message=str(last.get("message", ""))[:4000])
