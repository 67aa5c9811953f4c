"""A job's specification, the inputs of the tasks it creates, and waiting for those tasks.

:func:`parse_job_args` checks the arguments of ``job-submit`` (from ``caspectl run``) and builds
the job task's input; :func:`task_key` and :func:`test_input` name and describe the tasks the job
runner creates for a subtask, so that a resumed job finds the tasks it created before.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from casperd.agents import gitwork
from casperd.agents.jobstates import DEFAULT_MAX_PARALLEL, MAX_PARALLEL
from casperd.errors import InvalidBodyError


def now() -> str:
    return datetime.now(UTC).isoformat()


async def parse_job_args(args: dict[str, Any]) -> dict[str, Any]:
    """The input of a ``job`` task from ``job-submit``'s arguments (``base`` resolved to a sha).

    Raises:
        InvalidBodyError: a missing goal, a relative repository path, a bad budget or parallelism.
        GitError: the repository or revision cannot be used.
    """
    goal = args.get("goal")
    repo = args.get("repo")
    if not isinstance(goal, str) or not goal.strip():
        raise InvalidBodyError("a job needs a goal", hint='caspectl run "fix the failing tests" --repo PATH')
    if not isinstance(repo, str) or not Path(repo).is_absolute():
        raise InvalidBodyError(
            "a job needs --repo: an absolute path to a git repository",
            hint="the repository must be readable by every node at that path",
        )
    budget = args.get("budget_usd")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int | float) or budget <= 0):
        raise InvalidBodyError("budget_usd must be a positive number", hint="e.g. --budget-usd 2.5")
    par = args.get("max_parallel") or DEFAULT_MAX_PARALLEL
    if isinstance(par, bool) or not isinstance(par, int) or not 1 <= par <= MAX_PARALLEL:
        raise InvalidBodyError(f"max_parallel must be between 1 and {MAX_PARALLEL}", hint="e.g. --max-parallel 4")
    base = await gitwork.resolve_commit(repo, str(args.get("rev") or "HEAD"))
    return {
        "goal": goal.strip(),
        "repo": repo,
        "base": base,
        "test_cmd": args.get("test_cmd") or None,
        "budget_usd": budget,
        "max_parallel": par,
        "allowed": list(args.get("allowed") or []),
    }


def task_key(job_id: uuid.UUID, sub: dict[str, Any], kind: str) -> str:
    """Idempotency key of a subtask's task: rounds count up, so each round's key is new."""
    return f"job:{job_id}:{sub['id']}:r{sub['rounds']}:{kind}"


def test_input(job_id: uuid.UUID, spec: dict[str, Any], sub: dict[str, Any]) -> dict[str, Any]:
    return {
        "job_id": str(job_id),
        "subtask": sub["id"],
        "repo": spec["repo"],
        "base": sub["base"],
        "test_cmd": spec["test_cmd"],
        "patch": {"attachment": 0},
    }


def whole_test_input(job_id: uuid.UUID, spec: dict[str, Any], base: str) -> dict[str, Any]:
    """A test of the whole repository at ``base`` (the baseline, the final run)."""
    return {"job_id": str(job_id), "repo": spec["repo"], "base": base, "test_cmd": spec["test_cmd"]}


def parallelism(spec: dict[str, Any]) -> int:
    return int(spec.get("max_parallel") or DEFAULT_MAX_PARALLEL)


def code_input(
    job_id: uuid.UUID,
    spec: dict[str, Any],
    st: Any,
    sub: dict[str, Any],
    base: str,
    *,
    feedback: str | None,
    rebase: bool,
) -> dict[str, Any]:
    """The input of a subtask's code task for its current round (``sub["rounds"]``) on ``base``:
    a later round resumes the previous code task's conversation with ``feedback``; with a test
    command the developer hands its patch straight to a tester (``handoff``). Sets ``sub["base"]``."""
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
        inp["handoff"] = {"key": task_key(job_id, sub, "test"), "input": test_input(job_id, spec, sub)}
    return inp


async def finished_row(broker: Any, tid: uuid.UUID) -> dict[str, Any] | None:
    """The task's final row if it has finished, else None (without waiting)."""
    if broker.tasks.get(tid) is not None:
        return None
    row: dict[str, Any] | None = await broker.store.get(tid)
    if row is None or row["status"] not in ("complete", "dead", "cancelled"):
        return None
    return row


async def wait_finished(broker: Any, wake: asyncio.Event, tid: uuid.UUID) -> dict[str, Any]:
    """The final row of one of a job's own tasks, once it has finished (``wake`` is set by the
    runner whenever one of the job's tasks finishes)."""
    while True:
        wake.clear()  # before looking: a finish while we look still wakes us
        row = await finished_row(broker, tid)
        if row is not None:
            return row
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), 2.0)
