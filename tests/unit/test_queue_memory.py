"""The policeman's memory per queued task (issue #9 point 4): a compact record, and large inputs
that wait in Postgres rather than in memory (loaded back when the task is dispatched).

Driven through the in-memory lab (tests/support/corelab.py): the lab's store marks committed
records as the group-commit writer does and answers the core's LoadInputs from its rows.
"""

from __future__ import annotations

import gc
import sys
import time
import tracemalloc
import uuid
from typing import Any

from casperd import codec
from casperd.dispatch import Dispatcher
from casperd.handlers import Catalog
from casperd.lifecycle import Status
from casperd.messages import Submit, TaskSpec
from casperd.metrics import Metrics
from casperd.policeman import Now, PolicemanCore
from casperd.policeman.actions import LoadInputs, Send, Stage
from casperd.settings import load_settings
from casperd.taskrecord import TaskRecord, utcnow
from tests.support.corelab import Lab, LabWorker

BIG = {"blob": "x" * 2000, "n": 7}


def one(lab: Lab, inp: dict[str, Any], **spec: Any) -> uuid.UUID:
    (tid,) = lab.submit(TaskSpec(type="echo", input=inp, **spec))
    return tid


def join(lab: Lab, node_id: str) -> LabWorker:
    """A worker whose READY the policeman has taken, nothing dispatched yet."""
    w = lab.add_worker(node_id)
    while lab.to_police:
        route, frames = lab.to_police.popleft()
        lab.core.on_mesh(route, frames, lab.now())
        lab.run(lab.core.take())
    return w


# --- the compact record ---------------------------------------------------------------------------
def test_a_queued_record_keeps_its_input_once_as_json_text() -> None:
    lab = Lab()
    tid = one(lab, {"a": 1})
    lab.pump()
    rec = lab.core.tasks[tid]
    assert rec.input_json == '{"a":1}' and rec.input_obj is None, "no decoded copy while queued"
    assert rec.input == {"a": 1}  # decoded on demand
    assert rec.waiters is None, "no waiter list unless someone waits"
    assert rec.type is sys.intern("echo") and rec.submitted_by is sys.intern("caspectl")


def test_a_requeued_task_drops_its_decoded_input_again() -> None:
    lab = Lab()
    w = lab.add_worker("developer-1")
    tid = one(lab, {"a": 1})
    lab.pump()
    rec = lab.core.tasks[tid]
    assert w.runs[tid].input == {"a": 1} and rec.input_obj is not None, "decoded while held"
    w.fail(tid)
    lab.pump()
    lab.advance(5.0)  # the backoff elapses; the task runs again
    assert tid in w.runs and w.runs[tid].input == {"a": 1}
    w.fail(tid)
    lab.pump()
    assert rec.status is Status.RETRY and rec.input_obj is None


def test_waiters_are_kept_once_someone_waits() -> None:
    lab = Lab()
    (tid,) = lab.submit(TaskSpec(type="echo", input={}), wait=True)
    assert lab.core.tasks[tid].waiters == [b"ctl"]


def test_tasks_of_one_millisecond_share_their_creation_time() -> None:
    ms = 1_780_000_000_000
    ids = [uuid.UUID(int=(ms << 80) | (0x7 << 76) | (0x2 << 62) | n) for n in (1, 2)]
    spec = TaskSpec(type="echo")
    a, b = (TaskRecord.from_spec(t, spec, 3, None) for t in ids)
    assert a.created_at == b.created_at and a.created_at is b.created_at
    assert a.created_at.timestamp() == ms / 1000


def test_the_dispatcher_keeps_one_requirement_set_for_many_tasks() -> None:
    d = Dispatcher()
    for n in range(3):
        d.push(n, 5, ["gpu"])
    d.push(9, 9, ["gpu"])
    d.remove(1)
    assert len(d._queues) == 1 and len(d) == 3
    from casperd.dispatch import PeerSlot

    slot = PeerSlot("p", frozenset({"gpu"}), capacity=10)
    assert [t for t, _ in d.assign({"p": slot}, 0.0)] == [9, 0, 2], "priority, then submission order"


def test_memory_per_queued_task_in_the_core_is_well_under_a_kilobyte() -> None:
    """The core's own bytes per queued small task (tracemalloc; the bench measures the process's
    RSS, which adds the allocator's slack): 1,235 before issue #9's work, about 610 after (20,000 tasks)."""
    core = PolicemanCore(load_settings({"role": "policeman"}), Catalog(), Metrics(), time.monotonic())
    n, batch = 20_000, 500

    def now() -> Now:
        return Now(time.monotonic(), utcnow())

    def submit(specs: tuple[TaskSpec, ...]) -> None:
        msg = codec.decode(codec.encode(Submit(req_id=1, tasks=specs))).message
        assert isinstance(msg, Submit)
        core.submit(b"ctl", msg, "caspectl", {}, now())
        for a in core.take():
            if isinstance(a, Stage):
                a.rec.mark_persisted()

    submit((TaskSpec(type="noop", input={"warm": True}),))
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(0, n, batch):
            submit(tuple(TaskSpec(type="noop", input={"i": k}) for k in range(i, i + batch)))
        gc.collect()
        per_task = (tracemalloc.get_traced_memory()[0] - before) / n
    finally:
        tracemalloc.stop()
    assert len(core.dispatcher) == n + 1
    assert per_task < 800, f"{per_task:.0f} bytes per queued task"


# --- large inputs wait in Postgres ----------------------------------------------------------------
def test_a_large_queued_input_leaves_memory_once_its_row_is_committed() -> None:
    lab = Lab(inline_input_bytes=1024)
    big, small = one(lab, BIG), one(lab, {"a": 1})
    rec = lab.core.tasks[big]
    assert rec.spill and rec.input_loaded, "kept until its row is durable"
    lab.pump()
    assert not rec.input_loaded and rec.input_obj is None
    assert lab.db[big].rec["input"] == BIG, "the store has it"
    assert lab.core.tasks[small].input_loaded, "a small input stays in memory"
    assert rec.summary()["input"] is None  # caspectl get reads the row instead


def test_a_large_input_is_loaded_back_when_its_task_is_dispatched() -> None:
    lab = Lab(inline_input_bytes=1024)
    tid = one(lab, BIG)
    lab.pump()
    w = join(lab, "developer-1")
    lab.core.dispatch(lab.now())
    actions = lab.core.take()
    loads = [a for a in actions if isinstance(a, LoadInputs)]
    assert loads == [LoadInputs("developer-1", (tid,))]
    assert not any(isinstance(a, Send) and a.tasks for a in actions), "no TASK before the input is loaded"
    lab.run(actions)
    lab.pump()
    assert w.runs[tid].input == BIG
    w.finish(tid, {"ok": True})
    lab.pump()
    assert lab.status(tid) is Status.COMPLETE


def test_an_input_that_cannot_be_loaded_sends_the_task_back_unspent() -> None:
    lab = Lab(inline_input_bytes=1024)
    tid = one(lab, BIG)
    lab.pump()
    w = join(lab, "developer-1")
    lab.store_down = True
    lab.core.dispatch(lab.now())
    lab.run(lab.core.take())
    lab.commit()
    lab.load_inputs()
    lab.commit()
    assert lab.history(tid)[-2:] == [("pending", "assigned", 1), ("assigned", "pending", 0)]
    assert lab.core.peers["developer-1"].slot.inflight == 0 and not w.runs
    lab.store_down = False
    lab.pump()
    assert w.runs[tid].input == BIG and w.runs[tid].attempt == 1


def test_a_large_input_cancelled_while_loading_is_not_sent() -> None:
    lab = Lab(inline_input_bytes=1024)
    tid = one(lab, BIG)
    lab.pump()
    w = join(lab, "developer-1")
    lab.core.dispatch(lab.now())
    lab.run(lab.core.take())
    lab.core.cancel(tid, lab.now())
    lab.run(lab.core.take())
    lab.pump()
    assert lab.status(tid) is Status.CANCELLED and not w.runs


def test_a_retried_large_task_lets_its_input_go_and_runs_again_intact() -> None:
    lab = Lab(inline_input_bytes=1024)
    w = lab.add_worker("developer-1")
    tid = one(lab, BIG)
    lab.pump()
    rec = lab.core.tasks[tid]
    assert w.runs[tid].input == BIG and rec.input_loaded
    w.fail(tid)
    lab.pump()
    assert rec.status is Status.RETRY and not rec.input_loaded
    lab.advance(5.0)
    assert w.runs[tid].input == BIG and w.runs[tid].attempt == 2


def test_a_queued_tasks_large_attachments_wait_in_the_store_and_travel_with_its_task() -> None:
    """A hand-off's patch (input attachments) counts toward the input's size: queued, it is in
    Postgres only; dispatched, it is loaded back with the input and sent with the TASK."""
    lab = Lab(inline_input_bytes=1024)
    patch = b"diff --git " + b"p" * 4000
    rec = lab.core.new_local(TaskSpec(type="echo", input={"a": 1}), "developer-9")
    rec.attachments = (patch,)
    lab.blobs[rec.id] = [patch]  # the broker stores them before it stages the task
    lab.core.add_local(rec, None, lab.now())
    lab.run(lab.core.take())
    assert rec.spill and rec.sendable, "kept until its row is durable"
    lab.pump()
    assert rec.attachments is None and not rec.sendable
    w = join(lab, "developer-1")
    lab.core.dispatch(lab.now())
    actions = lab.core.take()
    assert [a for a in actions if isinstance(a, LoadInputs)] == [LoadInputs("developer-1", (rec.id,), (rec.id,))]
    lab.run(actions)
    lab.pump()
    assert w.runs[rec.id].input == {"a": 1} and w.blobs[rec.id] == (patch,)


def test_a_spilled_task_whose_attachments_the_store_lacks_fails_instead_of_looping() -> None:
    lab = Lab(inline_input_bytes=1024)
    rec = lab.core.new_local(TaskSpec(type="echo", input={"a": 1}), "developer-9")
    rec.attachments = (b"p" * 4000,)  # never saved in the lab's store
    lab.core.add_local(rec, None, lab.now())
    lab.run(lab.core.take())
    lab.pump()
    w = join(lab, "developer-1")
    lab.pump()
    assert lab.status(rec.id) is Status.DEAD and not w.runs  # not retried: it would only loop
    assert "missing from the task store" in (rec.error_json or "")
    assert lab.core.peers["developer-1"].slot.inflight == 0


def test_recovered_large_attachments_wait_in_the_store() -> None:
    lab = Lab(inline_input_bytes=1024)
    patch = b"p" * 4000
    rec = lab.core.new_local(TaskSpec(type="echo", input={"a": 1}), "developer-9")
    rec.attachments = (patch,)
    lab.core.add_local(rec, None, lab.now())
    lab.run(lab.core.take())
    lab.pump()
    lab.restart_policeman()
    lab.core.attach({rec.id: [patch]})  # what the broker loads for types with input attachments
    again = lab.core.tasks[rec.id]
    assert again.spill and again.attachments is None


def test_small_attachments_stay_in_memory_and_need_no_load() -> None:
    lab = Lab(inline_input_bytes=1024)
    rec = lab.core.new_local(TaskSpec(type="echo", input={"a": 1}), "developer-9")
    rec.attachments = (b"small",)
    lab.core.add_local(rec, None, lab.now())
    lab.run(lab.core.take())
    lab.pump()
    assert not rec.spill and rec.attachments == (b"small",)
    w = join(lab, "developer-1")
    lab.pump()
    assert w.blobs[rec.id] == (b"small",) and not lab.loads


def test_a_large_queued_input_stays_in_the_store_across_a_policeman_restart() -> None:
    lab = Lab(inline_input_bytes=1024)
    tid = one(lab, BIG)
    lab.pump()
    lab.restart_policeman()
    rec = lab.core.tasks[tid]
    assert rec.spill and not rec.input_loaded, "recovery does not load it"
    w = lab.add_worker("developer-1")
    lab.pump()
    assert w.runs[tid].input == BIG
