"""Tasks and their holders: progress, results, failures, validation, and the state changes they cause.

A report counts only from the peer that holds the task now (``held``); anything else is stale and
dropped (counted). Every status change goes through :meth:`CoreState.change` with a
:class:`~casperd.lifecycle.Trigger`: a clean hand-back and an undelivered TASK are triggers whose
table rows refund the attempt.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta
from typing import Any

from casperd.errors import DrainingError, HandedBackError, HolderLostError, InvalidOutputError, ValidationFailedError
from casperd.lifecycle import ACTIVE, Status, Trigger
from casperd.messages import RENEW, WIRE_MESSAGE_MAX, ErrorBody, FailedBatch, Progress, ResultBatch, done_item
from casperd.policeman.actions import Finished, Now, RunLocal, Validate
from casperd.policeman.state import CoreState, Peer, log
from casperd.taskrecord import TaskRecord, to_json

HANDED_BACK = frozenset({HandedBackError.code, DrainingError.code})
"""Failure codes that mean "given back unrun": no attempt spent (Trigger.HAND_BACK)."""
_UNDECODED: Any = object()
_MS = timedelta(milliseconds=1)


class TaskRules(CoreState):
    def held(self, peer: Peer, tid: uuid.UUID, attempt: int | None) -> TaskRecord | None:
        """The task if ``peer`` holds it now (an older attempt from the same holder is the same work:
        the new TASK may never have reached it); None for a stale or foreign report."""
        rec = self.tasks.get(tid)
        if (
            rec is None
            or rec.assigned_to != peer.node_id
            or rec.status not in ACTIVE
            or (attempt is not None and attempt > rec.attempts)
        ):
            self.metrics.duplicates.inc()
            log.debug("ignoring stale report for %s from %s", tid, peer.node_id)
            return None
        return rec

    def on_progress(self, peer: Peer, msg: Progress, now: Now) -> None:
        renewal = msg.note == RENEW
        until = now.mono + self.s.lease_s
        for tid in msg.task_ids:
            rec = self.held(peer, tid, None)
            if rec is None:
                continue
            self.leases[tid] = until
            if not renewal and rec.status is Status.ASSIGNED:
                self.change(rec, Trigger.START, now.wall, peer.node_id)
                rec.started_at = now.wall

    def on_results(self, peer: Peer, msg: ResultBatch, now: Now, attachments: tuple[bytes, ...] = ()) -> None:
        stamp = now.wall
        for out in msg.results:
            rec = self.held(peer, out.task_id, out.attempt)
            if rec is None or not self._take_output(peer, rec, out, stamp):
                continue
            ttype = self.catalog.find(rec.type)
            if self.catalog.validator(rec.type) is not None:
                self.change(rec, Trigger.VALIDATE, stamp, peer.node_id)
                rec.validating_at = stamp
                self.validating.add(rec.id)
                self.out.append(Validate(rec, peer.node_id, out.output, attachments))
                continue
            if ttype is not None and ttype.validate is not None and ttype.needs_validation(rec.input):
                self.change(rec, Trigger.VALIDATE, stamp, peer.node_id)
                rec.validating_at = stamp
                assert ttype.validate is not None
                problem = ttype.validate(rec.input, out.output)
                if problem is not None:
                    self.fail(rec, stamp, peer.node_id, ValidationFailedError.code, problem, True)
                    continue
            self.finish(rec, Trigger.COMPLETE, stamp, peer.node_id, output=out.output)

    def validated(self, tid: uuid.UUID, peer: str, problem: str | None, now: Now) -> None:
        """The asynchronous validation of a result ended (``problem`` None: it passed)."""
        self.validating.discard(tid)
        rec = self.tasks.get(tid)
        if rec is None or rec.status is not Status.VALIDATING:
            return  # cancelled meanwhile
        if problem is not None:
            self.fail(rec, now.wall, peer, ValidationFailedError.code, problem, True)
        else:
            self.finish(rec, Trigger.COMPLETE, now.wall, peer)
        self.dirty = True

    def attachments_lost(self, peer: Peer, tid: uuid.UUID, attempt: int, message: str, now: Now) -> None:
        """The attachments of an attached result could not be stored: the attempt failed (retryable)."""
        rec = self.held(peer, tid, attempt)
        if rec is not None:
            self.release(peer, rec)
            self.fail(rec, now.wall, peer.node_id, "storage", message, True)

    def _take_output(self, peer: Peer, rec: TaskRecord, out: Any, stamp: datetime) -> bool:
        """A holder's result arrived: release the task and keep its output (False: not storable)."""
        if rec.status is Status.ASSIGNED:
            self.change(rec, Trigger.START, stamp, peer.node_id)
            rec.started_at = stamp - _MS * out.duration_ms  # timedelta(milliseconds=...) costs twice as much
        self.release(peer, rec)
        peer.slot.breaker.record_success()
        try:
            rec.output_json = to_json(out.output)
        except ValueError as exc:
            self.fail(rec, stamp, peer.node_id, InvalidOutputError.code, f"task output {exc}", False)
            return False
        return True

    def on_failures(self, peer: Peer, msg: FailedBatch, now: Now) -> None:
        for f in msg.failures:
            rec = self.held(peer, f.task_id, f.attempt)
            if rec is None:
                continue
            self.release(peer, rec)
            if f.error.code in HANDED_BACK:
                # a clean hand-back (shutdown, draining) is not a failure: it costs no attempt,
                # and a half-open breaker's probe slot is free again
                peer.slot.breaker.release_probe()
                self.requeue(rec, now.wall, f"{f.error.code} by {peer.node_id}", Trigger.HAND_BACK)
                continue
            peer.slot.breaker.record_failure(now.mono)
            self.fail(rec, now.wall, peer.node_id, f.error.code, f.error.message, f.retryable)

    def release(self, peer: Peer, rec: TaskRecord) -> None:
        self.leases.pop(rec.id, None)
        if rec.id in peer.held:
            peer.held.discard(rec.id)
            peer.slot.inflight -= 1
            self.dirty = True

    # --- state changes --------------------------------------------------------------------------
    def finish(
        self,
        rec: TaskRecord,
        trigger: Trigger,
        stamp: datetime,
        peer: str | None,
        detail: dict[str, Any] | None = None,
        output: Any = _UNDECODED,
    ) -> None:
        """``output``: the decoded output ``rec.output_json`` was just made from (a result's, which
        JSON gives back unchanged once :func:`to_json` took it), so a waiter's DONE need not decode
        it again; by default it is decoded from ``rec.output_json``."""
        self.change(rec, trigger, stamp, peer, detail)
        rec.finished_at = stamp
        if self.tasks.pop(rec.id, None) is not None:
            self.quotas.closed(rec.submitted_by or "")
        self.leases.pop(rec.id, None)
        self.validating.discard(rec.id)
        self.dispatcher.remove(rec.id)
        self.out.append(Finished(rec))
        if rec.waiters:
            waiters = rec.take_waiters()
            last = last_error(rec)
            item = done_item(
                rec.id,
                rec.status.value,
                output if output is not _UNDECODED else (json.loads(rec.output_json) if rec.output_json else None),
                last.model_dump() if last else None,
            )
            for w in waiters:
                self.done_to(w, item)

    def fail(
        self, rec: TaskRecord, stamp: datetime, peer: str | None, code: str, message: str, retryable: bool
    ) -> None:
        history = json.loads(rec.error_json) if rec.error_json else []
        history.append(
            {"attempt": rec.attempts, "peer": peer, "code": code, "message": message[:2000], "at": stamp.isoformat()}
        )
        rec.error_json = json.dumps(history)
        self.change(rec, Trigger.FAIL, stamp, peer, {"code": code})
        self.after_error(rec, stamp, peer, retryable)

    def after_error(self, rec: TaskRecord, stamp: datetime, peer: str | None, retryable: bool = True) -> None:
        policy = self.policy_for(rec.type)
        if retryable and not policy.exhausted(rec.attempts, rec.max_attempts):
            delay = policy.backoff(rec.attempts)
            rec.not_before = stamp + timedelta(seconds=delay)
            rec.assigned_to = None
            self.change(rec, Trigger.BACKOFF, stamp, peer, {"backoff_s": delay})
            self.arm_retry(self.clock + delay, rec.id)
        else:
            why = "attempts exhausted" if retryable else "not retryable"
            self.finish(rec, Trigger.EXHAUST, stamp, peer, {"reason": why})

    def requeue(self, rec: TaskRecord, stamp: datetime, reason: str, trigger: Trigger = Trigger.HOLDER_LOST) -> None:
        """The holder let go of the task: back to pending by the trigger's row (HOLDER_LOST keeps the
        attempt counted, HAND_BACK and UNDELIVERED refund it), or dead if no attempt is left."""
        holder = rec.assigned_to
        self.leases.pop(rec.id, None)
        refund = trigger is not Trigger.HOLDER_LOST
        if not refund and self.policy_for(rec.type).exhausted(rec.attempts, rec.max_attempts):
            self.fail(rec, stamp, holder, HolderLostError.code, reason, False)
            return
        rec.assigned_to = None
        rec.lease_deadline = None
        self.change(rec, trigger, stamp, holder, {"reason": reason})
        self.queue(rec)

    def queue(self, rec: TaskRecord) -> None:
        if self.is_local(rec.type):
            self.out.append(RunLocal(rec))
            return
        if rec.persisted:  # while it waits: no decoded input; a spilled one only in Postgres
            rec.drop_input()  # (a new row's decoded input stays until the commit, when it is dispatched at once)
        self.dispatcher.push(rec.id, rec.priority, self.requirements(rec), rec.affinity)
        self.dirty = True


def last_error(rec: TaskRecord) -> ErrorBody | None:
    if not rec.error_json:
        return None
    history = json.loads(rec.error_json)
    if not history:
        return None
    last = history[-1]
    return ErrorBody(code=str(last.get("code") or "task")[:64], message=str(last.get("message", ""))[:WIRE_MESSAGE_MAX])
