"""Why does a task wait? A pure answer from the task and the registered peers (no I/O).

A pending task waits for a peer that has every capability it needs (its own ``requires`` plus its
type's), is alive, not draining and not behind an open breaker. When no peer could ever take it —
nobody registered has the capabilities — it waits until such a peer joins, which a newcomer cannot
guess: :func:`why_waiting` says so, and names what is missing. ``caspectl submit`` warns with it,
``caspectl get`` and ``caspectl tasks`` show it; an autoscaler can use :func:`missing_capabilities`
to know what kind of node to start.
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


def why_waiting(task: Mapping[str, Any], peers: Sequence[Mapping[str, Any]]) -> str | None:
    """A sentence saying why an open task cannot run now, or None when nothing stands in its way.

    Args:
        task: ``type``, ``status`` and ``requires`` (as ``caspectl get`` shows them).
        peers: the policeman's peer views (``capabilities``, ``liveness``, ``draining``, ``breaker``).
    """
    if task.get("status") not in WAITING_STATES:
        return None
    ttype = _type(str(task.get("type")))
    if ttype is not None and ttype.local:
        return None  # run by the policeman itself
    needs = needed_capabilities(str(task.get("type")), task.get("requires") or ())
    if not peers:
        return "no peer is registered: it runs once a developer or tester joins the mesh"
    missing = missing_capabilities(needs, peers)
    if missing:
        return (
            f"no live peer has the capabilit{'y' if len(missing) == 1 else 'ies'} {', '.join(sorted(missing))}: "
            "it waits until a peer offering them joins (start one with --capabilities), or cancel it"
        )
    able = [p for p in peers if p.get("liveness") != "dead" and needs <= frozenset(p.get("capabilities") or ())]
    if all(p.get("draining") for p in able):
        return f"every peer able to run it is draining ({_names(able)}): caspectl resume PEER"
    if all(p.get("breaker") == "open" for p in able):
        return f"the circuit breakers of every peer able to run it are open ({_names(able)}): they close on their own"
    return None


def _names(peers: Iterable[Mapping[str, Any]]) -> str:
    return ", ".join(str(p.get("node_id")) for p in peers)
