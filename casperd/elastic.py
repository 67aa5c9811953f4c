"""The autoscaler's shell on the policeman: broker state in, the policy's decisions carried out.

Called from the broker's tick (one hook). Every ``period`` it builds a
:class:`~casperd.autoscale.MeshView` from the broker (queued tasks grouped by the capabilities
they need, with how long the oldest of each group waits; the registered peers; which of them the
spawner started), asks :class:`~casperd.autoscale.Autoscaler` what to do, and does it: a drain or a
resume goes through the broker at once (so no task is dispatched to a peer being retired), a spawn
or a retire goes to the spawner in a background task. Every decision is logged with its reason,
counted in ``casper_autoscale_decisions_total`` and kept (the last 50) for ``caspectl status``,
``peers`` and ``top``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import string
import time
from collections import deque
from datetime import datetime
from typing import TYPE_CHECKING, Any

from casperd.autoscale import (
    DRAIN,
    RESUME,
    RETIRE,
    SPAWN,
    UNMET,
    AutoscaleConfig,
    Autoscaler,
    Decision,
    MeshView,
    PeerState,
    RoleBounds,
    WaitingGroup,
)
from casperd.errors import CasperError
from casperd.lifecycle import Status
from casperd.liveness import Liveness
from casperd.messages import Role
from casperd.settings import ROLE_CAPABILITIES, Settings
from casperd.spawners import Spawner
from casperd.taskrecord import utcnow

if TYPE_CHECKING:
    from casperd.broker import Broker
    from casperd.metrics import Metrics

log = logging.getLogger("casperd.autoscale")
REFRESH_S = 5.0
"""How often the spawner's inventory (which peers it started) is read again from the backend."""
VIEW_SHARE = 100
"""The autoscaler's view of the queue runs at most once per ``VIEW_SHARE`` times its own duration
(and at least ``period`` apart): a long queue is looked at less often, never at the cost of the loop."""


def config_from(s: Settings) -> AutoscaleConfig:
    roles = {
        name: RoleBounds(r.min, r.max, frozenset(ROLE_CAPABILITIES[Role(name)]) | frozenset(r.capabilities))
        for name, r in s.autoscale_roles.items()
    }
    return AutoscaleConfig(
        roles=roles if s.spawner != "none" else {},
        wait_s=s.autoscale_wait_s,
        idle_s=s.autoscale_idle_s,
        step_s=s.autoscale_step_s,
        spawns_per_min=s.autoscale_spawns_per_min,
        spawn_timeout_s=s.autoscale_spawn_timeout_s,
        spawn_capacity=s.capacity,
        grace_s=max(10.0, s.heartbeat_s * s.heartbeat_misses * 2),
    )


class Elastic:
    def __init__(
        self, broker: Broker, settings: Settings, spawner: Spawner, metrics: Metrics, period: float = 0.5
    ) -> None:
        self.broker = broker
        self.spawner = spawner
        self.metrics = metrics
        self.period = period
        tag = "".join(secrets.choice(string.ascii_lowercase) for _ in range(2))
        self.policy = Autoscaler(config_from(settings), name_tag=tag)
        self.capabilities = {name: list(r.capabilities) for name, r in settings.autoscale_roles.items()}
        self.decisions: deque[dict[str, Any]] = deque(maxlen=50)
        self.reasons: dict[str, str] = {}
        """Why each peer the autoscaler spawned was spawned (shown by caspectl peers)."""
        self._next = 0.0
        self._next_refresh = 0.0
        self._background: set[asyncio.Task[Any]] = set()
        if hasattr(spawner, "on_failed"):
            spawner.on_failed = self._spawn_failed

    # --- the broker's hook --------------------------------------------------------------------------
    def on_tick(self, now: float) -> None:
        if now < self._next:
            return
        self._next = now + self.period
        if now >= self._next_refresh:
            self._next_refresh = now + REFRESH_S
            self._spawn_task(self.spawner.refresh())
        t0 = time.perf_counter()
        view = self.view(now)
        # the view looks at every queued task: after a burst of tens of thousands it took 8-10% of
        # the policeman's CPU under throughput at one view per period; now it takes at most
        # 1/VIEW_SHARE (20,000 queued: 13 ms a view, one view per 1.3 s)
        self._next = now + max(self.period, (time.perf_counter() - t0) * VIEW_SHARE)
        for d in self.policy.decide(view, now):
            self._apply(d)

    def view(self, now: float) -> MeshView:
        # per group (the requirement set dispatch matches peers against): how many wait and since
        # when the oldest waits (its record's last status change, the move to pending), from the
        # dispatcher's queues: queued tasks only, nothing kept per task (issue #9)
        tasks = self.broker.tasks
        wall = utcnow()
        waiting: list[WaitingGroup] = []
        for req, ids in self.broker.core.dispatcher.waiting():
            stamps = [rec.updated_at for rec in map(tasks.get, ids) if rec is not None and rec.status is Status.PENDING]
            if stamps:
                waiting.append(WaitingGroup(req, len(stamps), _age(wall, min(stamps))))
        self.metrics.queue_depth.set(sum(g.count for g in waiting))
        self.metrics.queue_oldest.set(max((g.oldest_s for g in waiting), default=0.0))
        mine = self.spawner.spawned()
        states = {s.value: 0 for s in Liveness}
        for p in self.broker.core.peers.values():
            states[p.clock.state(now).value] += 1
        for state, n in states.items():
            self.metrics.peers_by_state.labels(state).set(n)
        self.metrics.breakers_open.set(
            sum(1 for p in self.broker.core.peers.values() if p.slot.breaker.state.value == "open")
        )
        peers = tuple(
            PeerState(
                p.node_id,
                p.role,
                p.slot.capabilities,
                p.slot.inflight,
                p.slot.capacity,
                alive=p.clock.state(now) is not Liveness.DEAD,
                draining=p.slot.draining,
                spawned=p.node_id in mine,
            )
            for p in self.broker.core.peers.values()
        )
        return MeshView(tuple(waiting), peers)

    # --- effects ----------------------------------------------------------------------------------
    def _apply(self, d: Decision) -> None:
        self._record(d)
        if d.kind == DRAIN or d.kind == RESUME:
            try:
                self.broker.set_draining(d.node_id, d.kind == DRAIN)
            except CasperError as exc:
                log.warning("autoscaler: could not %s %s: %s", d.kind, d.node_id, exc)
        elif d.kind == SPAWN:
            self.reasons[d.node_id] = d.reason
            self._spawn_task(self._spawn(d))
        elif d.kind == RETIRE:
            self._spawn_task(self._retire(d))

    def _record(self, d: Decision) -> None:
        self.metrics.autoscale.labels(d.kind, d.why).inc()
        entry = {"at": round(time.time(), 3), **d.view()}
        self.decisions.append(entry)
        level = logging.WARNING if d.kind == UNMET else logging.INFO
        target = f" {d.node_id}" if d.node_id else ""
        log.log(level, "autoscaler: %s%s (%s): %s", d.kind, target, d.role or "-", d.reason)

    async def _spawn(self, d: Decision) -> None:
        try:
            actual = await self.spawner.spawn(d.node_id, d.role, self.capabilities.get(d.role, []))
        except CasperError as exc:
            self._spawn_failed(d.node_id, str(exc))
            return
        except Exception as exc:  # a backend bug: the spawn failed; say so and keep scaling
            log.exception("autoscaler: the %s spawner failed unexpectedly", self.spawner.kind)
            self._spawn_failed(d.node_id, f"{type(exc).__name__}: {exc}")
            return
        if actual != d.node_id:
            self.policy.rename(d.node_id, actual)
            self.reasons[actual] = self.reasons.pop(d.node_id, d.reason)
            for entry in self.decisions:  # the backend chose the name (a swarm slot): show that one
                if entry["node_id"] == d.node_id:
                    entry["node_id"] = actual
            log.info("autoscaler: %s registers as %s", d.node_id, actual)

    def _spawn_failed(self, node_id: str, why: str) -> None:
        self.policy.spawn_failed(node_id)
        self.reasons.pop(node_id, None)
        self.metrics.autoscale.labels("spawn-failed", "error").inc()
        self.decisions.append(
            {"at": round(time.time(), 3), "kind": "spawn-failed", "role": "", "node_id": node_id, "why": "error"}
            | {"reason": why[:500]}
        )
        log.warning("autoscaler: spawning %s failed: %s", node_id, why)

    async def _retire(self, d: Decision) -> None:
        try:
            await self.spawner.retire(d.node_id)
        except Exception as exc:  # CasperError from the backend, or a bug in it: the peer stays
            if not isinstance(exc, CasperError):
                log.exception("autoscaler: the %s spawner failed unexpectedly", self.spawner.kind)
            log.warning("autoscaler: retiring %s failed: %s; it serves again", d.node_id, exc)
            self.policy.retired(d.node_id)
            if d.node_id in self.broker.core.peers:
                self.broker.set_draining(d.node_id, False)
            return
        self.reasons.pop(d.node_id, None)

    def _spawn_task(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        await self.spawner.close()

    def queue_view(self, now: float) -> dict[str, Any]:
        """Queued tasks by priority and the oldest wait (caspectl top)."""
        by_priority: dict[str, int] = {}
        queued = self.broker.core.dispatcher
        oldest: datetime | None = None
        for rec in self.broker.tasks.values():
            if rec.status is Status.PENDING and rec.id in queued:
                key = str(rec.priority)
                by_priority[key] = by_priority.get(key, 0) + 1
                if oldest is None or rec.updated_at < oldest:
                    oldest = rec.updated_at
        return {
            "depth": sum(by_priority.values()),
            "by_priority": by_priority,
            "oldest_s": None if oldest is None else round(_age(utcnow(), oldest), 3),
        }

    # --- views --------------------------------------------------------------------------------------
    def status_view(self) -> dict[str, Any]:
        return {
            "spawner": self.spawner.view(),
            "roles": {
                r: {"min": b.min, "max": b.max, "capabilities": sorted(b.capabilities)}
                for r, b in self.policy.c.roles.items()
            },
            **self.policy.snapshot(),
            "decisions": list(self.decisions)[-10:],
        }

    def outlook(self) -> dict[str, Any]:
        """The autoscaler's side of ``caspectl tasks``' why-it-waits (the ``peers`` answer)."""
        return self.policy.outlook(self.spawner.kind)

    def peer_note(self, node_id: str) -> dict[str, Any]:
        """What caspectl peers shows per peer: spawned by the autoscaler, and why."""
        spawned = node_id in self.spawner.spawned()
        return {
            "spawned": spawned,
            "spawn_reason": self.reasons.get(node_id) if spawned else None,
            "retiring": node_id in self.policy.draining or node_id in self.policy.retiring,
        }


def attach(broker: Broker, settings: Settings, metrics: Metrics) -> tuple[Elastic, Any]:
    """The policeman's autoscaler (on the broker's tick) and its telemetry (on finished tasks)."""
    from casperd.spawners import make_spawner
    from casperd.telemetry import Telemetry

    elastic = Elastic(broker, settings, make_spawner(settings), metrics)
    broker.on_tick = elastic.on_tick
    return elastic, Telemetry(broker, metrics)


def _age(wall: datetime, since: datetime) -> float:
    """Seconds a task has waited since it became pending (its record's ``updated_at``)."""
    return max(0.0, (wall - since).total_seconds())
