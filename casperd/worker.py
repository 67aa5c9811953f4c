"""A worker node (developer or tester): takes TASKs from the broker, runs handlers, reports.

Theory of operation. The worker's DEALER (routing id ``node_id/epoch``) talks to the policeman.
TASK frames start one asyncio task per assignment, bounded by the advertised capacity. Reports
are batched: everything that finished or started since the last flush leaves as one RESULT, one
FAILED and one PROGRESS frame, scheduled once per loop turn, so a burst of quick tasks costs a few
frames, not one per task. Handlers never block the loop (subprocesses and awaits only), so
heartbeats are never starved by work.

If the broker is silent for ``misses`` intervals the worker reconnects with jittered exponential
backoff (1 s doubling to 32 s) and READYs again with the tasks it holds; an ERROR ``unknown-peer``
(a restarted broker) triggers the same READY after a short random pause (no READY storm). On
shutdown it announces draining, lets running tasks finish for up to ``drain_timeout_s``, hands
the rest back, and says DISCONNECT.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio

from casperd import __version__, codec, handlers
from casperd.cache import ResultCache, cache_key
from casperd.errors import CasperError, ProtocolError, RequestTimeoutError, UnknownTaskTypeError, from_wire
from casperd.liveness import PeerClock
from casperd.messages import (
    RENEW,
    Assignment,
    Cancel,
    Command,
    Disconnect,
    Error,
    ErrorBody,
    FailedBatch,
    Failure,
    Heartbeat,
    Progress,
    Ready,
    Reply,
    Request,
    TaskBatch,
    outcome_body,
)
from casperd.metrics import Metrics
from casperd.settings import Settings
from casperd.transport import SocketOptions, dealer, send_now

log = logging.getLogger("casperd.worker")


@dataclass(slots=True)
class Running:
    task: asyncio.Task[None]
    attempt: int
    started: float
    in_slot: bool = False  # holds an execution slot (prefetched tasks wait for one)
    reported_start: bool = False
    cancelled_by_broker: bool = False


class Worker:
    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        ctx: zmq.asyncio.Context,
        opts: SocketOptions,
        cache: ResultCache | None,
    ) -> None:
        self.s = settings
        self.metrics = metrics
        self.ctx = ctx
        self.opts = opts
        self.cache = cache
        self.epoch = f"{int(time.time() * 1000):x}.{os.urandom(3).hex()}"
        self.identity = f"{settings.node_id}/{self.epoch}".encode()
        self.sock: zmq.asyncio.Socket | None = None
        self.clock = PeerClock(settings.heartbeat_s, settings.heartbeat_misses)
        self.running: dict[uuid.UUID, Running] = {}
        self.draining = False
        self.registered = False
        self._results: list[dict[str, Any]] = []
        self._failures: list[Failure] = []
        self._flush_scheduled = False
        self._reconnects = 0
        self._next_reconnect = 0.0
        self._ready_pending = False
        self._last_renew = 0.0
        self._renew_every = settings.lease_s / 3
        self._slots = asyncio.Semaphore(max(1, settings.capacity))
        self._req_id = 0
        self._requests: dict[int, asyncio.Future[tuple[Any, tuple[bytes, ...]]]] = {}
        self.services: Any = None  # casperd.agents.services.WorkerServices, set by the node
        self.completed = 0
        self.failed = 0

    # --- connection -----------------------------------------------------------------------------
    def connect(self) -> zmq.asyncio.Socket:
        if self.sock is not None:
            self.sock.close(linger=0)
        self.sock = dealer(self.ctx, self.s.broker, self.identity, self.opts, curve=self.s.curve)
        now = time.monotonic()
        self.clock.seen(now)  # give the broker a full dead-interval to answer
        self.send_ready()
        return self.sock

    def send_ready(self) -> None:
        self._send(
            codec.encode(
                Ready(
                    node_id=self.s.node_id,
                    epoch=self.epoch,
                    role=self.s.role,
                    endpoint=self.s.advertise,
                    pid=os.getpid(),
                    host=_hostname(),
                    capabilities=self.s.all_capabilities,
                    capacity=0 if self.draining else self.s.capacity + self.s.prefetch,
                    tasks=tuple(self.running),
                    heartbeat_ms=int(self.s.heartbeat_s * 1000),
                    version=__version__.replace("+", "."),
                    public_key=self.opts.curve_public.decode() if self.s.curve and self.opts.curve_public else None,
                )
            )
        )

    def _ready_again(self) -> None:
        self._ready_pending = False
        self.send_ready()

    def _send(self, frames: list[bytes]) -> bool:
        if self.sock is None:
            return False
        why = send_now(self.sock, frames)
        if why is None:
            self.clock.sent(time.monotonic())
            return True
        self.metrics.send_failures.labels(why).inc()
        return False

    # --- incoming -----------------------------------------------------------------------------
    def on_broker(self, frames: list[bytes]) -> None:
        self.clock.seen(time.monotonic())
        self._reconnects = 0
        try:
            decoded = codec.decode(frames, max_bytes=self.s.max_message_bytes)
        except ProtocolError as exc:
            self.metrics.rejected.labels(exc.code).inc()
            log.warning("dropped a bad frame from the broker: %s", exc.message)
            return
        msg = decoded.message
        self.metrics.messages.labels(msg.COMMAND.name, "in").inc()
        if isinstance(msg, TaskBatch):
            self.registered = True
            # attachments ride only in single-task TASK messages (the broker sends those alone)
            extra = decoded.attachments if len(msg.tasks) == 1 else ()
            for a in msg.tasks:
                self._start(a, extra)
        elif isinstance(msg, Reply):
            fut = self._requests.pop(msg.req_id, None)
            if fut is not None and not fut.done():
                if msg.ok:
                    fut.set_result((msg.data, decoded.attachments))
                else:
                    fut.set_exception(from_wire(msg.error.model_dump() if msg.error else {}))
        elif isinstance(msg, Cancel):
            for tid in msg.task_ids:
                run = self.running.get(tid)
                if run is not None:
                    run.cancelled_by_broker = True
                    run.task.cancel()
                    log.info("task %s cancelled: %s", tid, msg.reason)
        elif isinstance(msg, Heartbeat):
            self.registered = True
        elif isinstance(msg, Error):
            if msg.code == "unknown-peer":
                # a restarted broker: register again after a short random pause (no READY storm)
                if not self._ready_pending:
                    self._ready_pending = True
                    delay = random.uniform(0.0, min(0.5, self.s.heartbeat_s / 2))
                    log.info("broker does not know this node (restarted?); registering again in %.2fs", delay)
                    asyncio.get_running_loop().call_later(delay, self._ready_again)
            else:
                log.warning("broker reports [%s] %s", msg.code, msg.message)
        elif isinstance(msg, Disconnect):
            log.warning("broker disconnects us: %s; registering again", msg.reason)
            self.send_ready()

    async def request(
        self, op: str, args: dict[str, Any], attachments: tuple[bytes, ...] = (), timeout_s: float = 15.0
    ) -> tuple[Any, tuple[bytes, ...]]:
        """Ask the broker something over the mesh (REQUEST/REPLY on the DEALER): agent services
        such as rate-limit permits and saved turns. Raises the broker's error, or RequestTimeoutError."""
        self._req_id = (self._req_id + 1) % (1 << 62)
        req_id = self._req_id
        fut: asyncio.Future[tuple[Any, tuple[bytes, ...]]] = asyncio.get_running_loop().create_future()
        self._requests[req_id] = fut
        try:
            if not self._send(codec.encode(Request(req_id=req_id, op=op, args=args), attachments)):
                raise RequestTimeoutError(f"cannot reach the policeman to {op}", hint="is the policeman up?")
            async with asyncio.timeout(timeout_s):
                return await fut
        except TimeoutError:
            raise RequestTimeoutError(
                f"the policeman did not answer {op} within {timeout_s:g}s", hint="is the policeman up and reachable?"
            ) from None
        finally:
            self._requests.pop(req_id, None)

    async def accept_handoff(self, spec: dict[str, Any], attachments: tuple[bytes, ...], sender: str) -> dict[str, Any]:
        """A peer hands us a task directly (section 15 of the spec): the policeman records it with us
        as the holder (committed), then it runs here. If we cannot take it now, the policeman queues
        it for whoever can."""
        hold = not self.draining and len(self.running) < self.s.capacity + self.s.prefetch
        data, _ = await self.request("handoff-record", {"spec": spec, "hold": hold, "from": sender}, attachments)
        if data.get("assigned"):
            self._start(
                Assignment(
                    task_id=uuid.UUID(data["task_id"]),
                    type=data["type"],
                    input=data["input"],
                    attempt=data["attempt"],
                    lease_ms=data["lease_ms"],
                    timeout_s=data["timeout_s"],
                ),
                attachments,
            )
            log.info("task %s handed to us directly", data["task_id"])
        return {
            "task_id": data["task_id"],
            "holder": self.s.node_id if data.get("assigned") else None,
            "existing": data.get("existing", False),
        }

    def _start(self, a: Assignment, attachments: tuple[bytes, ...] = ()) -> None:
        self._renew_every = min(self._renew_every, a.lease_ms / 3000)
        old = self.running.get(a.task_id)
        if old is not None:
            if a.attempt <= old.attempt:
                return  # duplicate delivery
            if old.cancelled_by_broker:  # a new attempt of a task being cancelled here: run it after
                old.task.add_done_callback(lambda _t: self._start(a, attachments))
            else:  # the same work, reassigned to us: report it under the new attempt
                old.attempt = a.attempt
            return
        if self.draining:
            self._failures.append(
                Failure(
                    task_id=a.task_id,
                    attempt=a.attempt,
                    retryable=True,
                    error=ErrorBody(code="draining", message=f"{self.s.node_id} is shutting down"),
                )
            )
            self._schedule_flush()
            return
        task = asyncio.get_running_loop().create_task(self._run(a, attachments), name=f"task-{a.task_id}")
        self.running[a.task_id] = Running(task, a.attempt, time.monotonic())
        self.metrics.inflight.set(len(self.running))
        self._schedule_flush()

    async def _run(self, a: Assignment, attachments: tuple[bytes, ...] = ()) -> None:
        t0 = time.monotonic()
        outcome = "ok"
        try:
            async with self._slots:
                t0 = time.monotonic()  # run time, not time spent waiting for a slot
                run = self.running.get(a.task_id)
                if run is not None:
                    run.in_slot = True
                    self._schedule_flush()  # PROGRESS: processing means running, not just received
                ttype = handlers.get(a.type)
                ctx = handlers.RunContext(
                    self.s.node_id,
                    self.s.workspace,
                    self.s.shell_timeout_s,
                    self.s.shell_output_cap,
                    a.timeout_s,
                    a.task_id,
                    a.attempt,
                    attachments,
                    self.services,
                )

                async def compute() -> Any:
                    if a.timeout_s:
                        async with asyncio.timeout(a.timeout_s):
                            return await ttype.run(ctx, a.input)
                    return await ttype.run(ctx, a.input)

                if a.cache and self.cache is not None and self.cache.enabled:
                    output = await self.cache.get_or_compute(cache_key(a.type, a.input), compute)
                else:
                    output = await compute()
            body = outcome_body(a.task_id, self._attempt(a), output, (time.monotonic() - t0) * 1000)
            if isinstance(output, handlers.Attached):
                # alone in its RESULT message, with its attachments as frames after the body
                body["output"] = output.output
                frames = codec.encode_raw(Command.RESULT, {"results": [body]}, output.attachments)
                if sum(map(len, frames)) > self.s.max_message_bytes:
                    self._fail(
                        a,
                        CasperError(
                            f"the result with its attachments does not fit in {self.s.max_message_bytes} bytes",
                            hint="raise max_message_bytes or make the change smaller",
                        ),
                        False,
                        "too-large",
                    )
                    outcome = "failed"
                    return
                self._send(frames)
            else:
                self._results.append(body)
            self.completed += 1
        except asyncio.CancelledError:
            outcome = "cancelled"
            run = self.running.get(a.task_id)
            if run is None or not run.cancelled_by_broker:
                # shutdown, not the broker: hand the task back so it runs elsewhere
                self._failures.append(
                    Failure(
                        task_id=a.task_id,
                        attempt=a.attempt,
                        retryable=True,
                        error=ErrorBody(code="handed-back", message=f"{self.s.node_id} stopped before finishing"),
                    )
                )
        except TimeoutError:
            outcome = "failed"
            self._fail(
                a, CasperError(f"task timed out after {a.timeout_s:g}s", hint="raise timeout_s"), True, "timeout"
            )
        except CasperError as exc:
            outcome = "failed"
            self._fail(a, exc, exc.retryable and not isinstance(exc, UnknownTaskTypeError))
        except Exception as exc:
            outcome = "failed"
            log.exception("handler for %s task %s crashed", a.type, a.task_id)
            self._fail(a, CasperError(f"handler crashed: {type(exc).__name__}: {exc}"[:2000]), True, "crash")
        finally:
            self.running.pop(a.task_id, None)
            self.metrics.inflight.set(len(self.running))
            self.metrics.executed.labels(outcome).inc()
            self.metrics.task_seconds.labels(a.type).observe(time.monotonic() - t0)
            self._schedule_flush()

    def _attempt(self, a: Assignment) -> int:
        run = self.running.get(a.task_id)
        return run.attempt if run is not None else a.attempt

    def _fail(self, a: Assignment, exc: CasperError, retryable: bool, code: str | None = None) -> None:
        self.failed += 1
        self._failures.append(
            Failure(
                task_id=a.task_id,
                attempt=self._attempt(a),
                retryable=retryable,
                error=ErrorBody(code=code or exc.code, message=str(exc)[:4000]),
            )
        )

    # --- batched reports ------------------------------------------------------------------------
    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        if self._results:
            batch, self._results = self._results, []
            messages, too_big = codec.encode_batches(Command.RESULT, "results", batch, self.s.max_message_bytes)
            for frames, _ in messages:
                self._send(frames)
            for out in too_big:
                self._failures.append(
                    Failure(
                        task_id=out["task_id"],
                        attempt=out["attempt"],
                        retryable=False,
                        error=ErrorBody(
                            code="too-large", message=f"the output does not fit in {self.s.max_message_bytes} bytes"
                        ),
                    )
                )
        if self._failures:
            batch2, self._failures = self._failures, []
            for i in range(0, len(batch2), 1000):
                self._send(codec.encode(FailedBatch(failures=tuple(batch2[i : i + 1000]))))
        started = [tid for tid, r in self.running.items() if r.in_slot and not r.reported_start]
        if started:
            for tid in started:
                self.running[tid].reported_start = True
            for i in range(0, len(started), 1000):
                self._send(codec.encode(Progress(task_ids=tuple(started[i : i + 1000]))))

    # --- timers -----------------------------------------------------------------------------------
    def tick(self) -> None:
        now = time.monotonic()
        if now - self.clock.last_seen > self.s.heartbeat_s * self.s.heartbeat_misses:
            if self.sock is not None and self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                return  # the broker did talk: frames wait to be read (we were stalled); never drop them
            if now >= self._next_reconnect:
                self._reconnects += 1
                backoff = min(32.0, 2.0 ** (self._reconnects - 1)) * random.uniform(0.5, 1.0)
                self._next_reconnect = now + backoff
                log.warning(
                    "broker silent for %.1fs; reconnecting (next try in %.1fs)", now - self.clock.last_seen, backoff
                )
                self.connect()
                self.clock.last_seen = now - self.s.heartbeat_s * self.s.heartbeat_misses  # stay "silent"
            return
        if self.running and now - self._last_renew >= self._renew_every:
            # renew the leases of everything held: a PROGRESS marked "renew" changes no state
            self._last_renew = now
            held = list(self.running)
            for i in range(0, len(held), 1000):
                self._send(codec.encode(Progress(task_ids=tuple(held[i : i + 1000]), note=RENEW)))
        if self.clock.heartbeat_due(now):
            self._send(codec.encode(Heartbeat(load=len(self.running), draining=self.draining)))

    async def drain(self, timeout: float) -> None:
        """Stop taking work, let running tasks finish (bounded), hand back the rest, disconnect."""
        self.draining = True
        self._send(codec.encode(Heartbeat(load=len(self.running), draining=True)))
        deadline = time.monotonic() + timeout
        if self.running:
            log.info("draining: waiting up to %.0fs for %d running tasks", timeout, len(self.running))
        while self.running and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            self.flush()
        if self.running:
            log.warning("draining: handing back %d unfinished tasks", len(self.running))
            for run in list(self.running.values()):
                run.task.cancel()
            await asyncio.gather(*(r.task for r in list(self.running.values())), return_exceptions=True)
        self.flush()
        self._send(codec.encode(Disconnect(reason="shutdown")))

    def set_draining(self, draining: bool) -> dict[str, Any]:
        self.draining = draining
        self._send(codec.encode(Heartbeat(load=len(self.running), draining=draining)))
        return {"peer": self.s.node_id, "draining": draining, "inflight": len(self.running)}

    def status_view(self) -> dict[str, Any]:
        return {
            "node_id": self.s.node_id,
            "role": self.s.role.value,
            "pid": os.getpid(),
            "epoch": self.epoch,
            "broker": self.s.broker,
            "mesh": self.s.advertise,
            "registered": self.registered,
            "broker_silent_s": round(time.monotonic() - self.clock.last_seen, 3),
            "capacity": self.s.capacity,
            "running": len(self.running),
            "completed": self.completed,
            "failed": self.failed,
            "draining": self.draining,
            "capabilities": list(self.s.all_capabilities),
            "cache": self.cache.stats() if self.cache else None,
        }

    async def close(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=self.s.linger_ms)
            self.sock = None
        for run in list(self.running.values()):
            run.task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*(r.task for r in list(self.running.values())), return_exceptions=True)


def _hostname() -> str:
    name = socket.gethostname().split(".")[0] or "host"
    return "".join(c if c.isalnum() or c in "_.:-" else "-" for c in name)[:64]
