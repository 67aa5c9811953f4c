"""The autoscaler on a real local mesh, with the local spawner (casperd up's supervisor half).

A burst grows the mesh from one developer to the max and back to one once idle, no task
interrupted or lost; a task needing a capability only a spawnable role has gets that role spawned;
``caspectl top --once -o json`` agrees with ``status``, ``peers`` and the database."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from casperd.localmesh import LocalMesh
from casperd.messages import TaskSpec
from casperd.spawners.local import LocalSupervisor
from tests.integration.test_mesh import submit_and_wait
from tests.support.mesh import db_rows, free_port_base, server_dir, wait_for

pytestmark = pytest.mark.integration


def autoscale_env(roles: dict[str, Any], idle_s: float = 3.0) -> dict[str, str]:
    return {
        "CASPER_SPAWNER": "local",
        "CASPER_AUTOSCALE_ROLES": json.dumps(roles),
        "CASPER_AUTOSCALE_WAIT_S": "0.5",
        "CASPER_AUTOSCALE_STEP_S": "0.3",
        "CASPER_AUTOSCALE_IDLE_S": str(idle_s),
    }


@contextlib.contextmanager
def supervising(mesh: LocalMesh) -> Iterator[tuple[LocalSupervisor, list[int]]]:
    """casperd up's loop in a thread: carry out orders, record the live peer counts it sees."""
    sup = LocalSupervisor(mesh, say=lambda _m: None)
    sizes: list[int] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            sup.poll()
            with contextlib.suppress(Exception), mesh.client(2.0) as c:
                sizes.append(sum(1 for p in c.request("peers")["peers"] if p["role"] == "developer"))
            stop.wait(0.2)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield sup, sizes
    finally:
        stop.set()
        t.join(30)


def peers(mesh: LocalMesh) -> list[dict[str, Any]]:
    with mesh.client(5.0) as c:
        return list(c.request("peers")["peers"])


def status(mesh: LocalMesh) -> dict[str, Any]:
    with mesh.client(5.0) as c:
        return dict(c.request("status"))


def ctl_json(mesh: LocalMesh, *args: str) -> Any:
    """caspectl ARGS -o json against the mesh's policeman, as a user runs it (no CASPER_ env)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASPER_")}
    proc = subprocess.run(
        [sys.executable, "-m", "casperd.ctl.main", "--control", mesh.policeman.control, *args, "-o", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_burst_grows_the_mesh_to_max_and_back_to_one(make_mesh: Callable[..., LocalMesh]) -> None:
    mesh = make_mesh(
        developers=1,
        testers=0,
        policeman_env=autoscale_env({"developer": {"min": 1, "max": 3}}),
        extra_env={"CASPER_CAPACITY": "2"},
    )
    with supervising(mesh) as (sup, sizes):
        specs = [TaskSpec(type="sleep", input={"seconds": 0.75}) for _ in range(48)]
        done = submit_and_wait(mesh, specs, timeout=180)
        assert {ev.status for ev in done.values()} == {"complete"}
        grown = max(sizes)
        assert grown == 3, f"developer counts seen: {sorted(set(sizes))}"
        spawned = [p for p in peers(mesh) if p.get("spawned")]
        assert spawned and all(p["spawn_reason"] for p in spawned)
        assert any("waiting" in p["spawn_reason"] for p in spawned), spawned
        # idle: back to the one static developer, the spawned processes gone cleanly
        wait_for(lambda: [p["node_id"] for p in peers(mesh)] == ["developer-1"], 60, "the mesh to shrink to one")
        wait_for(lambda: not sup.spawned, 30, "the supervisor to forget the retired nodes")
    assert max(sizes) <= 3, "the max bound was exceeded"
    # nothing interrupted or lost: every task ran exactly once, none handed back or re-queued
    ids = list(done)
    rows = db_rows(
        mesh.database_url,
        "SELECT status, attempts FROM tasks WHERE id = ANY(%s::uuid[])",
        (ids,),
    )
    assert len(rows) == 48 and {r for r in rows} == {("complete", 1)}
    requeued = db_rows(
        mesh.database_url,
        "SELECT count(*) FROM task_events WHERE task_id = ANY(%s::uuid[]) AND to_status = 'pending' "
        "AND from_status IS NOT NULL",
        (ids,),
    )
    assert requeued[0][0] == 0
    holders = {r[0] for r in db_rows(mesh.database_url, "SELECT DISTINCT assigned_to FROM tasks")}
    assert len(holders) >= 2, f"the spawned developers took no work: {holders}"
    decisions = status(mesh)["autoscale"]["decisions"]
    kinds = [d["kind"] for d in decisions]
    assert "drain" in kinds and "retire" in kinds
    assert kinds.index("drain") < kinds.index("retire")
    log = (mesh.state_dir / "logs" / "policeman.log").read_text()
    assert "autoscaler: spawn developer-" in log and "autoscaler: retire developer-" in log


def test_capability_only_a_spawnable_role_has_gets_it_spawned_and_top_agrees(
    make_mesh: Callable[..., LocalMesh],
) -> None:
    roles = {"tester": {"min": 0, "max": 1}}
    mesh = make_mesh(developers=1, testers=0, policeman_env=autoscale_env(roles, idle_s=600))
    with supervising(mesh):
        spec = TaskSpec(type="shell", input={"cmd": "echo tested"}, requires=("test",))
        done = submit_and_wait(mesh, [spec], timeout=120)
        (ev,) = done.values()
        assert ev.status == "complete"
        (holder,) = db_rows(mesh.database_url, "SELECT assigned_to FROM tasks WHERE id = %s", (ev.task_id,))[0]
        assert holder.startswith("tester-")
        # a capability nobody can provide is reported (and the task waits)
        with mesh.client(5.0) as c:
            c.submit([TaskSpec(type="noop", requires=("gpu",))])
        wait_for(lambda: ["gpu"] in status(mesh)["autoscale"]["unmet"], 30, "the unmet capability report")
        # caspectl tasks says why it waits: the autoscaler's unmet report, not a generic guess
        listed = ctl_json(mesh, "tasks")["tasks"]
        (gpu,) = [t for t in listed if t["status"] == "pending"]
        assert "capability gpu" in gpu["waiting"] and "no spawner can provide them" in gpu["waiting"], gpu
        top = ctl_json(mesh, "top", "--once")
        st, ps = status(mesh), peers(mesh)
    assert (
        sorted(p["node_id"] for p in top["peers"])
        == sorted(p["node_id"] for p in ps)
        == [
            "developer-1",
            holder,
        ]
    )
    assert top["open_tasks"] == st["open_tasks"] == {"pending": 1}
    assert top["queue"]["depth"] == st["queued"] == 1
    assert top["queue"]["by_priority"] == {"5": 1}
    counts = dict(db_rows(mesh.database_url, "SELECT status, count(*) FROM tasks GROUP BY status"))
    assert counts == {"complete": 1, "pending": 1}
    assert top["throughput"]["by_status"] == {"complete": 1}
    tester = next(p for p in top["peers"] if p["node_id"] == holder)
    assert tester["spawned"] and "need capabilities shell,test;" in tester["spawn_reason"]
    assert tester["rss_bytes"] > 10 * 2**20 and tester["cpu_pct"] >= 0
    assert [d["kind"] for d in top["autoscale"]["decisions"]][:2] == ["spawn", "unmet"]


def test_casperd_up_grows_and_shrinks_under_a_burst_as_top_shows(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The real binary: `casperd up --developers 1 --max-developers 2`, a burst through caspectl,
    and `caspectl top --once -o json` showing the second developer come and go."""
    from tests.integration.test_up import ctl, stop

    state = server_dir("casper-test-up-elastic-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASPER_") and k != "PGPASSFILE"}
    env.update({"CASPER_AUTOSCALE_IDLE_S": "3", "CASPER_AUTOSCALE_WAIT_S": "0.5"})
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "casperd",
            "up",
            "--state-dir",
            str(state),
            "--port-base",
            str(free_port_base()),
            "--developers",
            "1",
            "--testers",
            "0",
            "--max-developers",
            "2",
            "--no-redis",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    out = ""
    try:
        wait_for(lambda: ctl(state, "status").returncode == 0, 120, "casperd up to serve")

        def developers() -> list[str]:
            top = json.loads(ctl(state, "top", "--once", "-o", "json").stdout)
            return sorted(p["node_id"] for p in top["peers"] if p["role"] == "developer")

        # 40 three-second tasks on 4 slots: 30 s of backlog, well past the autoscaler's 10 s start-up
        # grace (a mesh that is up in 3 s and a 10 s burst could finish inside the grace: no spawn)
        lines = "".join(json.dumps({"type": "sleep", "input": {"seconds": 3}}) + "\n" for _ in range(40))
        jobs = tmp_path_factory.mktemp("burst") / "burst.jsonl"
        jobs.write_text(lines)
        assert ctl(state, "submit-bulk", str(jobs)).returncode == 0
        grown = wait_for(lambda: len(developers()) == 2 and developers(), 90, "a second developer in top")
        wait_for(lambda: developers() == ["developer-1"], 120, "top to show one developer again")
        counts = json.loads(ctl(state, "tasks", "-o", "json").stdout)["counts"]
        assert counts == {"complete": 40}, counts
    finally:
        out = stop(proc)
        shutil.rmtree(state, ignore_errors=True)
    assert f"autoscaler: started {grown[1]}" in out and f"autoscaler: retired {grown[1]}" in out, out[-3000:]
