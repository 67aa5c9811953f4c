"""A worker node (developer or tester): the shell around :class:`~casperd.workercore.WorkerCore`.

Theory of operation. The core holds every rule (what to run, what to report, when to renew,
reconnect or register again); this module owns the DEALER (routing id ``node_id/epoch``), the
asyncio task of each run, the requests waiting for a REPLY, and the clock. A synchronous handler
(``TaskType.run_inline``: noop, echo) runs in place, without a task, when a slot is free, no
earlier run waits for one and no cache is asked for; it reports like any other. After every event it
carries the core's actions out (``ACTIONS``, a table from action type to method) and schedules one
flush per loop turn, so a burst of quick tasks costs a few frames, not one per task. Handlers
never block the loop (subprocesses and awaits only), so heartbeats are never starved by work.

On shutdown it announces draining, lets running tasks finish for up to ``drain_timeout_s``, hands
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
from collections.abc import Callable
from typing import Any

import zmq
import zmq.asyncio

from casperd import __version__, calltrace, codec, loopsock, procstats
from casperd.cache import ResultCache, cache_key
from casperd.errors import CasperError, RequestTimeoutError, TaskCrashError, UnknownTaskTypeError, from_wire
from casperd.handlers import Attached, Catalog, InlineRunner, RunContext
from casperd.loopsock import Sock
from casperd.meshcache import cache_counters
from casperd.messages import Assignment, Request
from casperd.metrics import Metrics
from casperd.settings import Settings
from casperd.transport import SocketOptions, dealer, plain_context, send_now
from casperd.workercore import (
    AbortRun,
    Identity,
    ReadyLater,
    Reconnect,
    Resolve,
    SendFrames,
    StartRun,
    WorkerAction,
    WorkerCore,
)

log = logging.getLogger("casperd.worker")


class Worker:
    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        ctx: zmq.asyncio.Context,
        opts: SocketOptions,
        cache: ResultCache | None,
        catalog: Catalog | None = None,
    ) -> None:
        self.s = settings
        self.metrics = metrics
        self.ctx = ctx
        self._workspace = settings.workspace  # a path built once, not for every task
        self.opts = opts
        self.cache = cache
        self.catalog = catalog if catalog is not None else Catalog()
        # 128 random bits: the routing id NODE_ID/EPOCH cannot be guessed by another mesh peer, so
        # ROUTER_HANDOVER only ever hands it back to this process (SPEC 14.1, "Routing ids")
        self.epoch = f"{int(time.time() * 1000):x}.{os.urandom(16).hex()}"
        self.identity = f"{settings.node_id}/{self.epoch}".encode()
        public = opts.curve_public.decode() if settings.curve and opts.curve_public else None
        me = Identity(self.epoch, os.getpid(), _hostname(), __version__.replace("+", "."), public)
        self.core = WorkerCore(settings, me, metrics, random.random, time.monotonic())
        self.core.stats = procstats.shared().sample
        self.metrics.inflight.set_function(lambda: len(self.core.running))  # read when scraped
        self.sock: Sock | None = None  # driven by casperd.loopsock
        self.tasks: dict[uuid.UUID, asyncio.Task[None]] = {}
        self._flush_scheduled = False
        self._slots = asyncio.Semaphore(max(1, settings.capacity))
        self._queued: set[asyncio.Task[None]] = set()
        self._finished: list[tuple[str, str, float]] = []  # runs done in place: (outcome, type, seconds)
        """Runs not yet in a slot: a run in place never overtakes them."""
        self._req_id = 0
        self._requests: dict[int, asyncio.Future[tuple[Any, tuple[bytes, ...]]]] = {}
        self.services: Any = None  # casperd.agents.services.WorkerServices, set by the node

    # --- views of the core ------------------------------------------------------------------------
    @property
    def clock(self) -> Any:
        return self.core.clock

    @property
    def registered(self) -> bool:
        return self.core.registered

    @property
    def running(self) -> dict[uuid.UUID, Any]:
        return self.core.running

    @property
    def draining(self) -> bool:
        return self.core.draining

    # --- connection -----------------------------------------------------------------------------
    def connect(self) -> Sock:
        self._reconnect()
        self.core.connected(time.monotonic())
        self._carry_out()
        assert self.sock is not None
        return self.sock

    def _reconnect(self, _a: Any = None) -> None:
        if self.sock is not None:
            loopsock.close(self.sock, linger=0)
        self.sock = dealer(plain_context(self.ctx), self.s.broker, self.identity, self.opts, curve=self.s.curve)

    def send_ready(self) -> None:
        self.core.send_ready(time.monotonic())
        self._carry_out()

    def _send(self, frames: list[bytes]) -> bool:
        if self.sock is None:
            return False
        why = send_now(self.sock, frames)
        if why is None:
            return True
        self.metrics.send_failures.labels(why).inc()
        return False

    # --- events -----------------------------------------------------------------------------------
    def on_broker(self, frames: list[bytes]) -> None:
        self.on_batch([frames])

    def on_batch(self, batch: list[list[bytes]]) -> None:
        """The messages one receive got from the policeman: what they cause is reported in one
        flush at the batch's end (the no-op tasks it carried ran in place), not a loop turn later."""
        core = self.core
        now = time.monotonic()
        for frames in batch:
            core.on_frames(frames, now)
            self._take_actions()
        if core.flush_needed:
            self.flush()
        if self._finished:
            self._count_finished()

    def tick(self) -> None:
        waiting = loopsock.pending_input(self.sock) if self.sock is not None else False
        if self.cache is not None:
            self.core.cache_counters = cache_counters(self.cache.stats())
        self.core.tick(time.monotonic(), waiting)
        self._carry_out()

    def flush(self) -> None:
        self._flush_scheduled = False
        self.core.flush(time.monotonic())
        self._carry_out()

    def _take_actions(self) -> None:
        core = self.core
        while core.out:  # an action may queue more (a run done in place reports at once)
            for action in core.take():
                ACTIONS[type(action)](self, action)

    def _carry_out(self) -> None:
        self._take_actions()
        core = self.core
        if core.flush_needed and not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)
        if self._finished:
            self._count_finished()

    # --- actions ----------------------------------------------------------------------------------
    def _do_send(self, a: SendFrames) -> None:
        self._send(a.frames)

    def _do_start(self, a: StartRun) -> None:
        if a.after:
            old = self.tasks.get(a.assignment.task_id)
            if old is not None:
                old.add_done_callback(lambda _t: self.assign(a.assignment, a.attachments))
            return
        assignment = a.assignment
        ttype = self.catalog.find(assignment.type)
        if (
            ttype is not None
            and ttype.run_inline is not None
            and not self._queued
            and not self._slots.locked()
            and not self._cached(assignment)
        ):
            self._run_inline(assignment, a.attachments, ttype.run_inline)
            return
        tid = assignment.task_id
        task = self.tasks[tid] = asyncio.get_running_loop().create_task(
            self._run(assignment, a.attachments), name=f"task-{tid}"
        )
        self._queued.add(task)
        task.add_done_callback(self._queued.discard)  # also when cancelled before it ever ran

    def _do_abort(self, a: AbortRun) -> None:
        task = self.tasks.get(a.task_id)
        if task is not None:
            task.cancel()

    def _do_resolve(self, a: Resolve) -> None:
        fut = self._requests.pop(a.req_id, None)
        if fut is not None and not fut.done():
            if a.ok:
                fut.set_result((a.data, a.attachments))
            else:
                fut.set_exception(from_wire(a.error or {}))

    def _do_ready_later(self, a: ReadyLater) -> None:
        def due() -> None:
            self.core.ready_due(time.monotonic())
            self._carry_out()

        asyncio.get_running_loop().call_later(a.delay_s, due)

    def assign(self, a: Assignment, attachments: tuple[bytes, ...] = ()) -> None:
        self.core.assign(a, attachments, time.monotonic())
        self._carry_out()

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
            self.assign(
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

    def _cached(self, a: Assignment) -> bool:
        return a.cache and self.cache is not None and self.cache.enabled

    def _context(self, a: Assignment, attachments: tuple[bytes, ...]) -> RunContext:
        return RunContext(
            self.s.node_id,
            self._workspace,
            self.s.shell_timeout_s,
            self.s.shell_output_cap,
            a.timeout_s,
            a.task_id,
            a.attempt,
            attachments,
            self.services,
        )

    def _run_inline(self, a: Assignment, attachments: tuple[bytes, ...], run: InlineRunner) -> None:
        """Run a synchronous handler in place, in a free slot: what :meth:`_run` does, without an
        asyncio task (nothing could interrupt it between its start and its end). Called while
        :meth:`_carry_out` takes actions: the reports it queues go out with the next flush."""
        t0 = time.monotonic()
        self.core.in_slot(a.task_id)
        calltrace.mark("handler start", a.task_id)
        try:
            output = run(self._context(a, attachments), a.input)
        except (asyncio.CancelledError, Exception) as exc:
            outcome = self._failed(a, exc)
        else:
            outcome = self._succeeded(a, output, t0)
        self.core.ended(a.task_id)
        # counted once its report is sent (_count_finished): the metrics are off the round trip
        self._finished.append((outcome, a.type, time.monotonic() - t0))

    async def _run(self, a: Assignment, attachments: tuple[bytes, ...] = ()) -> None:
        t0 = time.monotonic()
        outcome = "ok"
        try:
            async with self._slots:
                self._queued.discard(asyncio.current_task())
                t0 = time.monotonic()  # run time, not time spent waiting for a slot
                self.core.in_slot(a.task_id)
                calltrace.running(a.task_id)
                calltrace.mark("handler start")
                self._carry_out()
                ttype = self.catalog.get(a.type)
                ctx = self._context(a, attachments)

                async def compute() -> Any:
                    if a.timeout_s:
                        async with asyncio.timeout(a.timeout_s):
                            return await ttype.run(ctx, a.input)
                    return await ttype.run(ctx, a.input)

                if self._cached(a):
                    assert self.cache is not None
                    output = await self.cache.get_or_compute(cache_key(a.type, a.input), compute)
                else:
                    output = await compute()
            outcome = self._succeeded(a, output, t0)
        except (asyncio.CancelledError, Exception) as exc:
            outcome = self._failed(a, exc)
        finally:
            if self.tasks.get(a.task_id) is asyncio.current_task():
                del self.tasks[a.task_id]
            self._ended(a, outcome, t0)
            self._carry_out()

    def _succeeded(self, a: Assignment, output: Any, t0: float) -> str:
        ms = (time.monotonic() - t0) * 1000
        calltrace.mark("handler returned", a.task_id)
        if isinstance(output, Attached):  # alone in its RESULT message, attachments as frames
            ok = self.core.succeeded(a, output.output, ms, output.attachments)
        else:
            ok = self.core.succeeded(a, output, ms, None)
        return "ok" if ok else "failed"

    def _failed(self, a: Assignment, exc: BaseException) -> str:
        """Report a run that raised ``exc``; its outcome for the metrics."""
        core = self.core
        if isinstance(exc, asyncio.CancelledError):
            core.interrupted(a)
            return "cancelled"
        if isinstance(exc, TimeoutError):
            timed_out = CasperError(f"task timed out after {a.timeout_s:g}s", hint="raise timeout_s")
            core.failed_run(a, "timeout", str(timed_out), True)
        elif isinstance(exc, CasperError):
            core.failed_run(a, exc.code, str(exc), exc.retryable and not isinstance(exc, UnknownTaskTypeError))
        else:
            log.exception("handler for %s task %s crashed", a.type, a.task_id, exc_info=exc)
            message = str(CasperError(f"handler crashed: {type(exc).__name__}: {exc}"[:2000]))
            core.failed_run(a, TaskCrashError.code, message, True)
        return "failed"

    def _count_finished(self) -> None:
        finished, self._finished = self._finished, []
        for outcome, ttype, seconds in finished:
            self.metrics.executed_by(outcome).inc()
            self.metrics.task_seconds_by(ttype).observe(seconds)

    def _ended(self, a: Assignment, outcome: str, t0: float) -> None:
        self.core.ended(a.task_id)
        self.metrics.executed_by(outcome).inc()
        self.metrics.task_seconds_by(a.type).observe(time.monotonic() - t0)

    # --- operator and shutdown -----------------------------------------------------------------------
    async def drain(self, timeout: float) -> None:
        """Stop taking work, let running tasks finish (bounded), hand back the rest, disconnect."""
        self.core.set_draining(True, time.monotonic())
        self._carry_out()
        deadline = time.monotonic() + timeout
        if self.running:
            log.info("draining: waiting up to %.0fs for %d running tasks", timeout, len(self.running))
        while self.running and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            self.flush()
        if self.running:
            log.warning("draining: handing back %d unfinished tasks", len(self.running))
            for task in list(self.tasks.values()):
                task.cancel()
            await asyncio.gather(*list(self.tasks.values()), return_exceptions=True)
        self.flush()
        self.core.disconnect(time.monotonic())
        self._carry_out()

    def set_draining(self, draining: bool) -> dict[str, Any]:
        self.core.set_draining(draining, time.monotonic())
        self._carry_out()
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
            "completed": self.core.completed,
            "failed": self.core.failed,
            "draining": self.draining,
            "capabilities": list(self.s.all_capabilities),
            "cache": self.cache.stats() if self.cache else None,
        }

    async def close(self) -> None:
        if self.sock is not None:
            loopsock.close(self.sock, linger=self.s.linger_ms)
            self.sock = None
        for task in list(self.tasks.values()):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*list(self.tasks.values()), return_exceptions=True)


ACTIONS: dict[type, Callable[[Worker, Any], None]] = {
    SendFrames: Worker._do_send,
    StartRun: Worker._do_start,
    AbortRun: Worker._do_abort,
    Resolve: Worker._do_resolve,
    ReadyLater: Worker._do_ready_later,
    Reconnect: Worker._reconnect,
}
"""Worker action type -> how the shell carries it out."""
_ = WorkerAction


def _hostname() -> str:
    name = socket.gethostname().split(".")[0] or "host"
    return "".join(c if c.isalnum() or c in "_.:-" else "-" for c in name)[:64]
