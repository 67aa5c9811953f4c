"""Submissions and the operator's task actions: SUBMIT, the policeman's own tasks (a job's subtasks,
a hand-off), cancel, retry, and local tasks run on the policeman itself.

The shell looks idempotency keys up in the store first (I/O) and passes what it found; the core
decides everything else. ACCEPTED leaves after the commit of the rows it announces.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

from casperd import admission, authz, codec
from casperd.errors import CasperError, InvalidBodyError, TaskNotFoundError
from casperd.lifecycle import ACTIVE, Status, Trigger
from casperd.liveness import Liveness
from casperd.messages import Accepted, Cancel, Submit, TaskSpec
from casperd.policeman.actions import DoneFromStore, Now, Send, Socket
from casperd.policeman.assign import AssignRules
from casperd.taskrecord import TaskRecord, to_json


class SubmissionRules(AssignRules):
    def unknown_keys(self, specs: tuple[TaskSpec, ...] | list[TaskSpec]) -> list[str]:
        """Idempotency keys the shell must look up in the store before :meth:`submit`."""
        return [s.idempotency_key for s in specs if s.idempotency_key and s.idempotency_key not in self.keys]

    def submit(
        self, route: bytes, msg: Submit, submitter: str | None, found: dict[str, uuid.UUID], now: Now
    ) -> list[uuid.UUID]:
        """Create tasks (or find them by idempotency key); ACCEPTED goes out after the commit."""
        self.clock = now.mono
        if not self.accepting:
            raise CasperError(
                "the policeman is shutting down and accepts no new work", hint="submit again once it is back"
            )
        admission.check_specs(msg.tasks, self.catalog)  # types and input schemas: all refused, nothing half-done
        for spec in msg.tasks:
            if spec.type == "job":
                authz.check_job_limits(spec.input if isinstance(spec.input, dict) else {})
        for known, tid in found.items():
            self.remember_key(known, tid)
        fresh = sum(1 for spec in msg.tasks if not (spec.idempotency_key and spec.idempotency_key in self.keys))
        self.quotas.check_open(submitter or "", fresh, len(self.tasks))  # overloaded: caspectl waits, retries
        inputs: list[str] = []
        for n, spec in enumerate(msg.tasks):
            try:
                inputs.append(to_json(spec.input))  # all checked before anything is created
            except ValueError as exc:
                raise InvalidBodyError(f"task {n}: input {exc}", hint="inputs must be plain JSON objects") from None
        ids: list[uuid.UUID] = []
        existing: list[bool] = []
        terminal_waits: list[uuid.UUID] = []
        for spec, input_json in zip(msg.tasks, inputs, strict=True):
            key = spec.idempotency_key
            if key and key in self.keys:
                tid = self.keys[key]
                ids.append(tid)
                existing.append(True)
                if msg.wait:
                    rec = self.tasks.get(tid)
                    if rec is not None:
                        rec.wait(route)
                    else:
                        terminal_waits.append(tid)
                continue
            rec = self.create(spec, submitter, now.wall, input_json=input_json, input_obj=spec.input)
            if msg.wait:
                rec.wait(route)
            ids.append(rec.id)
            existing.append(False)
        frames = codec.encode(Accepted(req_id=msg.req_id, task_ids=tuple(ids), existing=tuple(existing)))
        created = tuple(t for t, old in zip(ids, existing, strict=True) if not old)
        self.out.append(Send(Socket.CONTROL, route, frames, after_commit=True, announces=created))
        self.metrics.submitted.inc(existing.count(False))
        self.out.extend(DoneFromStore(route, tid) for tid in terminal_waits)
        return ids

    def create(
        self,
        spec: TaskSpec,
        submitter: str | None,
        stamp: datetime,
        detail: dict[str, Any] | None = None,
        input_json: str | None = None,
        input_obj: dict[str, Any] | None = None,
    ) -> TaskRecord:
        """``input_obj``: the decoded input ``input_json`` was made from, if JSON gives it back
        unchanged (a SUBMIT's, decoded from msgpack): kept until the row is committed, so a task
        dispatched before then does not decode its input again (:meth:`TaskRecord.mark_persisted`)."""
        rec = TaskRecord.from_spec(self.new_id(), spec, self.policy_for(spec.type).max_attempts, submitter, input_json)
        rec.input_obj = input_obj
        own = self.s.task_policies.get(spec.type)
        if rec.timeout_s is None and own is not None and own.timeout_s is not None:
            rec.timeout_s = own.timeout_s  # the type's default timeout
        self.stage_new(rec, stamp, submitter, detail)
        self.queue(rec)
        return rec

    def existing(self, key: str | None) -> uuid.UUID | None:
        return self.keys.get(key) if key else None

    def new_local(self, spec: TaskSpec, submitter: str) -> TaskRecord:
        """A record for a task the policeman creates itself (not yet staged: its attachments are
        stored first, then :meth:`add_local` stages it)."""
        self.catalog.get(spec.type)
        if spec.type == "job":
            authz.check_job_limits(spec.input if isinstance(spec.input, dict) else {})
        try:
            to_json(spec.input)  # storable (no NUL, no NaN) before anything is created
        except ValueError as exc:
            raise InvalidBodyError(f"task input {exc}", hint="inputs must be plain JSON objects") from None
        return TaskRecord.from_spec(self.new_id(), spec, self.policy_for(spec.type).max_attempts, submitter)

    def add_local(self, rec: TaskRecord, holder: str | None, now: Now) -> None:
        """Stage a task the policeman created. With ``holder`` (a direct hand-off) it is assigned to
        that peer at once if the peer can take it — registered, alive, capable, with credit,
        breaker closed — else queued as usual."""
        self.clock = now.mono
        self.stage_new(rec, now.wall, rec.submitted_by, None)
        if not (holder and self._assign_to_holder(rec, holder, now)):
            self.queue(rec)
        self.metrics.submitted.inc()

    def _assign_to_holder(self, rec: TaskRecord, holder: str, now: Now) -> bool:
        peer = self.peers.get(holder)
        if (
            peer is None
            or peer.clock.state(now.mono) is not Liveness.ALIVE
            or not peer.slot.can_take(now.mono)
            or not self.requirements(rec) <= peer.slot.capabilities
        ):
            return False
        rec.assigned_to = holder
        rec.assigned_at = now.wall
        rec.lease_deadline = now.wall + timedelta(seconds=self.s.lease_s)
        self.change(rec, Trigger.DISPATCH, now.wall, holder, {"handoff": True})
        peer.held.add(rec.id)
        peer.slot.inflight += 1
        self.leases[rec.id] = now.mono + self.s.lease_s
        self.metrics.dispatched.inc()
        return True

    # --- local tasks (jobs) run by the policeman itself --------------------------------------------
    def start_local(self, rec: TaskRecord, now: Now) -> bool:
        """Mark a local task as running on the policeman; False if it is not pending any more."""
        if rec.status is not Status.PENDING or self.tasks.get(rec.id) is not rec:
            return rec.status is Status.PROCESSING and rec.assigned_to == self.s.node_id
        rec.assigned_to = self.s.node_id
        rec.assigned_at = now.wall
        self.change(rec, Trigger.DISPATCH, now.wall, self.s.node_id)
        self.change(rec, Trigger.START, now.wall, self.s.node_id)
        rec.started_at = now.wall
        return True

    def finish_local(self, rec: TaskRecord, now: Now, output: Any = None, error: CasperError | None = None) -> None:
        if self.tasks.get(rec.id) is not rec or rec.terminal:
            return
        self.clock = now.mono
        if error is None:
            rec.output_json = to_json(output)
            self.finish(rec, Trigger.COMPLETE, now.wall, self.s.node_id)
        else:
            if output is not None:
                rec.output_json = to_json(output)
            self.fail(rec, now.wall, self.s.node_id, error.code, error.message, False)

    # --- operator actions --------------------------------------------------------------------------
    def cancel(self, tid: uuid.UUID, now: Now, by: str = "operator") -> dict[str, Any]:
        self.clock = now.mono
        rec = self.tasks.get(tid)
        if rec is None:
            raise TaskNotFoundError(
                f"task {tid} is not open (already finished, or no such task)", hint="caspectl get ID shows its state"
            )
        holder = rec.assigned_to if rec.status in ACTIVE else None
        if holder is not None and holder in self.peers:
            peer = self.peers[holder]
            self.release(peer, rec)
            peer.slot.breaker.release_probe()
            frames = codec.encode(Cancel(task_ids=(tid,), reason=f"cancelled by {by}"))
            self.out.append(Send(Socket.MESH, peer.route, frames, after_commit=True))
        self.finish(rec, Trigger.CANCEL, now.wall, holder, {"by": by})
        return {"id": str(tid), "status": Status.CANCELLED.value, "was_running_on": holder}

    def retry(self, row: dict[str, Any], now: Now) -> dict[str, Any]:
        """Run a dead or cancelled task again, as a new task (the old one keeps its history)."""
        self.clock = now.mono
        if row["status"] not in (Status.DEAD.value, Status.CANCELLED.value):
            done = row["status"] == Status.COMPLETE.value
            raise InvalidBodyError(
                f"task {row['id']} is {row['status']}; only dead or cancelled tasks are retried",
                hint="it succeeded: to run the same work again, submit it again (caspectl get ID shows its input)"
                if done
                else "caspectl cancel ID first, or wait for it to finish",
            )
        spec = TaskSpec(
            type=row["type"],
            input=row["input"] or {},
            priority=row["priority"],
            requires=tuple(row["requires"] or ()),
            affinity=row["affinity"],
            max_attempts=row["max_attempts"],
            timeout_s=row["timeout_s"],
            parent_id=row["parent_id"],
            cache=row["cache"],
        )
        rec = self.create(spec, "caspectl retry", now.wall, {"retry_of": str(row["id"])})
        return {"id": str(rec.id), "retry_of": str(row["id"]), "status": rec.status.value}
