"""Leases: a peer that holds a task but never reports on it loses it; the task runs elsewhere."""

from __future__ import annotations

from typing import Any

import zmq

from casperd import codec
from casperd.messages import Cancel, Heartbeat, Progress, Ready, TaskBatch, TaskSpec
from tests.integration.test_bad_input import FakeWorker, key
from tests.support.mesh import db_rows, wait_for


def test_silent_holder_loses_its_lease_and_the_task_completes_elsewhere(make_mesh: Any, database_url: str) -> None:
    # no real worker at first: the fake one is the only peer, so it gets the task
    mesh = make_mesh(developers=0, testers=0, start=False, extra_env={"CASPER_LEASE_S": "2"})
    mesh.start_services()
    mesh.add_node("policeman", "policeman", mesh.port_base)
    mesh.wait_healthy("policeman", 60)
    ctx: zmq.Context[Any] = zmq.Context()
    sitter = zmq.curve_keypair()  # enrolled for its id: the policeman refuses unknown keys at the handshake
    with mesh.client() as c:
        c.request("keys-add", key=sitter[0].decode(), pattern="sitter", role="developer")
    fake = FakeWorker(
        ctx, mesh.policeman.bind, server_key=key(mesh, "policeman"), routing_id=b"sitter/1", keypair=sitter
    )
    try:
        fake.send(
            codec.encode(
                Ready(
                    node_id="sitter",
                    epoch="1",
                    role="developer",
                    endpoint="tcp://127.0.0.1:1",
                    pid=1,
                    host="h",
                    capacity=1,
                )
            )
        )
        fake.next(Heartbeat)
        with mesh.client() as c:
            tid = c.submit([TaskSpec(type="echo", input={"held": True})]).task_ids[0]
        batch: TaskBatch = fake.next(TaskBatch, 15)
        assert batch.tasks[0].task_id == tid and batch.tasks[0].lease_ms == 2000
        # it says it started, then keeps heartbeating but never renews the lease
        fake.send(codec.encode(Progress(task_ids=(tid,))))
        cancel: Cancel = fake.next(Cancel, 15)
        assert cancel.task_ids == (tid,) and "lease" in cancel.reason
        # a real developer joins and runs it
        mesh.add_node("developer-1", "developer", mesh.port_base + 1)
        with mesh.client() as c:
            view = wait_for(
                lambda: (v := c.request("get", id=str(tid)))["status"] == "complete" and v,
                30,
                "the task to complete on developer-1",
            )
        # (the sitter, still heartbeating, may have been given it again and lost it again meanwhile)
        assert view["assigned_to"] == "developer-1" and view["attempts"] >= 2
        reasons = [
            r[0]
            for r in db_rows(
                database_url,
                "SELECT detail->>'reason' FROM task_events WHERE task_id = %s AND to_status = 'pending'",
                (tid,),
            )
        ]
        assert any(r and "lease expired on sitter" in r for r in reasons), reasons
    finally:
        fake.close()
        ctx.destroy(linger=0)
