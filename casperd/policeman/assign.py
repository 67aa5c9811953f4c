"""Dispatch, delivery and timers: who gets which task, leases, liveness, due retries.

``dispatch`` asks the pure :class:`~casperd.dispatch.Dispatcher` for (task, peer) pairs within each
peer's credit and emits the TASK frames for after the commit; a task whose large input waits in
Postgres asks the shell to load it first (``LoadInputs``, answered by :meth:`AssignRules.inputs_loaded`).
A TASK the shell could not send comes back as :meth:`AssignRules.undelivered` (Trigger.UNDELIVERED:
no attempt spent). ``tick`` expires leases, declares silent peers dead, moves due retries back to
pending and returns the tasks of holders that never re-registered after a restart.
"""

from __future__ import annotations

import heapq
import uuid
from datetime import timedelta
from typing import Any

from casperd import codec
from casperd.errors import OutputTooLargeError, StorageError
from casperd.lifecycle import ACTIVE, Status, Trigger
from casperd.liveness import Liveness
from casperd.messages import Cancel, Command, Heartbeat, assignment_body
from casperd.policeman.actions import LoadInputs, Now, Send, Socket
from casperd.policeman.registry import RegistryRules
from casperd.policeman.state import log
from casperd.taskrecord import TaskRecord


class AssignRules(RegistryRules):
    def dispatch(self, now: Now) -> int:
        """Assign what can be assigned; the TASK frames leave after the commit."""
        self.clock = now.mono
        if not self.dirty or not self.accepting:
            return 0
        self.dirty = False
        slots = {p.node_id: p.slot for p in self.peers.values() if p.clock.state(now.mono) is Liveness.ALIVE}
        pairs = self.dispatcher.assign(slots, now.mono)
        if not pairs:
            return 0
        stamp = now.wall
        lease = stamp + timedelta(seconds=self.s.lease_s)
        lease_until = now.mono + self.s.lease_s
        per_peer: dict[str, list[TaskRecord]] = {}
        to_load: dict[str, list[uuid.UUID]] = {}
        for tid, node in pairs:
            rec = self.tasks[tid]
            peer = self.peers[node]
            rec.assigned_to = node
            rec.assigned_at = stamp
            rec.lease_deadline = lease
            rec.not_before = None
            self.change(rec, Trigger.DISPATCH, stamp, node)
            peer.held.add(tid)
            self.leases[tid] = lease_until
            if rec.sendable:
                per_peer.setdefault(node, []).append(rec)
            else:  # a spilled input is in Postgres only: its TASK leaves once the shell has loaded it
                to_load.setdefault(node, []).append(tid)
        for node, recs in per_peer.items():
            self._send_tasks(node, recs, now)
        for node, tids in to_load.items():
            blobs = tuple(t for t in tids if self.tasks[t].attachments is None)
            self.out.append(LoadInputs(node, tuple(tids), blobs))
        self.metrics.dispatched.inc(len(pairs))
        return len(pairs)

    def inputs_loaded(
        self,
        node: str,
        task_ids: tuple[uuid.UUID, ...],
        found: dict[uuid.UUID, str] | None,
        now: Now,
        blobs: dict[uuid.UUID, list[bytes]] | None = None,
    ) -> None:
        """The shell loaded the spilled inputs of tasks assigned to ``node`` (``found``: id -> input
        JSON; None: the store could not be read; ``blobs``: id -> input attachments, for those the
        ``LoadInputs`` named). Tasks still assigned to ``node`` get their TASK; one whose input
        could not be had goes back to pending, no attempt spent; one the store answered for
        without its input or attachments fails (``storage``, not retried)."""
        self.clock = now.mono
        peer = self.peers.get(node)
        ready: list[TaskRecord] = []
        for tid in task_ids:
            rec = self.tasks.get(tid)
            if rec is None or rec.status is not Status.ASSIGNED or rec.assigned_to != node:
                continue  # cancelled, expired or handed elsewhere meanwhile
            text = found.get(tid) if found is not None else None
            if text is not None and not rec.input_loaded:
                rec.load_input(text)
            if rec.attachments is None and found is not None and blobs and tid in blobs:
                rec.load_attachments(blobs[tid])
            if rec.sendable and peer is not None:
                ready.append(rec)
                continue
            if peer is not None:  # not the peer's fault: no failure on its breaker, its probe slot freed
                self.release(peer, rec)
                peer.slot.breaker.release_probe()
            if found is not None:  # the store answered without it: retrying would loop, not heal
                missing = "its input or input attachments are missing from the task store"
                log.error("task %s: %s; it fails", tid, missing)
                self.fail(rec, now.wall, None, StorageError.code, missing, False)
                continue
            self.requeue(rec, now.wall, "its input could not be loaded from the task store", Trigger.UNDELIVERED)
        if ready and peer is not None:
            self._send_tasks(node, ready, now)

    def _send_tasks(self, node: str, recs: list[TaskRecord], now: Now) -> None:
        """TASK messages for tasks just assigned to ``node`` (inputs in memory): at once, while the
        commit of the assignment is in flight (``dispatch_before_commit``, SPEC 11: the report of
        such a run waits for that commit, :meth:`~casperd.policeman.core.PolicemanCore.unsettled`),
        or after the commit."""
        peer = self.peers[node]
        after = not self.s.dispatch_before_commit
        lease_ms = int(self.s.lease_s * 1000)
        bodies: list[dict[str, Any]] = []
        for rec in recs:
            body = assignment_body(rec.id, rec.type, rec.input, rec.attempts, lease_ms, rec.timeout_s, rec.cache)
            if rec.attachments:  # alone in its TASK message, the attachments as frames after the body
                frames = codec.encode_raw(Command.TASK, {"tasks": [body]}, rec.attachments)
                self.out.append(Send(Socket.MESH, peer.route, frames, after, (rec.id,), node))
                continue
            bodies.append(body)
        for frames, chunk in self._task_frames(bodies, now):
            self.out.append(Send(Socket.MESH, peer.route, frames, after, tuple(a["task_id"] for a in chunk), node))
        if bodies:
            peer.clock.sent(now.mono)

    def _task_frames(self, assignments: list[dict[str, Any]], now: Now) -> list[tuple[list[bytes], list[Any]]]:
        """TASK messages of at most 1000 assignments and within the size limit."""
        batches, too_big = codec.encode_batches(Command.TASK, "tasks", assignments, self.s.max_message_bytes)
        for a in too_big:  # cannot happen for inputs that came in a SUBMIT of the same limit
            rec = self.tasks.get(a["task_id"])
            if rec is not None and rec.status is Status.ASSIGNED and rec.assigned_to in self.peers:
                self.release(self.peers[rec.assigned_to], rec)
                self.fail(
                    rec,
                    now.wall,
                    rec.assigned_to,
                    OutputTooLargeError.code,
                    "task message exceeds max_message_bytes",
                    False,
                )
        return batches

    def undelivered(self, node: str | None, task_ids: tuple[uuid.UUID, ...], now: Now) -> None:
        """A TASK message could not be sent (peer gone, unroutable, queue full): its tasks go back
        at once, no attempt spent."""
        self.clock = now.mono
        peer = self.peers.get(node or "")
        if peer is not None:
            peer.slot.breaker.record_failure(now.mono)
        for tid in task_ids:
            rec = self.tasks.get(tid)
            if rec is not None and rec.status is Status.ASSIGNED and rec.assigned_to == node:
                if peer is not None:
                    self.release(peer, rec)
                self.requeue(rec, now.wall, f"TASK could not be delivered to {node}", Trigger.UNDELIVERED)

    def tick(self, now: Now) -> None:
        """Heartbeats, liveness, lease expiry, due retries. The shell calls it four times per
        heartbeat interval (and when an armed timer is due)."""
        self.clock = mono = now.mono
        hb = codec.encode(Heartbeat())
        for peer in list(self.peers.values()):
            state = peer.clock.state(mono)
            if state is Liveness.DEAD:
                log.warning(
                    "peer %s is dead (silent %.1fs); returning its %d tasks",
                    peer.node_id,
                    mono - peer.clock.last_seen,
                    len(peer.held),
                )
                peer.slot.breaker.trip(mono)  # back from the dead, it must earn its work again (half-open)
                self.drop_peer(peer, "dead", now)
                continue
            if peer.clock.heartbeat_due(mono):
                self.send_mesh(peer, hb, mono)
        for tid in [tid for tid, until in self.leases.items() if until < mono]:
            self.leases.pop(tid, None)
            rec = self.tasks.get(tid)
            if rec is None or rec.status not in ACTIVE:
                continue
            holder = self.peers.get(rec.assigned_to or "")
            log.warning("lease of task %s on %s expired; returning it", tid, rec.assigned_to)
            if holder is not None:
                self.release(holder, rec)
                holder.slot.breaker.record_failure(mono)  # a holder that goes quiet on a task is failing
                frames = codec.encode(Cancel(task_ids=(tid,), reason="lease expired"))
                self.out.append(Send(Socket.MESH, holder.route, frames, after_commit=True))
            if rec.status is Status.VALIDATING:
                continue  # the result is in; the policeman's own check decides
            self.requeue(rec, now.wall, f"lease expired on {rec.assigned_to}")
        while self.retry_heap and self.retry_heap[0][0] <= mono:
            _, tid = heapq.heappop(self.retry_heap)
            rec = self.tasks.get(tid)
            if rec is not None and rec.status is Status.RETRY:
                self.change(rec, Trigger.RETRY_DUE, now.wall, None, {"reason": "backoff elapsed"})
                self.queue(rec)
        # tasks whose holder never came back after a broker restart
        grace = self.s.heartbeat_s * self.s.heartbeat_misses * 2
        if mono - self.started > grace:
            for rec in list(self.tasks.values()):
                if rec.status in ACTIVE and rec.assigned_to not in self.peers and rec.assigned_to != self.s.node_id:
                    self.lose_holder(rec, now, f"holder {rec.assigned_to} did not re-register")
        self.metrics.pending.set(len(self.dispatcher))
        self.metrics.open_tasks.set(len(self.tasks))
        self.dirty = True
