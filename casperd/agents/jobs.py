"""The job coordinator: a goal becomes a plan, code in parallel waves, tests, and one integrated branch.

A job is a task of type ``job`` that the policeman runs itself. Its progress is a JSON document in
the ``jobs`` table, saved after every step; every subtask it creates has an idempotency key derived
from the job, the subtask, the round and the kind, so a restarted policeman resumes the job where
it was: resubmitting finds the existing tasks, and finished ones are read from Postgres.

The states of jobs and subtasks and the moves between them are one table,
:mod:`casperd.agents.jobstates` (shared with ``caspectl``); every move goes through it.
Per subtask: ``pending`` → ``coding`` (a code task; the developer's result is validated in the
task's ``validating`` state, and a rejected patch goes back to the developer as feedback) →
``testing`` (a test task with the patch) → ``tested`` → ``integrated`` (applied onto the
integration branch in dependency order). A failed test starts another coding round with the
failures as feedback (``job_rounds`` at most); a patch that conflicts on integration starts a
rebase round from the current integration head. Subtasks start once all their dependencies are
integrated, at most ``max_parallel`` at once. When the budget is spent no new Claude work starts;
the job integrates what it has and says so. Finally the tester runs the test command on the
integrated branch, which is pushed to the repository as ``casper/job-<first 8 hex digits of the job id>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from pathlib import Path
from typing import Any

from casperd.agents import gitwork, turns
from casperd.agents.jobintegrate import integrate, push_branch
from casperd.agents.jobreport import (
    build_report,
    failing_sets,
    final_state,
    job_report,
    last_error,
    test_feedback,
    tests_pass,
)
from casperd.agents.jobspec import (
    code_input,
    finished_row,
    parallelism,
    parse_job_args,
    task_key,
    test_input,
    wait_finished,
    whole_test_input,
)
from casperd.agents.jobspec import now as _now
from casperd.agents.jobstates import (
    SUBTASK_ACTIVE,
    SUBTASK_DONE,
    TERMINAL_JOB,
    JobState,
    job_step,
    subtask_step,
)
from casperd.agents.jobstates import SubtaskState as S
from casperd.agents.planner import Plan, make_plan
from casperd.errors import AgentError, CasperError, PatchConflictError
from casperd.messages import TaskSpec
from casperd.taskrecord import TaskRecord

log = logging.getLogger("casperd.agents.jobs")


class JobRunner:
    def __init__(self, police: Any) -> None:
        self.police = police
        self.broker = police.broker
        self.records = police.records
        self.s = police.s
        self.running: dict[uuid.UUID, asyncio.Task[None]] = {}
        self._wake: dict[uuid.UUID, asyncio.Event] = {}
        self._states: dict[uuid.UUID, JobState] = {}

    # --- hooks from the broker ----------------------------------------------------------------------
    def start(self, rec: TaskRecord) -> None:
        if rec.id in self.running or not self.broker.start_local(rec):
            return
        task = asyncio.get_running_loop().create_task(self._run(rec), name=f"job-{rec.id}")
        self.running[rec.id] = task
        task.add_done_callback(lambda _t: self.running.pop(rec.id, None))

    def on_finish(self, rec: TaskRecord) -> None:
        if rec.type == "job" and rec.status.value == "cancelled" and rec.id in self.running:
            runner = self.running[rec.id]
            runner.cancel()  # caspectl cancel JOB: stop it and the work it started
            asyncio.get_running_loop().create_task(self._cancelled(rec, runner))
        if rec.parent_id in self._wake:  # one of a running job's tasks finished: the job looks again
            self._wake[rec.parent_id].set()

    async def close(self) -> None:
        for t in list(self.running.values()):
            t.cancel()
        await asyncio.gather(*self.running.values(), return_exceptions=True)

    # --- control operations ---------------------------------------------------------------------------
    async def submit(self, args: dict[str, Any]) -> dict[str, Any]:
        spec_input = await parse_job_args(args)
        key = args.get("idempotency_key")
        tid, existing = await self.broker.submit_local(
            TaskSpec(type="job", input=spec_input, idempotency_key=key, max_attempts=1), submitter="caspectl run"
        )
        return {"job_id": str(tid), "existing": existing}

    async def report(self, job_id: uuid.UUID) -> dict[str, Any]:
        return await job_report(self.records, self.broker.store, job_id)

    # --- the job ------------------------------------------------------------------------------------------
    async def _drop_integration_ref(self, job_id: uuid.UUID, spec: dict[str, Any]) -> None:
        """The job's working ref leaves the user's repository when the job ends (its result is the branch)."""
        with contextlib.suppress(CasperError, OSError):
            await gitwork.git(
                "update-ref", "-d", f"refs/casper/jobs/{job_id}/integration", cwd=Path(spec["repo"]), check=False
            )

    async def _run(self, rec: TaskRecord) -> None:
        try:
            await self._run_job(rec)
        finally:
            await asyncio.shield(self._drop_integration_ref(rec.id, rec.input))

    async def _run_job(self, rec: TaskRecord) -> None:
        try:
            report = await self._job(rec.id, rec.input)
            self.broker.finish_local(
                rec,
                {
                    k: report.get(k)
                    for k in ("state", "branch", "summary", "cost_usd", "wall_s", "sum_task_s", "final_tests", "notes")
                },
            )
        except asyncio.CancelledError:
            raise
        except CasperError as exc:
            log.warning("job %s failed: %s", rec.id, exc)
            await self._fail_job(rec.id, rec.input, str(exc))
            self.broker.finish_local(rec, error=exc)
        except Exception as exc:
            log.exception("job %s crashed", rec.id)
            await self._fail_job(rec.id, rec.input, f"internal error: {type(exc).__name__}")
            self.broker.finish_local(rec, error=AgentError(f"the job crashed: {type(exc).__name__}: {exc}"[:2000]))

    async def _cancelled(self, rec: TaskRecord, runner: asyncio.Task[None]) -> None:
        await asyncio.gather(runner, return_exceptions=True)  # it writes nothing more after this
        for child in [t for t in self.broker.tasks.values() if t.parent_id == rec.id and not t.terminal]:
            with contextlib.suppress(CasperError):
                self.broker.cancel(child.id)
        row = await self.records.load_job(rec.id)
        prog = row["progress"] if row else {"subtasks": {}, "notes": []}
        prog.setdefault("notes", []).append("cancelled by the operator; its open tasks were cancelled")
        prog["finished_at"] = _now()
        await self._save_final(rec.id, JobState.CANCELLED, rec.input, prog)
        log.info("job %s cancelled", rec.id)

    async def _fail_job(self, job_id: uuid.UUID, spec: dict[str, Any], why: str) -> None:
        row = await self.records.load_job(job_id)
        prog = row["progress"] if row else {"started_at": _now(), "subtasks": {}, "notes": []}
        prog.setdefault("notes", []).append(why)
        prog["finished_at"] = _now()
        await self._save_final(job_id, JobState.FAILED, spec, prog)

    async def _save(self, job_id: uuid.UUID, state: JobState, spec: dict[str, Any], prog: dict[str, Any]) -> None:
        """Save the job's progress in ``state``, a move the transition table allows."""
        self._states[job_id] = job_step(self._states.get(job_id, JobState.PLANNING), state)
        await self.records.save_job(job_id, state.value, spec, prog)

    async def _save_final(self, job_id: uuid.UUID, state: JobState, spec: dict[str, Any], prog: dict[str, Any]) -> None:
        """The last save of a job that failed or was cancelled: a storage error is logged (the job
        task's own status still says how it ended), never raised over the first failure."""
        try:
            await self.records.save_job(job_id, state.value, spec, prog)
        except CasperError as exc:
            log.error("job %s: could not save its final state %s: %s", job_id, state.value, exc)
        self._states.pop(job_id, None)

    async def _job(self, job_id: uuid.UUID, spec: dict[str, Any]) -> dict[str, Any]:
        row = await self.records.load_job(job_id)
        prog: dict[str, Any] = row["progress"] if row else {}
        state = JobState(row["state"]) if row else JobState.PLANNING
        if state in TERMINAL_JOB:
            return await build_report(self.records, job_id, spec, prog, state.value)
        self._states[job_id] = state
        prog.setdefault("started_at", _now())
        prog.setdefault("t0", time.time())
        prog.setdefault("notes", [])
        prog.setdefault("integration", {"head": spec["base"], "applied": []})
        self._wake[job_id] = asyncio.Event()
        try:
            if "plan" not in prog:
                await self._save(job_id, JobState.PLANNING, spec, prog)
                plan = await self._plan(job_id, spec)
                prog["plan"] = plan.model_dump()
                prog["subtasks"] = {
                    s.id: {"id": s.id, "title": s.title, "state": S.PENDING.value, "rounds": 0, "task_ids": []}
                    for s in plan.subtasks
                }
                if spec.get("test_cmd"):
                    tid, _ = await self.broker.submit_local(
                        TaskSpec(  # what already fails before any change
                            type="test",
                            parent_id=job_id,
                            idempotency_key=f"job:{job_id}:baseline",
                            input=whole_test_input(job_id, spec, spec["base"]),
                        )
                    )
                    prog["baseline_task"] = str(tid)
                await self._save(job_id, JobState.RUNNING, spec, prog)
            plan = Plan.model_validate(prog["plan"])
            final = await self._drive(job_id, spec, prog, plan)
            return await build_report(self.records, job_id, spec, prog, final.value)
        finally:
            self._wake.pop(job_id, None)
            self._states.pop(job_id, None)

    async def _plan(self, job_id: uuid.UUID, spec: dict[str, Any]) -> Plan:
        files = await gitwork.list_files(spec["repo"], spec["base"])
        plan, _usage, calls = await make_plan(
            self.police.claude,
            self.s.models.get("policeman", "claude-sonnet-4-6"),
            spec["goal"],
            files,
            spec.get("test_cmd"),
            parallelism(spec),
            turns.role_max_tokens(self.s.llm_max_tokens, "planner"),
        )
        await self.records.add_calls(calls, task_id=job_id, job_id=job_id, node=self.s.node_id, role="policeman")
        log.info("job %s planned %d subtasks", job_id, len(plan.subtasks))
        return plan

    # --- the main loop ------------------------------------------------------------------------------
    async def _drive(self, job_id: uuid.UUID, spec: dict[str, Any], prog: dict[str, Any], plan: Plan) -> JobState:
        subs: dict[str, dict[str, Any]] = prog["subtasks"]
        by_id = {s.id: s for s in plan.subtasks}
        par = parallelism(spec)
        budget = spec.get("budget_usd")
        wake = self._wake[job_id]
        while True:
            changed = False
            for sid, sub in subs.items():
                changed |= await self._advance(job_id, spec, prog, by_id[sid], sub)
            spent = (await self.records.usage_by_job(job_id))["cost_usd"]
            broke = budget is not None and spent >= float(budget)
            if broke and not prog.get("budget_note"):
                prog["budget_note"] = True
                prog["notes"].append(
                    f"budget spent (${spent:.4f} of ${float(budget):.2f}): no new Claude work was dispatched"
                )
                changed = True
            for sid, sub in subs.items():  # dependents of failed work, and everything once the budget is spent
                if sub["state"] == S.PENDING:
                    deps = [subs[d]["state"] for d in by_id[sid].depends_on]
                    if any(d in (S.FAILED, S.SKIPPED) for d in deps):
                        subtask_step(sub, S.SKIPPED, "a dependency was not integrated")
                        changed = True
                    elif broke:
                        subtask_step(sub, S.SKIPPED, "budget spent")
                        changed = True
            active = sum(1 for s in subs.values() if s["state"] in SUBTASK_ACTIVE)
            for sid, sub in subs.items():
                if active >= par or broke:
                    break
                if sub["state"] == S.PENDING and all(subs[d]["state"] == S.INTEGRATED for d in by_id[sid].depends_on):
                    await self._code_round(job_id, spec, prog, by_id[sid], sub, feedback=None)
                    active += 1
                    changed = True
            if changed:
                await self._save(job_id, JobState.RUNNING, spec, prog)
            if all(s["state"] in SUBTASK_DONE for s in subs.values()):
                break
            wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), 1.0)
        return await self._finish(job_id, spec, prog, broke)

    async def _advance(
        self, job_id: uuid.UUID, spec: dict[str, Any], prog: dict[str, Any], st: Any, sub: dict[str, Any]
    ) -> bool:
        """Move one subtask on if its current task finished; True if anything changed."""
        if sub["state"] == S.CODING:
            row = await self._finished(uuid.UUID(sub["code_task"]))
            if row is None:
                return False
            sub["attempts"] = sub.get("attempts", 0) + int(row["attempts"] or 0)
            sub["time_s"] = sub.get("time_s", 0.0) + float((row["output"] or {}).get("duration_s") or 0.0)
            if row["status"] != "complete":
                subtask_step(sub, S.FAILED, last_error(row))
                return True
            patch = await self._patch(sub)
            if not patch:
                subtask_step(sub, S.FAILED, "the developer changed nothing")
                return True
            subtask_step(sub, S.TESTING if spec.get("test_cmd") else S.TESTED)
            if spec.get("test_cmd"):
                # the developer normally handed this test straight to a tester (same idempotency key):
                # then this finds it; otherwise it is created here
                tid, handed = await self.broker.submit_local(
                    TaskSpec(
                        type="test",
                        parent_id=job_id,
                        idempotency_key=task_key(job_id, sub, "test") + f":a{int(row['attempts'] or 1)}",
                        input=test_input(job_id, spec, sub),
                    ),
                    (patch,),
                )
                sub["test_task"] = str(tid)
                sub["handed_off"] = handed
                sub["task_ids"].append(str(tid))
            return True
        if sub["state"] == S.TESTING:
            row = await self._finished(uuid.UUID(sub["test_task"]))
            if row is None:
                return False
            # judged against the base commit: nothing that passed there may fail, and the subtask's own
            # tests must pass
            base_row = await self._finished(uuid.UUID(prog["baseline_task"]))
            if base_row is None:
                return False
            out = row["output"] or {}
            sub["time_s"] = sub.get("time_s", 0.0) + float(out.get("duration_s") or 0.0)
            sub["tests"] = {k: out.get(k) for k in ("passed", "failed", "errors", "skipped")} if out else None
            if tests_pass(row, base_row, st.tests):
                subtask_step(sub, S.TESTED)
            elif sub["rounds"] >= self.s.job_rounds:
                subtask_step(sub, S.FAILED, f"tests still fail after {sub['rounds']} rounds")
            else:
                await self._code_round(
                    job_id, spec, prog, st, sub, feedback=test_feedback(row, *failing_sets(row, base_row, st.tests))
                )
            return True
        if sub["state"] == S.TESTED:
            return await self._integrate(job_id, spec, prog, st, sub)
        return False

    async def _code_round(
        self,
        job_id: uuid.UUID,
        spec: dict[str, Any],
        prog: dict[str, Any],
        st: Any,
        sub: dict[str, Any],
        *,
        feedback: str | None,
        rebase: bool = False,
    ) -> None:
        sub["rounds"] += 1
        base = prog["integration"]["head"]
        inp = code_input(job_id, spec, st, sub, base, feedback=feedback, rebase=rebase)
        budget = spec.get("budget_usd")
        if budget is not None:
            spent = (await self.records.usage_by_job(job_id))["cost_usd"]
            inp["limits"] = {"max_cost_usd": max(0.0001, float(budget) - spent)}
        tid, _ = await self.broker.submit_local(
            TaskSpec(
                type="code",
                parent_id=job_id,
                idempotency_key=task_key(job_id, sub, "rebase" if rebase else "code"),
                input=inp,
            )
        )
        subtask_step(sub, S.CODING)
        sub.update(code_task=str(tid), base=base)
        sub["task_ids"].append(str(tid))

    async def _integrate(
        self, job_id: uuid.UUID, spec: dict[str, Any], prog: dict[str, Any], st: Any, sub: dict[str, Any]
    ) -> bool:
        patch = await self._patch(sub)
        integ = prog["integration"]
        message = f"{st.id}: {st.title}\n\nCASPER job {job_id}"
        try:
            head = await integrate(self.s.workspace, job_id, spec, integ["head"], len(integ["applied"]), patch, message)
        except PatchConflictError as exc:
            if sub["rounds"] >= self.s.job_rounds + 1:
                subtask_step(sub, S.FAILED, "its patch still conflicts after a rebase")
                return True
            log.info("job %s: %s conflicts on integration; a developer rebases it", job_id, sub["id"])
            text = patch.decode("utf-8", "replace")[:6000]
            await self._code_round(
                job_id,
                spec,
                prog,
                st,
                sub,
                rebase=True,
                feedback=(
                    "Your patch no longer applies: other agents' work was integrated first and changed the same "
                    f"code. Redo your change on the current code in this fresh worktree.\n{exc.message[:1500]}\n"
                    f"Your previous patch was:\n{text}"
                ),
            )
            return True
        integ["head"] = head
        integ["applied"].append(st.id)
        subtask_step(sub, S.INTEGRATED)
        log.info("job %s: %s integrated at %s", job_id, sub["id"], head[:12])
        return True

    async def _finish(self, job_id: uuid.UUID, spec: dict[str, Any], prog: dict[str, Any], broke: bool) -> JobState:
        integ = prog["integration"]
        if integ["applied"]:
            if spec.get("test_cmd") and "final_tests" not in prog:
                await self._save(job_id, JobState.TESTING, spec, prog)
                tid, _ = await self.broker.submit_local(
                    TaskSpec(
                        type="test",
                        parent_id=job_id,
                        idempotency_key=f"job:{job_id}:final:{integ['head'][:12]}",
                        input=whole_test_input(job_id, spec, integ["head"]),
                    )
                )
                prog["final_task"] = str(tid)
                row = await self._wait(job_id, tid)
                out = row["output"] or {}
                prog["final_tests"] = (
                    {k: out.get(k) for k in ("passed", "failed", "errors", "skipped", "ok", "failures")}
                    if out
                    else {"ok": False}
                )
                prog["final_time_s"] = float(out.get("duration_s") or 0.0)
            branch = await push_branch(self.s.workspace, job_id, spec, integ["head"])
            prog["branch"] = branch
        state, prog["summary"] = final_state(spec, prog, broke)
        prog["finished_at"] = _now()
        prog["wall_s"] = round(time.time() - float(prog["t0"]), 3)
        await self._save(job_id, state, spec, prog)
        log.info("job %s %s: %s", job_id, state.value, prog["summary"])
        return state

    async def _patch(self, sub: dict[str, Any]) -> bytes:
        """The patch of the subtask's latest code task (its RESULT's attachment 0), or b""."""
        tid = uuid.UUID(sub["code_task"])
        return (await self.records.attachments([tid], "output")).get(tid, [b""])[0]

    # --- waiting for tasks ----------------------------------------------------------------------------
    async def _finished(self, tid: uuid.UUID) -> dict[str, Any] | None:
        return await finished_row(self.broker, tid)

    async def _wait(self, job_id: uuid.UUID, tid: uuid.UUID) -> dict[str, Any]:
        return await wait_finished(self.broker, self._wake[job_id], tid)
