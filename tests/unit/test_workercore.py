"""WorkerCore alone: frames in, actions out, with the time and the randomness passed in."""

from __future__ import annotations

import itertools
import uuid

from casperd import codec
from casperd.messages import (
    RENEW,
    Assignment,
    Cancel,
    Error,
    FailedBatch,
    Heartbeat,
    Progress,
    Ready,
    ResultBatch,
    TaskBatch,
)
from casperd.metrics import Metrics
from casperd.settings import load_settings
from casperd.workercore import AbortRun, Identity, ReadyLater, Reconnect, Run, SendFrames, StartRun, WorkerCore


def core(**overrides: object) -> WorkerCore:
    s = load_settings({"role": "developer", "node_id": "developer-1", "capacity": 2, "prefetch": 0, **overrides})
    return WorkerCore(s, Identity("e1", 7, "lab", "0.1.0", None), Metrics(), lambda: 0.5, 100.0)


def sent(c: WorkerCore) -> list[object]:
    return [codec.decode(a.frames).message for a in c.take() if isinstance(a, SendFrames)]


def task(tid: uuid.UUID, attempt: int = 1, lease_ms: int = 30_000) -> Assignment:
    return Assignment(task_id=tid, type="echo", input={}, attempt=attempt, lease_ms=lease_ms)


def deliver(c: WorkerCore, *assignments: Assignment, now: float = 100.0) -> None:
    c.on_frames(codec.encode(TaskBatch(tasks=assignments)), now)


def test_connect_sends_ready_with_the_tasks_it_holds() -> None:
    c = core()
    c.running[uuid.uuid4()] = Run(1, 0.0)
    c.connected(100.0)
    (ready,) = sent(c)
    assert isinstance(ready, Ready) and ready.epoch == "e1" and ready.capacity == 2
    assert set(ready.tasks) == set(c.running)


def test_a_duplicate_is_ignored_and_a_newer_attempt_renumbers_the_run() -> None:
    c = core()
    tid = uuid.uuid4()
    deliver(c, task(tid))
    assert [type(a) for a in c.take()] == [StartRun]
    deliver(c, task(tid))
    assert c.take() == []
    deliver(c, task(tid, attempt=2))
    assert c.take() == [] and c.running[tid].attempt == 2
    c.in_slot(tid)
    c.succeeded(task(tid), {"ok": 1}, 5.0, None)
    c.ended(tid)
    c.flush(101.0)
    msgs = sent(c)
    results = [m for m in msgs if isinstance(m, ResultBatch)]
    assert results and results[0].results[0].attempt == 2, "reported under the newest attempt"


def test_while_draining_a_task_is_handed_back_unrun() -> None:
    c = core()
    c.set_draining(True, 100.0)
    c.take()
    tid = uuid.uuid4()
    deliver(c, task(tid))
    assert not any(isinstance(a, StartRun) for a in c.take())
    c.flush(100.0)
    (failed,) = sent(c)
    assert isinstance(failed, FailedBatch) and failed.failures[0].error.code == "draining"


def test_a_cancel_aborts_and_the_new_attempt_waits_for_it() -> None:
    c = core()
    tid = uuid.uuid4()
    deliver(c, task(tid))
    c.take()
    c.on_frames(codec.encode(Cancel(task_ids=(tid,), reason="lease expired")), 100.0)
    assert c.take() == [AbortRun(tid)]
    deliver(c, task(tid, attempt=2))
    (start,) = c.take()
    assert isinstance(start, StartRun) and start.after
    c.interrupted(task(tid))
    c.ended(tid)
    c.flush(100.0)
    assert not [m for m in sent(c) if isinstance(m, FailedBatch)], "a cancelled run is not reported"


def test_a_run_interrupted_by_shutdown_is_handed_back() -> None:
    c = core()
    tid = uuid.uuid4()
    deliver(c, task(tid))
    c.take()
    c.interrupted(task(tid))
    c.ended(tid)
    c.flush(100.0)
    (failed,) = [m for m in sent(c) if isinstance(m, FailedBatch)]
    assert failed.failures[0].error.code == "handed-back" and failed.failures[0].retryable


def test_progress_once_per_run_then_renewals_every_third_of_the_lease() -> None:
    c = core(heartbeat_s=100.0)
    tid = uuid.uuid4()
    deliver(c, task(tid, lease_ms=3000))
    c.take()
    c.in_slot(tid)
    c.flush(100.0)
    (p,) = sent(c)
    assert isinstance(p, Progress) and p.task_ids == (tid,) and p.note != RENEW
    c.flush(100.1)
    assert sent(c) == []
    renewals = []
    for step in range(1, 13):
        c.on_frames(codec.encode(Heartbeat()), 100.0 + step * 0.25)
        c.tick(100.0 + step * 0.25, False)
        renewals += [m for m in sent(c) if isinstance(m, Progress) and m.note == RENEW]
    assert len(renewals) == 3, "a 3 s lease renewed every 1 s over 3 s"


def test_a_silent_policeman_means_reconnect_with_doubling_backoff() -> None:
    c = core(heartbeat_s=1.0, heartbeat_misses=3)
    c.connected(100.0)
    c.take()
    times = []
    for step in range(1, 200):
        now = 100.0 + step * 0.25
        c.tick(now, False)
        acts = c.take()
        if any(isinstance(a, Reconnect) for a in acts):
            times.append(now)
            assert isinstance(codec.decode(acts[1].frames).message, Ready)  # type: ignore[union-attr]
    gaps = [round(b - a, 2) for a, b in itertools.pairwise(times)]
    assert gaps[:4] == [0.75, 1.5, 3.0, 6.0], gaps  # 2^(n-1) s x jitter (0.5 + 0.5 x rng 0.5)


def test_waiting_input_is_never_mistaken_for_silence() -> None:
    c = core()
    c.tick(200.0, True)
    assert not any(isinstance(a, Reconnect) for a in c.take())


def test_unknown_peer_asks_for_one_delayed_ready() -> None:
    c = core(heartbeat_s=1.0)
    err = codec.encode(Error(code="unknown-peer", message="send READY first"))
    c.on_frames(err, 100.0)
    c.on_frames(err, 100.1)
    (later,) = c.take()
    assert later == ReadyLater(0.25)
    c.ready_due(100.3)
    (ready,) = sent(c)
    assert isinstance(ready, Ready)


def test_an_attached_result_too_large_for_a_message_fails_as_too_large() -> None:
    c = core(max_message_bytes=4096)
    tid = uuid.uuid4()
    deliver(c, task(tid))
    c.take()
    assert not c.succeeded(task(tid), {"patch": 0}, 1.0, (b"x" * 10_000,))
    c.ended(tid)
    c.flush(100.0)
    (failed,) = [m for m in sent(c) if isinstance(m, FailedBatch)]
    assert failed.failures[0].error.code == "too-large" and not failed.failures[0].retryable
