"""The autoscaler policy: thresholds, cooldowns, bounds, capability-driven spawn, drain before
retire, spawn rate. Pure: views and the time go in, decisions come out."""

from __future__ import annotations

from typing import Any

import pytest

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

DEV = frozenset({"code", "llm", "shell"})
TESTER = frozenset({"test", "shell"})


def config(**kw: Any) -> AutoscaleConfig:
    roles = kw.pop("roles", {"developer": RoleBounds(1, 3, DEV)})
    base: dict[str, Any] = {"wait_s": 2.0, "idle_s": 30.0, "step_s": 1.0, "spawns_per_min": 10}
    base.update(kw)
    return AutoscaleConfig(roles=roles, **base)


def peer(node_id: str, role: str = "developer", inflight: int = 0, capacity: int = 4, **kw: Any) -> PeerState:
    caps = kw.pop("capabilities", DEV if role == "developer" else TESTER)
    return PeerState(node_id, role, caps, inflight, capacity, **kw)


def waiting(count: int, oldest: float, requires: frozenset[str] = frozenset({"shell"})) -> WaitingGroup:
    return WaitingGroup(requires, count, oldest)


def kinds(ds: list[Decision]) -> list[tuple[str, str]]:
    return [(d.kind, d.why) for d in ds]


def test_no_spawn_while_the_oldest_task_is_younger_than_the_threshold() -> None:
    a = Autoscaler(config())
    view = MeshView((waiting(50, 1.9),), (peer("developer-1", inflight=4),))
    assert a.decide(view, 100.0) == []
    ds = a.decide(MeshView((waiting(50, 2.1),), (peer("developer-1", inflight=4),)), 100.1)
    assert kinds(ds) == [(SPAWN, "backlog")]
    assert ds[0].role == "developer" and ds[0].node_id.startswith("developer-")
    assert "50 tasks waiting" in ds[0].reason


def test_no_spawn_while_a_capable_peer_has_free_credit() -> None:
    a = Autoscaler(config())
    view = MeshView((waiting(50, 30.0),), (peer("developer-1", inflight=3),))
    assert a.decide(view, 100.0) == []


def test_spawn_step_cooldown_and_bounds() -> None:
    a = Autoscaler(config(step_s=5.0))
    full = (peer("developer-1", inflight=4),)
    view = MeshView((waiting(100, 10.0),), full)
    assert kinds(a.decide(view, 100.0)) == [(SPAWN, "backlog")]
    assert a.decide(view, 101.0) == []  # one spawn per role per step
    assert kinds(a.decide(view, 105.0)) == [(SPAWN, "backlog")]
    # max 3: developer-1 plus two pending spawns
    assert a.decide(view, 120.0) == []
    assert len(a.pending) == 2


def test_pending_spawns_absorb_the_backlog_they_were_made_for() -> None:
    a = Autoscaler(config(spawn_capacity=4))
    view = MeshView((waiting(3, 10.0),), (peer("developer-1", inflight=4),))
    assert len(a.decide(view, 100.0)) == 1
    assert a.decide(view, 110.0) == []  # 3 waiting tasks fit in the one coming


def test_spawn_rate_limit_across_roles() -> None:
    roles = {"developer": RoleBounds(0, 10, DEV), "tester": RoleBounds(0, 10, TESTER)}
    a = Autoscaler(config(roles=roles, spawns_per_min=3, step_s=0.0, spawn_capacity=1))
    view = MeshView(
        (waiting(100, 10.0, frozenset({"code"})), waiting(100, 10.0, frozenset({"test"}))),
        (peer("developer-1", inflight=4), peer("tester", "tester", inflight=4)),
    )
    total = 0
    for t in range(10):
        total += len([d for d in a.decide(view, 100.0 + t) if d.kind == SPAWN])
    assert total == 3
    # a minute after the first spawns, the window has room again
    assert any(d.kind == SPAWN for d in a.decide(view, 161.0))


def test_below_min_spawns_up_to_min() -> None:
    a = Autoscaler(config(roles={"developer": RoleBounds(2, 4, DEV)}, step_s=0.0))
    ds = a.decide(MeshView((), ()), 100.0)
    assert kinds(ds) == [(SPAWN, "below-min"), (SPAWN, "below-min")]
    assert a.decide(MeshView((), ()), 101.0) == []  # the two are pending


def test_capability_only_a_spawnable_role_has_spawns_that_role_at_once() -> None:
    roles = {"developer": RoleBounds(1, 3, DEV), "tester": RoleBounds(0, 1, TESTER)}
    a = Autoscaler(config(roles=roles))
    view = MeshView((waiting(1, 0.0, frozenset({"test"})),), (peer("developer-1"),))
    ds = a.decide(view, 100.0)
    assert kinds(ds) == [(SPAWN, "capability")]
    assert ds[0].role == "tester" and "need capabilities test;" in ds[0].reason
    assert a.decide(view, 110.0) == []  # on its way; tester max is 1 anyway


def test_capability_nobody_can_provide_is_reported_once() -> None:
    a = Autoscaler(config())
    view = MeshView((waiting(2, 0.0, frozenset({"gpu"})),), (peer("developer-1"),))
    ds = a.decide(view, 100.0)
    assert kinds(ds) == [(UNMET, "capability")]
    assert "gpu" in ds[0].reason
    assert a.decide(view, 101.0) == []
    assert a.snapshot()["unmet"] == [["gpu"]]


def test_none_spawner_bounds_spawn_nothing_but_report() -> None:
    a = Autoscaler(config(roles={}))
    view = MeshView((waiting(100, 60.0), waiting(1, 1.0, frozenset({"test"}))), (peer("developer-1", inflight=4),))
    assert kinds(a.decide(view, 100.0)) == [(UNMET, "capability")]


def test_idle_spawned_peer_drains_then_retires_and_never_below_min() -> None:
    a = Autoscaler(config(idle_s=30.0))
    static = peer("developer-1")
    spawned = peer("developer-s1", spawned=True)
    view = MeshView((), (static, spawned))
    assert a.decide(view, 100.0) == []
    assert a.decide(view, 129.0) == []  # not idle long enough
    ds = a.decide(view, 131.0)
    assert kinds(ds) == [(DRAIN, "idle")] and ds[0].node_id == "developer-s1"
    # next pass: it is draining and holds nothing: retire
    drained = MeshView((), (static, peer("developer-s1", spawned=True, draining=True)))
    ds = a.decide(drained, 131.5)
    assert kinds(ds) == [(RETIRE, "drained")] and ds[0].node_id == "developer-s1"
    a.retired("developer-s1")
    # the static peer is never drained, and min=1 holds anyway
    assert a.decide(MeshView((), (static,)), 500.0) == []


def test_a_busy_peer_is_not_idle_and_a_draining_one_with_work_waits() -> None:
    a = Autoscaler(config(idle_s=10.0, roles={"developer": RoleBounds(0, 3, DEV)}))
    busy = peer("developer-s1", inflight=1, spawned=True)
    assert a.decide(MeshView((), (busy,)), 100.0) == []
    idle = peer("developer-s1", spawned=True)
    assert a.decide(MeshView((), (idle,)), 105.0) == []  # idle only since 100
    assert kinds(a.decide(MeshView((), (idle,)), 111.0)) == [(DRAIN, "idle")]
    # a task it still held would keep it: retire waits for inflight 0
    holding = peer("developer-s1", inflight=1, spawned=True, draining=True)
    assert a.decide(MeshView((), (holding,)), 112.0) == []
    done = peer("developer-s1", spawned=True, draining=True)
    assert kinds(a.decide(MeshView((), (done,)), 113.0)) == [(RETIRE, "drained")]


def test_work_arriving_for_a_drained_peer_resumes_it() -> None:
    a = Autoscaler(config(idle_s=10.0, roles={"developer": RoleBounds(0, 3, DEV)}))
    idle = peer("developer-s1", spawned=True)
    a.decide(MeshView((), (idle,)), 100.0)
    assert kinds(a.decide(MeshView((), (idle,)), 111.0)) == [(DRAIN, "idle")]
    draining = peer("developer-s1", spawned=True, draining=True)
    ds = a.decide(MeshView((waiting(1, 0.0),), (draining,)), 111.2)
    assert kinds(ds) == [(RESUME, "work")]
    assert a.draining == {}


def test_idle_peer_is_kept_while_tasks_it_could_take_wait() -> None:
    a = Autoscaler(config(idle_s=10.0, roles={"developer": RoleBounds(0, 3, DEV)}))
    p = peer("developer-s1", spawned=True)
    a.decide(MeshView((), (p,)), 100.0)
    assert a.decide(MeshView((waiting(1, 0.1),), (p,)), 200.0) == []


def test_only_spawned_peers_are_retired() -> None:
    a = Autoscaler(config(idle_s=1.0, roles={"developer": RoleBounds(0, 3, DEV)}))
    static = (peer("developer-1"), peer("developer-2"))
    a.decide(MeshView((), static), 100.0)
    assert a.decide(MeshView((), static), 200.0) == []


def test_spawn_that_never_registers_times_out_and_is_retired() -> None:
    a = Autoscaler(config(spawn_timeout_s=30.0, roles={"developer": RoleBounds(1, 3, DEV)}))
    (d,) = a.decide(MeshView((), ()), 100.0)
    assert d.kind == SPAWN
    assert a.decide(MeshView((), ()), 120.0) == []
    ds = a.decide(MeshView((), ()), 131.0)
    assert (RETIRE, "timeout") in kinds(ds) and ds[0].node_id == d.node_id
    assert any(x.kind == SPAWN for x in ds)  # and min is restored with a fresh spawn


def test_registered_spawn_leaves_pending() -> None:
    a = Autoscaler(config(roles={"developer": RoleBounds(1, 3, DEV)}))
    (d,) = a.decide(MeshView((), ()), 100.0)
    a.decide(MeshView((), (peer(d.node_id, spawned=True),)), 101.0)
    assert a.pending == {}


def test_spawn_failure_frees_the_slot() -> None:
    a = Autoscaler(config(roles={"developer": RoleBounds(1, 1, DEV)}, step_s=0.0))
    (d,) = a.decide(MeshView((), ()), 100.0)
    assert a.decide(MeshView((), ()), 101.0) == []
    a.spawn_failed(d.node_id)
    assert kinds(a.decide(MeshView((), ()), 102.0)) == [(SPAWN, "below-min")]


def test_dead_peers_do_not_count() -> None:
    a = Autoscaler(config(roles={"developer": RoleBounds(1, 3, DEV)}))
    ds = a.decide(MeshView((), (peer("developer-1", alive=False),)), 100.0)
    assert kinds(ds) == [(SPAWN, "below-min")]


def test_no_decision_during_the_startup_grace() -> None:
    a = Autoscaler(config(roles={"developer": RoleBounds(1, 3, DEV)}, grace_s=6.0))
    assert a.decide(MeshView((), ()), 100.0) == []
    assert a.decide(MeshView((), ()), 105.9) == []
    assert kinds(a.decide(MeshView((), ()), 106.0)) == [(SPAWN, "below-min")]
    # a peer that registered within the grace is not mistaken for a missing one
    b = Autoscaler(config(roles={"developer": RoleBounds(1, 3, DEV)}, grace_s=6.0))
    b.decide(MeshView((), ()), 100.0)
    assert b.decide(MeshView((), (peer("developer-1"),)), 107.0) == []


def test_the_waiting_report_says_what_the_autoscaler_does_about_a_missing_capability() -> None:
    """The policy's pending spawns and unmet needs reach caspectl tasks' why-it-waits."""
    from casperd.waiting import why_waiting

    roles = {"developer": RoleBounds(1, 3, DEV), "tester": RoleBounds(0, 1, TESTER)}
    a = Autoscaler(config(roles=roles), name_tag="s")
    devs = [{"node_id": "developer-1", "capabilities": sorted(DEV), "liveness": "alive"}]
    test_task = {"type": "noop", "status": "pending", "requires": ["test"]}
    gpu_task = {"type": "noop", "status": "pending", "requires": ["gpu"]}
    before = why_waiting(test_task, devs, a.outlook("local"))
    assert before and "can spawn a tester" in before and "local spawner" in before
    view = MeshView((waiting(1, 0.0, frozenset({"test"})), waiting(2, 0.0, frozenset({"gpu"}))), (peer("developer-1"),))
    assert sorted(kinds(a.decide(view, 100.0))) == [(SPAWN, "capability"), (UNMET, "capability")]
    outlook = a.outlook("local")
    assert outlook["pending"] == {"tester-s1": "tester"} and outlook["unmet"] == [["gpu"]]
    spawning = why_waiting(test_task, devs, outlook)
    assert spawning and "a tester offering them is being spawned for it (tester-s1)" in spawning
    unmet = why_waiting(gpu_task, devs, outlook)
    assert unmet and "capability gpu" in unmet and "no spawner can provide them" in unmet
    assert why_waiting({"type": "noop", "status": "pending", "requires": ["shell"]}, devs, outlook) is None
    # registered: no longer pending, and the task is no longer missing anything
    a.decide(MeshView((), (peer("developer-1"), peer("tester-s1", role="tester"))), 101.0)
    assert a.outlook("local")["pending"] == {}
    fixed = why_waiting(test_task, devs, Autoscaler(config(roles={})).outlook("none"))
    assert fixed and "fixed size (spawner none)" in fixed
    assert "no peer is registered" in (why_waiting(gpu_task, [], outlook) or "")


def test_the_autoscalers_view_of_a_long_queue_is_taken_less_often(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from casperd import elastic

    clock = [0.0]
    monkeypatch.setattr(elastic, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    e = object.__new__(elastic.Elastic)
    e.period, e._next, e._next_refresh = 0.5, 0.0, 1e9
    views: list[float] = []

    def view(now: float) -> None:
        views.append(now)
        clock[0] += 0.1  # a view that takes 100 ms: the next no sooner than 100 ms x VIEW_SHARE later

    e.view = view  # type: ignore[method-assign,assignment]
    e.policy = SimpleNamespace(decide=lambda v, now: [])  # type: ignore[assignment]
    for now in (0.0, 1.0, 4.9, 5.0, 9.9, 10.1, 20.0, 20.2):
        e.on_tick(now)
    assert elastic.VIEW_SHARE * 0.1 == 10.0 and views == [0.0, 10.1, 20.2]


def test_the_autoscalers_view_counts_the_queued_tasks_per_requirement_set() -> None:
    """Queued tasks only (not held, not cancelled), grouped by the requirement set dispatch matches
    (the task's and its type's), with the oldest one's wait."""
    from datetime import timedelta
    from types import SimpleNamespace

    from casperd import elastic
    from casperd.messages import TaskSpec
    from casperd.metrics import Metrics
    from casperd.taskrecord import utcnow
    from tests.support.corelab import Lab

    lab = Lab()
    lab.add_worker("developer-1", capacity=1)
    lab.pump()
    held, plain = lab.submit(TaskSpec(type="echo"), TaskSpec(type="echo"))
    gpu = lab.submit(*[TaskSpec(type="echo", requires=("gpu",)) for _ in range(3)])
    (gone,) = lab.submit(TaskSpec(type="echo", requires=("gpu",)))
    lab.pump()
    lab.core.cancel(gone, lab.now())
    lab.run(lab.core.take())
    assert lab.core.tasks[held].assigned_to == "developer-1"
    old = lab.core.tasks[gpu[1]]
    old.updated_at -= timedelta(seconds=30)
    e = object.__new__(elastic.Elastic)
    e.broker = SimpleNamespace(tasks=lab.core.tasks, core=lab.core)  # type: ignore[assignment]
    e.metrics = Metrics()
    e.spawner = SimpleNamespace(spawned=lambda: set())  # type: ignore[assignment]
    view = e.view(lab.mono)
    groups = {g.requires: g for g in view.waiting}
    assert set(groups) == {frozenset(), frozenset({"gpu"})}
    assert groups[frozenset()].count == 1 and groups[frozenset({"gpu"})].count == 3
    assert abs(groups[frozenset({"gpu"})].oldest_s - (utcnow() - old.updated_at).total_seconds()) < 5
    assert e.metrics.registry.get_sample_value("casper_queue_depth") == 4
    assert plain in lab.core.dispatcher
