"""Message models: one frozen pydantic model per wire command.

These are the bodies carried in the third frame of every CASPER message (see protocol/SPEC.md).
Field order here is the key order on the wire, so the golden vectors in protocol/vectors/ pin it.
Every field is validated on decode; nothing a peer sends is trusted.
"""

from __future__ import annotations

import enum
import os
import time
import uuid
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, StringConstraints, model_serializer

if TYPE_CHECKING:
    from casperd.errors import CasperError

PROTOCOL_VERSION = 1
SIGNATURE = b"CASP"

Name = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")]
STORABLE = r"^[^\x00]*$"
"""Text Postgres can store: no NUL (msgpack's UTF-8 decoding already refuses invalid UTF-8 and
surrogates). Every free-text field of every message carries it, so a NUL is refused at the codec."""
Text = Annotated[str, StringConstraints(max_length=4096, pattern=STORABLE)]
WIRE_MESSAGE_MAX = 4000
"""An error's message is cut to this before it is sent (a ``Text`` holds 4,096)."""
Key = Annotated[str, StringConstraints(min_length=1, max_length=256, pattern=STORABLE)]
Endpoint = Annotated[str, StringConstraints(min_length=1, max_length=256, pattern=STORABLE)]
CurveKey = Annotated[str, StringConstraints(pattern=r"^[0-9A-Za-z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")]
"""A CurveZMQ public key in Z85 (40 characters)."""


class Command(enum.IntEnum):
    READY = 0x01
    HEARTBEAT = 0x02
    SUBMIT = 0x03
    ACCEPTED = 0x04
    TASK = 0x05
    PROGRESS = 0x06
    RESULT = 0x07
    FAILED = 0x08
    CANCEL = 0x09
    DISCONNECT = 0x0A
    ERROR = 0x0B
    REQUEST = 0x0C
    REPLY = 0x0D
    DONE = 0x0E


class Role(enum.StrEnum):
    POLICEMAN = "policeman"
    DEVELOPER = "developer"
    TESTER = "tester"
    CLIENT = "client"


class _Body(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=False)
    COMMAND: ClassVar[Command]


_RANDOM_IDS: list[int] = []
"""The random parts (80 bits) of the next task ids, drawn 400 at a time: one ``os.urandom`` call
per 400 ids rather than one each. ``list.pop`` is atomic, so no two callers get the same one."""
_ID_RANDOM_BYTES = 10
_ID_BATCH = 400
_ID_CLEAR = ((1 << 128) - 1) ^ (0xF << 76 | 0x3 << 62)
_ID_SET = 0x7 << 76 | 0x2 << 62  # version 7, RFC 4122 variant
_ID_MS = (1 << 48) - 1
_new_object = object.__new__
_set_attr = object.__setattr__
_SAFE_UNKNOWN = uuid.SafeUUID.unknown
os.register_at_fork(after_in_child=_RANDOM_IDS.clear)  # a forked child never reuses its parent's


def _draw_random_ids() -> None:
    n = _ID_RANDOM_BYTES
    pool = os.urandom(n * _ID_BATCH)
    _RANDOM_IDS.extend([int.from_bytes(pool[i : i + n], "big") for i in range(0, len(pool), n)])


def new_task_id() -> uuid.UUID:
    """A UUIDv7 (RFC 9562): 48-bit Unix milliseconds, then random bits, so ids sort by time.

    Equal to ``uuid.UUID(int=value)``, made without its checks (the value is in range by
    construction), as CPython 3.14's ``UUID._from_int`` does: a tenth of the cost."""
    try:
        rand = _RANDOM_IDS.pop()
    except IndexError:
        _draw_random_ids()
        rand = _RANDOM_IDS.pop()
    value = ((time.time_ns() // 1_000_000 & _ID_MS) << 80 | rand) & _ID_CLEAR | _ID_SET
    u = _new_object(uuid.UUID)
    _set_attr(u, "int", value)
    _set_attr(u, "is_safe", _SAFE_UNKNOWN)
    return u


def task_created_at(task_id: uuid.UUID) -> float:
    """The creation time (Unix seconds) encoded in a UUIDv7 task id."""
    return task_created_ms(task_id) / 1000.0


def task_created_ms(task_id: uuid.UUID) -> int:
    """The creation time (Unix milliseconds) encoded in a UUIDv7 task id."""
    return task_id.int >> 80


# --- shared parts -----------------------------------------------------------------------------
class ErrorBody(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    code: Name
    message: Text
    hint: Text | None = None

    @classmethod
    def of(cls, exc: CasperError) -> ErrorBody:
        """``exc`` as sent on the wire: its code, its message cut to :data:`WIRE_MESSAGE_MAX`, its hint."""
        return cls(code=exc.code, message=exc.message[:WIRE_MESSAGE_MAX], hint=exc.hint)


class TaskSpec(BaseModel):
    """A task as a submitter describes it."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    type: Name
    input: dict[str, Any] = Field(default_factory=dict)
    priority: int = Field(default=5, ge=0, le=9)
    requires: tuple[Name, ...] = Field(default=(), max_length=32)
    affinity: Key | None = None
    idempotency_key: Key | None = None
    max_attempts: int | None = Field(default=None, ge=1, le=100)
    timeout_s: float | None = Field(default=None, gt=0, le=86400, allow_inf_nan=False)
    parent_id: uuid.UUID | None = None
    cache: bool = False


class Assignment(BaseModel):
    """A task as the broker hands it to a worker."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    task_id: uuid.UUID
    type: Name
    input: dict[str, Any] = Field(default_factory=dict)
    attempt: int = Field(ge=1)
    lease_ms: int = Field(ge=1)
    timeout_s: float | None = Field(default=None, gt=0)
    cache: bool = False


class Outcome(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    task_id: uuid.UUID
    attempt: int = Field(ge=1)
    output: Any = None
    duration_ms: float = Field(default=0.0, ge=0, le=1e11, allow_inf_nan=False)


class Failure(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    task_id: uuid.UUID
    attempt: int = Field(ge=1)
    error: ErrorBody
    retryable: bool = True


# --- commands ---------------------------------------------------------------------------------
class Ready(_Body):
    COMMAND = Command.READY
    node_id: Name
    epoch: Name
    role: Role
    endpoint: Endpoint
    pid: int = Field(ge=0)
    host: Name
    capabilities: tuple[Name, ...] = Field(default=(), max_length=64)
    capacity: int = Field(ge=0, le=100_000)
    tasks: tuple[uuid.UUID, ...] = Field(default=(), max_length=100_000)
    heartbeat_ms: int = Field(default=1000, ge=10, le=600_000)
    version: Name = "0"
    public_key: CurveKey | None = None


class Heartbeat(_Body):
    COMMAND = Command.HEARTBEAT
    load: int = Field(default=0, ge=0)
    draining: bool = False
    cache: dict[Name, int] | None = Field(default=None, max_length=16)
    """A worker's result-cache counters (hits, misses, ...); the policeman sums them for status."""
    cpu_pct: float | None = Field(default=None, ge=0, le=100_000)
    """The sender's process CPU use since its last heartbeat, percent of one core (workers)."""
    rss_bytes: int | None = Field(default=None, ge=0)
    """The sender's process resident memory (workers)."""

    @model_serializer(mode="wrap")
    def _omit_absent(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        body: dict[str, Any] = handler(self)
        for key in ("cache", "cpu_pct", "rss_bytes"):
            if body.get(key) is None:
                body.pop(key, None)  # absent on the wire, not nil: the bytes stay those of version 1
        return body


SUBMIT_MAX_TASKS = 10_000
"""The most tasks one SUBMIT carries (SPEC 6.4)."""


class Submit(_Body):
    COMMAND = Command.SUBMIT
    req_id: int = Field(ge=0)
    tasks: tuple[TaskSpec, ...] = Field(min_length=1, max_length=SUBMIT_MAX_TASKS)
    wait: bool = False


class Accepted(_Body):
    COMMAND = Command.ACCEPTED
    req_id: int = Field(ge=0)
    task_ids: tuple[uuid.UUID, ...]
    existing: tuple[bool, ...]


class TaskBatch(_Body):
    COMMAND = Command.TASK
    tasks: tuple[Assignment, ...] = Field(min_length=1, max_length=10_000)


RENEW = "renew"
"""PROGRESS.note of a lease renewal: it extends the leases of the listed tasks and changes no state."""


class Progress(_Body):
    COMMAND = Command.PROGRESS
    task_ids: tuple[uuid.UUID, ...] = Field(min_length=1, max_length=10_000)
    note: Text | None = None


class ResultBatch(_Body):
    COMMAND = Command.RESULT
    results: tuple[Outcome, ...] = Field(min_length=1, max_length=10_000)


class FailedBatch(_Body):
    COMMAND = Command.FAILED
    failures: tuple[Failure, ...] = Field(min_length=1, max_length=10_000)


class Cancel(_Body):
    COMMAND = Command.CANCEL
    task_ids: tuple[uuid.UUID, ...] = Field(min_length=1, max_length=10_000)
    reason: Text = "cancelled"


class Disconnect(_Body):
    COMMAND = Command.DISCONNECT
    reason: Text


class Error(_Body):
    COMMAND = Command.ERROR
    code: Name
    message: Text
    hint: Text | None = None
    ref: int | None = Field(default=None, ge=0, le=255)

    @classmethod
    def of(cls, exc: CasperError, ref: int | None = None) -> Error:
        """ERROR for ``exc`` (about the command ``ref``), as :meth:`ErrorBody.of` words it."""
        return cls(code=exc.code, message=exc.message[:WIRE_MESSAGE_MAX], hint=exc.hint, ref=ref)


class Request(_Body):
    COMMAND = Command.REQUEST
    req_id: int = Field(ge=0)
    op: Name
    args: dict[str, Any] = Field(default_factory=dict)


class Reply(_Body):
    COMMAND = Command.REPLY
    req_id: int = Field(ge=0)
    ok: bool
    data: Any = None
    error: ErrorBody | None = None


class Done(BaseModel):
    """One waited-on task's outcome, an item of DONE."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    task_id: uuid.UUID
    status: Name
    output: Any = None
    error: ErrorBody | None = None


class DoneBatch(_Body):
    COMMAND = Command.DONE
    done: tuple[Done, ...] = Field(min_length=1, max_length=10_000)


# --- trusted fast paths ------------------------------------------------------------------------
# The broker and workers build the bodies of their busiest messages (TASK, RESULT, DONE) and their
# items as plain dicts from values they already validated, skipping model construction. Keys are in model field
# order, so codec.encode_raw gives the same bytes as codec.encode of the model (unit-tested).
def assignment_body(
    task_id: uuid.UUID,
    type: str,
    input: dict[str, Any],
    attempt: int,
    lease_ms: int,
    timeout_s: float | None,
    cache: bool,
) -> dict[str, Any]:
    return {
        "task_id": task_id,
        "type": type,
        "input": input,
        "attempt": attempt,
        "lease_ms": lease_ms,
        "timeout_s": timeout_s,
        "cache": cache,
    }


def outcome_body(task_id: uuid.UUID, attempt: int, output: Any, duration_ms: float) -> dict[str, Any]:
    return {"task_id": task_id, "attempt": attempt, "output": output, "duration_ms": duration_ms}


def done_item(task_id: uuid.UUID, status: str, output: Any, error: dict[str, Any] | None) -> dict[str, Any]:
    """One item of a DONE (a :class:`Done`), in field order."""
    return {"task_id": task_id, "status": status, "output": output, "error": error}


MODELS: dict[Command, type[_Body]] = {
    m.COMMAND: m
    for m in (
        Ready,
        Heartbeat,
        Submit,
        Accepted,
        TaskBatch,
        Progress,
        ResultBatch,
        FailedBatch,
        Cancel,
        Disconnect,
        Error,
        Request,
        Reply,
        DoneBatch,
    )
}

Message = _Body
