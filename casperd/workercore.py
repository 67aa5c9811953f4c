"""WorkerCore: every rule of a worker node (developer, tester), sans-io.

Events in — frames from the policeman, a handler that took its slot or finished, a tick with the
time, draining on or off — and actions out: frames to send, handlers to start (or start once a
cancelled run of the same task is gone), runs to abort, requests to resolve, a READY to send after
a pause, a reconnect. No sockets, no clock, no asyncio; randomness (the jitter of reconnects and
re-registration) comes from the ``rng`` the shell passes in.

Rules: TASKs start within capacity + prefetch (a duplicate attempt is ignored; a newer attempt of
work already running here just renumbers it); reports are batched (one RESULT, FAILED and PROGRESS
message per flush); held tasks' leases are renewed every third of the lease; a policeman silent
for ``misses`` intervals means reconnect with jittered exponential backoff (1 s doubling to 32 s);
ERROR ``unknown-peer`` means READY again after a short random pause; a run interrupted by anything
but the policeman's CANCEL is handed back (no attempt spent).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from casperd import calltrace, codec
from casperd.errors import DrainingError, HandedBackError, OutputTooLargeError, ProtocolError
from casperd.hints import silent_broker_hint
from casperd.liveness import PeerClock
from casperd.messages import (
    RENEW,
    WIRE_MESSAGE_MAX,
    Assignment,
    Cancel,
    Command,
    Disconnect,
    Error,
    ErrorBody,
    FailedBatch,
    Failure,
    Heartbeat,
    Message,
    Progress,
    Ready,
    Reply,
    TaskBatch,
    outcome_body,
)
from casperd.metrics import Metrics
from casperd.procstats import STATS_EVERY_S
from casperd.settings import Settings

log = logging.getLogger("casperd.worker")


@dataclass(frozen=True, slots=True)
class SendFrames:
    frames: list[bytes]


@dataclass(frozen=True, slots=True)
class StartRun:
    """Run the handler of this assignment (``after``: once the cancelled run of the same task ends)."""

    assignment: Assignment
    attachments: tuple[bytes, ...]
    after: bool = False


@dataclass(frozen=True, slots=True)
class AbortRun:
    task_id: uuid.UUID


@dataclass(frozen=True, slots=True)
class Resolve:
    """A REPLY to a request of ours (``error``: the wire error body when not ok)."""

    req_id: int
    ok: bool
    data: Any
    attachments: tuple[bytes, ...]
    error: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class ReadyLater:
    delay_s: float


@dataclass(frozen=True, slots=True)
class Reconnect:
    """Replace the DEALER (then call :meth:`WorkerCore.connected`)."""


WorkerAction = SendFrames | StartRun | AbortRun | Resolve | ReadyLater | Reconnect


@dataclass(slots=True)
class Run:
    attempt: int
    started: float
    in_slot: bool = False  # holds an execution slot (prefetched tasks wait for one)
    reported_start: bool = False
    cancelled_by_broker: bool = False


@dataclass(frozen=True, slots=True)
class Identity:
    """What READY says about this node besides its state."""

    epoch: str
    pid: int
    host: str
    version: str
    public_key: str | None


class WorkerCore:
    def __init__(
        self, settings: Settings, identity: Identity, metrics: Metrics, rng: Callable[[], float], now: float
    ) -> None:
        self.s = settings
        self.me = identity
        self.metrics = metrics
        self.rng = rng
        self.clock = PeerClock(settings.heartbeat_s, settings.heartbeat_misses, last_seen=now)
        self.running: dict[uuid.UUID, Run] = {}
        self.draining = False
        self.registered = False
        self.cache_counters: dict[str, int] | None = None  # the shell keeps them current; sent in HEARTBEAT
        self.completed = 0
        self.failed = 0
        self.flush_needed = False
        self._results: list[dict[str, Any]] = []
        self._failures: list[Failure] = []
        self._reconnects = 0
        self._next_reconnect = 0.0
        self._ready_pending = False
        self._last_renew = 0.0
        self._renew_every = settings.lease_s / 3
        self.out: list[WorkerAction] = []
        self.stats: Callable[[], tuple[float, int]] | None = None
        """The process's (CPU %, resident bytes), sampled by the shell for the heartbeats."""
        self._stats_at = 0.0

    def take(self) -> list[WorkerAction]:
        out, self.out = self.out, []
        return out

    def _send(self, frames: list[bytes], now: float | None = None) -> None:
        self.out.append(SendFrames(frames))
        if now is not None:
            self.clock.sent(now)

    # --- registration -----------------------------------------------------------------------------
    def connected(self, now: float) -> None:
        """A new DEALER is up: give the policeman a full dead-interval to answer, send READY."""
        self.clock.seen(now)
        self.send_ready(now)

    def send_ready(self, now: float) -> None:
        self._send(
            codec.encode(
                Ready(
                    node_id=self.s.node_id,
                    epoch=self.me.epoch,
                    role=self.s.role,
                    endpoint=self.s.advertise,
                    pid=self.me.pid,
                    host=self.me.host,
                    capabilities=self.s.all_capabilities,
                    capacity=0 if self.draining else self.s.capacity + self.s.prefetch,
                    tasks=tuple(self.running),
                    heartbeat_ms=int(self.s.heartbeat_s * 1000),
                    version=self.me.version,
                    public_key=self.me.public_key,
                )
            ),
            now,
        )

    def ready_due(self, now: float) -> None:
        self._ready_pending = False
        self.send_ready(now)

    # --- frames from the policeman ----------------------------------------------------------------
    def on_frames(self, frames: list[bytes], now: float) -> None:
        self.clock.seen(now)
        self._reconnects = 0
        try:
            decoded = codec.decode(frames, max_bytes=self.s.max_message_bytes)
        except ProtocolError as exc:
            self.metrics.rejected.labels(exc.code).inc()
            log.warning("dropped a bad frame from the broker: %s", exc.message)
            return
        msg = decoded.message
        self.metrics.messages_by(msg.COMMAND.name, "in").inc()
        handler = HANDLERS.get(type(msg))
        if handler is not None:
            handler(self, msg, decoded.attachments, now)

    def _tasks(self, msg: TaskBatch, attachments: tuple[bytes, ...], now: float) -> None:
        self.registered = True
        # attachments ride only in single-task TASK messages (the broker sends those alone)
        extra = attachments if len(msg.tasks) == 1 else ()
        for a in msg.tasks:
            self.assign(a, extra, now)

    def _reply(self, msg: Reply, attachments: tuple[bytes, ...], now: float) -> None:
        error = msg.error.model_dump() if msg.error else ({} if not msg.ok else None)
        self.out.append(Resolve(msg.req_id, msg.ok, msg.data, attachments, error))

    def _cancel(self, msg: Cancel, attachments: tuple[bytes, ...], now: float) -> None:
        for tid in msg.task_ids:
            run = self.running.get(tid)
            if run is not None:
                run.cancelled_by_broker = True
                self.out.append(AbortRun(tid))
                log.info("task %s cancelled: %s", tid, msg.reason)

    def _heartbeat(self, msg: Heartbeat, attachments: tuple[bytes, ...], now: float) -> None:
        self.registered = True

    def _error(self, msg: Error, attachments: tuple[bytes, ...], now: float) -> None:
        if msg.code != "unknown-peer":
            log.warning("broker reports [%s] %s", msg.code, msg.message)
            return
        # a restarted broker: register again after a short random pause (no READY storm)
        if not self._ready_pending:
            self._ready_pending = True
            delay = self.rng() * min(0.5, self.s.heartbeat_s / 2)
            log.info("broker does not know this node (restarted?); registering again in %.2fs", delay)
            self.out.append(ReadyLater(delay))

    def _disconnect(self, msg: Disconnect, attachments: tuple[bytes, ...], now: float) -> None:
        log.warning("broker disconnects us: %s; registering again", msg.reason)
        self.send_ready(now)

    # --- runs ---------------------------------------------------------------------------------------
    def assign(self, a: Assignment, attachments: tuple[bytes, ...], now: float) -> None:
        """An assignment (a TASK, or a hand-off the policeman recorded with us as holder)."""
        self._renew_every = min(self._renew_every, a.lease_ms / 3000)
        old = self.running.get(a.task_id)
        if old is not None:
            if a.attempt <= old.attempt:
                return  # duplicate delivery
            if old.cancelled_by_broker:  # a new attempt of a task being cancelled here: run it after
                self.out.append(StartRun(a, attachments, after=True))
            else:  # the same work, reassigned to us: report it under the new attempt
                old.attempt = a.attempt
            return
        if self.draining:
            error = ErrorBody(code=DrainingError.code, message=f"{self.s.node_id} is shutting down")
            self._failures.append(Failure(task_id=a.task_id, attempt=a.attempt, retryable=True, error=error))
            self.flush_needed = True
            return
        self.running[a.task_id] = Run(a.attempt, now)
        calltrace.mark("task received", a.task_id)
        self.out.append(StartRun(a, attachments))
        self.flush_needed = True

    def in_slot(self, tid: uuid.UUID) -> None:
        """The run got its execution slot: PROGRESS (processing means running, not just received)."""
        run = self.running.get(tid)
        if run is not None:
            run.in_slot = True
            self.flush_needed = True

    def attempt_of(self, a: Assignment) -> int:
        run = self.running.get(a.task_id)
        return run.attempt if run is not None else a.attempt

    def succeeded(self, a: Assignment, output: Any, duration_ms: float, attachments: tuple[bytes, ...] | None) -> bool:
        """The handler returned (``attachments`` not None: an attached result, sent alone). False
        when the result cannot be sent (too large): it failed instead."""
        body = outcome_body(a.task_id, self.attempt_of(a), output, duration_ms)
        if attachments is None:
            self._results.append(body)
        else:
            frames = codec.encode_raw(Command.RESULT, {"results": [body]}, attachments)
            if sum(map(len, frames)) > self.s.max_message_bytes:
                message = f"the result with its attachments does not fit in {self.s.max_message_bytes} bytes"
                self.failed_run(a, OutputTooLargeError.code, message, False)
                return False
            self._send(frames)
        self.completed += 1
        return True

    def failed_run(self, a: Assignment, code: str, message: str, retryable: bool) -> None:
        self.failed += 1
        error = ErrorBody(code=code, message=message[:WIRE_MESSAGE_MAX])
        self._failures.append(Failure(task_id=a.task_id, attempt=self.attempt_of(a), retryable=retryable, error=error))
        self.flush_needed = True

    def interrupted(self, a: Assignment) -> None:
        """The run was cancelled: by the policeman (nothing to report) or by shutdown (hand it back)."""
        run = self.running.get(a.task_id)
        if run is None or not run.cancelled_by_broker:
            error = ErrorBody(code=HandedBackError.code, message=f"{self.s.node_id} stopped before finishing")
            self._failures.append(Failure(task_id=a.task_id, attempt=a.attempt, retryable=True, error=error))
        self.flush_needed = True

    def ended(self, tid: uuid.UUID) -> None:
        self.running.pop(tid, None)
        self.flush_needed = True

    # --- batched reports ----------------------------------------------------------------------------
    def flush(self, now: float) -> None:
        self.flush_needed = False
        if self._results:
            batch, self._results = self._results, []
            messages, too_big = codec.encode_batches(Command.RESULT, "results", batch, self.s.max_message_bytes)
            for frames, _ in messages:
                self._send(frames, now)
            if calltrace.enabled():
                for body in batch:
                    calltrace.mark("result sent", body["task_id"])
            for out in too_big:
                message = f"the output does not fit in {self.s.max_message_bytes} bytes"
                error = ErrorBody(code=OutputTooLargeError.code, message=message)
                self._failures.append(
                    Failure(task_id=out["task_id"], attempt=out["attempt"], retryable=False, error=error)
                )
        if self._failures:
            failures, self._failures = self._failures, []
            for i in range(0, len(failures), 1000):
                self._send(codec.encode(FailedBatch(failures=tuple(failures[i : i + 1000]))), now)
        started = [tid for tid, r in self.running.items() if r.in_slot and not r.reported_start]
        for tid in started:
            self.running[tid].reported_start = True
            calltrace.mark("processing sent", tid)
        for i in range(0, len(started), 1000):
            self._send(codec.encode(Progress(task_ids=tuple(started[i : i + 1000]))), now)

    # --- timers -------------------------------------------------------------------------------------
    def tick(self, now: float, input_waiting: bool) -> None:
        """``input_waiting``: frames from the policeman wait to be read (we were stalled, not it)."""
        if now - self.clock.last_seen > self.s.heartbeat_s * self.s.heartbeat_misses:
            if input_waiting:
                return  # the broker did talk; never drop what it said
            if now >= self._next_reconnect:
                self._reconnects += 1
                backoff = min(32.0, 2.0 ** (self._reconnects - 1)) * (0.5 + 0.5 * self.rng())
                self._next_reconnect = now + backoff
                hint = silent_broker_hint(self.s.broker, self.s.curve, self.registered, self._reconnects)
                log.warning(
                    "broker silent for %.1fs; reconnecting (next try in %.1fs)%s",
                    now - self.clock.last_seen,
                    backoff,
                    f"; {hint}" if hint else "",
                )
                self.out.append(Reconnect())
                self.connected(now)
                self.clock.last_seen = now - self.s.heartbeat_s * self.s.heartbeat_misses  # stay "silent"
            return
        if self.running and now - self._last_renew >= self._renew_every:
            # renew the leases of everything held: a PROGRESS marked "renew" changes no state
            self._last_renew = now
            held = list(self.running)
            for i in range(0, len(held), 1000):
                self._send(codec.encode(Progress(task_ids=tuple(held[i : i + 1000]), note=RENEW)), now)
        stats_due = self.stats is not None and now - self._stats_at >= STATS_EVERY_S
        if self.clock.heartbeat_due(now) or stats_due:
            cpu, rss = self.stats() if self.stats is not None else (None, None)
            self._stats_at = now
            beat = Heartbeat(
                load=len(self.running), draining=self.draining, cache=self.cache_counters, cpu_pct=cpu, rss_bytes=rss
            )
            self._send(codec.encode(beat), now)

    def set_draining(self, draining: bool, now: float) -> None:
        self.draining = draining
        self._send(codec.encode(Heartbeat(load=len(self.running), draining=draining)), now)

    def disconnect(self, now: float) -> None:
        self._send(codec.encode(Disconnect(reason="shutdown")), now)


Handler = Callable[[WorkerCore, Any, tuple[bytes, ...], float], None]
HANDLERS: dict[type[Message], Handler] = {
    TaskBatch: WorkerCore._tasks,
    Reply: WorkerCore._reply,
    Cancel: WorkerCore._cancel,
    Heartbeat: WorkerCore._heartbeat,
    Error: WorkerCore._error,
    Disconnect: WorkerCore._disconnect,
}
"""Message type from the policeman -> the core's handler."""
