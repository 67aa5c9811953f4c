"""The peer registry: READY (registration and reconciliation), heartbeats, departures, the directory.

A peer's routing id must be ``node_id/epoch``. A READY with a new epoch replaces the old
registration (its tasks go back to pending); the tasks a READY lists are reconciled against what
the policeman says the peer holds: held ones keep running with a fresh lease, unknown ones are
cancelled on the peer, and tasks the peer should hold but did not list go back to pending.
"""

from __future__ import annotations

import uuid
from typing import Any

from casperd import codec
from casperd.dispatch import PeerSlot
from casperd.errors import CasperError, IdentityError, PeerNotFoundError, ValidationFailedError
from casperd.lifecycle import ACTIVE, Status
from casperd.liveness import Liveness, PeerClock
from casperd.messages import Cancel, Disconnect, Heartbeat, Ready
from casperd.messages import Error as ErrorMsg
from casperd.policeman.actions import Now
from casperd.policeman.state import Peer, log
from casperd.policeman.tasks import TaskRules


class RegistryRules(TaskRules):
    def reject(self, route: bytes, exc: CasperError, ref: int | None) -> None:
        """Answer a frame with ERROR (counted every time, logged once per sender and cause)."""
        self.metrics.rejections.record("mesh", route, exc)
        self.send_mesh(route, codec.encode(ErrorMsg.of(exc, ref)))

    def on_ready(self, route: bytes, msg: Ready, now: Now) -> None:
        expected = f"{msg.node_id}/{msg.epoch}".encode()
        if route != expected:
            raise IdentityError(
                f"READY claims node {msg.node_id!r} but arrives from routing id {route[:64]!r}",
                hint="a node's routing id must be NODE_ID/EPOCH",
            )
        old = self.peers.get(msg.node_id)
        if old is not None and old.epoch != msg.epoch:
            log.info("peer %s restarted (epoch %s -> %s)", msg.node_id, old.epoch, msg.epoch)
            self.drop_peer(old, "restarted", now)
            old = None
        clock = PeerClock(interval_s=self.s.heartbeat_s, misses=self.s.heartbeat_misses, last_seen=now.mono)
        breaker = self.breaker_for(msg.node_id)  # a node's breaker outlives its registrations
        slot = PeerSlot(msg.node_id, frozenset(msg.capabilities), msg.capacity, breaker=breaker)
        peer = Peer(
            msg.node_id,
            msg.epoch,
            route,
            msg.role.value,
            msg.endpoint,
            msg.host,
            msg.pid,
            msg.version,
            slot,
            clock,
            now.wall.timestamp(),
            public_key=msg.public_key,
        )
        if old is not None:
            peer.drained_by_operator = old.drained_by_operator
            peer.update_draining()
        self.peers[msg.node_id] = peer
        self.by_route[route] = peer
        # reconcile: what the peer says it holds against what the policeman says it holds
        unknown: list[uuid.UUID] = []
        for tid in set(msg.tasks):
            rec = self.tasks.get(tid)
            if rec is not None and rec.status in ACTIVE and rec.assigned_to == msg.node_id:
                peer.held.add(tid)
                self.leases[tid] = now.mono + self.s.lease_s
            else:
                unknown.append(tid)
        slot.inflight = len(peer.held)
        for rec in list(self.tasks.values()):
            if rec.status in ACTIVE and rec.assigned_to == msg.node_id and rec.id not in peer.held:
                self.lose_holder(rec, now, "holder re-registered without it")
        if unknown:
            self.send_mesh(route, codec.encode(Cancel(task_ids=tuple(unknown[:10_000]), reason="not assigned to you")))
        log.info(
            "peer %s registered: role=%s endpoint=%s capacity=%d capabilities=%s holding=%d",
            msg.node_id,
            msg.role.value,
            msg.endpoint,
            msg.capacity,
            ",".join(msg.capabilities),
            len(peer.held),
        )
        self.metrics.peers.set(len(self.peers))
        self.send_mesh(peer, codec.encode(Heartbeat()), now.mono)
        self.dirty = True

    def lose_holder(self, rec: Any, now: Now, reason: str) -> None:
        """A task's holder is gone. A task in ``validating`` keeps its result and is not requeued;
        after a restart (no validation running) that result cannot be checked: the attempt fails."""
        if rec.id in self.validating:
            return
        if rec.status is Status.VALIDATING:
            self.fail(
                rec, now.wall, rec.assigned_to, ValidationFailedError.code, "the validation was interrupted", True
            )
            return
        self.requeue(rec, now.wall, reason)

    def on_heartbeat(self, peer: Peer, msg: Heartbeat, now: Now) -> None:
        peer.cache = msg.cache
        if msg.cpu_pct is not None:
            peer.cpu_pct, peer.rss_bytes = msg.cpu_pct, msg.rss_bytes
        if msg.draining != peer.draining_itself:
            peer.draining_itself = msg.draining
            peer.update_draining()
            self.dirty = True
            log.info("peer %s is %s", peer.node_id, "draining" if msg.draining else "serving again")

    def on_disconnect(self, peer: Peer, msg: Disconnect, now: Now) -> None:
        log.info("peer %s disconnects: %s", peer.node_id, msg.reason)
        self.drop_peer(peer, f"disconnected: {msg.reason}", now)

    def drop_peer(self, peer: Peer, reason: str, now: Now) -> None:
        if self.peers.get(peer.node_id) is peer:
            del self.peers[peer.node_id]
        self.by_route.pop(peer.route, None)
        self.dispatcher.forget_peer(peer.node_id)
        for tid in list(peer.held):
            rec = self.tasks.get(tid)
            if rec is not None and rec.status in ACTIVE and rec.assigned_to == peer.node_id:
                self.lose_holder(rec, now, f"peer {peer.node_id} {reason}")
        peer.held.clear()
        self.metrics.peers.set(len(self.peers))
        self.dirty = True

    # --- views and operator actions ----------------------------------------------------------------
    def directory(self, now: float, capability: str | None = None) -> list[dict[str, Any]]:
        """Live peers as other peers should reach them (for direct hand-off), least loaded first."""
        out = [
            {
                "node_id": p.node_id,
                "role": p.role,
                "endpoint": p.endpoint,
                "public_key": p.public_key,
                "capabilities": sorted(p.slot.capabilities),
                "capacity": p.slot.capacity,
                "inflight": p.slot.inflight,
            }
            for p in self.peers.values()
            if p.clock.state(now) is Liveness.ALIVE
            and p.slot.can_take(now)
            and (capability is None or capability in p.slot.capabilities)
        ]
        return sorted(out, key=lambda d: (d["inflight"] / max(1, d["capacity"]), d["node_id"]))

    def set_draining(self, node_id: str, draining: bool) -> dict[str, Any]:
        peer = self.peers.get(node_id)
        if peer is None:
            known = ", ".join(sorted(self.peers)) or "none"
            raise PeerNotFoundError(f"no peer named {node_id!r}", hint=f"registered peers: {known}")
        peer.drained_by_operator = draining
        peer.update_draining()
        self.dirty = True
        log.info("peer %s %s by operator", node_id, "drained" if draining else "resumed")
        return {"peer": node_id, "draining": draining, "inflight": peer.slot.inflight}

    def peers_view(self, now: float) -> list[dict[str, Any]]:
        return [p.view(now) for p in sorted(self.peers.values(), key=lambda p: p.node_id)]
