"""The job coordinator: a goal becomes a plan, code in parallel waves, tests, and one integrated branch.

A job is a task of type ``job`` that the policeman runs itself. Its progress is a JSON document in
the ``jobs`` table, saved after every step; every subtask it creates has an idempotency key derived
from the job, the subtask, the round and the kind, so a restarted policeman resumes the job where
it was: resubmitting finds the existing tasks, and finished ones are read from Postgres.

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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from casperd.agents import gitwork, turns
from casperd.agents.jobreport import build_report, last_error, spec_view, test_feedback
from casperd.agents.planner import Plan, make_plan
from casperd.errors import AgentError, CasperError, InvalidBodyError, PatchConflictError, TaskNotFoundError
from casperd.messages import TaskSpec
from casperd.taskrecord import TaskRecord

log = logging.getLogger("casperd.agents.jobs")

TERMINAL_JOB = ("done", "failed", "budget-exhausted", "cancelled")
_SUB_DONE = ("integrated", "failed", "skipped")


def _now() -> str:
    return datetime.now(UTC).isoformat()


class JobRunner:
    def __init__(self, police: Any) -> None:
        self.police = police
        self.broker = police.broker
        self.records = police.records
        self.s = police.s
        self.running: dict[uuid.UUID, asyncio.Task[None]] = {}
        self._wake: dict[uuid.UUID, asyncio.Event] = {}

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
        goal = args.get("goal")
        repo = args.get("repo")
        if not isinstance(goal, str) or not goal.strip():
            raise InvalidBodyError("a job needs a goal", hint='caspectl run "fix the failing tests" --repo PATH')
        if not isinstance(repo, str) or not Path(repo).is_absolute():
            raise InvalidBodyError(
                "a job needs --repo: an absolute path to a git repository",
                hint="the repository must be readable by every node at that path",
            )
        base = await gitwork.resolve_commit(repo, str(args.get("rev") or "HEAD"))
        budget = args.get("budget_usd")
        if budget is not None and (not isinstance(budget, int | float) or budget <= 0):
            raise InvalidBodyError("budget_usd must be a positive number", hint="e.g. --budget-usd 2.5")
        par = args.get("max_parallel") or 4
        if not isinstance(par, int) or not 1 <= par <= 64:
            raise InvalidBodyError("max_parallel must be between 1 and 64", hint="e.g. --max-parallel 4")
        spec_input = {
            "goal": goal.strip(),
            "repo": repo,
            "base": base,
            "test_cmd": args.get("test_cmd") or None,
            "budget_usd": budget,
            "max_parallel": par,
            "allowed": list(args.get("allowed") or []),
        }
        key = args.get("idempotency_key")
        tid, existing = await self.broker.submit_local(
            TaskSpec(type="job", input=spec_input, idempotency_key=key, max_attempts=1), submitter="caspectl run"
        )
        return {"job_id": str(tid), "existing": existing}

    async def report(self, job_id: uuid.UUID) -> dict[str, Any]:
        row = await self.records.load_job(job_id)
        if row is None:
            task = await self.broker.store.get(job_id)
            if task is None or task["type"] != "job":
                raise TaskNotFoundError(f"no job {job_id}", hint="caspectl tasks lists tasks; jobs have type job")
            spec = task["input"] or {}
            return {
                "job_id": str(job_id),
                "state": "planning",
                **spec_view(spec),
                "subtasks": [],
                "plan": [],
                "notes": [],
                "tokens": {},
                "cost_usd": 0.0,
            }
        return await build_report(self.records, job_id, row["spec"], row["progress"], row["state"])

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
        with contextlib.suppress(CasperError):
            await self.records.save_job(rec.id, "cancelled", rec.input, prog)
        log.info("job %s cancelled", rec.id)

    async def _fail_job(self, job_id: uuid.UUID, spec: dict[str, Any], why: str) -> None:
        row = await self.records.load_job(job_id)
        prog = row["progress"] if row else {"started_at": _now(), "subtasks": {}, "notes": []}
        prog.setdefault("notes", []).append(why)
        prog["finished_at"] = _now()
        with contextlib.suppress(CasperError):
            await self.records.save_job(job_id, "failed", spec, prog)

    async def _job(self, job_id: uuid.UUID, spec: dict[str, Any]) -> dict[str, Any]:
        row = await self.records.load_job(job_id)
        prog: dict[str, Any] = row["progress"] if row else {}
        state = row["state"] if row else "planning"
        if state in TERMINAL_JOB:
            return await build_report(self.records, job_id, spec, prog, state)
        prog.setdefault("started_at", _now())
        prog.setdefault("t0", time.time())
        prog.setdefault("notes", [])
        prog.setdefault("integration", {"head": spec["base"], "applied": []})
        self._wake[job_id] = asyncio.Event()
        try:
            if "plan" not in prog:
                await self.records.save_job(job_id, "planning", spec, prog)
                plan = await self._plan(job_id, spec)
                prog["plan"] = plan.model_dump()
                prog["subtasks"] = {
                    s.id: {"id": s.id, "title": s.title, "state": "pending", "rounds": 0, "task_ids": []}
                    for s in plan.subtasks
                }
                if spec.get("test_cmd"):
                    tid, _ = await self.broker.submit_local(
                        TaskSpec(  # what already fails before any change
                            type="test",
                            parent_id=job_id,
                            idempotency_key=f"job:{job_id}:baseline",
                            input={
                                "job_id": str(job_id),
                                "repo": spec["repo"],
                                "base": spec["base"],
                                "test_cmd": spec["test_cmd"],
                            },
                        )
                    )
                    prog["baseline_task"] = str(tid)
                await self.records.save_job(job_id, "running", spec, prog)
            plan = Plan.model_validate(prog["plan"])
            state = await self._drive(job_id, spec, prog, plan)
            return await build_report(self.records, job_id, spec, prog, state)
        finally:
            self._wake.pop(job_id, None)

    async def _plan(self, job_id: uuid.UUID, spec: dict[str, Any]) -> Plan:
        files = (
            (await gitwork.git("ls-tree", "-r", "--name-only", spec["base"], cwd=Path(spec["repo"])))
            .decode("utf-8", "replace")
            .splitlines()
        )
        plan, _usage, calls = await make_plan(
            self.police.claude,
            self.s.models.get("policeman", "claude-sonnet-4-6"),
            spec["goal"],
            files,
            spec.get("test_cmd"),
            int(spec.get("max_parallel") or 4),
            turns.role_max_tokens(self.s.llm_max_tokens, "planner"),
        )
        await self.records.add_calls(calls, task_id=job_id, job_id=job_id, node=self.s.node_id, role="policeman")
        log.info("job %s planned %d subtasks", job_id, len(plan.subtasks))
        return plan

    # --- the main loop ------------------------------------------------------------------------------
    async def _drive(self, job_id: uuid.UUID, spec: dict[str, Any], prog: dict[str, Any], plan: Plan) -> str:
        subs: dict[str, dict[str, Any]] = prog["subtasks"]
        by_id = {s.id: s for s in plan.subtasks}
        par = int(spec.get("max_parallel") or 4)
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
                if sub["state"] == "pending":
                    deps = [subs[d]["state"] for d in by_id[sid].depends_on]
                    if any(d in ("failed", "skipped") for d in deps):
                        sub["state"], sub["note"] = "skipped", "a dependency was not integrated"
                        changed = True
                    elif broke:
                        sub["state"], sub["note"] = "skipped", "budget spent"
                        changed = True
            active = sum(1 for s in subs.values() if s["state"] in ("coding", "testing", "tested"))
            for sid, sub in subs.items():
                if active >= par or broke:
                    break
                if sub["state"] == "pending" and all(subs[d]["state"] == "integrated" for d in by_id[sid].depends_on):
                    await self._code_round(job_id, spec, prog, by_id[sid], sub, feedback=None)
                    active += 1
                    changed = True
            if changed:
                await self.records.save_job(job_id, "running", spec, prog)
            if all(s["state"] in _SUB_DONE for s in subs.values()):
                break
            wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), 1.0)
        return await self._finish(job_id, spec, prog, broke)

    async def _advance(
        self, job_id: uuid.UUID, spec: dict[str, Any], prog: dict[str, Any], st: Any, sub: dict[str, Any]
    ) -> bool:
        """Move one subtask on if its current task finished; True if anything changed."""
        if sub["state"] == "coding":
            row = await self._finished(uuid.UUID(sub["code_task"]))
            if row is None:
                return False
            sub["attempts"] = sub.get("attempts", 0) + int(row["attempts"] or 0)
            sub["time_s"] = sub.get("time_s", 0.0) + float((row["output"] or {}).get("duration_s") or 0.0)
            if row["status"] != "complete":
                sub["state"], sub["note"] = "failed", last_error(row)
                return True
            patch = await self._patch(sub)
            if not patch:
                sub["state"], sub["note"] = "failed", "the developer changed nothing"
                return True
            sub["state"] = "testing" if spec.get("test_cmd") else "tested"
            if spec.get("test_cmd"):
                # the developer normally handed this test straight to a tester (same idempotency key):
                # then this finds it; otherwise it is created here
                tid, handed = await self.broker.submit_local(
                    TaskSpec(
                        type="test",
                        parent_id=job_id,
                        idempotency_key=_key(job_id, sub, "test") + f":a{int(row['attempts'] or 1)}",
                        input=_test_input(job_id, spec, sub),
                    ),
                    (patch,),
                )
                sub["test_task"] = str(tid)
                sub["handed_off"] = handed
                sub["task_ids"].append(str(tid))
            return True
        if sub["state"] == "testing":
            row = await self._finished(uuid.UUID(sub["test_task"]))
            if row is None:
                return False
            # judged against the base commit: nothing that passed there may fail, and the subtask's own
            # tests must pass
            base_row = await self._finished(uuid.UUID(prog["baseline_task"]))
            if base_row is None:
                return False
            baseline = {str(f.get("name")) for f in (base_row["output"] or {}).get("failures") or []}
            out = row["output"] or {}
            sub["time_s"] = sub.get("time_s", 0.0) + float(out.get("duration_s") or 0.0)
            sub["tests"] = {k: out.get(k) for k in ("passed", "failed", "errors", "skipped")} if out else None
            failing = {str(f.get("name")) for f in out.get("failures") or []}
            own = {
                f
                for f in failing
                if any(f == t or f.startswith(t.rstrip("/") + "::") or f.startswith(t) for t in st.tests)
            }
            ok = row["status"] == "complete" and failing <= baseline and not own
            if ok:
                sub["state"] = "tested"
            elif sub["rounds"] >= self.s.job_rounds:
                sub["state"], sub["note"] = "failed", f"tests still fail after {sub['rounds']} rounds"
            else:
                await self._code_round(job_id, spec, prog, st, sub, feedback=test_feedback(row, baseline, own))
            return True
        if sub["state"] == "tested":
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
        inp: dict[str, Any] = {
            "job_id": str(job_id),
            "subtask": st.id,
            "repo": spec["repo"],
            "base": base,
            "instructions": st.instructions,
            "goal": spec["goal"],
            "allowed": st.paths or spec.get("allowed") or [],
            "test_cmd": spec.get("test_cmd"),
            "round": sub["rounds"],
        }
        if sub.get("code_task"):
            inp.update(resume_from=sub["code_task"], feedback=feedback, restore=not rebase)
        if spec.get("test_cmd"):
            sub["base"] = base
            inp["handoff"] = {"key": _key(job_id, sub, "test"), "input": _test_input(job_id, spec, sub)}
        budget = spec.get("budget_usd")
        if budget is not None:
            spent = (await self.records.usage_by_job(job_id))["cost_usd"]
            inp["limits"] = {"max_cost_usd": max(0.0001, float(budget) - spent)}
        tid, _ = await self.broker.submit_local(
            TaskSpec(
                type="code",
                parent_id=job_id,
                idempotency_key=_key(job_id, sub, "rebase" if rebase else "code"),
                input=inp,
            )
        )
        sub.update(state="coding", code_task=str(tid), base=base)
        sub["task_ids"].append(str(tid))

    async def _integrate(
        self, job_id: uuid.UUID, spec: dict[str, Any], prog: dict[str, Any], st: Any, sub: dict[str, Any]
    ) -> bool:
        patch = await self._patch(sub)
        integ = prog["integration"]
        wt = self.s.workspace / "jobs" / str(job_id) / f"int-{len(integ['applied'])}"
        await gitwork.make_worktree(spec["repo"], integ["head"], wt, self.s.workspace / "mirrors")
        try:
            try:
                await gitwork.apply(wt, patch)
            except PatchConflictError as exc:
                if sub["rounds"] >= self.s.job_rounds + 1:
                    sub["state"], sub["note"] = "failed", "its patch still conflicts after a rebase"
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
            head = await gitwork.commit_all(wt, f"{st.id}: {st.title}\n\nCASPER job {job_id}")
            await gitwork.push_ref(wt, spec["repo"], f"refs/casper/jobs/{job_id}/integration")
        finally:
            with contextlib.suppress(Exception):
                await gitwork.remove_worktree(wt)
        integ["head"] = head
        integ["applied"].append(st.id)
        sub["state"] = "integrated"
        log.info("job %s: %s integrated at %s", job_id, sub["id"], head[:12])
        return True

    async def _finish(self, job_id: uuid.UUID, spec: dict[str, Any], prog: dict[str, Any], broke: bool) -> str:
        integ = prog["integration"]
        subs = prog["subtasks"]
        if integ["applied"]:
            if spec.get("test_cmd") and "final_tests" not in prog:
                await self.records.save_job(job_id, "testing", spec, prog)
                tid, _ = await self.broker.submit_local(
                    TaskSpec(
                        type="test",
                        parent_id=job_id,
                        idempotency_key=f"job:{job_id}:final:{integ['head'][:12]}",
                        input={
                            "job_id": str(job_id),
                            "repo": spec["repo"],
                            "base": integ["head"],
                            "test_cmd": spec["test_cmd"],
                        },
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
            branch = f"casper/job-{str(job_id)[:8]}"
            wt = self.s.workspace / "jobs" / str(job_id) / "branch"
            await gitwork.make_worktree(spec["repo"], integ["head"], wt, self.s.workspace / "mirrors")
            try:
                await gitwork.push_ref(wt, spec["repo"], f"refs/heads/{branch}")
            finally:
                with contextlib.suppress(Exception):
                    await gitwork.remove_worktree(wt)
            prog["branch"] = branch
        failed = [s["id"] for s in subs.values() if s["state"] != "integrated"]
        tests_ok = (prog.get("final_tests") or {}).get("ok", True) if spec.get("test_cmd") else True
        if broke and failed:
            state = "budget-exhausted"
        elif not failed and integ["applied"] and tests_ok:
            state = "done"
        else:
            state = "failed"
        n = len(integ["applied"])
        prog["summary"] = (
            f"{n} of {len(subs)} subtasks integrated on {prog.get('branch') or 'no branch'}"
            + (f"; not integrated: {', '.join(failed)}" if failed else "")
            + ("" if not spec.get("test_cmd") else f"; final tests {'pass' if tests_ok else 'FAIL'}")
        )
        prog["finished_at"] = _now()
        prog["wall_s"] = round(time.time() - float(prog["t0"]), 3)
        await self.records.save_job(job_id, state, spec, prog)
        log.info("job %s %s: %s", job_id, state, prog["summary"])
        return state

    async def _patch(self, sub: dict[str, Any]) -> bytes:
        """The patch of the subtask's latest code task (its RESULT's attachment 0), or b""."""
        tid = uuid.UUID(sub["code_task"])
        return (await self.records.attachments([tid], "output")).get(tid, [b""])[0]

    # --- waiting for tasks ----------------------------------------------------------------------------
    async def _finished(self, tid: uuid.UUID) -> dict[str, Any] | None:
        """The task's final row if it has finished, else None (without waiting)."""
        if self.broker.tasks.get(tid) is not None:
            return None
        row = await self.broker.store.get(tid)
        if row is None or row["status"] not in ("complete", "dead", "cancelled"):
            return None
        return row

    async def _wait(self, job_id: uuid.UUID, tid: uuid.UUID) -> dict[str, Any]:
        """The final row of one of the job's own tasks, once it has finished."""
        wake = self._wake[job_id]
        while True:
            wake.clear()  # before looking: a finish while we look still wakes us
            row = await self._finished(tid)
            if row is not None:
                return row
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), 2.0)


def _key(job_id: uuid.UUID, sub: dict[str, Any], kind: str) -> str:
    """Idempotency key of a subtask's task: rounds count up, so each round's key is new."""
    return f"job:{job_id}:{sub['id']}:r{sub['rounds']}:{kind}"


def _test_input(job_id: uuid.UUID, spec: dict[str, Any], sub: dict[str, Any]) -> dict[str, Any]:
    return {
        "job_id": str(job_id),
        "subtask": sub["id"],
        "repo": spec["repo"],
        "base": sub["base"],
        "test_cmd": spec["test_cmd"],
        "patch": {"attachment": 0},
    }
