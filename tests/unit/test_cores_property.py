"""Property test: random sequences of submits, peer joins, deaths and shutdowns, results, failures,
cancels, lease expiries and policeman restarts against the linked in-memory cores, with the
invariants checked after every step:

* no task lost or invented: the store holds exactly the accepted tasks, and the policeman's open
  tasks are exactly the stored non-terminal ones, in the same status;
* capacity never exceeded, on either side of the link;
* exactly one ``complete`` event per completed task, none for any other;
* every status change is a legal row of the lifecycle table (``replay``), and the attempts the
  history adds up to are the row's attempts;
* and at the end, with a healthy worker and time, every task reaches a terminal state.
"""

from __future__ import annotations

import uuid

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from casperd.lifecycle import ACTIVE, TERMINAL, Status, replay
from casperd.messages import TaskSpec
from tests.support.corelab import Lab

NODES = ("developer-1", "developer-2", "developer-3")


class Mesh(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.lab = Lab(lease_s=4.0)
        self.n = 0

    # --- events ------------------------------------------------------------------------------------
    @rule(count=st.integers(1, 4), attempts=st.integers(1, 3), wait=st.booleans())
    def submit(self, count: int, attempts: int, wait: bool) -> None:
        specs = []
        for _ in range(count):
            self.n += 1
            specs.append(TaskSpec(type="echo", input={"n": self.n}, max_attempts=attempts))
        self.lab.submit(*specs, wait=wait)
        self.lab.pump()

    @rule(node=st.sampled_from(NODES), capacity=st.integers(1, 3))
    def join(self, node: str, capacity: int) -> None:
        """A node starts (or restarts with a new epoch, holding nothing)."""
        old = self.lab.workers.get(node)
        if old is not None:
            old.up = False
        self.lab.add_worker(node, capacity)
        self.lab.pump()

    @precondition(lambda self: any(w.up for w in self.lab.workers.values()))
    @rule(data=st.data())
    def die(self, data: st.DataObject) -> None:
        """A node goes silent (crash, partition): nothing in or out."""
        w = data.draw(st.sampled_from([w for w in self.lab.workers.values() if w.up]))
        w.up = False
        w.inbox.clear()

    @precondition(lambda self: any(w.up for w in self.lab.workers.values()))
    @rule(data=st.data())
    def shut_down(self, data: st.DataObject) -> None:
        w = data.draw(st.sampled_from([w for w in self.lab.workers.values() if w.up]))
        w.shut_down()
        self.lab.pump()

    def _runs(self) -> list[tuple[str, uuid.UUID]]:
        return sorted((w.node_id, tid) for w in self.lab.workers.values() if w.up for tid in w.runs)

    @precondition(lambda self: bool(self._runs()))
    @rule(data=st.data(), outcome=st.sampled_from(["ok", "ok", "fail", "fatal"]))
    def report(self, data: st.DataObject, outcome: str) -> None:
        node, tid = data.draw(st.sampled_from(self._runs()))
        w = self.lab.workers[node]
        if outcome == "ok":
            w.finish(tid, {"by": node})
        else:
            w.fail(tid, "task", retryable=outcome == "fail")
        self.lab.pump()

    @precondition(lambda self: bool(self.lab.core.tasks))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        tid = data.draw(st.sampled_from(sorted(self.lab.core.tasks)))
        self.lab.core.cancel(tid, self.lab.now())
        self.lab.run(self.lab.core.take())
        self.lab.pump()

    @rule(seconds=st.sampled_from([0.25, 1.0, 2.5, 5.0]))
    def wait(self, seconds: float) -> None:
        """Time passes: heartbeats, renewals, deaths, lease expiries, due retries."""
        self.lab.advance(seconds)

    @rule()
    def restart_policeman(self) -> None:
        self.lab.restart_policeman()
        self.lab.pump()

    # --- invariants ---------------------------------------------------------------------------------
    @invariant()
    def nothing_lost_or_invented(self) -> None:
        lab = self.lab
        assert set(lab.db) == lab.accepted
        for tid, row in lab.db.items():
            status = Status(row.rec["status"])
            if status in TERMINAL:
                assert tid not in lab.core.tasks
            else:
                assert lab.core.tasks[tid].status is status, (tid, status)
        assert set(lab.core.tasks) <= set(lab.db)

    @invariant()
    def capacity_never_exceeded(self) -> None:
        lab = self.lab
        for peer in lab.core.peers.values():
            holding = [
                t
                for t in lab.core.tasks.values()
                if t.assigned_to == peer.node_id and t.status in ACTIVE and t.status is not Status.VALIDATING
            ]
            assert len(holding) <= peer.slot.capacity
            assert peer.slot.inflight == len(peer.held) <= peer.slot.capacity
        for w in lab.workers.values():
            assert len(w.core.running) <= w.capacity
            assert w.max_running <= w.capacity

    @invariant()
    def one_complete_per_completed_task(self) -> None:
        for row in self.lab.db.values():
            completes = sum(1 for e in row.events if e.to_status == Status.COMPLETE.value)
            assert completes == (1 if row.rec["status"] == Status.COMPLETE.value else 0)

    @invariant()
    def every_change_is_a_row_of_the_table(self) -> None:
        for tid, row in self.lab.db.items():
            assert replay(tid, [(e.from_status, e.to_status, e.attempt) for e in row.events]) == row.rec["attempts"]

    def teardown(self) -> None:
        lab = self.lab
        lab.add_worker("finisher", capacity=4)
        for _ in range(400):
            lab.pump()
            if all(Status(r.rec["status"]) in TERMINAL for r in lab.db.values()):
                break
            for w in [w for w in lab.workers.values() if w.up]:
                for tid in list(w.runs):
                    w.finish(tid, "done")
            lab.advance(0.5)
        open_ = {tid: r.rec["status"] for tid, r in lab.db.items() if Status(r.rec["status"]) not in TERMINAL}
        assert not open_, f"tasks never finished: {open_}"
        self.one_complete_per_completed_task()
        self.every_change_is_a_row_of_the_table()


Mesh.TestCase.settings = settings(
    max_examples=50,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
TestCoresProperty = Mesh.TestCase


class SpilledMesh(Mesh):
    """The same machine with every input waiting in the store while its task is queued
    (``inline_input_bytes`` 0): dispatch goes through LoadInputs every time."""

    def __init__(self) -> None:
        super().__init__()
        self.lab = Lab(lease_s=4.0, inline_input_bytes=0)

    @invariant()
    def inputs_reach_workers_whole_and_wait_in_the_store(self) -> None:
        lab = self.lab
        for w in lab.workers.values():
            for tid, a in w.runs.items():
                assert a.input == lab.db[tid].rec["input"], tid
        for rec in lab.core.tasks.values():
            if rec.persisted and rec.status in (Status.PENDING, Status.RETRY):
                assert not rec.input_loaded, rec.id


SpilledMesh.TestCase.settings = settings(
    max_examples=30,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
TestCoresPropertySpilled = SpilledMesh.TestCase
