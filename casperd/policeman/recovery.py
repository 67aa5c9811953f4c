"""Recovery after a restart: the open tasks come back from Postgres; their holders' READYs (see
:mod:`casperd.policeman.registry`) or the grace period in ``tick`` settle the rest.

pending tasks are queued, ``retry`` ones wait out what is left of their backoff, an ``error`` one
(the policeman stopped between the failure and its next step) takes that step now, a
``validating`` one whose check was lost fails its attempt (retryable), and local tasks (jobs) the
policeman was running start again.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from casperd.lifecycle import ACTIVE, QUEUED, Status
from casperd.policeman.actions import Now, RunLocal
from casperd.policeman.state import log
from casperd.policeman.submissions import SubmissionRules
from casperd.taskrecord import TaskRecord


class RecoveryRules(SubmissionRules):
    def recover(self, records: list[TaskRecord], now: Now) -> list[uuid.UUID]:
        """Take the open tasks loaded from the store. Returns the ids whose input attachments the
        shell must load (and hand over with :meth:`attach`)."""
        self.clock = now.mono
        for rec in records:
            self.size_input(rec)  # a queued large input was not loaded (Store.load_open)
            self.tasks[rec.id] = rec
            self.quotas.opened(rec.submitted_by or "")
            if rec.idempotency_key:
                self.remember_key(rec.idempotency_key, rec.id)
            if rec.status is Status.PENDING:
                self.queue(rec)
            elif rec.status is Status.RETRY:
                due = rec.not_before or now.wall
                self.arm_retry(now.mono + max(0.0, _seconds(due, now.wall)), rec.id)
            elif rec.status is Status.ERROR:
                self.after_error(rec, now.wall, None)
            elif rec.status is Status.VALIDATING and rec.assigned_to == self.s.node_id:
                pass  # a local task's own validation: its runner decides
        if records:
            log.info("recovered %d open tasks from Postgres", len(records))
        # jobs the policeman was running when it stopped: run them again (they resume from the jobs table)
        for rec in list(self.tasks.values()):
            if rec.status in ACTIVE and rec.assigned_to == self.s.node_id and self.is_local(rec.type):
                self.out.append(RunLocal(rec, delay_s=0.5, after_commit=False))
        return [tid for tid, rec in self.tasks.items() if self._needs_attachments(rec)]

    def attach(self, found: dict[uuid.UUID, list[bytes]]) -> None:
        """Recovered tasks' input attachments; a queued one whose input and attachments together
        are large lets them go again (they are loaded back when it is dispatched)."""
        for tid, blobs in found.items():
            rec = self.tasks.get(tid)
            if rec is not None:
                rec.attachments = tuple(blobs)
                self.size_input(rec)
                if rec.status in QUEUED:
                    rec.drop_input()

    def _needs_attachments(self, rec: TaskRecord) -> bool:
        ttype = self.catalog.find(rec.type)
        return bool(ttype is not None and ttype.input_attachments)


def _seconds(due: datetime, wall: datetime) -> float:
    return (due - wall).total_seconds()
