"""PolicemanCore and WorkerCore driven together in memory (tests/support/corelab.py): no sockets,
no clock, no asyncio. Every row of the lifecycle table is reached through core events; leases,
renewals, hand-backs, refunds, stale results, re-registration and recovery after a restart."""

from __future__ import annotations

import itertools
import json
import sys
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

from casperd import codec
from casperd.errors import CasperError, IllegalTransitionError
from casperd.lifecycle import STEPS, Status, Trigger, replay
from casperd.messages import Cancel, Command, Done, TaskSpec, done_item
from casperd.policeman.actions import Send, Validate
from casperd.workercore import Run
from tests.support.corelab import Lab

S, T = Status, Trigger


def rows_of(history: list[tuple[str | None, str, int]]) -> set[tuple[Status, Trigger]]:
    """The table rows a history went through (matched by status change and attempt change)."""
    out: set[tuple[Status, Trigger]] = set()
    for (_, _, before), (frm, to, after) in itertools.pairwise(history):
        assert frm is not None
        matches = [key for key, row in STEPS.items() if key[0] == Status(frm) and row == (Status(to), after - before)]
        assert matches, f"{frm} -> {to} ({before} -> {after}) is no row"
        out.update(matches)
    return out


def one(lab: Lab, **spec: Any) -> uuid.UUID:
    (tid,) = lab.submit(TaskSpec(type=spec.pop("type", "echo"), **spec))
    return tid


def holder(lab: Lab, tid: uuid.UUID) -> str:
    rec = lab.core.tasks[tid]
    assert rec.assigned_to is not None
    return rec.assigned_to


# --- the happy path and the submitter's DONE ----------------------------------------------------------
def test_submit_run_complete_sends_one_done_after_the_commit() -> None:
    lab = Lab()
    w = lab.add_worker("developer-1")
    (tid,) = lab.submit(TaskSpec(type="echo", input={"x": 1}), wait=True)
    assert lab.control[b"ctl"] == [], "ACCEPTED waits for the commit"
    lab.pump()
    assert [m.COMMAND for m in lab.control[b"ctl"]] == [Command.ACCEPTED]
    assert list(w.runs) == [tid]
    w.finish(tid, {"x": 1})
    lab.pump()
    assert lab.status(tid) is S.COMPLETE
    assert lab.history(tid) == [
        (None, "pending", 0),
        ("pending", "assigned", 1),
        ("assigned", "processing", 1),
        ("processing", "complete", 1),
    ]
    done = [m for m in lab.control[b"ctl"] if isinstance(m, Done)]
    assert len(done) == 1 and done[0].status == "complete" and done[0].output == {"x": 1}
    assert tid not in lab.core.tasks and lab.finished == [tid]


def test_a_results_output_reaches_its_done_without_a_second_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """The DONE carries the output the RESULT brought (decoded from msgpack), not the stored JSON
    text decoded again; a submitted input reaches its TASK without being decoded either."""
    lab = Lab()
    w = lab.add_worker("developer-1")
    lab.pump()  # its READY is taken: the task is dispatched in the turn it is submitted
    spec = TaskSpec(type="echo", input={"in": [1, 2]})
    (tid,) = lab.submit(spec, wait=True)
    rec = lab.core.tasks[tid]
    assert rec.input_obj is spec.input, "the SUBMIT's decoded input, kept until the commit"
    decoded: list[str] = []
    real = json.loads

    def loads(text: str, *args: Any, **kwargs: Any) -> Any:
        if sys._getframe(1).f_globals["__name__"].startswith("casperd."):  # not the lab's store
            decoded.append(text)
        return real(text, *args, **kwargs)

    monkeypatch.setattr(json, "loads", loads)
    lab.pump()
    assert w.runs[tid].input == {"in": [1, 2]}
    output = {"out": [1.5, None, "é"], "n": {"k": -0.0}}
    w.finish(tid, output)
    lab.pump()
    done = [m for m in lab.control[b"ctl"] if isinstance(m, Done)]
    assert len(done) == 1 and done[0].status == "complete" and done[0].output == output
    assert rec.output_json is not None and real(rec.output_json) == output
    assert decoded == [], "neither the input nor the output was decoded from JSON"


def test_transitions_are_counted_once_the_event_is_taken() -> None:
    lab = Lab()
    w = lab.add_worker("developer-1")
    lab.pump()
    ids = lab.submit(*[TaskSpec(type="echo", input={"n": n}) for n in range(2)])
    lab.pump()
    for tid in ids:
        w.finish(tid, None)
    lab.pump()

    def counted(status: str) -> float | None:
        return lab.core.metrics.registry.get_sample_value("casper_task_transitions_total", {"to": status})

    assert [counted(s) for s in ("assigned", "processing", "complete")] == [2, 2, 2]
    assert counted("pending") == 0, "a new task's row is not a transition"
    lab.core.cancel(lab.submit(TaskSpec(type="echo"))[0], lab.now())
    assert counted("cancelled") == 0, "counted when the event's actions are taken"
    lab.run(lab.core.take())
    assert counted("cancelled") == 1


def test_tasks_that_end_together_reach_each_submitter_in_one_done() -> None:
    lab = Lab()
    w = lab.add_worker("developer-1", capacity=4)
    mine = lab.submit(*[TaskSpec(type="echo", input={"n": n}) for n in range(3)], wait=True)
    (theirs,) = lab.submit(TaskSpec(type="echo", input={"n": 3}), wait=True, route=b"other")
    lab.pump()
    assert sorted(w.runs) == sorted([*mine, theirs])
    before = dict(lab.control_messages)
    for tid in [*mine, theirs]:  # four results in one RESULT message
        w.core.succeeded(w.runs.pop(tid), {"ok": True}, 1.0, None)
        w.core.ended(tid)
    w.carry_out()
    lab.pump()
    assert lab.control_messages[b"ctl"] - before[b"ctl"] == 1
    assert lab.control_messages[b"other"] - before[b"other"] == 1
    assert sorted(m.task_id for m in lab.control[b"ctl"] if isinstance(m, Done)) == sorted(mine)
    assert [m.task_id for m in lab.control[b"other"] if isinstance(m, Done)] == [theirs]


def test_an_output_too_large_for_a_done_is_reported_without_it() -> None:
    # a RESULT that fits always makes a Done that fits; a local task's output need not
    lab = Lab(max_message_bytes=2048)
    small, big = uuid.uuid4(), uuid.uuid4()
    lab.core.done_to(b"ctl", done_item(small, "complete", {"n": 1}, None))
    lab.core.done_to(b"ctl", done_item(big, "complete", {"big": "x" * 3000}, None))
    sends = [a for a in lab.core.take() if isinstance(a, Send)]
    assert all(a.after_commit for a in sends)
    done = {d.task_id: d for a in sends for d in codec.decode(a.frames, max_bytes=2048).message.done}
    assert done[small].output == {"n": 1} and done[small].error is None
    assert done[big].output is None and done[big].error is not None and done[big].error.code == "too-large"


def test_credit_is_never_exceeded_and_the_queue_drains() -> None:
    lab = Lab()
    w = lab.add_worker("developer-1", capacity=2)
    ids = lab.submit(*[TaskSpec(type="echo", input={"n": n}) for n in range(7)])
    lab.pump()
    done = 0
    while w.runs:
        assert len(w.runs) <= 2
        w.finish(next(iter(w.runs)))
        lab.pump()
        done += 1
    assert done == 7 and all(lab.status(t) is S.COMPLETE for t in ids)
    assert w.max_running == 2


# --- failures, retries, exhaustion ----------------------------------------------------------------------
def test_a_retryable_failure_backs_off_then_runs_again_until_attempts_run_out() -> None:
    lab = Lab(max_attempts=2)
    w = lab.add_worker("developer-1")
    tid = one(lab)
    lab.pump()
    w.fail(tid)
    lab.pump()
    assert lab.status(tid) is S.RETRY and not w.runs
    lab.advance(0.5)
    assert lab.status(tid) is S.RETRY, "still backing off (1 s)"
    lab.advance(1.0)
    assert list(w.runs) == [tid] and w.runs[tid].attempt == 2
    w.fail(tid)
    lab.pump()
    assert lab.status(tid) is S.DEAD
    assert replay(tid, lab.history(tid)) == 2
    assert {(S.ERROR, T.BACKOFF), (S.RETRY, T.RETRY_DUE), (S.ERROR, T.EXHAUST)} <= rows_of(lab.history(tid))


def test_a_failure_that_is_not_retryable_is_dead_at_once() -> None:
    lab = Lab()
    w = lab.add_worker("developer-1")
    tid = one(lab)
    lab.pump()
    w.fail(tid, "bad-input", retryable=False)
    lab.pump()
    assert lab.status(tid) is S.DEAD and lab.db[tid].rec["attempts"] == 1


# --- leases -----------------------------------------------------------------------------------------------
def test_renewals_keep_a_long_task_past_its_lease() -> None:
    lab = Lab(lease_s=3.0)
    w = lab.add_worker("developer-1")
    tid = one(lab)
    lab.pump()
    lab.advance(12.0)
    assert lab.status(tid) is S.PROCESSING and holder(lab, tid) == "developer-1"
    w.finish(tid)
    lab.pump()
    assert lab.status(tid) is S.COMPLETE and lab.db[tid].rec["attempts"] == 1


def test_an_expired_lease_returns_the_task_and_the_late_result_is_stale() -> None:
    lab = Lab(lease_s=3.0)
    w1 = lab.add_worker("developer-1")
    tid = one(lab)
    lab.pump()
    w1.renew = False  # alive (heartbeats) but stuck on the task
    lab.core.set_draining("developer-1", True)  # so the task goes elsewhere
    w2 = lab.add_worker("developer-2")
    lab.advance(3.5)
    assert tid not in w1.runs, "the holder was told to cancel"
    assert list(w2.runs) == [tid] and w2.runs[tid].attempt == 2
    stale_before = lab.core.metrics.duplicates._value.get()
    # a late result from the first holder (attempt 1) changes nothing
    w1.runs[tid] = w2.runs[tid].model_copy(update={"attempt": 1})
    w1.finish(tid, "late")
    lab.pump()
    assert lab.status(tid) is S.PROCESSING
    assert lab.core.metrics.duplicates._value.get() == stale_before + 1
    w2.finish(tid, "on time")
    lab.pump()
    assert lab.status(tid) is S.COMPLETE and lab.db[tid].rec["output"] == "on time"
    assert sum(1 for e in lab.db[tid].events if e.to_status == "complete") == 1
    assert (S.PROCESSING, T.HOLDER_LOST) in rows_of(lab.history(tid))


# --- hand-backs and refunds ---------------------------------------------------------------------------------
def test_a_shutdown_hands_back_without_spending_an_attempt() -> None:
    lab = Lab()
    w1 = lab.add_worker("developer-1")
    tid = one(lab)
    lab.pump()
    w1.shut_down()
    lab.pump()
    assert lab.status(tid) is S.PENDING and lab.db[tid].rec["attempts"] == 0
    assert "developer-1" not in lab.core.peers
    w2 = lab.add_worker("developer-2")
    lab.pump()
    assert w2.runs[tid].attempt == 1, "the refunded attempt is used again"
    assert (S.PROCESSING, T.HAND_BACK) in rows_of(lab.history(tid))


def test_an_undelivered_task_goes_back_without_spending_an_attempt() -> None:
    lab = Lab(breaker_failures=1)  # the failed send opens the peer's breaker: no retry storm
    w = lab.add_worker("developer-1")
    lab.pump()
    w.up = False  # registered, but its link is gone: the TASK cannot be sent
    tid = one(lab)
    lab.pump()
    assert "developer-1" in lab.core.peers
    assert lab.status(tid) is S.PENDING and lab.db[tid].rec["attempts"] == 0
    assert (S.ASSIGNED, T.UNDELIVERED) in rows_of(lab.history(tid))


# --- registration -------------------------------------------------------------------------------------------
def test_re_registration_with_a_new_epoch_returns_the_old_epochs_tasks() -> None:
    lab = Lab()
    w = lab.add_worker("developer-1")
    tid = one(lab)
    lab.pump()
    w.up = False
    w2 = lab.add_worker("developer-1")  # the same node, restarted: a new epoch, nothing held
    lab.pump()
    assert w2.epoch != w.epoch
    assert list(w2.runs) == [tid] and w2.runs[tid].attempt == 2, "the lost attempt stays counted"
    assert lab.core.peers["developer-1"].epoch == w2.epoch


def test_a_ready_from_another_routing_id_is_refused() -> None:
    lab = Lab()
    w = lab.add_worker("developer-1")
    lab.pump()
    frames = lab.to_police  # nothing pending
    assert not frames
    w.route = b"developer-1/forged"
    w.connect()
    lab.pump()
    assert lab.core.peers["developer-1"].epoch == w.epoch  # unchanged: the real registration
    assert lab.core.by_route.get(b"developer-1/forged") is None


def test_frames_from_an_unknown_peer_ask_it_to_register() -> None:
    lab = Lab()
    w = lab.add_worker("developer-1")
    lab.pump()
    lab.core.drop_peer(lab.core.peers["developer-1"], "forgotten", lab.now())
    w.tick()
    lab.advance(1.0)
    assert "developer-1" in lab.core.peers, "unknown-peer made it send READY again"


# --- recovery after a policeman restart ---------------------------------------------------------------------
def test_after_a_restart_holders_reconcile_and_lost_holders_time_out() -> None:
    lab = Lab()
    w1 = lab.add_worker("developer-1", capacity=1)
    w2 = lab.add_worker("developer-2", capacity=1)
    a, b, c = lab.submit(*[TaskSpec(type="echo", input={"n": n}) for n in range(3)])
    lab.pump()
    on1, on2 = next(iter(w1.runs)), next(iter(w2.runs))
    queued = ({a, b, c} - {on1, on2}).pop()
    w2.up = False  # dies with the policeman and never comes back
    lab.restart_policeman()
    lab.advance(1.0)  # developer-1's next frame is refused: it registers again with what it holds
    assert lab.core.peers["developer-1"].held == {on1}
    assert lab.status(on2) is S.PROCESSING, "within the grace period its holder may still come back"
    lab.advance(7.0)  # grace: 2 x heartbeat x misses
    assert lab.status(on2) is not S.PROCESSING
    assert replay(on2, lab.history(on2)) == 1
    while w1.runs:
        w1.finish(next(iter(w1.runs)))
        lab.pump()
        lab.advance(0.5)
    assert all(lab.status(t) is S.COMPLETE for t in (a, b, c)), [lab.status(t) for t in (a, b, c)]
    assert queued in lab.db


def test_a_claimed_task_the_policeman_does_not_know_is_cancelled_on_the_peer() -> None:
    lab = Lab()
    w = lab.add_worker("developer-1")
    lab.pump()
    ghost = uuid.uuid4()
    w.core.running[ghost] = Run(attempt=1, started=lab.mono)  # it believes it holds a task
    w.connect()
    lab.pump()
    assert ghost not in lab.core.peers["developer-1"].held
    assert w.core.running[ghost].cancelled_by_broker, "READY's unknown task was cancelled on the peer"


# --- validation ---------------------------------------------------------------------------------------------
def _with_validator(lab: Lab) -> None:
    async def check(*_a: Any) -> str | None:
        return None

    lab.catalog.add_validator("echo", check)


def test_asynchronous_validation_passes_or_fails_the_result() -> None:
    lab = Lab(max_attempts=1)
    _with_validator(lab)
    w = lab.add_worker("developer-1")
    good, bad = lab.submit(TaskSpec(type="echo", input={"n": 1}), TaskSpec(type="echo", input={"n": 2}))
    lab.pump()
    for tid in (good, bad):
        w.finish(tid, "patch")
    lab.pump()
    assert lab.status(good) is S.VALIDATING and len(lab.validations) == 2
    assert all(isinstance(v, Validate) for v in lab.validations)
    lab.core.validated(good, "developer-1", None, lab.now())
    lab.core.validated(bad, "developer-1", "syntax error", lab.now())
    lab.run(lab.core.take())
    lab.pump()
    assert lab.status(good) is S.COMPLETE and lab.status(bad) is S.DEAD
    assert (S.VALIDATING, T.FAIL) in rows_of(lab.history(bad))


def test_shell_results_are_validated_only_when_the_input_asks() -> None:
    lab = Lab(max_attempts=1)
    w = lab.add_worker("developer-1", capacity=3, caps=("shell",))
    ok, wrong, free = lab.submit(
        TaskSpec(type="shell", input={"cmd": "true", "expect_exit": 0}),
        TaskSpec(type="shell", input={"cmd": "false", "expect_exit": 0}),
        TaskSpec(type="shell", input={"cmd": "false"}),
    )
    lab.pump()
    w.finish(ok, {"exit_code": 0})
    w.finish(wrong, {"exit_code": 1})
    w.finish(free, {"exit_code": 1})
    lab.pump()
    assert [lab.status(t) for t in (ok, wrong, free)] == [S.COMPLETE, S.DEAD, S.COMPLETE]
    assert (S.PROCESSING, T.VALIDATE) in rows_of(lab.history(ok))
    assert (S.PROCESSING, T.COMPLETE) in rows_of(lab.history(free))


def test_an_attached_result_is_stored_first_and_a_storage_failure_costs_the_attempt() -> None:
    lab = Lab()
    w = lab.add_worker("developer-1")
    ok, lost = lab.submit(TaskSpec(type="echo", input={"n": 1}), TaskSpec(type="echo", input={"n": 2}))
    lab.pump()
    w.finish_attached(ok, {"patch": 0}, (b"diff --git a b",))
    w.finish_attached(lost, {"patch": 0}, (b"diff --git c d",))
    lab.pump()
    assert [s.attachments for s in lab.saves] == [(b"diff --git a b",), (b"diff --git c d",)]
    assert lab.status(ok) is S.PROCESSING, "nothing changes before the attachments are stored"
    first, second = lab.saves
    lab.core.attachments_saved(first.node_id, first.result, first.attachments, None, lab.now())
    lab.core.attachments_saved(second.node_id, second.result, second.attachments, "disk full", lab.now())
    lab.run(lab.core.take())
    lab.pump()
    assert lab.status(ok) is S.COMPLETE
    assert lab.status(lost) is S.RETRY and lab.db[lost].rec["error"][-1]["code"] == "storage"


# --- cancel -------------------------------------------------------------------------------------------------
def test_cancel_of_a_running_task_tells_its_holder_after_the_commit() -> None:
    lab = Lab()
    w = lab.add_worker("developer-1")
    tid = one(lab)
    lab.pump()
    lab.core.cancel(tid, lab.now())
    lab.run(lab.core.take())
    assert tid in w.runs, "the CANCEL waits for the commit"
    lab.pump()
    assert tid not in w.runs and lab.status(tid) is S.CANCELLED
    assert lab.core.peers["developer-1"].slot.inflight == 0
    with pytest.raises(CasperError):
        lab.core.cancel(tid, lab.now())


# --- every row of the table, reached through events -----------------------------------------------------------
def _row_pending_dispatch_cancel(lab: Lab) -> list[uuid.UUID]:
    tid = one(lab)
    lab.core.cancel(tid, lab.now())
    lab.run(lab.core.take())
    lab.pump()
    w = lab.add_worker("developer-1")
    t2 = one(lab)
    lab.pump()
    w.finish(t2)
    lab.pump()
    return [tid, t2]


def _row_assigned_fail_and_cancel(lab: Lab) -> list[uuid.UUID]:
    w = lab.add_worker("developer-1", capacity=3)
    w.auto_slot = False  # runs stay queued: the tasks stay ``assigned``
    a, b, c = lab.submit(*[TaskSpec(type="echo", input={"n": n}) for n in range(3)])
    lab.pump()
    w.fail(a)
    lab.core.cancel(b, lab.now())
    lab.run(lab.core.take())
    w.finish(c)  # a result straight from assigned: started, then complete
    lab.pump()
    return [a, b, c]


def _row_assigned_hand_back(lab: Lab) -> list[uuid.UUID]:
    w = lab.add_worker("developer-1")
    tid = one(lab)
    lab.core.dispatch(lab.now())
    lab.run(lab.core.take())
    lab.commit()
    w.core.set_draining(True, lab.mono)  # it started draining while the TASK was on its way
    w.receive()
    lab.pump()
    return [tid]


def _row_assigned_holder_lost(lab: Lab) -> list[uuid.UUID]:
    w = lab.add_worker("developer-1")
    w.auto_slot = False
    tid = one(lab)
    lab.pump()
    w.up = False
    lab.advance(4.0)
    return [tid]


def _row_processing_fail_cancel_hand_back(lab: Lab) -> list[uuid.UUID]:
    w = lab.add_worker("developer-1", capacity=3)
    a, b, c = lab.submit(*[TaskSpec(type="echo", input={"n": n}) for n in range(3)])
    lab.pump()
    w.fail(a)
    lab.core.cancel(b, lab.now())
    lab.run(lab.core.take())
    lab.pump()
    w.shut_down()
    lab.pump()
    return [a, b, c]


def _row_processing_holder_lost(lab: Lab) -> list[uuid.UUID]:
    w = lab.add_worker("developer-1")
    tid = one(lab)
    lab.pump()
    w.up = False
    lab.advance(4.0)
    return [tid]


def _row_undelivered(lab: Lab) -> list[uuid.UUID]:
    lab.core.s.breaker_failures = 1
    w = lab.add_worker("developer-1")
    w.up = False
    tid = one(lab)
    lab.pump()
    return [tid]


def _row_validating(lab: Lab) -> list[uuid.UUID]:
    _with_validator(lab)
    w = lab.add_worker("developer-1", capacity=3)
    a, b, c = lab.submit(*[TaskSpec(type="echo", input={"n": n}) for n in range(3)])
    lab.pump()
    for t in (a, b, c):
        w.finish(t)
    lab.pump()
    lab.core.validated(a, "developer-1", None, lab.now())
    lab.core.validated(b, "developer-1", "rejected", lab.now())
    lab.core.cancel(c, lab.now())
    lab.run(lab.core.take())
    lab.pump()
    return [a, b, c]


def _row_retry(lab: Lab) -> list[uuid.UUID]:
    lab2 = lab
    w = lab2.add_worker("developer-1", capacity=2)
    a, b = lab2.submit(TaskSpec(type="echo", max_attempts=2), TaskSpec(type="echo", max_attempts=1))
    lab2.pump()
    w.fail(a)
    w.fail(b)
    lab2.pump()
    lab2.advance(1.5)
    lab2.core.cancel(a, lab2.now())
    lab2.run(lab2.core.take())
    lab2.pump()
    c = one(lab2, max_attempts=2)
    lab2.pump()
    w.fail(c)
    lab2.pump()
    lab2.core.cancel(c, lab2.now())
    lab2.run(lab2.core.take())
    lab2.pump()
    return [a, b, c]


SCENARIOS: list[Callable[[Lab], list[uuid.UUID]]] = [
    _row_pending_dispatch_cancel,
    _row_assigned_fail_and_cancel,
    _row_assigned_hand_back,
    _row_assigned_holder_lost,
    _row_processing_fail_cancel_hand_back,
    _row_processing_holder_lost,
    _row_undelivered,
    _row_validating,
    _row_retry,
]


def test_every_row_of_the_lifecycle_table_is_reached_through_core_events() -> None:
    seen: set[tuple[Status, Trigger]] = set()
    for scenario in SCENARIOS:
        lab = Lab()
        for tid in scenario(lab):
            history = lab.history(tid)
            replay(tid, history)
            seen |= rows_of(history)
    missing = set(STEPS) - seen
    assert not missing, f"rows never reached: {sorted((s.value, t.value) for s, t in missing)}"


def test_replay_refuses_a_history_that_is_no_path_through_the_table() -> None:
    tid = uuid.uuid4()
    with pytest.raises(IllegalTransitionError):
        replay(tid, [(None, "pending", 0), ("pending", "assigned", 2)])  # two attempts at once
    with pytest.raises(IllegalTransitionError):
        replay(tid, [(None, "pending", 0), ("pending", "assigned", 1), ("processing", "complete", 1)])
    with pytest.raises(IllegalTransitionError):
        replay(tid, [(None, "pending", 0), ("pending", "complete", 0)])


# --- the authorization hook -----------------------------------------------------------------------------------
def test_the_authorization_hook_runs_before_any_handler() -> None:
    calls: list[tuple[str, Command, str | None]] = []

    class Refused(CasperError):
        code = "forbidden"

    def deny_results(role: str, command: Command, *, service: str | None = None, task_type: str | None = None) -> None:
        calls.append((role, command, service or task_type))
        if command in (Command.RESULT, Command.REQUEST) or task_type == "shell":
            raise Refused(f"{role} may not send {command.name}", hint="see the trust table")

    lab = Lab()
    lab.core = lab.new_core(authorize=deny_results)
    w = lab.add_worker("developer-1")
    tid = one(lab)
    lab.pump()
    assert ("developer", Command.READY, None) in calls
    w.finish(tid, "forged")
    lab.pump()
    assert lab.status(tid) is S.PROCESSING, "the refused RESULT changed nothing"
    assert ("developer", Command.RESULT, None) in calls
    errors = [m for m in (lab.core.metrics.rejected.labels("forbidden")._value.get(),)]
    assert errors == [1.0]
    with pytest.raises(Refused):
        lab.submit(TaskSpec(type="shell", input={"cmd": "id"}))
    assert ("control", Command.SUBMIT, "shell") in calls
    assert not lab.staged, "nothing was created"
    _ = Cancel


def test_a_result_without_progress_dates_the_start_back_by_its_duration() -> None:
    lab = Lab()
    w = lab.add_worker("developer-1")
    w.auto_slot = False  # no PROGRESS: the RESULT finds the task assigned
    lab.pump()
    (tid,) = lab.submit(TaskSpec(type="echo"))
    lab.pump()
    rec = lab.core.tasks[tid]
    assert rec.status is S.ASSIGNED
    w.finish(tid, {"ok": True})
    lab.pump()
    assert rec.status is S.COMPLETE and rec.started_at is not None and rec.finished_at is not None
    assert rec.finished_at - rec.started_at == timedelta(milliseconds=1.0)  # the lab worker's duration
