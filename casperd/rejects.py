"""What the policeman does with a task whose rows Postgres refused (poison isolation).

The group-commit writer (:mod:`casperd.groupcommit`) isolates the refused task by halving the
batch, commits every other task, marks the refused record ``rejected`` and hands it to the broker
after the batch's callbacks have run; the broker calls :func:`drop_refused`, which changes only the
core's state and queues actions (no I/O), so it can become a core entry point as it is. The task
goes away from memory: a new task was never created (its submitter gets ERROR
``storage-rejected`` instead of ACCEPTED, see :func:`announce`); a task that was already stored
keeps its last committed row, which the next restart recovers. Waiters get the same ERROR, a
holder gets CANCEL ``storage-rejected``.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from casperd import codec
from casperd.errors import StorageRejectedError
from casperd.messages import Cancel, Command
from casperd.messages import Error as ErrorMsg
from casperd.policeman.actions import Send, Socket
from casperd.taskrecord import TaskRecord

if TYPE_CHECKING:
    from casperd.policeman import PolicemanCore

log = logging.getLogger("casperd.broker")


def rejected_error(rec: TaskRecord) -> StorageRejectedError:
    return StorageRejectedError(
        f"the task store refused task {rec.id} ({rec.rejected}); it was not stored",
        hint="a value in the task cannot be stored in Postgres (e.g. a NUL character in a text field); "
        "fix the task and submit it again",
    )


def _error_frames(rec: TaskRecord) -> list[bytes]:
    exc = rejected_error(rec)
    return codec.encode(ErrorMsg.of(exc, Command.SUBMIT.value))


def drop_refused(core: PolicemanCore, rec: TaskRecord, reason: str) -> None:
    """Forget a task Postgres refused: out of the core's state, its holder told to stop, its
    waiters told why (actions queued on ``core.out``)."""
    if core.tasks.get(rec.id) is rec:
        del core.tasks[rec.id]
    core.dispatcher.remove(rec.id)
    core.leases.pop(rec.id, None)
    core.validating.discard(rec.id)
    if rec.idempotency_key and core.keys.get(rec.idempotency_key) == rec.id:
        del core.keys[rec.idempotency_key]
    holder = core.peers.get(rec.assigned_to or "")
    if holder is not None and rec.id in holder.held:
        core.release(holder, rec)
        frames = codec.encode(Cancel(task_ids=(rec.id,), reason="storage-rejected"))
        core.out.append(Send(Socket.MESH, holder.route, frames))
    waiters = rec.take_waiters()
    core.out.extend(Send(Socket.CONTROL, route, _error_frames(rec)) for route in waiters)
    core.metrics.rejected.labels("storage-rejected").inc()
    log.error("task %s dropped: the task store refused it (%s)", rec.id, reason)


def announce(send: Callable[[Send], None], a: Send, tasks: Mapping[uuid.UUID, TaskRecord]) -> None:
    """Send an ACCEPTED after its commit if every new task it announces was stored; else the ERROR
    ``storage-rejected`` naming the first refused one (the SUBMIT's other tasks are stored and run;
    a resubmission with idempotency keys finds them). A waiter on the refused task gets the same
    ERROR from :func:`drop_refused` instead."""
    bad = next((r for t in a.announces if (r := tasks.get(t)) is not None and r.rejected), None)
    if bad is None:
        send(a)
    elif a.route not in (bad.waiters or ()):
        send(Send(a.socket, a.route, _error_frames(bad)))
