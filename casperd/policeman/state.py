"""The policeman core's state and the few primitives every concern shares.

Everything here is plain data and arithmetic: the peers, the open tasks, leases, the retry heap,
the idempotency keys, and ``change``, the one way a task's status moves (a trigger looked up in
``lifecycle.STEPS``, staged with its event). Outputs accumulate in ``out`` until the shell takes
them (:meth:`CoreState.take`).
"""

from __future__ import annotations

import heapq
import json
import logging
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from casperd import codec
from casperd.breaker import CircuitBreaker
from casperd.dispatch import Dispatcher, PeerSlot, shrink
from casperd.enrollment import Enrollment
from casperd.errors import OutputTooLargeError
from casperd.handlers import Catalog
from casperd.lifecycle import Status, Trigger
from casperd.liveness import PeerClock
from casperd.messages import Command, new_task_id
from casperd.metrics import Metrics
from casperd.policeman.actions import Action, Arm, Send, Socket, Stage, StageKey
from casperd.quotas import Limits, Quotas
from casperd.retry import RetryPolicy
from casperd.settings import Settings
from casperd.taskrecord import TaskEvent, TaskRecord

log = logging.getLogger("casperd.broker")
_VALUE = {s: s.value for s in Status}
"""Each status's text (``Enum.value`` is a property: a dict lookup costs a fifth of it)."""
_PENDING = Status.PENDING.value
_NOTHING: frozenset[str] = frozenset()
_dumps = json.dumps
_event = tuple.__new__
"""Makes a TaskEvent from a tuple of all its fields in C (the NamedTuple's ``__new__`` is Python)."""


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
    registered_at: float
    held: set[uuid.UUID] = field(default_factory=set)
    drained_by_operator: bool = False
    send_failing: bool = False
    draining_itself: bool = False
    public_key: str | None = None
    cache: dict[str, int] | None = None  # its result-cache counters, from its last HEARTBEAT
    cpu_pct: float | None = None
    rss_bytes: int | None = None
    key: str | None = None
    """The enrolled Curve key that registered this peer (None: enrollment off)."""

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
            "cpu_pct": self.cpu_pct,
            "rss_bytes": self.rss_bytes,
        }


class CoreState:
    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        metrics: Metrics,
        started: float,
        new_id: Callable[[], uuid.UUID] = new_task_id,
    ) -> None:
        self.s = settings
        self.new_id = new_id
        """Makes task ids (UUIDv7: they carry their creation time); tests pass a deterministic one."""
        self.catalog = catalog
        self.metrics = metrics
        self.started = started
        self.clock = started
        """Monotonic time of the event being handled (set by every entry point)."""
        self.tasks: dict[uuid.UUID, TaskRecord] = {}
        self.dispatcher = Dispatcher()
        self.peers: dict[str, Peer] = {}
        self.by_route: dict[bytes, Peer] = {}
        self.retry_heap: list[tuple[float, uuid.UUID]] = []
        self.keys: OrderedDict[str, uuid.UUID] = OrderedDict()
        self.breakers: dict[str, CircuitBreaker] = {}
        self.leases: dict[uuid.UUID, float] = {}
        """Lease deadline (monotonic) of every task a peer holds, renewed by its PROGRESS."""
        self.validating: set[uuid.UUID] = set()
        """Tasks whose asynchronous validation is running (a restart loses it)."""
        self.policy = RetryPolicy(
            settings.max_attempts, settings.backoff_base_s, settings.backoff_factor, settings.backoff_cap_s
        )
        self._policies: dict[str, RetryPolicy] = {}
        self._transition_counter = {s: metrics.transitions.labels(s.value) for s in Status}
        self._moved: dict[Status, int] = {}
        """Transitions per new status since the last :meth:`take`, counted into the metric there
        (one increment per status and event rather than one per task)."""
        self.accepting = True
        self.dirty = False
        """Something changed that may allow new assignments (dispatch has work to do)."""
        self.out: list[Action] = []
        self.done_out: dict[bytes, list[dict[str, Any]]] = {}
        """DONE items per waiting submitter, sent as one DONE per submitter by :meth:`take`."""
        self.enrollment: Enrollment | None = None
        """With Curve and enrollment on: who may join and as whom (casperd.enrollment)."""
        self.quotas = Quotas(
            Limits(
                open_tasks=settings.max_open_tasks,
                open_per_submitter=settings.max_open_per_submitter,
                peer_rate_per_s=settings.peer_tasks_per_s,
                peer_burst=max(1, min(200, int(settings.peer_tasks_per_s * 4 + 0.999))),
                turn_bytes=settings.max_turn_bytes,
                attachment_bytes=settings.max_attachment_bytes,
            )
        )
        """Open tasks per submitter, tasks per peer per second, bytes per turn and attachment."""

    def take(self) -> list[Action]:
        """The actions produced since the last call, in order; the DONEs of the event last, one
        message per waiting submitter (split only by the message size limit)."""
        if self.done_out:
            self._flush_done()
        if self._moved:
            moved, self._moved = self._moved, {}
            for status, n in moved.items():
                self._transition_counter[status].inc(n)
        out, self.out = self.out, []
        return out

    def compact(self) -> None:
        """Give back the tables a burst grew (the shell calls it when the open tasks have drained)."""
        tables: list[dict[Any, Any] | set[Any]] = [self.tasks, self.leases, self.validating, self.done_out]
        for table in [*tables, *(p.held for p in self.peers.values())]:
            shrink(table)
        self.dispatcher.compact()

    def done_to(self, route: bytes, item: dict[str, Any]) -> None:
        """Tell a waiting submitter that a task ended (after the commit, in the event's DONE)."""
        items = self.done_out.get(route)
        if items is None:
            self.done_out[route] = [item]
        else:
            items.append(item)

    def _flush_done(self) -> None:
        pending, self.done_out = self.done_out, {}
        for route, items in pending.items():
            messages, too_big = codec.encode_batches(Command.DONE, "done", items, self.s.max_message_bytes)
            for item in too_big:  # its output alone fills a message: the submitter reads it with `get`
                message = f"the output does not fit in a DONE of {self.s.max_message_bytes} bytes; read it with get"
                error = {"code": OutputTooLargeError.code, "message": message, "hint": None}
                alone = {**item, "output": None, "error": error}
                messages.append((codec.encode_raw(Command.DONE, {"done": [alone]}), []))
            for frames, _ in messages:
                self.out.append(Send(Socket.CONTROL, route, frames, after_commit=True))

    # --- policies ---------------------------------------------------------------------------------
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

    def requirements(self, rec: TaskRecord) -> frozenset[str]:
        ttype = self.catalog.find(rec.type)
        own = ttype.requires if ttype else ()
        if not own and not rec.requires:
            return _NOTHING
        return frozenset(rec.requires).union(own)

    def is_local(self, type_name: str) -> bool:
        ttype = self.catalog.find(type_name)
        return bool(ttype is not None and ttype.local)

    def remember_key(self, key: str, tid: uuid.UUID) -> None:
        self.keys[key] = tid
        self.keys.move_to_end(key)
        while len(self.keys) > 200_000:
            self.keys.popitem(last=False)

    # --- outputs ----------------------------------------------------------------------------------
    def size_input(self, rec: TaskRecord) -> None:
        """Mark a record whose input waits in Postgres rather than in memory while it is queued:
        larger than ``inline_input_bytes`` (the JSON text and the input attachments together), and
        not a local task (a job reads its input on the policeman)."""
        held = len(rec.input_json) + sum(map(len, rec.attachments or ())) if rec.input_json is not None else None
        rec.spill = not self.is_local(rec.type) and (held is None or held > self.s.inline_input_bytes)

    def stage_new(self, rec: TaskRecord, stamp: datetime, by: str | None, detail: dict[str, Any] | None) -> None:
        self.size_input(rec)
        self.tasks[rec.id] = rec
        self.quotas.opened(rec.submitted_by or "")
        event = _event(TaskEvent, (stamp, rec.id, None, _PENDING, by, 0, _dumps(detail) if detail else None))
        self.out.append(Stage(rec, event))
        if rec.idempotency_key:
            self.remember_key(rec.idempotency_key, rec.id)
            self.out.append(StageKey(rec.idempotency_key, rec.id, rec.created_at))

    def change(
        self, rec: TaskRecord, trigger: Trigger, stamp: datetime, peer: str | None, detail: dict[str, Any] | None = None
    ) -> None:
        """The one way a task moves: the trigger's row of the lifecycle table, staged with its event."""
        old = rec.apply(trigger, stamp)
        new = rec.status
        detail_json = _dumps(detail) if detail else None
        event = _event(TaskEvent, (stamp, rec.id, _VALUE[old], _VALUE[new], peer, rec.attempts, detail_json))
        self.out.append(Stage(rec, event))
        moved = self._moved
        moved[new] = moved.get(new, 0) + 1

    def send_mesh(self, peer_or_route: Peer | bytes, frames: list[bytes], now: float | None = None) -> None:
        """Frames to a peer now (a heartbeat, an ERROR, a REPLY)."""
        if isinstance(peer_or_route, Peer):
            route = peer_or_route.route
            if now is not None:
                peer_or_route.clock.sent(now)
        else:
            route = peer_or_route
            peer = self.by_route.get(route)
            if peer is not None and now is not None:
                peer.clock.sent(now)
        self.out.append(Send(Socket.MESH, route, frames))

    def arm_retry(self, at: float, tid: uuid.UUID) -> None:
        heapq.heappush(self.retry_heap, (at, tid))
        self.out.append(Arm(at))
