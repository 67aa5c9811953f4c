"""The policeman's background work, which the broker starts for the core and whose outcome goes
back into the core as an event: asynchronous validation of a result, a mesh service call, storing
a result's attachments, and answering a ``--wait`` from the store (DONE).

Each entry is a function of the broker shell (:class:`Shell`, what it needs of it) and one action,
listed in ``casperd.broker.ACTIONS``. :class:`LocalWork` is what the policeman's plugin (the agent
service) does for the broker.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Coroutine
from typing import Any, Protocol

from casperd import codec
from casperd.errors import CasperError, ForbiddenError, UnsupportedError
from casperd.handlers import Catalog
from casperd.messages import Done, DoneBatch, ErrorBody, Reply
from casperd.metrics import Metrics
from casperd.policeman import Now, PolicemanCore
from casperd.policeman.actions import DoneFromStore, SaveAttachments, Send, Serve, Socket, Validate
from casperd.policeman.tasks import last_error
from casperd.store import Store, record_from_row
from casperd.taskrecord import TaskRecord, utcnow

log = logging.getLogger("casperd.broker")


class LocalWork(Protocol):
    """What the policeman's plugin (the agent service) does for the broker."""

    def run_local(self, rec: TaskRecord) -> None:
        """Start a task of a ``local`` type (a job) on the policeman itself."""

    def on_finish(self, rec: TaskRecord) -> None:
        """Called (after the commit) with every task that reaches a terminal state."""

    async def save_attachments(self, task_id: uuid.UUID, kind: str, blobs: tuple[bytes, ...]) -> None: ...

    async def load_attachments(self, task_ids: list[uuid.UUID]) -> dict[uuid.UUID, list[bytes]]: ...


def now() -> Now:
    return Now(time.monotonic(), utcnow())


class Shell(Protocol):
    """What the background work uses of the broker (casperd.broker.Broker)."""

    core: PolicemanCore
    catalog: Catalog
    metrics: Metrics
    store: Store
    work: LocalWork | None

    def run(self, actions: list[Any]) -> None: ...

    def _send(self, a: Send) -> None: ...

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None: ...


def validate(b: Shell, a: Validate) -> None:
    check = b.catalog.validator(a.rec.type)
    assert check is not None

    async def run() -> None:
        try:
            problem = await check(a.rec.id, a.rec.input, a.output, a.attachments)
        except CasperError as exc:
            problem = f"the policeman could not validate it: {exc}"
        except Exception as exc:  # a bug in a validator must not leave the task validating forever
            log.exception("validator of %s crashed on task %s", a.rec.type, a.rec.id)
            problem = f"the policeman's validator crashed: {type(exc).__name__}"
        b.core.validated(a.rec.id, a.peer, problem, now())
        b.run(b.core.take())

    b._spawn(run())


def serve(b: Shell, a: Serve) -> None:
    b._spawn(_serve_request(b, a))


async def _serve_request(b: Shell, a: Serve) -> None:
    msg = a.request
    svc = b.catalog.service(msg.op)
    try:
        if svc is None:
            raise UnsupportedError(
                f"the policeman offers no mesh service {msg.op!r}",
                hint=f"known: {', '.join(b.catalog.service_names) or 'none'}",
            )
        if a.sender.role not in svc.roles:  # the plugin's own statement agrees with casperd.authz
            raise ForbiddenError(f"{a.sender.role} may not call {msg.op!r}", hint="see protocol/SPEC.md 14.1")
        data, extra = await svc.run(a.sender.node_id, msg.args, a.attachments)
        frames = codec.encode(Reply(req_id=msg.req_id, ok=True, data=data), extra)
    except CasperError as exc:
        if exc.code == "forbidden":
            b.metrics.forbidden.labels(msg.op[:64]).inc()
        error = ErrorBody.of(exc)
        frames = codec.encode(Reply(req_id=msg.req_id, ok=False, error=error))
    except Exception as exc:  # a bug in a service: answer, log, keep serving
        log.exception("mesh service %s failed", msg.op)
        error = ErrorBody(code=CasperError.code, message=f"{msg.op} failed: {type(exc).__name__}")
        frames = codec.encode(Reply(req_id=msg.req_id, ok=False, error=error))
    b._send(Send(Socket.MESH, a.route, frames))


def save_attachments(b: Shell, a: SaveAttachments) -> None:
    async def run() -> None:
        error = None
        if b.work is not None:
            tid = a.result.results[0].task_id
            try:
                await b.work.save_attachments(tid, "output", a.attachments)
            except CasperError as exc:
                log.warning("could not store the attachments of task %s: %s; it will run again", tid, exc)
                error = exc.message
        b.core.attachments_saved(a.node_id, a.result, a.attachments, error, now())
        b.run(b.core.take())

    b._spawn(run())


def done_from_store(b: Shell, a: DoneFromStore) -> None:
    async def run() -> None:
        await b.store.committed()  # the ACCEPTED of the same submit goes out first
        row = await b.store.get(a.task_id)
        if row is None:
            return
        rec = record_from_row(row)
        done = Done(task_id=a.task_id, status=rec.status.value, output=row["output"], error=last_error(rec))
        b._send(Send(Socket.CONTROL, a.route, codec.encode(DoneBatch(done=(done,)))))

    b._spawn(run())
