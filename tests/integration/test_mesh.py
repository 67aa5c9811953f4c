"""The mesh end to end: real processes, real Postgres and Redis, real ZeroMQ with CurveZMQ."""

from __future__ import annotations

import itertools
import json
import signal
import time
from collections import Counter, defaultdict
from typing import Any

import pytest

from casperd.ctl.client import ControlClient
from casperd.lifecycle import ACTIVE, TRANSITIONS, Status
from casperd.localmesh import LocalMesh
from casperd.messages import TaskSpec
from tests.support.mesh import db_rows, wait_for


def mixed_specs(n: int) -> list[TaskSpec]:
    specs = []
    for i in range(n):
        k = i % 6
        if k == 0:
            specs.append(TaskSpec(type="noop", priority=i % 10))
        elif k == 1:
            specs.append(TaskSpec(type="echo", input={"i": i}))
        elif k == 2:
            specs.append(TaskSpec(type="echo", input={"same": i % 7}, cache=True))
        elif k == 3:
            specs.append(TaskSpec(type="sleep", input={"seconds": 0.01}, affinity=f"a{i % 4}"))
        elif k == 4:
            specs.append(TaskSpec(type="shell", input={"cmd": f"echo {i}", "expect_exit": 0}))
        else:
            specs.append(TaskSpec(type="shell", input={"cmd": ["true"]}, requires=("shell",)))
    return specs


def submit_and_wait(mesh: LocalMesh, specs: list[TaskSpec], timeout: float = 240) -> dict[str, Any]:
    """Submit with wait=True; return {task_id: DONE} once every task reported exactly once."""
    done: dict[str, Any] = {}
    dupes = 0
    with mesh.client(timeout_s=60) as c:
        ids: list[str] = []
        for i in range(0, len(specs), 250):
            ids.extend(str(t) for t in c.submit(specs[i : i + 250], wait=True).task_ids)
        deadline = time.monotonic() + timeout
        for ev in c.done_events(timeout_s=60):
            tid = str(ev.task_id)
            if tid in done:
                dupes += 1
            done[tid] = ev
            if len(done) >= len(ids) or time.monotonic() > deadline:
                break
    assert dupes == 0, f"{dupes} tasks reported DONE more than once"
    assert set(done) == set(ids), f"{len(set(ids) - set(done))} tasks never finished"
    return done


def held_intervals(url: str) -> dict[str, int]:
    """Max tasks held at once by each peer, replayed from the append-only events."""
    rows = db_rows(url, "SELECT task_id, from_status, to_status, peer FROM task_events ORDER BY id")
    holder: dict[Any, str] = {}
    load: Counter[str] = Counter()
    peak: Counter[str] = Counter()
    for tid, frm, to, peer in rows:
        if to == Status.ASSIGNED:
            holder[tid] = peer
            load[peer] += 1
            peak[peer] = max(peak[peer], load[peer])
        elif frm in {s.value for s in ACTIVE} and to not in {s.value for s in ACTIVE} and tid in holder:
            load[holder.pop(tid)] -= 1
    return dict(peak)


def test_thousand_mixed_tasks_complete_exactly_once(make_mesh: Any, database_url: str) -> None:
    capacity = 3
    mesh = make_mesh(developers=2, testers=1, extra_env={"CASPER_CAPACITY": str(capacity)})
    specs = mixed_specs(1000)
    done = submit_and_wait(mesh, specs)
    assert Counter(ev.status for ev in done.values()) == {"complete": 1000}

    rows = db_rows(database_url, "SELECT id::text, status, attempts, assigned_to, output FROM tasks")
    assert len(rows) == 1000
    assert {r[1] for r in rows} == {"complete"}
    assert all(r[2] == 1 for r in rows), "no task should need a second attempt in a healthy mesh"
    by_id = {r[0]: r for r in rows}
    assert set(by_id) == set(done)
    # what DONE said is what Postgres holds
    for tid, ev in list(done.items())[:200]:
        assert by_id[tid][4] == ev.output

    # every task: exactly one 'complete' event, and its event chain follows the lifecycle table
    events = db_rows(database_url, "SELECT task_id::text, from_status, to_status FROM task_events ORDER BY id")
    chains: dict[str, list[tuple[str | None, str]]] = defaultdict(list)
    for tid, frm, to in events:
        chains[tid].append((frm, to))
    for tid, chain in chains.items():
        assert chain[0] == (None, "pending")
        assert [to for _, to in chain].count("complete") == 1
        for (_, prev_to), (frm, to) in itertools.pairwise(chain):
            assert frm == prev_to
            assert Status(to) in TRANSITIONS[Status(frm)], f"{tid}: illegal {frm} -> {to}"

    # capacity (credit) was never exceeded at any peer
    peaks = held_intervals(database_url)
    assert peaks, "no assignments recorded"
    assert max(peaks.values()) <= capacity, peaks
    assert len(peaks) == 3, f"work should spread over all peers: {peaks}"

    # caspectl's view agrees with the rows
    with mesh.client() as c:
        sample = next(iter(done))
        view = c.request("get", id=sample)
        assert view["status"] == "complete" and view["attempts"] == 1
        assert [e["to_status"] for e in view["events"]][-1] == "complete"
        listing = c.request("tasks", status="complete", limit=10_000)
        assert listing["counts"] == {"complete": 1000}
        stats = c.request("status")
        assert stats["peers"] == 3 and stats["open_tasks"] == {}


def test_task_needing_a_missing_capability_waits_then_runs(make_mesh: Any, database_url: str) -> None:
    mesh = make_mesh(developers=1, testers=0)
    with mesh.client() as c:
        tid = str(c.submit([TaskSpec(type="echo", input={"x": 1}, requires=("gpu",))]).task_ids[0])
        ordinary = str(c.submit([TaskSpec(type="echo", input={"y": 2})], wait=True).task_ids[0])
        assert next(c.done_events(20)).task_id.hex == ordinary.replace("-", "")
        time.sleep(1.0)
        assert c.request("get", id=tid)["status"] == "pending"
    mesh.add_node("gpu-node", "developer", mesh.port_base + 9, capabilities="gpu")
    with mesh.client() as c:
        view = wait_for(lambda: (v := c.request("get", id=tid))["status"] == "complete" and v, 30, "gpu task")
        assert view["assigned_to"] == "gpu-node"
        assert view["output"] == {"x": 1}


def test_cancel_pending_and_running(make_mesh: Any, database_url: str) -> None:
    mesh = make_mesh(developers=1, testers=0)
    with mesh.client() as c:
        pending = str(c.submit([TaskSpec(type="noop", requires=("nobody-has-this",))]).task_ids[0])
        running = str(c.submit([TaskSpec(type="shell", input={"cmd": "sleep 30; echo late"})]).task_ids[0])
        wait_for(lambda: c.request("get", id=running)["status"] == "processing", 20, "task to start")
        assert c.request("cancel", id=pending)["status"] == "cancelled"
        out = c.request("cancel", id=running)
        assert out["was_running_on"] == "developer-1"
        wait_for(lambda: c.request("peers")["peers"][0]["inflight"] == 0, 10, "credit returned")
        for tid in (pending, running):
            assert c.request("get", id=tid)["status"] == "cancelled"
        # the peer really stopped the command: a new task runs at once, no late result appears
        echo = c.submit([TaskSpec(type="echo", input={"after": True})], wait=True)
        assert next(c.done_events(20)).task_id == echo.task_ids[0]
    statuses = dict(db_rows(database_url, "SELECT id::text, status FROM tasks"))
    assert statuses[pending] == "cancelled" and statuses[running] == "cancelled"
    to_states = [
        r[0] for r in db_rows(database_url, "SELECT to_status FROM task_events WHERE task_id = %s::uuid", (running,))
    ]
    assert to_states[-1] == "cancelled" and "complete" not in to_states


def test_idempotent_submit_returns_the_same_task(make_mesh: Any, database_url: str) -> None:
    mesh = make_mesh(developers=1, testers=0)
    spec = TaskSpec(type="echo", input={"v": 1}, idempotency_key="job-42")
    with mesh.client() as c:
        first = c.submit([spec], wait=True)
        assert first.existing == (False,)
        next(c.done_events(20))
        second = c.submit([spec, spec])
        assert second.task_ids == (first.task_ids[0], first.task_ids[0])
        assert second.existing == (True, True)
    # the key is durable: a restarted policeman still knows it
    mesh.stop_node("policeman")
    mesh.start_node("policeman")
    mesh.wait_healthy("policeman", 30)
    with mesh.client() as c:
        again = c.submit([spec], wait=True)
        assert again.task_ids == first.task_ids and again.existing == (True,)
        ev = next(c.done_events(20))  # a wait on a finished task answers at once from the store
        assert ev.status == "complete" and ev.output == {"v": 1}
    assert db_rows(database_url, "SELECT count(*) FROM tasks")[0][0] == 1


def test_redis_stopped_mid_run_tasks_still_complete(make_mesh: Any) -> None:
    mesh = make_mesh(developers=2, testers=0)
    specs = [TaskSpec(type="echo", input={"k": i % 50}, cache=True) for i in range(400)]
    with mesh.client(timeout_s=60) as c:
        ids = [str(t) for t in c.submit(specs[:200], wait=True).task_ids]
        got = 0
        for _ in c.done_events(30):
            got += 1
            if got == 50:
                assert mesh.redis is not None
                mesh.redis.stop()  # Redis gone while tasks are in flight
                ids += [str(t) for t in c.submit(specs[200:], wait=True).task_ids]
            if got >= 400:
                break
        assert got == 400
        statuses = Counter(c.request("get", id=t)["status"] for t in ids[::20])
        assert statuses == {"complete": 20}
    bypassed = 0
    hits = 0
    for node in ("developer-1", "developer-2"):
        with ControlClient(mesh.nodes[node].control) as wc:
            cache = wc.request("status")["cache"]
            bypassed += cache["bypassed"]
            hits += cache["hits"]
    assert bypassed > 0, "tasks after the Redis stop must bypass the cache"
    assert hits > 0, "identical inputs before the stop must hit the cache"


def test_dead_developer_tasks_move_to_another(make_mesh: Any, database_url: str) -> None:
    mesh = make_mesh(developers=2, testers=0, extra_env={"CASPER_CAPACITY": "4"})
    with mesh.client(timeout_s=30) as c:
        ids = [
            str(t)
            for t in c.submit([TaskSpec(type="sleep", input={"seconds": 2.0}) for _ in range(8)], wait=True).task_ids
        ]
        wait_for(lambda: all(p["inflight"] == 4 for p in c.request("peers")["peers"]), 15, "both peers busy")
        mesh.signal_node("developer-1", signal.SIGKILL)
        t0 = time.monotonic()
        done = {}
        for ev in c.done_events(30):
            done[str(ev.task_id)] = ev.status
            if len(done) == len(ids):
                break
        assert set(done) == set(ids) and set(done.values()) == {"complete"}
        assert time.monotonic() - t0 < 20
    rows = db_rows(database_url, "SELECT attempts, assigned_to FROM tasks")
    moved = [r for r in rows if r[0] == 2]
    assert len(moved) == 4, f"the 4 tasks of the killed peer run a second time: {rows}"
    assert {r[1] for r in moved} == {"developer-2"}
    reasons = db_rows(database_url, "SELECT detail FROM task_events WHERE to_status = 'pending' AND detail IS NOT NULL")
    assert any("developer-1" in json.dumps(r[0]) for r in reasons)


def test_sigterm_drains_a_developer_and_nothing_is_lost(make_mesh: Any, database_url: str) -> None:
    mesh = make_mesh(developers=2, testers=0, extra_env={"CASPER_DRAIN_TIMEOUT_S": "1"})
    with mesh.client(timeout_s=30) as c:
        specs = [TaskSpec(type="sleep", input={"seconds": 0.5 if i % 2 else 4.0}) for i in range(12)]
        ids = [str(t) for t in c.submit(specs, wait=True).task_ids]
        wait_for(lambda: c.request("peers")["peers"][0]["inflight"] > 0, 10, "work on developer-1")
        t0 = time.monotonic()
        assert mesh.stop_node("developer-1", timeout=15) == 0
        assert time.monotonic() - t0 < 10, "drain is bounded by drain_timeout_s"
        done = {}
        for ev in c.done_events(40):
            done[str(ev.task_id)] = ev.status
            if len(done) == len(ids):
                break
        assert set(done.values()) == {"complete"} and len(done) == 12
    handed = db_rows(
        database_url,
        "SELECT count(*) FROM task_events WHERE to_status = 'pending' "
        "AND detail->>'reason' LIKE 'handed-back by developer-1%%'",
    )
    assert handed[0][0] >= 1, "unfinished tasks are handed back on shutdown"
    # a clean hand-back costs no attempt: every task finished on its first counted attempt
    assert {r[0] for r in db_rows(database_url, "SELECT attempts FROM tasks")} == {1}


def test_policeman_restart_recovers_from_postgres(make_mesh: Any, database_url: str) -> None:
    mesh = make_mesh(developers=2, testers=0)
    with mesh.client(timeout_s=30) as c:
        ids = [str(t) for t in c.submit([TaskSpec(type="sleep", input={"seconds": 1.0}) for _ in range(20)]).task_ids]
    time.sleep(0.5)
    mesh.signal_node("policeman", signal.SIGKILL)
    mesh.nodes["policeman"].proc.wait(10)  # type: ignore[union-attr]
    mesh.start_node("policeman")
    mesh.wait_healthy("policeman", 30)
    mesh.wait_peers(2, 30)
    with mesh.client() as c:
        wait_for(
            lambda: c.request("tasks", status="complete", limit=100)["counts"].get("complete") == 20,
            60,
            "all tasks complete after the restart",
        )
    assert {r[0] for r in db_rows(database_url, "SELECT status FROM tasks")} == {"complete"}
    assert len(ids) == 20


def test_dead_task_keeps_every_error_and_retry_runs_it_again(make_mesh: Any, tmp_path: Any) -> None:
    mesh = make_mesh(developers=1, testers=0, extra_env={"CASPER_BACKOFF_BASE_S": "0.1"})
    marker = tmp_path / "second-time"
    flaky = TaskSpec(
        type="shell",
        max_attempts=2,
        input={"cmd": f"[ -f {marker}.ok ] || {{ echo no >> {marker}; exit 3; }}", "expect_exit": 0},
    )
    with mesh.client(timeout_s=30) as c:
        tid = str(c.submit([flaky], wait=True).task_ids[0])
        ev = next(c.done_events(30))
        assert ev.status == "dead" and ev.error is not None and ev.error.code == "validation"
        view = c.request("get", id=tid)
        assert view["attempts"] == 2
        assert [e["attempt"] for e in view["error"]] == [1, 2], "every attempt's error is kept"
        dead = c.request("tasks", status="dead")
        assert [t["id"] for t in dead["tasks"]] == [tid]
        (tmp_path / "second-time.ok").touch()
        again = c.request("retry", id=tid)
        assert again["retry_of"] == tid and again["id"] != tid
        new = wait_for(
            lambda: (v := c.request("get", id=again["id"]))["status"] == "complete" and v, 30, "the retried task"
        )
        assert new["events"][0]["detail"] == {"retry_of": tid}
        assert c.request("get", id=tid)["status"] == "dead", "the old task keeps its history"


def test_get_of_unknown_ids_of_any_uuid_version_is_not_found(make_mesh: Any) -> None:
    import uuid as _uuid

    from casperd.errors import TaskNotFoundError

    mesh = make_mesh(developers=0, testers=1)
    far_future_v7 = _uuid.UUID(int=(0xFFFF_FFFF_FFFF << 80) | (0x7 << 76) | (0x2 << 62))
    with mesh.client() as c:
        for tid in [*(_uuid.uuid4() for _ in range(20)), far_future_v7, _uuid.UUID(int=0)]:
            with pytest.raises(TaskNotFoundError):
                c.request("get", id=str(tid))
        assert c.request("health")["healthy"]
