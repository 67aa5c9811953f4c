"""The node runtime: one asyncio loop per casperd process, a thin shell around the roles.

Every node binds its mesh ROUTER (peers send to it directly) and a control ROUTER (caspectl).
The policeman also runs the broker over its mesh ROUTER and the Postgres store; developers and
testers connect a DEALER to the policeman and run a :class:`~casperd.worker.Worker`. One
long-lived reader task per socket drains every ready message per wake-up, then runs dispatch
once; a timer drives heartbeats, liveness and retries. SIGINT/SIGTERM start a bounded, clean
shutdown: workers drain and hand back, the broker flushes its last commits, sockets close with a
finite linger.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zmq
import zmq.asyncio

from casperd import codec, handoff, loopsock, memtrim, taskenv
from casperd.agents.tasktypes import install as install_agent_types
from casperd.cache import ResultCache
from casperd.control import Control
from casperd.enrollment import Enrollment
from casperd.errors import CasperError, ProtocolError, UnsupportedError
from casperd.eventloop import tune_gc
from casperd.handlers import Catalog
from casperd.loopsock import Sock
from casperd.messages import Error, Heartbeat, Request, Role, Submit
from casperd.metrics import Metrics
from casperd.settings import Settings
from casperd.telemetry import watch_api
from casperd.transport import (
    SocketOptions,
    advertised,
    load_key,
    plain_context,
    read_secret_file,
    recv_batch,
    recv_batch_users,
    router,
    send_now,
)
from casperd.zap import ZapHandler

if TYPE_CHECKING:  # the policeman's modules (and the Postgres driver) load only on the policeman
    from casperd.broker import Broker
    from casperd.store import Store
    from casperd.worker import Worker

log = logging.getLogger("casperd.node")


class Node:
    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.metrics = Metrics()
        self.ctx = zmq.asyncio.Context()
        self.opts = SocketOptions(
            hwm=settings.hwm,
            linger_ms=settings.linger_ms,
            max_message_bytes=settings.max_message_bytes,
            heartbeat_ms=int(settings.heartbeat_s * 1000),
            curve_secret=load_key(settings.curve_secret_key_file, "Curve secret key"),
            curve_public=load_key(settings.curve_public_key_file, "Curve public key"),
            curve_server_key=load_key(settings.broker_public_key_file, "broker public key"),
        )
        self.catalog = install_agent_types(Catalog())
        """Task types, validators and mesh services this node knows (the plugin interface)."""
        self.store: Store | None = None
        self.broker: Broker | None = None
        self.worker: Worker | None = None
        self.elastic: Any = None  # casperd.elastic.Elastic on the policeman (the autoscaler)
        self.telemetry: Any = None  # casperd.telemetry.Telemetry on the policeman
        self.police: Any = None  # casperd.agents.police.PoliceService on the policeman
        self.metrics_server: asyncio.Server | None = None  # /metrics (casperd.metricsweb), with --metrics-port
        self.cache = ResultCache.from_settings(settings) if settings.redis_url else None
        self.control = Control(self)
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.mesh_sock: Sock | None = None  # driven by casperd.loopsock
        self.control_sock: Sock | None = None
        self.started = time.monotonic()
        self._oneshots: set[asyncio.Task[None]] = set()
        self.enrollment: Enrollment | None = None
        self.zap: ZapHandler | None = None
        self.drain = memtrim.DrainWatch()

    @property
    def is_policeman(self) -> bool:
        return self.s.role is Role.POLICEMAN

    # --- run / stop -------------------------------------------------------------------------------
    async def run(self) -> None:
        """Start everything, serve until SIGINT/SIGTERM or stop(), then shut down cleanly."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop)
        try:
            await self.start()
            await self._stop.wait()
        finally:
            await self.shutdown()

    def stop(self) -> None:
        if not self._stop.is_set():
            log.info("%s: stopping", self.s.node_id)
        self._stop.set()

    async def start(self) -> None:
        self.s.state_dir.mkdir(parents=True, exist_ok=True)
        taskenv.configure(self.s)
        self.s.advertise = advertised(self.s.bind, self.s.advertise, self.s.broker)
        if self.is_policeman:
            if not self.s.database_url:
                raise CasperError(
                    "the policeman needs a database",
                    hint="set --database-url / CASPER_DATABASE_URL (casperd up starts one for you)",
                )
            password = read_secret_file(self.s.database_password_file, "database password")
            from casperd.broker import Broker
            from casperd.store import Store

            self.store = Store(
                self.s.database_url, pool_size=self.s.db_pool_size, batch_max=self.s.commit_batch_max, password=password
            )
            self.store.on_commit = self.metrics.commit_seconds.observe
            await self.store.open()
            applied = await self.store.migrate()
            if applied:
                log.info("applied migrations: %s", ", ".join(applied))
            self.broker = Broker(self.s, self.store, self.metrics, self.catalog)
            from casperd.agents.police import PoliceService

            self.police = PoliceService(self.s, self.broker, self.cache)
            from casperd.elastic import attach

            self.elastic, self.telemetry = attach(self.broker, self.s, self.metrics)
            self.police.on_client = lambda client: watch_api(client, self.metrics)  # built on first use
            await self.broker.recover()
        if self.s.curve and self.s.curve_enrollment:
            self._start_zap()
        plain = plain_context(self.ctx)
        self.mesh_sock = router(plain, self.s.bind, self.opts, curve=self.s.curve)
        self.control_sock = router(plain, self.s.control, self.opts, curve=False)
        if self.broker is not None:
            self.broker.enrollment = self.enrollment
            self.broker.mesh = self.mesh_sock
            self.broker.control = self.control_sock
            self._spawn(self._mesh_loop_broker(), "mesh")
        else:
            from casperd.agents.services import WorkerServices
            from casperd.worker import Worker

            self.worker = Worker(self.s, self.metrics, self.ctx, self.opts, self.cache, self.catalog)
            self.worker.services = WorkerServices(self.s, self.worker, self.cache)
            watch_api(self.worker.services.claude, self.metrics)
            self.worker.connect()
            self._spawn(self._dealer_loop(), "dealer")
            self._spawn(self._mesh_loop_peer(), "mesh")
        self._spawn(self._control_loop(), "control")
        self._spawn(self._timer_loop(), "timer")
        self.metrics_server = await self.metrics.serve(self.s.metrics_port, "0.0.0.0")
        log.info(
            "%s up: role=%s mesh=%s control=%s%s",
            self.s.node_id,
            self.s.role.value,
            self.s.bind,
            self.s.control,
            f" broker={self.s.broker}" if not self.is_policeman else "",
        )
        tune_gc()

    def _start_zap(self) -> None:
        """Enrollment on: the ZAP handler admits only enrolled keys on every mesh ROUTER of this node."""
        path = self.s.authorized_keys_file
        assert path is not None
        if not path.is_file():
            raise CasperError(
                f"CurveZMQ is on but there is no enrollment file at {path}",
                hint="enroll the nodes' public keys: caspectl keys add KEY.pub NODE_ID ROLE "
                "(casperd up and containers/make-secrets.sh do it for the nodes they make)",
            )
        self.enrollment = Enrollment(path)
        self.zap = ZapHandler(self.ctx, self.enrollment, self.metrics.handshakes_refused)
        self.zap.start()
        log.info("enrollment on: %d keys enrolled in %s", len(self.enrollment.entries), path)

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(self._guard(coro, name), name=name)
        self._tasks.append(task)

    async def _guard(self, coro: Any, name: str) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s loop crashed; stopping the node", name)
            self.stop()

    async def shutdown(self) -> None:
        t0 = time.monotonic()
        if self.broker is not None:
            self.broker.accepting = False
        if self.worker is not None and self.worker.sock is not None:
            # A failed drain leaves tasks running when the node stops: their leases return them.
            await self._shutdown_step("drain", self.worker.drain(self.s.drain_timeout_s))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.worker is not None:
            await self.worker.close()
            if self.worker.services is not None:
                await self._shutdown_step("agent-services", self.worker.services.close())
        if self.police is not None:
            await self._shutdown_step("police", self.police.close())
        if self.elastic is not None:
            await self._shutdown_step("elastic", self.elastic.close())
        if self.store is not None:
            await self.store.close(timeout=self.s.drain_timeout_s)
        if self.cache is not None:
            await self.cache.close()
        for sock in (self.mesh_sock, self.control_sock):
            if sock is not None:
                loopsock.close(sock, linger=self.s.linger_ms)
        if self.s.control.startswith("ipc://"):  # no stale socket file left for caspectl to find
            await asyncio.to_thread(Path(self.s.control[len("ipc://") :]).unlink, missing_ok=True)
        if self.zap is not None:
            await self.zap.close()
        if self.metrics_server is not None:
            self.metrics_server.close()
        self.ctx.term()
        log.info("%s stopped cleanly in %.2fs", self.s.node_id, time.monotonic() - t0)

    async def _shutdown_step(self, step: str, work: Any) -> None:
        """One step of the shutdown: a failure is logged and counted, and the shutdown goes on."""
        try:
            await work
        except Exception:
            self.metrics.housekeeping_failures.labels(f"shutdown-{step}").inc()
            log.exception("%s: shutdown step %s failed; going on", self.s.node_id, step)

    # --- loops ------------------------------------------------------------------------------------
    async def _recv_mesh(self) -> list[tuple[list[bytes], str | None]]:
        """Every message ready on the mesh ROUTER, with the sender's ZAP User-Id when Curve is on."""
        assert self.mesh_sock is not None
        if self.s.curve:
            return await recv_batch_users(self.mesh_sock)
        return [(f, None) for f in await recv_batch(self.mesh_sock)]

    async def _mesh_loop_broker(self) -> None:
        assert self.broker is not None and self.mesh_sock is not None
        broker = self.broker
        while True:
            for frames, user in await self._recv_mesh():
                if len(frames) < 2:
                    continue
                try:
                    broker.on_mesh(frames[0], frames[1:], user)
                except Exception:  # a bug must cost one message, never the broker
                    self.metrics.rejected.labels("internal").inc()
                    log.exception("internal error handling a mesh message; message dropped")
            broker.dispatch()

    async def _mesh_loop_peer(self) -> None:
        """A worker's own ROUTER: answers HEARTBEAT pings and runs direct hand-offs (REQUEST
        ``handoff``, SPEC section 15); anything else is answered ERROR ``unsupported``."""
        assert self.mesh_sock is not None
        while True:
            for frames, user in await self._recv_mesh():
                if len(frames) < 2:
                    continue
                route, body = frames[0], frames[1:]
                try:
                    decoded = codec.decode(body, max_bytes=self.s.max_message_bytes)
                    msg = decoded.message
                    if isinstance(msg, Request) and msg.op == "handoff" and self.worker is not None:
                        handoff.admit(self.enrollment, self.metrics, route, msg, user)
                        self._spawn_once(handoff.answer(self.worker, self.mesh_sock, route, msg, decoded.attachments))
                        continue
                    reply = (
                        Heartbeat()
                        if isinstance(msg, Heartbeat)
                        else Error(
                            code=UnsupportedError.code,
                            ref=msg.COMMAND.value,
                            message=f"{msg.COMMAND.name} is not served on a worker's mesh socket",
                            hint="send tasks through the policeman (or REQUEST handoff, SPEC section 15)",
                        )
                    )
                except ProtocolError as exc:
                    self.metrics.rejections.record("mesh", route, exc)
                    reply = Error.of(exc)
                send_now(self.mesh_sock, [route, *codec.encode(reply)])

    def _spawn_once(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._oneshots.add(task)
        task.add_done_callback(self._oneshots.discard)

    async def _dealer_loop(self) -> None:
        assert self.worker is not None
        worker = self.worker
        me = asyncio.current_task()
        while True:
            sock = worker.sock
            if sock is None:
                await asyncio.sleep(0.05)
                continue
            try:
                batch = await recv_batch(sock)
            except asyncio.CancelledError:
                if me is not None and me.cancelling():
                    raise
                continue  # the socket was replaced by a reconnect
            except zmq.ZMQError:
                await asyncio.sleep(0.01)
                continue
            worker.on_batch(batch)

    async def _control_loop(self) -> None:
        assert self.control_sock is not None
        while True:
            for frames in await recv_batch(self.control_sock, limit=64):
                if len(frames) >= 2:
                    await self._on_control(frames[0], frames[1:])
            if self.broker is not None:
                self.broker.dispatch()

    async def _on_control(self, route: bytes, body: list[bytes]) -> None:
        """One control request. A method of its own so that nothing of it (a SUBMIT's thousands of
        specs) stays referenced while the loop waits for the next one (issue #13: memory after a burst)."""
        assert self.control_sock is not None
        try:
            msg = codec.decode(body, max_bytes=self.s.max_message_bytes).message
        except ProtocolError as exc:
            self.metrics.rejections.record("control", route, exc)
            self._control_error(route, exc, body[1][0] if len(body) > 1 and len(body[1]) == 1 else None)
            return
        try:
            if isinstance(msg, Submit):
                if self.broker is None:
                    raise UnsupportedError(
                        "this node does not take submissions", hint="submit to the policeman's control socket"
                    )
                await self.broker.submit(route, msg, "caspectl")
            else:
                reply = await self.control.handle(msg)
                send_now(self.control_sock, [route, *codec.encode(reply)])
        except CasperError as exc:
            self._control_error(route, exc, msg.COMMAND.value)
        except Exception as exc:  # a bug must cost one request, never the node
            log.exception("internal error handling a control request")
            self._control_error(
                route,
                CasperError(f"internal error: {type(exc).__name__}", hint="see the daemon's log"),
                msg.COMMAND.value,
            )

    def _control_error(self, route: bytes, exc: CasperError, ref: int | None) -> None:
        assert self.control_sock is not None
        send_now(self.control_sock, [route, *codec.encode(Error.of(exc, ref))])

    async def _timer_loop(self) -> None:
        period = max(0.01, self.s.heartbeat_s / 4)
        last_partitions = time.monotonic()
        while True:
            await asyncio.sleep(period)
            if self.enrollment is not None:  # an edited file: revoked keys' peers go at once
                known = set(self.enrollment.entries)
                self.enrollment.refresh()
                gone = known - set(self.enrollment.entries)
                if gone and self.broker is not None:
                    self.broker.revoke(gone)
            if self.broker is not None:
                self.broker.tick()
                self.broker.dispatch()
                if self.drain.drained(len(self.broker.tasks)):  # a burst drained: its peak memory goes back
                    self.broker.compact()
                    await memtrim.trim()
                if self.store is not None and time.monotonic() - last_partitions > 6 * 3600:
                    last_partitions = time.monotonic()
                    try:
                        await self.store.ensure_partitions()
                    except Exception:  # retried in 6 h; the next month's partition is made well ahead
                        self.metrics.housekeeping_failures.labels("ensure-partitions").inc()
                        log.exception("could not create the coming months' task partitions; retrying in 6 h")
            if self.worker is not None:
                self.worker.tick()
