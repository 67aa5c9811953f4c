"""What a job tells: its report (``caspectl job``) and the feedback its developers get."""

from __future__ import annotations

import time
import uuid
from typing import Any


async def build_report(
    records: Any, job_id: uuid.UUID, spec: dict[str, Any], prog: dict[str, Any], state: str
) -> dict[str, Any]:
    """The job's report (caspectl job): plan, subtasks with tokens, cost and time, totals, final tests."""
    subs = list((prog.get("subtasks") or {}).values())
    ids = [uuid.UUID(t) for s in subs for t in s.get("task_ids", [])]
    usage = await records.usage_by_task(ids)
    out_subs = []
    for s in subs:
        u: dict[str, Any] = {}
        for t in s.get("task_ids", []):
            for k, v in usage.get(uuid.UUID(t), {}).items():
                u[k] = round(u.get(k, 0) + v, 6)
        out_subs.append(
            {
                **{
                    k: s.get(k)
                    for k in ("id", "title", "state", "rounds", "attempts", "task_ids", "tests", "note", "handed_off")
                },
                "time_s": round(float(s.get("time_s") or 0.0), 3),
                "tokens": u,
                "cost_usd": u.get("cost_usd", 0.0),
            }
        )
    total = await records.usage_by_job(job_id)
    t0 = prog.get("t0")
    wall = prog.get("wall_s") or (round(time.time() - float(t0), 3) if t0 else 0.0)
    return {
        "job_id": str(job_id),
        **spec_view(spec),
        "state": state,
        "branch": prog.get("branch"),
        "summary": prog.get("summary", ""),
        "cost_usd": total["cost_usd"],
        "tokens": total,
        "wall_s": wall,
        "sum_task_s": round(sum(s["time_s"] for s in out_subs) + float(prog.get("final_time_s") or 0.0), 3),
        "started_at": prog.get("started_at"),
        "finished_at": prog.get("finished_at"),
        "plan": [
            {"id": s["id"], "title": s["title"], "depends_on": s.get("depends_on", [])}
            for s in (prog.get("plan") or {}).get("subtasks", [])
        ],
        "subtasks": out_subs,
        "final_tests": prog.get("final_tests"),
        "notes": prog.get("notes", []),
    }


def spec_view(spec: dict[str, Any]) -> dict[str, Any]:
    return {k: spec.get(k) for k in ("goal", "repo", "base", "test_cmd", "budget_usd", "max_parallel")}


def last_error(row: dict[str, Any]) -> str:
    errs = row.get("error") or []
    if errs:
        e = errs[-1]
        return f"{row['status']}: [{e.get('code')}] {e.get('message')}"[:1000]
    return str(row["status"])


def test_feedback(row: dict[str, Any], baseline: set[str] | None = None, own: set[str] | None = None) -> str:
    """What a developer is told about its patch's test run: its own failing tests, tests its patch
    broke (they pass on the base commit), and, apart, tests that fail on the base too (not its
    doing; often another subtask's)."""
    out = row.get("output") or {}
    if row["status"] != "complete":
        return f"The tests could not run: {last_error(row)}"
    baseline, own = baseline or set(), own or set()
    lines = [
        f"The tests fail: {out.get('passed', 0)} passed, {out.get('failed', 0)} failed, {out.get('errors', 0)} errors."
    ]
    failures = list(out.get("failures") or [])
    mine = [f for f in failures if str(f.get("name")) in own]
    broke = [f for f in failures if str(f.get("name")) not in own and str(f.get("name")) not in baseline]
    base_too = [str(f.get("name")) for f in failures if str(f.get("name")) in baseline - own]
    for title, group in (
        ("Your subtask's tests that still fail (fix these):", mine),
        ("Tests that pass on the base commit but fail with your patch (your change broke them):", broke),
    ):
        if group:
            lines.append(title)
            lines.extend(f"- {f.get('name')}: {str(f.get('message') or '')[:800]}" for f in group[:10])
    if base_too:
        shown = ", ".join(base_too[:20]) + (f" and {len(base_too) - 20} more" if len(base_too) > 20 else "")
        lines.append(
            f"Failing on the base commit too, before your change (not yours to fix; other subtasks may own them): "
            f"{shown}"
        )
    tail = str(out.get("output_tail") or "")[-2000:]
    if tail and (mine or broke):
        lines.append(f"Output (tail):\n{tail}")
    return "\n".join(lines)
