"""What the policeman core is told (its inputs) and what it asks its shell to do (its outputs).

Inputs carry everything the core may not find out for itself: the time (:class:`Now`, read once by
the shell per event) and who sent a message (:class:`Sender`, an authenticated identity). Outputs
are plain records the shell carries out in order: rows to stage in the group commit, frames to
send now or once the rows staged before them are committed, work to start (a local job, an
asynchronous validation, a mesh service call), a timer to arm.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from casperd.messages import Request
from casperd.taskrecord import TaskEvent, TaskRecord


@dataclass(frozen=True, slots=True)
class Now:
    """The time of one event: ``mono`` (monotonic seconds, for leases and liveness) and ``wall``
    (UTC, for rows)."""

    mono: float
    wall: datetime


class SenderKind(enum.StrEnum):
    PEER = "peer"  # a node on the mesh ROUTER
    CONTROL = "control"  # the local operator on the control socket
    LOCAL = "local"  # the policeman itself (its job runner, its mesh services)


@dataclass(frozen=True, slots=True)
class Sender:
    """The authenticated identity of a message's sender. ``role`` is what authorization checks:
    a peer's registered (or, for READY, claimed) role, ``control`` for the control socket,
    ``policeman`` for the policeman's own work. ``key`` is the Curve public key when known."""

    node_id: str
    role: str
    kind: SenderKind = SenderKind.PEER
    key: str | None = None

    @classmethod
    def control(cls) -> Sender:
        return cls("caspectl", "control", SenderKind.CONTROL)

    @classmethod
    def local(cls, node_id: str = "policeman") -> Sender:
        return cls(node_id, "policeman", SenderKind.LOCAL)


class Socket(enum.StrEnum):
    MESH = "mesh"
    CONTROL = "control"


@dataclass(frozen=True, slots=True)
class Stage:
    """Stage a task row (and its event) for the next group commit."""

    rec: TaskRecord
    event: TaskEvent


@dataclass(frozen=True, slots=True)
class StageKey:
    key: str
    task_id: uuid.UUID
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Send:
    """Frames to a routing id. ``after_commit``: only once everything staged before is durable.
    ``tasks``/``node``: a TASK message; if it cannot be sent the shell reports
    :meth:`~casperd.policeman.PolicemanCore.undelivered` so they go back without losing an attempt."""

    socket: Socket
    route: bytes
    frames: list[bytes]
    after_commit: bool = False
    tasks: tuple[uuid.UUID, ...] = ()
    node: str | None = None
    announces: tuple[uuid.UUID, ...] = ()
    """The new tasks an ACCEPTED announces: if the store refuses one, the shell answers ERROR
    ``storage-rejected`` instead (casperd.rejects)."""


@dataclass(frozen=True, slots=True)
class RunLocal:
    """Start a ``local`` task (a job) on the policeman, after the commit (or after ``delay_s``)."""

    rec: TaskRecord
    delay_s: float = 0.0
    after_commit: bool = True


@dataclass(frozen=True, slots=True)
class Finished:
    """A task reached a terminal state; tell the finish listeners once it is committed."""

    rec: TaskRecord


@dataclass(frozen=True, slots=True)
class Validate:
    """Run the type's asynchronous validator, then report :meth:`validated`."""

    rec: TaskRecord
    peer: str
    output: Any
    attachments: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Serve:
    """Run the mesh service ``request.op`` for ``sender`` and REPLY on ``route``."""

    route: bytes
    sender: Sender
    request: Request
    attachments: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class DoneFromStore:
    """Answer a waiting submitter with the stored outcome of a finished task (after the commit)."""

    route: bytes
    task_id: uuid.UUID


@dataclass(frozen=True, slots=True)
class Arm:
    """Tick the core again no later than ``at`` (monotonic seconds)."""

    at: float


@dataclass(frozen=True, slots=True)
class Replay:
    """Feed a worker's report back to :meth:`~casperd.policeman.PolicemanCore.replay` once
    everything staged so far is committed: it is about tasks whose rows are still being committed
    (their TASK left before the commit, SPEC 11)."""

    node_id: str
    epoch: str
    report: Any  # casperd.messages.ResultBatch or FailedBatch: the outcomes that wait
    attachments: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class SaveAttachments:
    """Store the attachments of an attached RESULT, then report
    :meth:`~casperd.policeman.PolicemanCore.attachments_saved`."""

    node_id: str
    result: Any  # casperd.messages.ResultBatch with one outcome
    attachments: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class LoadInputs:
    """Load the spilled inputs of tasks just assigned to ``node`` from the task store, then report
    :meth:`~casperd.policeman.PolicemanCore.inputs_loaded` (their TASK leaves then)."""

    node: str
    task_ids: tuple[uuid.UUID, ...]
    attachments: tuple[uuid.UUID, ...] = ()
    """Those of ``task_ids`` whose input attachments are to be loaded too."""


Action = (
    Stage
    | StageKey
    | Send
    | RunLocal
    | Finished
    | Validate
    | Serve
    | DoneFromStore
    | Arm
    | SaveAttachments
    | LoadInputs
    | Replay
)
