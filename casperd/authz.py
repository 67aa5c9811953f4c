"""Authorization: one table of who may do what on the mesh (protocol/SPEC.md, "Trust"). Pure.

A sender's role is the role its Curve key is enrolled with (or, with Curve off, the role its READY
claimed). :func:`authorize` is checked before any handler runs; a refusal is a
:class:`~casperd.errors.ForbiddenError` (wire code ``forbidden``), counted by the caller.

Besides mesh roles there are two creators of tasks that never arrive over the mesh:
``control`` (the local admin on the control socket) and ``policeman`` (the policeman's own job
runner). ``shell``, ``code`` and ``job`` tasks come only from them.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

from casperd.enrollment import Entry
from casperd.errors import ForbiddenError, IdentityError, InvalidBodyError
from casperd.messages import Command, Ready, Request

CONTROL = "control"
POLICEMAN = "policeman"
WORKER_ROLES = frozenset({"developer", "tester"})

_PEER_COMMANDS = frozenset(
    {
        Command.READY,
        Command.HEARTBEAT,
        Command.PROGRESS,
        Command.RESULT,
        Command.FAILED,
        Command.REQUEST,
        Command.DISCONNECT,
    }
)
COMMANDS: dict[str, frozenset[Command]] = {
    "developer": _PEER_COMMANDS,
    "tester": _PEER_COMMANDS,
    CONTROL: frozenset({Command.SUBMIT, Command.REQUEST}),
}
"""Which command each role may send to the policeman's mesh ROUTER (``control``: its control socket)."""

SERVICES: dict[str, frozenset[str]] = {
    "llm-permit": WORKER_ROLES,
    "turns-save": frozenset({"developer"}),
    "turns-load": frozenset({"developer"}),
    "calls-save": WORKER_ROLES,
    "directory": WORKER_ROLES,
    "handoff-record": WORKER_ROLES,
    "handoff": frozenset({"developer"}),  # a worker's own ROUTER: a developer hands a test over
}
"""Which role may call which mesh service (REQUEST ``op``)."""

_ADMIN = frozenset({CONTROL, POLICEMAN})
CREATORS: dict[str, frozenset[str]] = {
    "shell": _ADMIN,
    "code": _ADMIN,
    "job": _ADMIN,
    "test": _ADMIN | WORKER_ROLES,  # a developer hands its patch to a tester
}
"""Who may create a task of each type; a type not listed: the local admin and the policeman only."""


def authorize(role: str | None, command: Command, *, service: str | None = None, task_type: str | None = None) -> None:
    """Raise ForbiddenError unless ``role`` may send ``command`` (calling ``service`` /
    creating a ``task_type`` task)."""
    who = role or "an unregistered peer"
    if role not in COMMANDS or command not in COMMANDS[role]:
        _refuse(f"{who} may not send {command.name}", "see protocol/SPEC.md, Trust: who sends what")
    if service is not None and role not in SERVICES.get(service, frozenset()):
        _refuse(f"{who} may not call the mesh service {service!r}", "only the roles in SPEC's table may")
    if task_type is not None:
        may_create(role, task_type)


def may_create(creator: str | None, task_type: str) -> None:
    """Raise ForbiddenError unless ``creator`` may create a ``task_type`` task."""
    if creator not in CREATORS.get(task_type, _ADMIN):
        _refuse(
            f"{creator or 'a mesh peer'} may not create {task_type!r} tasks",
            "shell, code and job tasks are submitted only by the local admin (caspectl) or a job",
        )


def check_identity(entry: Entry | None, node_id: str, role: str, reserved: Collection[str] = ()) -> None:
    """The identity a READY claims must be one its key is enrolled for; a pattern key never gets an
    id in ``reserved`` (one another entry names exactly: a fixed node's)."""
    if entry is None:
        _refuse("this key is not enrolled (revoked?)", "enroll it with caspectl keys add")
    elif not entry.admits(node_id, role, reserved):
        if role == entry.role and not entry.exact and node_id in reserved:
            raise IdentityError(
                f"{node_id!r} is enrolled for another key; this key's pattern {entry.pattern!r} cannot claim it",
                hint="a pattern-enrolled node takes an id no entry names exactly",
            )
        raise IdentityError(
            f"this key is enrolled as {entry.pattern!r} ({entry.role}), not as {node_id!r} ({role})",
            hint="a node may only claim the id and role its key is enrolled with",
        )


def _refuse(message: str, hint: str) -> None:
    raise ForbiddenError(message, hint=hint)


def bind(
    msg: Any, *, entry: Entry | None, key: str | None, peer_key: str | None, reserved: Collection[str] = ()
) -> None:
    """With enrollment on: the frame's key (``entry``: its enrollment) may speak as this sender. A
    READY must claim an id and role the key is enrolled for; any other frame on a registered
    routing id must come from the key that registered it."""
    if entry is None:
        _refuse("this key is not enrolled (revoked?)", "enroll it with caspectl keys add")
    assert entry is not None
    if isinstance(msg, Ready):
        check_identity(entry, msg.node_id, msg.role.value, reserved)
    elif peer_key is not None and peer_key != key:
        raise IdentityError(
            "this frame comes from another key than the one that registered this routing id",
            hint="a node may only speak for itself",
        )


def admit(
    msg: Any,
    *,
    enforced: bool,
    entry: Entry | None,
    key: str | None,
    peer_role: str | None,
    peer_key: str | None,
    reserved: Collection[str] = (),
) -> str | None:
    """Who sent ``msg`` and may they: the sender's role (None: an unregistered peer that must READY first).

    With enrollment ``enforced`` (Curve on), ``key`` is the ZAP User-Id of the frame and ``entry``
    its enrollment: a READY must claim an id and role the key is enrolled for, and every later frame
    on a registered route must come from the key that registered it. Then the command (and the
    service a REQUEST names) is checked against the table."""
    if enforced:
        bind(msg, entry=entry, key=key, peer_key=peer_key, reserved=reserved)
        assert entry is not None
        role: str | None = entry.role if (isinstance(msg, Ready) or peer_role is not None) else None
    else:
        role = msg.role.value if isinstance(msg, Ready) else peer_role
    if role is not None:
        authorize(role, msg.COMMAND, service=msg.op if isinstance(msg, Request) else None)
    return role


def check_handoff(role: str, task_type: str, *, hold: bool, sender_role: str | None) -> None:
    """``handoff-record``: a developer records a test it hands over (queued, no holder); a tester
    records a test a registered developer handed it directly (with ``hold`` the tester itself becomes
    the holder; without, it is queued)."""
    may_create(role, task_type)
    if task_type != "test":
        _refuse(f"{role} may not hand off {task_type!r} tasks", "only test tasks are handed between peers")
    if role == "developer" and hold:
        _refuse("a developer cannot hold a test it hands off", "send it to a tester, or without hold")
    if role == "tester" and sender_role != "developer":
        _refuse(
            "a tester records only a test a registered developer handed it directly",
            "the developer sends handoff-record itself when the direct send fails",
        )


def check_job_limits(task_input: dict[str, Any], max_parallel: int = 64) -> None:
    """A job's budget and parallelism, checked on every path that creates a job."""
    budget = task_input.get("budget_usd")
    if budget is not None and (
        isinstance(budget, bool) or not isinstance(budget, int | float) or not math.isfinite(budget) or budget <= 0
    ):
        raise InvalidBodyError("a job's budget_usd must be a positive number of dollars", hint="e.g. --budget-usd 2.5")
    par = task_input.get("max_parallel", 4)
    if isinstance(par, bool) or not isinstance(par, int) or not 1 <= par <= max_parallel:
        raise InvalidBodyError(
            f"a job's max_parallel must be between 1 and {max_parallel}", hint="e.g. --max-parallel 4"
        )
