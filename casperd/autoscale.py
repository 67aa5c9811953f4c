"""The autoscaler's policy: when the mesh grows, when it shrinks (pure; no I/O, no clock of its own).

Theory of operation. The policeman hands the policy a snapshot of the mesh (:class:`MeshView`:
waiting tasks grouped by the capabilities they need, with their count and oldest wait; every
registered peer with role, capabilities, load and liveness; which peers a spawner started) and the
time. The policy answers with :class:`Decision` s, each carrying the reason it was taken:

* ``spawn`` a peer of a role when
  - a role is below its ``min`` (``below-min``);
  - tasks need capabilities no live peer offers and a spawnable role offers them (``capability``);
  - tasks wait longer than ``wait_s`` and no capable peer has free credit (``backlog``);
  each subject to the role's ``max`` (peers of the role plus spawns not yet registered), one
  spawn per role every ``step_s``, and ``spawns_per_min`` across the mesh.
* ``drain`` a spawned peer idle for ``idle_s`` (no task held, none waiting that it could take)
  while its role stays at or above ``min``: it gets no new work.
* ``retire`` a peer the policy drained, once it holds no task: nothing is ever interrupted.
* ``resume`` a peer the policy drained when work it could take arrives before it is retired.
* ``unmet`` (reported once per capability set, again after it was met): tasks need capabilities
  no live peer offers and no spawnable role can provide.

Only peers a spawner started are drained and retired; peers started by hand or by compose are
the operator's. A spawn that does not register within ``spawn_timeout_s`` is given up (and
retired, so a half-started peer does not linger).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

SPAWN = "spawn"
DRAIN = "drain"
RETIRE = "retire"
RESUME = "resume"
UNMET = "unmet"


@dataclass(frozen=True, slots=True)
class RoleBounds:
    """How many peers of one role the autoscaler keeps, and what a spawned one offers."""

    min: int = 0
    max: int = 0
    capabilities: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class AutoscaleConfig:
    roles: Mapping[str, RoleBounds] = field(default_factory=dict)
    wait_s: float = 2.0
    idle_s: float = 30.0
    step_s: float = 2.0
    spawns_per_min: int = 10
    spawn_timeout_s: float = 60.0
    spawn_capacity: int = 4
    """Slots a spawned peer brings (how many waiting tasks one spawn is expected to absorb)."""
    grace_s: float = 0.0
    """No decision this soon after the first view: peers that were up before a (re)start of the
    policeman need a moment to register again, and must not be mistaken for missing ones."""


@dataclass(frozen=True, slots=True)
class WaitingGroup:
    """Queued tasks that need the same capabilities."""

    requires: frozenset[str]
    count: int
    oldest_s: float


@dataclass(frozen=True, slots=True)
class PeerState:
    node_id: str
    role: str
    capabilities: frozenset[str]
    inflight: int
    capacity: int
    alive: bool = True
    draining: bool = False
    """Draining for any reason (the operator, itself, or this policy)."""
    spawned: bool = False
    """Started by the spawner (so the autoscaler may retire it)."""

    @property
    def free(self) -> int:
        return max(0, self.capacity - self.inflight)


@dataclass(frozen=True, slots=True)
class MeshView:
    waiting: tuple[WaitingGroup, ...] = ()
    peers: tuple[PeerState, ...] = ()


@dataclass(frozen=True, slots=True)
class Decision:
    kind: str
    role: str
    node_id: str
    reason: str
    why: str
    """A short machine-readable reason: below-min, capability, backlog, idle, drained, work, timeout."""

    def view(self) -> dict[str, str]:
        return {"kind": self.kind, "role": self.role, "node_id": self.node_id, "why": self.why, "reason": self.reason}


class Autoscaler:
    """The policy and its memory (pending spawns, drains it started, idle clocks, spawn rate)."""

    def __init__(self, config: AutoscaleConfig, name_tag: str = "s") -> None:
        self.c = config
        self.tag = name_tag
        self._seq = 0
        self.pending: dict[str, tuple[str, float]] = {}
        """node id -> (role, when spawned) until it registers."""
        self.draining: dict[str, float] = {}
        """Peers this policy drained -> since when."""
        self.retiring: set[str] = set()
        self._busy_at: dict[str, float] = {}
        self._spawns: deque[float] = deque()
        self._last_spawn: dict[str, float] = {}
        self._unmet: set[frozenset[str]] = set()
        self._first: float | None = None

    # --- events from the shell -----------------------------------------------------------------
    def spawn_failed(self, node_id: str) -> None:
        """The spawner could not start it: forget the pending spawn (the rate limit still counts it)."""
        self.pending.pop(node_id, None)

    def rename(self, node_id: str, actual: str) -> None:
        """The spawner chose the name (a swarm slot): track the pending spawn under it."""
        if node_id in self.pending and actual != node_id:
            self.pending[actual] = self.pending.pop(node_id)

    def retired(self, node_id: str) -> None:
        self.retiring.discard(node_id)
        self.draining.pop(node_id, None)
        self._busy_at.pop(node_id, None)

    @property
    def spawnable(self) -> dict[str, RoleBounds]:
        return {r: b for r, b in self.c.roles.items() if b.max > 0}

    # --- the policy ------------------------------------------------------------------------------
    def decide(self, view: MeshView, now: float) -> list[Decision]:
        if self._first is None:
            self._first = now
        if now - self._first < self.c.grace_s:
            return []
        out: list[Decision] = []
        peers = {p.node_id: p for p in view.peers if p.alive}
        self._track(peers, now, out)
        counts = self._counts(peers)
        released = self._release_drained(peers, view.waiting)
        resumed = {d.node_id for d in released if d.kind == RESUME}
        out += released
        out += self._scale_up(view.waiting, peers, counts, now, resumed)
        out += self._scale_down(view.waiting, peers, counts, now)
        return out

    def _track(self, peers: Mapping[str, PeerState], now: float, out: list[Decision]) -> None:
        for node_id, (role, at) in list(self.pending.items()):
            if node_id in peers:
                del self.pending[node_id]
            elif now - at > self.c.spawn_timeout_s:
                del self.pending[node_id]
                self.retiring.add(node_id)
                out.append(
                    Decision(
                        RETIRE,
                        role,
                        node_id,
                        f"spawned {now - at:.0f}s ago and never registered; giving it up",
                        "timeout",
                    )
                )
        for node_id in list(self.draining):
            if node_id not in peers:  # gone (retired, died): nothing left to wait for
                self.draining.pop(node_id, None)
        for node_id in list(self.retiring):
            if node_id not in peers and node_id not in self.pending:
                self.retiring.discard(node_id)
        for node_id, p in peers.items():
            if p.inflight > 0 or node_id not in self._busy_at:
                self._busy_at[node_id] = now
        for node_id in list(self._busy_at):
            if node_id not in peers:
                del self._busy_at[node_id]
        while self._spawns and now - self._spawns[0] >= 60.0:
            self._spawns.popleft()

    def _counts(self, peers: Mapping[str, PeerState]) -> dict[str, int]:
        """Peers per role that count towards its bounds: registered and not being retired, plus pending."""
        counts: dict[str, int] = {}
        for p in peers.values():
            if p.node_id not in self.retiring and p.node_id not in self.draining:
                counts[p.role] = counts.get(p.role, 0) + 1
        for role, _ in self.pending.values():
            counts[role] = counts.get(role, 0) + 1
        return counts

    def _release_drained(self, peers: Mapping[str, PeerState], waiting: Iterable[WaitingGroup]) -> list[Decision]:
        out: list[Decision] = []
        needs = [g.requires for g in waiting if g.count]
        for node_id in list(self.draining):
            p = peers[node_id]
            if any(req <= p.capabilities for req in needs):
                del self.draining[node_id]
                out.append(Decision(RESUME, p.role, node_id, "work it can take arrived while it drained", "work"))
            elif p.inflight == 0 and node_id not in self.retiring:
                del self.draining[node_id]
                self.retiring.add(node_id)
                out.append(Decision(RETIRE, p.role, node_id, "drained and holds no task", "drained"))
        return out

    def _may_spawn(self, role: str, counts: Mapping[str, int], now: float) -> bool:
        bounds = self.c.roles.get(role)
        if bounds is None or counts.get(role, 0) >= bounds.max:
            return False
        if len(self._spawns) >= self.c.spawns_per_min:
            return False
        last = self._last_spawn.get(role)
        return last is None or now - last >= self.c.step_s

    def _spawn(self, role: str, counts: dict[str, int], now: float, reason: str, why: str) -> Decision:
        self._seq += 1
        node_id = f"{role}-{self.tag}{self._seq}"
        self.pending[node_id] = (role, now)
        self._spawns.append(now)
        self._last_spawn[role] = now
        counts[role] = counts.get(role, 0) + 1
        return Decision(SPAWN, role, node_id, reason, why)

    def _scale_up(
        self,
        waiting: Iterable[WaitingGroup],
        peers: Mapping[str, PeerState],
        counts: dict[str, int],
        now: float,
        resumed: set[str],
    ) -> list[Decision]:
        out: list[Decision] = []
        for role, bounds in self.spawnable.items():
            while counts.get(role, 0) < bounds.min and self._may_spawn(role, counts, now):
                have = counts.get(role, 0)
                out.append(self._spawn(role, counts, now, f"{role}s: {have} below min {bounds.min}", "below-min"))
        serving = [p for p in peers.values() if p.node_id not in self.draining and p.node_id not in self.retiring]
        for g in sorted(waiting, key=lambda g: -g.oldest_s):
            if g.count <= 0:
                continue
            capable = [p for p in serving if g.requires <= p.capabilities and (not p.draining or p.node_id in resumed)]
            roles = [r for r, b in self.spawnable.items() if g.requires <= b.capabilities]
            if not capable:
                pending = [n for n, (r, _) in self.pending.items() if r in roles]
                if pending:
                    continue  # a peer that offers them is on its way
                if not roles:
                    if g.requires not in self._unmet:
                        self._unmet.add(g.requires)
                        caps = ",".join(sorted(g.requires)) or "(none)"
                        out.append(
                            Decision(
                                UNMET,
                                "",
                                "",
                                f"{g.count} tasks need {caps}: no live peer offers it and no spawnable role does",
                                "capability",
                            )
                        )
                    continue
                role = min(roles, key=lambda r: counts.get(r, 0))
                if self._may_spawn(role, counts, now):
                    caps = ",".join(sorted(g.requires))
                    out.append(
                        self._spawn(
                            role,
                            counts,
                            now,
                            f"{g.count} tasks need capabilities {caps}; no live peer has them all",
                            "capability",
                        )
                    )
                continue
            self._unmet.discard(g.requires)
            if g.oldest_s < self.c.wait_s or any(p.free > 0 for p in capable) or not roles:
                continue
            # every capable peer is full and the oldest task waited too long: more hands, unless
            # spawns already on their way will absorb the backlog
            coming = sum(1 for r, _ in self.pending.values() if r in roles)
            if coming * max(1, self.c.spawn_capacity) >= g.count:
                continue
            role = min(roles, key=lambda r: counts.get(r, 0))
            if self._may_spawn(role, counts, now):
                out.append(
                    self._spawn(
                        role,
                        counts,
                        now,
                        f"{g.count} tasks waiting, oldest {g.oldest_s:.1f}s, no free capacity among "
                        f"{len(capable)} capable peers",
                        "backlog",
                    )
                )
        return out

    def _scale_down(
        self, waiting: Iterable[WaitingGroup], peers: Mapping[str, PeerState], counts: dict[str, int], now: float
    ) -> list[Decision]:
        out: list[Decision] = []
        needs = [g.requires for g in waiting if g.count]
        for p in sorted(peers.values(), key=lambda p: p.node_id, reverse=True):  # newest spawn first
            bounds = self.c.roles.get(p.role)
            if (
                bounds is None
                or not p.spawned
                or p.draining
                or p.inflight
                or p.node_id in self.draining
                or p.node_id in self.retiring
                or counts.get(p.role, 0) <= bounds.min
                or any(req <= p.capabilities for req in needs)
            ):
                continue
            idle = now - self._busy_at.get(p.node_id, now)
            if idle < self.c.idle_s:
                continue
            self.draining[p.node_id] = now
            counts[p.role] -= 1
            out.append(Decision(DRAIN, p.role, p.node_id, f"idle {idle:.0f}s (cooldown {self.c.idle_s:.0f}s)", "idle"))
        return out

    def outlook(self, spawner: str) -> dict[str, object]:
        """What the waiting-task report needs (:func:`casperd.waiting.spawn_outlook`): the
        spawner's kind, the roles it may start with what they offer, the spawns on their way (node
        id -> role) and the capability sets reported ``unmet``."""
        return {
            "spawner": spawner,
            "roles": {r: sorted(b.capabilities) for r, b in self.spawnable.items()},
            "pending": {n: role for n, (role, _) in sorted(self.pending.items())},
            "unmet": [sorted(r) for r in self._unmet],
        }

    def snapshot(self) -> dict[str, object]:
        return {
            "pending": sorted(self.pending),
            "draining": sorted(self.draining),
            "retiring": sorted(self.retiring),
            "spawns_last_min": len(self._spawns),
            "unmet": [sorted(r) for r in self._unmet],
        }
