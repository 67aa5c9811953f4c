"""Why does a task wait? A pure answer from the task and the registered peers (no I/O).

A pending task waits for a peer that has every capability it needs (its own ``requires`` plus its
type's), is alive, not draining and not behind an open breaker. When no peer could ever take it —
nobody registered has the capabilities — it waits until such a peer joins, which a newcomer cannot
guess: :func:`why_waiting` says so, and names what is missing. ``caspectl submit`` warns with it,
``caspectl get`` and ``caspectl tasks`` show it. On a policeman with an autoscaler the answer also
says what the autoscaler does about it (:func:`spawn_outlook`): a peer is being spawned for the
task, one can be, or no spawner can provide what it needs (the autoscaler's ``unmet`` decision).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from functools import cache
from typing import Any

from casperd.handlers import Catalog, TaskType

WAITING_STATES = frozenset({"pending", "retry"})


@cache
def _catalog() -> Catalog:
    """The built-in and the Claude-backed task types (what a mesh of this version knows)."""
    from casperd.agents.tasktypes import install

    return install(Catalog())


def _type(name: str) -> TaskType | None:
    return _catalog().find(name)


def needed_capabilities(task_type: str, requires: Iterable[str] = ()) -> frozenset[str]:
    """The task's own requirements plus those of its type (an unknown type adds none)."""
    ttype = _type(task_type)
    return frozenset(requires) | frozenset(ttype.requires if ttype is not None else ())


def missing_capabilities(needs: Iterable[str], peers: Sequence[Mapping[str, Any]]) -> frozenset[str]:
    """Capabilities no live peer offers (empty when at least one live peer has them all).

    When several live peers each lack something, the answer is what the best-equipped one lacks.
    """
    needs = frozenset(needs)
    live = [frozenset(p.get("capabilities") or ()) for p in peers if p.get("liveness") != "dead"]
    if not live:
        return needs
    return min((needs - caps for caps in live), key=len)


def spawn_outlook(needs: frozenset[str], autoscale: Mapping[str, Any]) -> str:
    """What the policeman's autoscaler does about tasks that need ``needs`` when no live peer has
    them all: a peer is being spawned for them, one can be, or none can (the ``unmet`` case).

    Args:
        autoscale: the ``autoscale`` part of the policeman's ``peers`` answer: ``spawner`` (its
            kind), ``roles`` (spawnable role -> capabilities a spawned peer offers), ``pending``
            (node id -> role, spawns not yet registered), ``unmet`` (capability sets reported).
    """
    kind = str(autoscale.get("spawner") or "none")
    roles = {str(r): frozenset(c) for r, c in (autoscale.get("roles") or {}).items()}
    able = sorted(r for r, caps in roles.items() if needs <= caps)
    coming = sorted(n for n, r in (autoscale.get("pending") or {}).items() if r in able)
    if coming:
        return f"a {_role_of(autoscale, coming[0])} offering them is being spawned for it ({', '.join(coming)})"
    if able:
        return (
            f"the autoscaler can spawn a {' or '.join(able)} offering them ({kind} spawner) and will, "
            "within its bounds and spawn rate (caspectl status shows its decisions)"
        )
    if kind == "none":
        return "this mesh has a fixed size (spawner none): start a peer offering them (--capabilities), or cancel it"
    return (
        f"no spawner can provide them either ({kind} spawner; the roles it may start, "
        f"{', '.join(sorted(roles)) or 'none'}, lack them): start a peer offering them (--capabilities), or cancel it"
    )


def _role_of(autoscale: Mapping[str, Any], node_id: str) -> str:
    return str((autoscale.get("pending") or {}).get(node_id) or "peer")


def why_waiting(
    task: Mapping[str, Any], peers: Sequence[Mapping[str, Any]], autoscale: Mapping[str, Any] | None = None
) -> str | None:
    """A sentence saying why an open task cannot run now, or None when nothing stands in its way.

    Args:
        task: ``type``, ``status`` and ``requires`` (as ``caspectl get`` shows them).
        peers: the policeman's peer views (``capabilities``, ``liveness``, ``draining``, ``breaker``).
        autoscale: the policeman's autoscaler outlook (see :func:`spawn_outlook`), when it has one:
            a task no live peer can take then says whether a peer is being spawned for it.
    """
    if task.get("status") not in WAITING_STATES:
        return None
    ttype = _type(str(task.get("type")))
    if ttype is not None and ttype.local:
        return None  # run by the policeman itself
    needs = needed_capabilities(str(task.get("type")), task.get("requires") or ())
    missing = missing_capabilities(needs, peers)
    if not peers or missing:
        if not peers:
            head = "no peer is registered"
        else:
            head = f"no live peer has the capabilit{'y' if len(missing) == 1 else 'ies'} {', '.join(sorted(missing))}"
        if autoscale is not None:
            return f"{head}: {spawn_outlook(needs, autoscale)}"
        if not peers:
            return f"{head}: it runs once a developer or tester joins the mesh"
        return f"{head}: it waits until a peer offering them joins (start one with --capabilities), or cancel it"
    able = [p for p in peers if p.get("liveness") != "dead" and needs <= frozenset(p.get("capabilities") or ())]
    if all(p.get("draining") for p in able):
        return f"every peer able to run it is draining ({_names(able)}): caspectl resume PEER"
    if all(p.get("breaker") == "open" for p in able):
        return f"the circuit breakers of every peer able to run it are open ({_names(able)}): they close on their own"
    return None


def _names(peers: Iterable[Mapping[str, Any]]) -> str:
    return ", ".join(str(p.get("node_id")) for p in peers)
