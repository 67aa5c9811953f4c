"""A TASK leaves while the commit of its assignment is in flight (``dispatch_before_commit``, SPEC 11):
the work overlaps the commit; a report about a task whose row is not committed yet waits for that
commit; a task Postgres refuses never reports DONE; a broker crash before the commit leaves no
run the store does not know of (the worker's run is cancelled when it registers again)."""

from __future__ import annotations

import uuid
from types import SimpleNamespace
from typing import Any

from casperd.broker import Broker
from casperd.lifecycle import Status
from casperd.messages import Command, Done, FailedBatch, ResultBatch, TaskSpec
from casperd.metrics import Metrics
from casperd.policeman.actions import Finished, Replay, Send, Socket
from casperd.settings import load_settings
from tests.support.corelab import Lab, LabWorker

S = Status


def _reports(lab: Lab) -> list[object]:
    """Every frame the workers sent, fed to the core; the actions it asked for."""
    out: list[object] = []
    while lab.to_police:
        route, frames = lab.to_police.popleft()
        lab.core.on_mesh(route, frames, lab.now())
        out += lab.core.take()
    return out


def _running_uncommitted(lab: Lab, wait: bool = False) -> tuple[LabWorker, uuid.UUID]:
    """One worker, one task submitted and dispatched, its TASK received: nothing committed yet."""
    w = lab.add_worker("developer-1")
    lab.pump()
    (tid,) = lab.submit(TaskSpec(type="echo", input={"x": 1}), wait=wait)
    lab.core.dispatch(lab.now())
    lab.run(lab.core.take())  # the TASK is in the worker's inbox
    w.receive()
    return w, tid


def _task_sends(actions: list[object]) -> list[Send]:
    return [a for a in actions if isinstance(a, Send) and a.socket is Socket.MESH and a.tasks]


def test_the_task_leaves_before_the_commit_and_accepted_after() -> None:
    lab = Lab()
    lab.add_worker("developer-1")
    lab.pump()
    (tid,) = lab.submit(TaskSpec(type="echo", input={"x": 1}), wait=True)
    lab.core.dispatch(lab.now())
    sends = _task_sends(lab.core.take())
    assert sends and not sends[0].after_commit, "the TASK does not wait for the commit"
    assert not lab.core.tasks[tid].persisted


def test_with_the_setting_off_the_task_waits_for_the_commit() -> None:
    lab = Lab(dispatch_before_commit=False)
    lab.add_worker("developer-1")
    lab.pump()
    lab.submit(TaskSpec(type="echo", input={"x": 1}))
    lab.core.dispatch(lab.now())
    sends = _task_sends(lab.core.take())
    assert sends and sends[0].after_commit


def test_a_result_that_beats_the_commit_waits_for_it_then_counts() -> None:
    lab = Lab()
    w, tid = _running_uncommitted(lab, wait=True)
    w.finish(tid, {"x": 1})
    out = _reports(lab)
    replays = [a for a in out if isinstance(a, Replay)]
    assert len(replays) == 1 and isinstance(replays[0].report, ResultBatch)
    assert lab.core.tasks[tid].status is S.PROCESSING, "nothing applied before the task's row is committed"
    lab.run(out)
    assert lab.control[b"ctl"] == []
    lab.commit()  # the task's row; then the report applies and its rows are staged
    assert [m.COMMAND for m in lab.control[b"ctl"]] == [Command.ACCEPTED]
    lab.commit()
    done = [m for m in lab.control[b"ctl"] if isinstance(m, Done)]
    assert len(done) == 1 and done[0].status == "complete" and done[0].output == {"x": 1}
    assert lab.history(tid)[-1] == ("processing", "complete", 1)


def test_a_failure_that_beats_the_commit_waits_too() -> None:
    lab = Lab()
    w, tid = _running_uncommitted(lab)
    w.fail(tid, "task", retryable=True)
    out = _reports(lab)
    assert [type(a.report) for a in out if isinstance(a, Replay)] == [FailedBatch]
    lab.run(out)
    lab.commit()
    lab.commit()
    assert lab.status(tid) is S.RETRY


def test_reports_of_committed_tasks_apply_at_once_beside_waiting_ones() -> None:
    lab = Lab()
    w = lab.add_worker("developer-1", capacity=2)
    lab.pump()
    (old,) = lab.submit(TaskSpec(type="echo", input={"n": 0}))
    lab.pump()  # committed and running
    (new,) = lab.submit(TaskSpec(type="echo", input={"n": 1}))
    lab.core.dispatch(lab.now())
    lab.run(lab.core.take())
    w.receive()
    for tid in (old, new):  # both outcomes in one RESULT
        w.core.succeeded(w.runs.pop(tid), {"ok": True}, 1.0, None)
        w.core.ended(tid)
    w.core.flush(lab.mono)
    w.carry_out()
    out = _reports(lab)
    (replay,) = [a for a in out if isinstance(a, Replay)]
    assert [r.task_id for r in replay.report.results] == [new]
    assert old not in lab.core.tasks, "the committed task's result applied at once"
    lab.run(out)
    lab.commit()
    lab.commit()
    assert lab.status(old) is S.COMPLETE and lab.status(new) is S.COMPLETE


def test_a_refused_task_never_reports_done() -> None:
    lab = Lab()
    w, tid = _running_uncommitted(lab, wait=True)
    w.finish(tid, {"x": 1})
    (replay,) = [a for a in _reports(lab) if isinstance(a, Replay)]
    lab.core.tasks[tid].rejected = "CheckViolation (SQLSTATE 23514)"  # as the writer marks it
    lab.core.replay(replay.node_id, replay.epoch, replay.report, replay.attachments, lab.now())
    assert lab.core.take() == [] and lab.core.tasks[tid].status is S.PROCESSING


def test_a_report_whose_sender_restarted_is_dropped() -> None:
    lab = Lab()
    w, tid = _running_uncommitted(lab)
    w.finish(tid, {"x": 1})
    (replay,) = [a for a in _reports(lab) if isinstance(a, Replay)]
    before = lab.core.metrics.duplicates._value.get()
    lab.core.replay(replay.node_id, "another-epoch", replay.report, (), lab.now())
    assert lab.core.take() == [] and lab.core.metrics.duplicates._value.get() == before + 1


def test_a_crash_before_the_commit_cancels_the_run_when_its_worker_registers_again() -> None:
    lab = Lab()
    w, tid = _running_uncommitted(lab, wait=True)
    assert tid in w.runs and b"ctl" not in lab.control, "running; its submitter heard nothing yet"
    lab.restart_policeman()  # the commit never happened
    assert tid not in lab.db
    assert tid in w.core.running
    w.connect()  # registers again, claiming the run
    lab.pump()
    assert tid not in w.runs and tid not in w.core.running, "the store does not know it: cancelled on the worker"
    assert tid not in lab.core.tasks and tid not in lab.db


# --- the shell: a TASK that may leave at once waits behind an earlier message to the same worker ------
class _Store:
    def __init__(self) -> None:
        self.first: list[Any] = []
        self.after: list[Any] = []
        self.on_reject: Any = None

        self.groups: dict[str, tuple[Any, list[Any]]] = {}

    def after_commit(self, fn: Any, *, first: bool = False) -> None:
        (self.first if first else self.after).append(fn)

    def after_commit_each(self, key: str, item: Any, fn: Any) -> None:
        self.groups.setdefault(key, (fn, []))[1].append(item)

    def commit(self) -> None:
        fns, self.first, self.after = [*self.first, *self.after], [], []
        groups, self.groups = self.groups, {}
        for fn in fns:
            fn()
        for each, items in groups.values():
            each(items)


def test_the_shell_keeps_a_workers_messages_in_order() -> None:
    store = _Store()
    broker = Broker(load_settings({"role": "policeman", "node_id": "policeman"}), store, Metrics())  # type: ignore[arg-type]
    sent: list[bytes] = []
    broker._send = lambda a: sent.append(a.frames[0])  # type: ignore[method-assign]
    tid = uuid.uuid4()
    w1, w2 = b"developer-1/e1", b"developer-2/e1"
    broker._send_action(Send(Socket.MESH, w1, [b"CANCEL run 1"], after_commit=True))
    broker._send_action(Send(Socket.MESH, w1, [b"TASK run 2"], False, (tid,), "developer-1"))
    broker._send_action(Send(Socket.MESH, w2, [b"TASK other"], False, (uuid.uuid4(),), "developer-2"))
    assert sent == [b"TASK other"], "a worker with nothing waiting gets its TASK at once"
    store.commit()
    assert sent == [b"TASK other", b"CANCEL run 1", b"TASK run 2"]
    broker._send_action(Send(Socket.MESH, w1, [b"TASK run 3"], False, (tid,), "developer-1"))
    assert sent[-1] == b"TASK run 3" and not broker._held, "nothing waits any more"


def test_the_shell_tells_the_finish_listeners_once_per_commit_each_failure_alone() -> None:
    store = _Store()
    broker = Broker(load_settings({"role": "policeman", "node_id": "policeman"}), store, Metrics())  # type: ignore[arg-type]
    seen: list[str] = []

    def broken(rec: Any) -> None:
        raise RuntimeError("a listener's bug")

    broker.finish_listeners += [broken, lambda rec: seen.append(rec.id)]
    for name in ("t1", "t2"):
        broker._finished(Finished(SimpleNamespace(id=name)))  # type: ignore[arg-type]
    assert seen == [] and len(store.groups["finished"][1]) == 2, "nothing before the commit, one group"
    store.commit()
    assert seen == ["t1", "t2"]
