"""Dispatch policy: which pending task goes to which peer (pure; no I/O, no clock of its own).

Rules, in order:
1. Only capable peers: a task's required capabilities must be a subset of the peer's.
2. Credit: a peer never holds more tasks than the capacity it advertised.
3. Priority: higher ``priority`` first; equal priority in submission order (FIFO).
4. Affinity: tasks sharing an affinity key go to the peer that took the first of them while that
   peer is registered; if it is busy the task waits for it (it does not block other tasks).
   If the peer is gone, the key is bound afresh.
5. Least loaded among equals: lowest in-flight/capacity ratio, then fewest in flight, then id.
Draining peers, peers whose circuit breaker is open and peers not alive get nothing.
Tasks whose requirements no peer can meet stay queued and are looked at again on every pass.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from casperd.breaker import CircuitBreaker


@dataclass(slots=True)
class PeerSlot:
    node_id: str
    capabilities: frozenset[str]
    capacity: int
    inflight: int = 0
    draining: bool = False
    alive: bool = True
    breaker: CircuitBreaker = field(default_factory=CircuitBreaker)

    @property
    def credit(self) -> int:
        return self.capacity - self.inflight

    def can_take(self, now: float) -> bool:
        return self.alive and not self.draining and self.credit > 0 and self.breaker.would_allow(now)

    def load_key(self) -> tuple[float, int, str]:
        return (self.inflight / self.capacity if self.capacity else 1.0, self.inflight, self.node_id)


_Entry = tuple[int, Any, "str | None"]
"""A queued task, as small as a heap entry can be (issue #9: memory per queued task): its order
key (priority, then submission order, in one int), its id, its affinity key. Tuples compare in C;
the order key is unique, so ids and affinities are never compared."""

_ORDER_BITS = 48
"""Submission order takes the low bits of the order key, priority (negated) the bits above."""


def shrink(table: dict[Any, Any] | set[Any]) -> None:
    """Rebuild ``table`` in place at the size of what it holds: a dict or set keeps the hash table
    of its largest size after entries are removed (issue #13: the policeman's memory after a burst)."""
    kept = table.copy()
    table.clear()
    table.update(kept)


class Dispatcher:
    """Pending tasks grouped by requirement set, each group a priority heap."""

    def __init__(self) -> None:
        self._queues: dict[frozenset[str], list[_Entry]] = {}
        self._where: dict[Any, int] = {}  # the order key of each queued task's live heap entry
        self._reqs: dict[frozenset[str], frozenset[str]] = {}  # one shared frozenset per requirement set
        self._affinity: dict[str, str] = {}
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._where

    def push(
        self,
        task_id: Any,
        priority: int,
        requires: Iterable[str] = (),
        affinity: str | None = None,
        seq: int | None = None,
    ) -> None:
        if task_id in self._where:
            return
        req = frozenset(requires)
        req = self._reqs.setdefault(req, req)
        order = next(self._seq) if seq is None else seq
        key = (-priority << _ORDER_BITS) + order
        heapq.heappush(self._queues.setdefault(req, []), (key, task_id, affinity))
        self._where[task_id] = key

    def remove(self, task_id: Any) -> bool:
        """Forget a queued task (lazily: its heap entry is skipped when reached, because it is no
        longer the live entry of that id, even if the id is pushed again later)."""
        return self._where.pop(task_id, None) is not None

    def compact(self) -> None:
        """Drop the heap entries of removed tasks and give back the tables a burst grew (call when
        the queue has drained: the work is linear in what is left)."""
        where = self._where
        for req in list(self._queues):
            live = [e for e in self._queues[req] if where.get(e[1]) == e[0]]
            if live:
                heapq.heapify(live)
                self._queues[req] = live
            else:
                del self._queues[req]
        shrink(where)

    def waiting(self) -> Iterator[tuple[frozenset[str], list[Any]]]:
        """Each requirement set with queued tasks, and their ids (in no particular order)."""
        where = self._where
        for req, heap in self._queues.items():
            ids = [tid for key, tid, _ in heap if where.get(tid) == key]
            if ids:
                yield req, ids

    def waiting_requirements(self) -> set[frozenset[str]]:
        return {req for req, heap in self._queues.items() if heap}

    def forget_peer(self, node_id: str) -> None:
        for key in [k for k, v in self._affinity.items() if v == node_id]:
            del self._affinity[key]

    def assign(self, peers: dict[str, PeerSlot], now: float, limit: int | None = None) -> list[tuple[Any, str]]:
        """Take as many tasks as the peers have credit for; returns (task_id, node_id) pairs.

        The chosen peers' ``inflight`` is incremented (and half-open breakers take their probe).
        """
        out: list[tuple[Any, str]] = []
        open_peers = [p for p in peers.values() if p.can_take(now)]
        if not open_peers or not self._where:
            return out
        capable: dict[frozenset[str], list[PeerSlot]] = {}
        for req, heap in self._queues.items():
            if heap:
                capable[req] = [p for p in open_peers if req <= p.capabilities]
        deferred: list[tuple[frozenset[str], _Entry]] = []
        while limit is None or len(out) < limit:
            best_req: frozenset[str] | None = None
            best: _Entry | None = None
            for req, cands in capable.items():
                heap = self._queues[req]
                while heap and self._where.get(heap[0][1]) != heap[0][0]:
                    heapq.heappop(heap)  # lazily removed
                if not heap or not any(p.can_take(now) for p in cands):
                    continue
                if best is None or heap[0] < best:
                    best, best_req = heap[0], req
            if best is None or best_req is None:
                break
            heapq.heappop(self._queues[best_req])
            peer = self._choose(best, capable[best_req], peers, now)
            if peer is None:
                deferred.append((best_req, best))
                continue
            del self._where[best[1]]
            peer.inflight += 1
            peer.breaker.allow(now)
            out.append((best[1], peer.node_id))
        for req, entry in deferred:
            heapq.heappush(self._queues[req], entry)
        return out

    def _choose(self, entry: _Entry, cands: list[PeerSlot], peers: dict[str, PeerSlot], now: float) -> PeerSlot | None:
        affinity = entry[2]
        if affinity is not None:
            bound = self._affinity.get(affinity)
            if bound is not None and bound in peers and peers[bound].alive:
                slot = peers[bound]
                return slot if slot.can_take(now) and slot in cands else None
        ready = [p for p in cands if p.can_take(now)]
        if not ready:
            return None
        chosen = min(ready, key=PeerSlot.load_key)
        if affinity is not None:
            self._affinity[affinity] = chosen.node_id
        return chosen
