"""Faults injected into a compose mesh with Docker itself: a developer killed, a developer cut
off claude-net for 15 s, the policeman restarted. Each time the work completes elsewhere or after
the recovery, nothing submitted is lost, and the node that was gone gets work again.

One mesh for the module (see conftest.py); ``healthy_mesh`` repairs what a failed test left.
The policeman runs with CASPER_BREAKER_RECOVERY_S=5 (compose.test.yaml), so a node back from
the dead earns its work back through a half-open probe within seconds, not a minute.
"""

from __future__ import annotations

import time

import pytest

from tests.compose.composemesh import TIMINGS, WORKERS, ComposeMesh, new_tag, poll, sleep_tasks, tagged

pytestmark = [pytest.mark.compose, pytest.mark.timeout(600)]


def moved_away(m: ComposeMesh, tag: str, node: str) -> int:
    """Tasks of ``tag`` that were assigned to ``node`` once and were completed by another node."""
    rows = m.psql(
        "select count(distinct t.id) from tasks t join task_events e on e.task_id = t.id "
        f"where {tagged(tag, 't')} and e.to_status = 'assigned' and e.peer = '{node}' "
        f"and t.status = 'complete' and t.assigned_to <> '{node}'"
    )
    return int(rows[0][0])


def busy(m: ComposeMesh, node: str) -> bool:
    return m.peers().get(node, {}).get("inflight", 0) > 0


def earns_work_back(m: ComposeMesh, node: str, timeout: float = 90) -> dict[str, int]:
    """Small batches until ``node`` has completed some of them and its breaker is closed again."""
    deadline = time.monotonic() + timeout
    tag = new_tag(f"back-{node}")
    while time.monotonic() < deadline:
        m.submit(sleep_tasks(24, 0.25, tag))
        time.sleep(1.0)
        ran_on = m.ran_on(tag)
        if ran_on.get(node, 0) > 0 and m.peers()[node]["breaker"] == "closed":
            return ran_on
    raise AssertionError(f"{node} got no work back within {timeout:.0f}s: {m.ran_on(tag)}, peers {m.peers()}")


def test_killed_developer_work_completes_elsewhere_and_it_rejoins(healthy_mesh: ComposeMesh) -> None:
    m = healthy_mesh
    tag, n = new_tag("kill"), 120
    ids = m.submit(sleep_tasks(n, 0.5, tag))
    poll(lambda: busy(m, "developer-1"), 30, interval=0.2, what="developer-1 running tasks")

    victim = m.container("developer-1")
    victim.kill()  # SIGKILL: no drain, no hand-back
    t0 = time.monotonic()
    m.wait_peers({"developer-2", "tester"}, timeout=30, absent={"developer-1"})
    TIMINGS.append(("docker kill developer -> declared dead", time.monotonic() - t0))

    assert m.wait_complete(tag, n, timeout=180) == {"complete": n}
    assert len(ids) == n
    assert moved_away(m, tag, "developer-1") >= 1  # its tasks completed elsewhere
    victim.reload()
    assert victim.status == "exited"  # `docker kill` is a manual stop: unless-stopped leaves it down

    victim.start()
    t0 = time.monotonic()
    m.wait_healthy(["developer-1"], timeout=120)
    peers = m.wait_peers(set(WORKERS), timeout=60)
    breaker = peers["developer-1"]["breaker"]
    TIMINGS.append(
        (f"docker start developer -> healthy and registered (breaker then: {breaker})", time.monotonic() - t0)
    )
    assert peers["developer-1"]["liveness"] == "alive"
    # declared dead, its breaker was tripped: with no work queued since, it is still open (or
    # half-open), and it closes once the node has completed a probe task
    assert breaker in ("open", "half-open"), peers["developer-1"]
    earns_work_back(m, "developer-1")


def test_partitioned_developer_is_declared_dead_and_rejoins(healthy_mesh: ComposeMesh) -> None:
    m = healthy_mesh
    tag, n = new_tag("partition"), 100  # ~5 s of work for the two others: done before the reconnect
    m.submit(sleep_tasks(n, 0.5, tag))
    poll(lambda: busy(m, "developer-2"), 30, interval=0.2, what="developer-2 running tasks")

    net = m.client.networks.get(m.claude_net)
    victim = m.container("developer-2")
    net.disconnect(victim)
    t0 = time.monotonic()
    try:
        # declared dead (heartbeat_s x heartbeat_misses = 3 s): dropped from the registry, work returned
        m.wait_peers({"developer-1", "tester"}, timeout=14, absent={"developer-2"})
        TIMINGS.append(("network disconnect -> declared dead", time.monotonic() - t0))
        time.sleep(max(0.0, 15 - (time.monotonic() - t0)))
    finally:
        net.connect(victim, ipv4_address=m.ip("developer-2"))
    t0 = time.monotonic()
    peers = m.wait_peers(set(WORKERS), timeout=60)
    breaker = peers["developer-2"]["breaker"]
    TIMINGS.append((f"network reconnect -> registered again (breaker then: {breaker})", time.monotonic() - t0))
    idle = m.counts(tag) == {"complete": n}

    assert m.wait_complete(tag, n, timeout=180) == {"complete": n}  # nothing lost
    # back from the dead it must earn its work again: the broker tripped its breaker when it
    # declared the node dead. With nothing queued since, no probe has run: still open (or
    # half-open); with work still queued a probe may already have closed it.
    assert breaker in (("open", "half-open") if idle else ("open", "half-open", "closed")), peers["developer-2"]
    assert moved_away(m, tag, "developer-2") >= 1
    earns_work_back(m, "developer-2")


def test_policeman_restart_recovers_from_postgres(healthy_mesh: ComposeMesh) -> None:
    m = healthy_mesh
    tag, n = new_tag("restart"), 200
    ids = m.submit(sleep_tasks(n, 0.5, tag))
    poll(lambda: m.counts(tag).get("complete", 0) >= 20, 60, what="the first 20 tasks complete")
    open_before = n - m.counts(tag).get("complete", 0)

    policeman = m.container("policeman")
    t0 = time.monotonic()
    policeman.restart(timeout=30)
    m.wait_healthy(["policeman"], timeout=120)
    m.wait_peers(set(WORKERS), timeout=90)
    TIMINGS.append(("docker restart policeman -> healthy, workers registered", time.monotonic() - t0))

    assert m.wait_complete(tag, n, timeout=240) == {"complete": n}
    rows = m.psql(f"select id::text, status from tasks where {tagged(tag)}")
    assert sorted(r[0] for r in rows) == sorted(ids)  # every submitted id, once
    assert {r[1] for r in rows} == {"complete"}
    if open_before > 0:
        logs = policeman.logs(tail=500).decode(errors="replace")
        assert "recovered" in logs and "open tasks from Postgres" in logs, logs[-3000:]
