"""Postgres going away and coming back: the policeman refuses new work clearly, keeps running,
loses nothing it accepted, and serves again once the database is back."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator

import pytest

from casperd.ctl.client import ControlClient
from casperd.errors import StorageError
from casperd.localmesh import LocalMesh
from casperd.messages import TaskSpec
from tests.support.mesh import free_port_base, server_dir, wait_for


@pytest.fixture
def own_db_mesh() -> Iterator[LocalMesh]:
    """A mesh with its own embedded Postgres, so the test may stop it."""
    state = server_dir("casper-test-outage-")
    mesh = LocalMesh(
        state,
        developers=1,
        testers=0,
        port_base=free_port_base(),
        redis_url=None,
        curve=False,
        extra_env={"CASPER_HEARTBEAT_S": "0.5"},
    )
    try:
        mesh.start()
        yield mesh
    finally:
        mesh.stop()
        shutil.rmtree(state, ignore_errors=True)


def test_postgres_restart_loses_no_accepted_task(own_db_mesh: LocalMesh) -> None:
    mesh = own_db_mesh
    assert mesh.postgres is not None
    with mesh.client(timeout_s=30) as c:
        accepted = [
            str(t)
            for t in c.submit([TaskSpec(type="sleep", input={"seconds": 0.3}) for _ in range(12)], wait=True).task_ids
        ]
    mesh.postgres.stop()

    def refused() -> bool:
        try:
            with ControlClient(mesh.policeman.control, 3.0) as c:
                c.submit([TaskSpec(type="noop")])
        except StorageError as exc:
            assert "unavailable" in exc.message and exc.hint
            return True
        except Exception:
            return False
        return False

    wait_for(refused, 30, "the policeman to refuse work while Postgres is down")
    assert mesh.policeman.alive
    with ControlClient(mesh.policeman.control, 10.0) as c:
        health = c.request("health")
        assert not health["healthy"] and not health["checks"]["database"]["ok"]

    time.sleep(1.0)
    mesh.postgres.start()
    with mesh.client(timeout_s=30) as c:
        wait_for(lambda: c.request("health")["healthy"], 60, "the policeman to be healthy again")
        counts = wait_for(
            lambda: (n := c.request("tasks", limit=100)["counts"]).get("complete", 0) >= 12 and n,
            90,
            "every accepted task to complete",
        )
        assert counts.get("complete", 0) >= 12
        for tid in accepted:
            assert c.request("get", id=tid)["status"] == "complete"
        again = c.submit([TaskSpec(type="echo", input={"back": True})], wait=True)
        ev = next(c.done_events(30))
        assert ev.task_id == again.task_ids[0] and ev.output == {"back": True}
