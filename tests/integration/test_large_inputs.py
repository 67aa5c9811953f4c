"""Large inputs wait in Postgres, not in the policeman's memory (issue #9 point 4), and still reach
their worker whole: queued with no capable peer, kept across a policeman restart, loaded back from
the tasks row when a peer that can run them joins."""

from __future__ import annotations

from typing import Any

from casperd.messages import TaskSpec
from tests.support.mesh import db_rows, wait_for


def test_large_inputs_queued_then_dispatched_run_with_their_full_input(make_mesh: Any, database_url: str) -> None:
    mesh = make_mesh(developers=1, testers=0, extra_env={"CASPER_INLINE_INPUT_BYTES": "1024"})
    bigs = [{"n": n, "blob": f"{n}:" + "ab" * 12_000} for n in range(3)]  # 24 KB each, over 1 KiB
    with mesh.client(timeout_s=30) as c:
        # a capability nobody has yet: they wait in the queue
        ids = [str(t) for t in c.submit([TaskSpec(type="echo", input=b, requires=("big",)) for b in bigs]).task_ids]
        small = str(c.submit([TaskSpec(type="echo", input={"s": 1}, requires=("big",))]).task_ids[0])
        for tid, big in zip(ids, bigs, strict=True):
            view = c.request("get", id=tid)
            assert view["status"] == "pending"
            assert view["input"] == big, "caspectl get shows a queued large input (from its row)"
    # the policeman restarts while they wait: recovery leaves their inputs in Postgres
    mesh.stop_node("policeman")
    mesh.start_node("policeman")
    mesh.wait_healthy("policeman", 30)
    mesh.wait_peers(1, 30)
    mesh.add_node("big-node", "developer", mesh.port_base + 9, capabilities="big")
    with mesh.client(timeout_s=30) as c:
        for tid, big in [*zip(ids, bigs, strict=True), (small, {"s": 1})]:
            view = wait_for(lambda t=tid: (v := c.request("get", id=t))["status"] == "complete" and v, 60, "the task")
            assert view["assigned_to"] == "big-node"
            assert view["output"] == big, "the worker got the whole input (echo returns it)"
    attempts = dict(db_rows(database_url, "SELECT id::text, attempts FROM tasks"))
    assert all(attempts[t] == 1 for t in [*ids, small])
