"""Dispatch policy: capabilities, credit, priority, affinity, least-loaded, breakers, limit."""

from __future__ import annotations

import random

import pytest

from casperd.breaker import BreakerState, CircuitBreaker
from casperd.dispatch import Dispatcher, PeerSlot


def slot(node_id: str, caps: tuple[str, ...] | set[str] = (), capacity: int = 1, **kw: object) -> PeerSlot:
    return PeerSlot(node_id, frozenset(caps), capacity, **kw)  # type: ignore[arg-type]


def peers(*slots: PeerSlot) -> dict[str, PeerSlot]:
    return {p.node_id: p for p in slots}


def drain_one_at_a_time(d: Dispatcher, p: PeerSlot, now: float = 0.0) -> list[str]:
    """Assign with a single capacity-1 peer, freeing it each time: the order tasks come out."""
    order = []
    while True:
        got = d.assign({p.node_id: p}, now)
        if not got:
            return order
        assert len(got) == 1
        order.append(got[0][0])
        p.inflight -= 1


# --- capabilities -------------------------------------------------------------------------------
def test_requirements_must_be_a_subset_of_peer_capabilities() -> None:
    d = Dispatcher()
    d.push("t", 5, {"a", "b"})
    ps = peers(slot("p-a", {"a"}, 5), slot("p-b", {"b"}, 5), slot("p-ab", {"a", "b", "c"}, 5))
    assert d.assign(ps, 0.0) == [("t", "p-ab")]
    assert ps["p-ab"].inflight == 1 and ps["p-a"].inflight == 0 and ps["p-b"].inflight == 0


def test_no_requirements_go_anywhere() -> None:
    d = Dispatcher()
    d.push("t", 5)
    ps = peers(slot("p", (), 1))
    assert d.assign(ps, 0.0) == [("t", "p")]


def test_unmet_requirement_stays_queued_until_a_capable_peer_joins() -> None:
    d = Dispatcher()
    d.push("gpu-task", 9, {"gpu"})
    d.push("cpu-task", 1)
    ps = peers(slot("cpu", {"shell"}, 4))
    assert d.assign(ps, 0.0) == [("cpu-task", "cpu")]
    # nothing for the gpu task, on every pass, but it is still queued
    for _ in range(3):
        assert d.assign(ps, 0.0) == []
    assert "gpu-task" in d and len(d) == 1
    assert frozenset({"gpu"}) in d.waiting_requirements()
    ps["gpu1"] = slot("gpu1", {"gpu", "shell"}, 1)
    assert d.assign(ps, 0.0) == [("gpu-task", "gpu1")]
    assert len(d) == 0 and "gpu-task" not in d


def test_capability_mismatch_does_not_block_lower_priority_work() -> None:
    d = Dispatcher()
    d.push("needs-x", 9, {"x"})
    d.push("plain", 0)
    assert d.assign(peers(slot("p", {"y"}, 1)), 0.0) == [("plain", "p")]


# --- capacity / credit --------------------------------------------------------------------------
def test_never_more_than_capacity_across_repeated_assigns() -> None:
    d = Dispatcher()
    for i in range(20):
        d.push(f"t{i}", 5)
    ps = peers(slot("a", (), 3), slot("b", (), 2))
    first = d.assign(ps, 0.0)
    assert len(first) == 5
    assert sum(1 for _, n in first if n == "a") == 3 and sum(1 for _, n in first if n == "b") == 2
    for _ in range(5):
        assert d.assign(ps, 0.0) == []
    assert ps["a"].inflight == 3 and ps["b"].inflight == 2
    assert len(d) == 15


def test_inflight_decrement_frees_exactly_one_slot() -> None:
    d = Dispatcher()
    for i in range(5):
        d.push(f"t{i}", 5)
    p = slot("a", (), 2)
    assert [t for t, _ in d.assign({"a": p}, 0.0)] == ["t0", "t1"]
    p.inflight -= 1
    assert d.assign({"a": p}, 0.0) == [("t2", "a")]
    assert d.assign({"a": p}, 0.0) == []
    assert p.inflight == 2 and p.credit == 0


def test_zero_capacity_peer_gets_nothing() -> None:
    d = Dispatcher()
    d.push("t", 5)
    p = slot("z", (), 0)
    assert not p.can_take(0.0)
    assert d.assign({"z": p}, 0.0) == []
    assert "t" in d


def test_overcommitted_peer_gets_nothing() -> None:
    d = Dispatcher()
    d.push("t", 5)
    p = slot("a", (), 2, inflight=3)  # capacity lowered after a re-READY
    assert d.assign({"a": p}, 0.0) == []
    assert p.inflight == 3


# --- priority -----------------------------------------------------------------------------------
def test_higher_priority_first_fifo_within_equal() -> None:
    d = Dispatcher()
    for tid, prio in [("l1", 1), ("h1", 9), ("m1", 5), ("h2", 9), ("l2", 1), ("m2", 5), ("h3", 9)]:
        d.push(tid, prio)
    assert drain_one_at_a_time(d, slot("p", (), 1)) == ["h1", "h2", "h3", "m1", "m2", "l1", "l2"]


def test_priority_order_across_requirement_classes() -> None:
    d = Dispatcher()
    pushes = [
        ("a-5", 5, {"a"}),
        ("none-5", 5, set()),
        ("b-9", 9, {"b"}),
        ("ab-5", 5, {"a", "b"}),
        ("none-9", 9, set()),
        ("a-0", 0, {"a"}),
        ("b-5", 5, {"b"}),
    ]
    for tid, prio, req in pushes:
        d.push(tid, prio, req)
    order = drain_one_at_a_time(d, slot("p", {"a", "b"}, 1))
    assert order == ["b-9", "none-9", "a-5", "none-5", "ab-5", "b-5", "a-0"]


def test_priority_order_within_a_single_multi_slot_assign() -> None:
    d = Dispatcher()
    for i, prio in enumerate([3, 7, 7, 1, 9]):
        d.push(f"t{i}", prio)
    got = d.assign(peers(slot("p", (), 3)), 0.0)
    assert [t for t, _ in got] == ["t4", "t1", "t2"]


def test_explicit_seq_orders_equal_priorities() -> None:
    d = Dispatcher()
    d.push("later", 5, seq=20)
    d.push("earlier", 5, seq=10)
    assert drain_one_at_a_time(d, slot("p", (), 1)) == ["earlier", "later"]


def test_push_of_a_queued_task_is_ignored() -> None:
    d = Dispatcher()
    d.push("t", 1)
    d.push("t", 9)  # duplicate: neither re-queued nor re-prioritised
    d.push("u", 5)
    assert len(d) == 2
    assert drain_one_at_a_time(d, slot("p", (), 1)) == ["u", "t"]


# --- affinity -----------------------------------------------------------------------------------
def test_same_affinity_key_goes_to_the_same_peer() -> None:
    d = Dispatcher()
    ps = peers(slot("p1", (), 10), slot("p2", (), 10))
    d.push("k-1", 5, affinity="k")
    assert d.assign(ps, 0.0) == [("k-1", "p1")]  # least loaded, then id
    # p1 is now the more loaded peer; least-loaded alone would pick p2
    ps["p1"].inflight = 5
    d.push("k-2", 5, affinity="k")
    d.push("free", 5)
    got = dict(d.assign(ps, 0.0))
    assert got == {"k-2": "p1", "free": "p2"}


def test_busy_bound_peer_makes_the_task_wait_without_blocking_others() -> None:
    d = Dispatcher()
    ps = peers(slot("p1", (), 1), slot("p2", (), 5))
    d.push("k-1", 5, affinity="k")
    assert d.assign(ps, 0.0) == [("k-1", "p1")]
    d.push("k-2", 9, affinity="k")  # highest priority, but its peer is full
    d.push("other-1", 1)
    d.push("other-2", 1)
    got = d.assign(ps, 0.0)
    assert got == [("other-1", "p2"), ("other-2", "p2")]
    assert "k-2" in d
    assert d.assign(ps, 0.0) == []  # p2 has credit, yet k-2 still waits for p1
    assert "k-2" in d
    ps["p1"].inflight -= 1
    assert d.assign(ps, 0.0) == [("k-2", "p1")]


def test_affinity_wait_does_not_block_same_class_tasks_behind_it() -> None:
    d = Dispatcher()
    ps = peers(slot("p1", {"a"}, 1), slot("p2", {"a"}, 2))
    d.push("k-1", 5, {"a"}, affinity="k")
    assert d.assign(ps, 0.0) == [("k-1", "p1")]
    d.push("k-2", 9, {"a"}, affinity="k")
    d.push("k-3", 9, {"a"}, affinity="k")
    d.push("x", 5, {"a"})
    assert d.assign(ps, 0.0) == [("x", "p2")]
    assert "k-2" in d and "k-3" in d
    ps["p1"].inflight = 0
    assert d.assign(ps, 0.0) == [("k-2", "p1")]  # FIFO kept among the deferred tasks
    ps["p1"].inflight = 0
    assert d.assign(ps, 0.0) == [("k-3", "p1")]


def test_bound_peer_gone_rebinds() -> None:
    d = Dispatcher()
    ps = peers(slot("p1", (), 5), slot("p2", (), 5))
    d.push("k-1", 5, affinity="k")
    assert d.assign(ps, 0.0) == [("k-1", "p1")]
    gone = ps.pop("p1")
    d.push("k-2", 5, affinity="k")
    assert d.assign(ps, 0.0) == [("k-2", "p2")]
    # the key is now bound to p2, even when p1 comes back idle and p2 is busier
    gone.inflight = 0
    ps["p1"] = gone
    ps["p2"].inflight = 4
    d.push("k-3", 5, affinity="k")
    assert d.assign(ps, 0.0) == [("k-3", "p2")]


def test_bound_peer_dead_rebinds() -> None:
    d = Dispatcher()
    ps = peers(slot("p1", (), 5), slot("p2", (), 5))
    d.push("k-1", 5, affinity="k")
    assert d.assign(ps, 0.0) == [("k-1", "p1")]
    ps["p1"].alive = False
    d.push("k-2", 5, affinity="k")
    assert d.assign(ps, 0.0) == [("k-2", "p2")]
    ps["p1"].alive = True
    ps["p1"].inflight = 0
    d.push("k-3", 5, affinity="k")
    assert d.assign(ps, 0.0) == [("k-3", "p2")]


def test_forget_peer_drops_its_bindings() -> None:
    d = Dispatcher()
    ps = peers(slot("p1", (), 5), slot("p2", (), 5))
    d.push("k-1", 5, affinity="k")
    d.push("j-1", 5, affinity="j")
    got = dict(d.assign(ps, 0.0))
    assert got == {"k-1": "p1", "j-1": "p2"}
    d.forget_peer("p1")
    ps["p1"].inflight = 3  # p1 still registered, but it was forgotten: k binds afresh (least loaded)
    d.push("k-2", 5, affinity="k")
    d.push("j-2", 5, affinity="j")
    got = dict(d.assign(ps, 0.0))
    assert got == {"k-2": "p2", "j-2": "p2"}


def test_draining_bound_peer_keeps_its_key() -> None:
    d = Dispatcher()
    ps = peers(slot("p1", (), 5), slot("p2", (), 5))
    d.push("k-1", 5, affinity="k")
    assert d.assign(ps, 0.0) == [("k-1", "p1")]
    ps["p1"].draining = True
    d.push("k-2", 5, affinity="k")
    assert d.assign(ps, 0.0) == []
    ps["p1"].draining = False
    assert d.assign(ps, 0.0) == [("k-2", "p1")]


def test_different_affinity_keys_are_independent() -> None:
    d = Dispatcher()
    ps = peers(slot("p1", (), 5), slot("p2", (), 5))
    for i in range(4):
        d.push(f"a{i}", 5, affinity="A")
        d.push(f"b{i}", 5, affinity="B")
    got = d.assign(ps, 0.0)
    by_key: dict[str, set[str]] = {"A": set(), "B": set()}
    for tid, node in got:
        by_key[tid[0].upper()].add(node)
    assert len(got) == 8
    assert len(by_key["A"]) == 1 and len(by_key["B"]) == 1


# --- least loaded -------------------------------------------------------------------------------
def test_least_loaded_by_ratio_first() -> None:
    d = Dispatcher()
    d.push("t", 5)
    ps = peers(slot("small", (), 2, inflight=1), slot("big", (), 10, inflight=2))  # 0.5 vs 0.2
    assert d.assign(ps, 0.0) == [("t", "big")]


def test_least_loaded_ties_on_ratio_broken_by_count() -> None:
    d = Dispatcher()
    d.push("t", 5)
    ps = peers(slot("a", (), 4, inflight=2), slot("b", (), 2, inflight=1))  # both 0.5
    assert d.assign(ps, 0.0) == [("t", "b")]


def test_least_loaded_full_tie_broken_by_id() -> None:
    d = Dispatcher()
    d.push("t", 5)
    ps = peers(slot("node-b", (), 3), slot("node-c", (), 3), slot("node-a", (), 3))
    assert d.assign(ps, 0.0) == [("t", "node-a")]


def test_load_spreads_evenly() -> None:
    d = Dispatcher()
    for i in range(6):
        d.push(f"t{i}", 5)
    ps = peers(slot("a", (), 4), slot("b", (), 4), slot("c", (), 4))
    d.assign(ps, 0.0)
    assert [ps[n].inflight for n in "abc"] == [2, 2, 2]


# --- peers that get nothing ---------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["draining", "dead", "open-breaker"])
def test_unavailable_peers_get_nothing(kind: str) -> None:
    d = Dispatcher()
    d.push("t", 5)
    p = slot("p", (), 5)
    if kind == "draining":
        p.draining = True
    elif kind == "dead":
        p.alive = False
    else:
        p.breaker = CircuitBreaker(failure_threshold=1, recovery_s=30.0)
        p.breaker.record_failure(0.0)
        assert p.breaker.state is BreakerState.OPEN
    assert d.assign({"p": p}, 1.0) == []
    assert p.inflight == 0 and "t" in d
    healthy = slot("q", (), 5)
    assert d.assign({"p": p, "q": healthy}, 1.0) == [("t", "q")]


def test_half_open_breaker_admits_exactly_one_probe() -> None:
    d = Dispatcher()
    for i in range(5):
        d.push(f"t{i}", 5)
    p = slot("p", (), 5, breaker=CircuitBreaker(failure_threshold=1, recovery_s=10.0))
    p.breaker.record_failure(100.0)
    assert d.assign({"p": p}, 105.0) == []  # still open
    assert d.assign({"p": p}, 110.0) == [("t0", "p")]  # recovery elapsed: one probe
    assert p.breaker.state is BreakerState.HALF_OPEN
    assert d.assign({"p": p}, 111.0) == []  # probe in flight, credit left but no more
    assert d.assign({"p": p}, 500.0) == []
    p.inflight -= 1
    p.breaker.record_success()
    got = d.assign({"p": p}, 501.0)
    assert [t for t, _ in got] == ["t1", "t2", "t3", "t4"]


def test_half_open_probe_failure_reopens() -> None:
    d = Dispatcher()
    for i in range(3):
        d.push(f"t{i}", 5)
    p = slot("p", (), 5, breaker=CircuitBreaker(failure_threshold=1, recovery_s=10.0))
    p.breaker.record_failure(0.0)
    assert d.assign({"p": p}, 10.0) == [("t0", "p")]
    p.inflight -= 1
    p.breaker.record_failure(12.0)
    assert d.assign({"p": p}, 21.0) == []  # open again, timer restarted at 12
    assert d.assign({"p": p}, 22.0) == [("t1", "p")]


def test_half_open_with_two_probes_admits_two() -> None:
    d = Dispatcher()
    for i in range(5):
        d.push(f"t{i}", 5)
    p = slot("p", (), 5, breaker=CircuitBreaker(failure_threshold=1, recovery_s=1.0, probes=2))
    p.breaker.record_failure(0.0)
    assert len(d.assign({"p": p}, 1.0)) == 2
    assert d.assign({"p": p}, 2.0) == []


# --- remove / limit / bookkeeping ---------------------------------------------------------------
def test_remove_a_queued_task() -> None:
    d = Dispatcher()
    for tid in ("a", "b", "c"):
        d.push(tid, 5)
    assert d.remove("b") is True
    assert d.remove("b") is False
    assert d.remove("never-pushed") is False
    assert "b" not in d and len(d) == 2
    got = d.assign(peers(slot("p", (), 10)), 0.0)
    assert [t for t, _ in got] == ["a", "c"]
    assert len(d) == 0


def test_remove_the_only_task_of_a_class() -> None:
    d = Dispatcher()
    d.push("x", 9, {"x"})
    d.push("y", 1)
    d.remove("x")
    ps = peers(slot("p", {"x"}, 5))
    assert d.assign(ps, 0.0) == [("y", "p")]
    assert ps["p"].inflight == 1


def test_assigned_task_can_be_pushed_again_for_a_retry() -> None:
    d = Dispatcher()
    d.push("t", 5)
    p = slot("p", (), 1)
    assert d.assign({"p": p}, 0.0) == [("t", "p")]
    p.inflight -= 1
    d.push("t", 5)
    assert d.assign({"p": p}, 0.0) == [("t", "p")]
    p.inflight -= 1
    assert d.assign({"p": p}, 0.0) == []


def test_remove_then_push_again_uses_the_new_requirements() -> None:
    d = Dispatcher()
    d.push("t", 5, {"gpu"})
    d.remove("t")
    d.push("t", 5, {"cpu"})
    gpu_only = peers(slot("g", {"gpu"}, 1))
    assert d.assign(gpu_only, 0.0) == []  # the live entry needs "cpu"


def test_remove_then_push_again_uses_the_new_priority() -> None:
    d = Dispatcher()
    d.push("t", 9)
    d.push("u", 5)
    d.remove("t")
    d.push("t", 0)
    assert drain_one_at_a_time(d, slot("p", (), 1)) == ["u", "t"]


def test_limit_caps_one_pass() -> None:
    d = Dispatcher()
    for i in range(5):
        d.push(f"t{i}", 5)
    ps = peers(slot("p", (), 10))
    assert d.assign(ps, 0.0, limit=0) == []
    assert [t for t, _ in d.assign(ps, 0.0, limit=2)] == ["t0", "t1"]
    assert ps["p"].inflight == 2
    assert [t for t, _ in d.assign(ps, 0.0, limit=1)] == ["t2"]
    assert [t for t, _ in d.assign(ps, 0.0, limit=100)] == ["t3", "t4"]


def test_empty_inputs() -> None:
    d = Dispatcher()
    assert d.assign({}, 0.0) == []
    assert d.assign(peers(slot("p", (), 1)), 0.0) == []
    d.push("t", 5)
    assert d.assign({}, 0.0) == []
    assert len(d) == 1


def test_slot_properties() -> None:
    p = slot("p", (), 4, inflight=1)
    assert p.credit == 3
    assert p.load_key() == (0.25, 1, "p")
    assert slot("z", (), 0).load_key() == (1.0, 0, "z")


# --- property test ------------------------------------------------------------------------------
CAPS = ("a", "b", "c")


def _available(p: PeerSlot, now: float) -> bool:
    """Whether a peer may take a task, computed here rather than by PeerSlot.can_take."""
    b = p.breaker
    if b.state is BreakerState.CLOSED:
        breaker_ok = True
    elif b.state is BreakerState.OPEN:
        breaker_ok = now - b.opened_at >= b.recovery_s
    else:
        breaker_ok = b.in_flight_probes < b.probes
    return p.alive and not p.draining and p.inflight < p.capacity and breaker_ok


def _random_subset(rng: random.Random, k_max: int) -> frozenset[str]:
    return frozenset(rng.sample(CAPS, rng.randint(0, k_max)))


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_random_operations_keep_the_invariants(seed: int) -> None:
    rng = random.Random(seed)
    d = Dispatcher()
    all_peers = {
        f"p{i}": slot(
            f"p{i}",
            _random_subset(rng, 3),
            rng.randint(0, 5),
            breaker=CircuitBreaker(failure_threshold=3, recovery_s=5.0, probes=rng.randint(1, 2)),
        )
        for i in range(5)
    }
    all_peers["p0"].capabilities = frozenset(CAPS)  # someone can run everything
    all_peers["p0"].capacity = 3
    fail_rate = {n: 0.0 if n == "p0" else rng.choice([0.2, 0.4, 0.7]) for n in all_peers}
    registered = dict(all_peers)
    requires: dict[str, frozenset[str]] = {}
    affinity: dict[str, str | None] = {}
    queued: set[str] = set()
    ever_assigned: set[str] = set()
    holding: dict[str, list[str]] = {n: [] for n in all_peers}
    bound: dict[str, str] = {}
    now = 0.0
    next_id = 0
    assigned_total = 0

    for _ in range(500):
        now += rng.random()
        op = rng.random()
        if op < 0.35:
            for _ in range(rng.randint(1, 4)):
                tid = f"t{next_id}"
                next_id += 1
                requires[tid] = _random_subset(rng, 2)
                affinity[tid] = rng.choice([None, None, None, "k1", "k2"])
                d.push(tid, rng.randint(0, 9), requires[tid], affinity[tid])
                queued.add(tid)
        elif op < 0.42 and queued:
            tid = rng.choice(sorted(queued))
            assert d.remove(tid)
            queued.discard(tid)
        elif op < 0.65:
            # complete (or fail) a few random held tasks
            for _ in range(rng.randint(1, 3)):
                busy = [n for n, held in holding.items() if held]
                if not busy:
                    break
                n = rng.choice(busy)
                held = holding[n]
                held.pop(rng.randrange(len(held)))
                p = all_peers[n]
                p.inflight -= 1
                if rng.random() >= fail_rate[n]:
                    p.breaker.record_success()
                else:
                    p.breaker.record_failure(now)
        elif op < 0.72:
            p = rng.choice(list(all_peers.values()))
            p.draining = not p.draining
        elif op < 0.78:
            p = rng.choice(list(all_peers.values()))
            p.alive = not p.alive
        elif op < 0.82:
            n = rng.choice(sorted(all_peers))
            if n in registered:
                del registered[n]
                d.forget_peer(n)
                for k in [k for k, v in bound.items() if v == n]:
                    del bound[k]
            else:
                registered[n] = all_peers[n]
        elif op < 0.88:
            # a failure reported outside this bookkeeping (a late FAILED, a timeout): trips breakers
            p = rng.choice([p for n, p in all_peers.items() if n != "p0"])
            p.breaker.record_failure(now)

        # --- assign, then check every promise ---
        before = {
            n: (_available(p, now), p.breaker.state, p.breaker.in_flight_probes, p.alive) for n, p in registered.items()
        }
        limit = rng.choice([None, None, 1, 2, 5])
        got = d.assign(registered, now, limit=limit)
        if limit is not None:
            assert len(got) <= limit
        per_peer: dict[str, int] = {}
        for tid, n in got:
            assert tid in queued, f"{tid} was not queued (removed or already assigned)"
            assert tid not in ever_assigned, f"{tid} assigned twice"
            assert n in registered
            assert requires[tid] <= all_peers[n].capabilities, f"{tid} went to incapable {n}"
            can_take = before[n][0]
            assert can_take, f"{n} could not take tasks but got {tid}"
            key = affinity[tid]
            if key is not None:
                if key in bound and bound[key] in registered and before[bound[key]][3]:
                    assert n == bound[key], f"affinity {key} bound to {bound[key]} but {tid} went to {n}"
                bound[key] = n
            per_peer[n] = per_peer.get(n, 0) + 1
            queued.discard(tid)
            ever_assigned.add(tid)
            holding[n].append(tid)
            assigned_total += 1
        for n, count in per_peer.items():
            p = all_peers[n]
            _, state, probes_before, _ = before[n]
            if state is BreakerState.HALF_OPEN:
                assert count <= p.breaker.probes - probes_before
            elif state is BreakerState.OPEN:
                assert count <= p.breaker.probes
        for n, p in all_peers.items():
            assert p.inflight == len(holding[n])
            assert p.inflight <= p.capacity, f"{n} over capacity"
        assert len(d) == len(queued)
        for tid in queued:
            assert tid in d
        if limit is None:
            # work-conserving: a queued task without affinity has no available capable peer left
            for tid in queued:
                if affinity[tid] is None:
                    assert not any(
                        _available(p, now) and requires[tid] <= p.capabilities for p in registered.values()
                    ), f"{tid} left queued with a free capable peer"
    trips = sum(p.breaker.trips for p in all_peers.values())
    assert assigned_total > 60  # the run did exercise assignment
    assert trips > 0  # and breakers did open
