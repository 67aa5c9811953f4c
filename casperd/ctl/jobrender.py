"""What ``caspectl job`` shows: a job report read tolerantly and rendered (pure functions).

Every key of a report may be missing, ``None`` or of the wrong type; nothing here fails on a
sparse report. States, their order and which ones end a job come from
:mod:`casperd.agents.jobstates`, the table the job runner moves by. The report::

    {"job_id", "goal", "repo", "base", "test_cmd", "state", "branch", "summary", "budget_usd",
     "cost_usd", "tokens": {...}, "wall_s", "sum_task_s", "started_at", "finished_at",
     "plan": [{"id", "title", "depends_on"}], "subtasks": [{"id", "title", "state", "rounds",
     "attempts", "tokens", "cost_usd", "time_s", "task_ids", "tests", "note"}],
     "final_tests": {"passed", "failed", "errors", "skipped", "ok", "failures"}, "notes": [...]}
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from casperd.agents.jobstates import JobState, SubtaskState, is_terminal

__all__ = ["is_terminal"]

JOB_STATES = tuple(s.value for s in JobState)
SUBTASK_STATES = tuple(s.value for s in SubtaskState)
TOKEN_KINDS = (
    ("input_tokens", "input"),
    ("output_tokens", "output"),
    ("cache_read_tokens", "cache read"),
    ("cache_write_tokens", "cache write"),
)

JOB_COLORS = {
    "planning": "cyan",
    "running": "cyan",
    "testing": "cyan",
    "done": "bold green",
    "failed": "bold red",
    "budget-exhausted": "bold magenta",
    "cancelled": "yellow",
}
SUBTASK_COLORS = {
    "pending": "dim",
    "coding": "cyan",
    "testing": "cyan",
    "tested": "green",
    "integrated": "bold green",
    "failed": "red",
    "skipped": "dim yellow",
}


# --- reading a report (tolerant of missing keys, None and wrong types) ---------------------------
def _d(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _items(value: Any) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _int(value: Any) -> int:
    n = _num(value)
    return int(n) if n is not None else 0


def _str(value: Any) -> str:
    return "" if value is None else str(value)


def subtask_counts(report: dict[str, Any]) -> dict[str, int]:
    """Subtasks by state, in lifecycle order (unknown states last)."""
    counts: dict[str, int] = {}
    for st in _items(report.get("subtasks")):
        state = _str(st.get("state")) or "unknown"
        counts[state] = counts.get(state, 0) + 1
    order = {s: i for i, s in enumerate(SUBTASK_STATES)}
    return dict(sorted(counts.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))


def total_tokens(tokens: Any) -> int:
    t = _d(tokens)
    return sum(_int(t.get(k)) for k, _ in TOKEN_KINDS)


def tests_ok(final: dict[str, Any]) -> bool:
    """Whether final tests passed: their ``ok``, else no failures and no errors."""
    if isinstance(final.get("ok"), bool):
        return bool(final["ok"])
    return _int(final.get("failed")) == 0 and _int(final.get("errors")) == 0


# --- formatting ------------------------------------------------------------------------------------
def fmt_usd(value: Any) -> str:
    n = _num(value)
    if n is None:
        return "-"
    return f"${n:.4f}" if abs(n) < 1 else f"${n:,.2f}"


def fmt_tokens(value: Any) -> str:
    """Compact token count: 950, 12.3k, 4.56M."""
    n = _int(value)
    if n < 1000:
        return str(n)
    if n < 1_000_000:
        return f"{n / 1000:.1f}k"
    return f"{n / 1_000_000:.2f}M"


def fmt_secs(value: Any) -> str:
    n = _num(value)
    if n is None:
        return "-"
    if n < 60:
        return f"{n:.1f}s"
    minutes, secs = divmod(int(n), 60)
    return f"{minutes}m{secs:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def _cost_vs_budget(report: dict[str, Any]) -> str:
    cost, budget = _num(report.get("cost_usd")), _num(report.get("budget_usd"))
    text = fmt_usd(cost if cost is not None else 0.0)
    if budget is None:
        return f"{text} (no budget)"
    pct = 100 * (cost or 0.0) / budget if budget > 0 else None
    share = "" if pct is None else f" ({pct:.1f}%)" if pct < 10 else f" ({pct:.0f}%)"
    return f"{text} of {fmt_usd(budget)}{share}"


def _state_text(state: Any, colors: dict[str, str]) -> Text:
    s = _str(state) or "?"
    return Text(s, style=colors.get(s, ""))


def _counts_text(report: dict[str, Any]) -> str:
    counts = subtask_counts(report)
    if not counts:
        return "no subtasks yet"
    total = sum(counts.values())
    return f"{total} subtask{'s' if total != 1 else ''}: " + ", ".join(f"{n} {s}" for s, n in counts.items())


def _rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The plan merged with the subtasks' progress: plan order first, then subtasks not in the plan."""
    subtasks = _items(report.get("subtasks"))
    by_id = {_str(s.get("id")): s for s in subtasks}
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for step in _items(report.get("plan")):
        sid = _str(step.get("id"))
        seen.add(sid)
        merged = {"state": "pending", **step, **by_id.get(sid, {})}
        merged.setdefault("depends_on", step.get("depends_on"))
        if not merged.get("title"):
            merged["title"] = step.get("title")
        rows.append(merged)
    rows.extend(s for s in subtasks if _str(s.get("id")) not in seen)
    return rows


def _tokens_cell(tokens: Any) -> str:
    t = _d(tokens)
    if not t:
        return "-"
    return f"{fmt_tokens(t.get('input_tokens'))}/{fmt_tokens(t.get('output_tokens'))}"


def _tests_cell(tests: Any) -> str:
    t = _d(tests)
    if not t:
        return "-"
    text = f"{_int(t.get('passed'))} ok"
    if _int(t.get("failed")) or _int(t.get("errors")):
        text += f", {_int(t.get('failed'))} failed, {_int(t.get('errors'))} errors"
    return text


def _subtask_table(report: dict[str, Any], *, full: bool) -> Table | None:
    rows = _rows(report)
    if not rows:
        return None
    deps = any(isinstance(r.get("depends_on"), list) and r.get("depends_on") for r in rows)
    t = Table(title="subtasks" if full else None, title_justify="left", header_style="bold")
    t.add_column("id", no_wrap=True)
    t.add_column("title", overflow="fold", ratio=1)
    if deps:
        t.add_column("after")
    t.add_column("state", no_wrap=True)
    if full:
        t.add_column("rounds", justify="right")
        t.add_column("attempts", justify="right")
    else:
        t.add_column("att/rnd", justify="right")
    t.add_column("tokens in/out", justify="right")
    t.add_column("cost", justify="right")
    t.add_column("time", justify="right")
    if full:
        t.add_column("tests")
    for r in rows:
        cells: list[RenderableType] = [_str(r.get("id")), _str(r.get("title"))]
        if deps:
            dep = r.get("depends_on")
            cells.append(", ".join(map(str, dep)) if isinstance(dep, list) else "")
        cells.append(_state_text(r.get("state"), SUBTASK_COLORS))
        if full:
            cells += [_str(r.get("rounds")), _str(r.get("attempts"))]
        else:
            cells.append(f"{_int(r.get('attempts'))}/{_int(r.get('rounds'))}")
        cells += [
            _tokens_cell(r.get("tokens")),
            fmt_usd(r.get("cost_usd")) if "cost_usd" in r else "-",
            fmt_secs(r.get("time_s")),
        ]
        if full:
            cells.append(_tests_cell(r.get("tests")))
        t.add_row(*cells)
    return t


def _header(report: dict[str, Any], elapsed: float | None = None) -> Text:
    head = Text.assemble(
        ("job ", "bold"),
        (_str(report.get("job_id")) or "?", "bold"),
        "  ",
        _state_text(report.get("state"), JOB_COLORS),
    )
    if elapsed is not None:
        head.append(f"  {fmt_secs(elapsed)}", style="dim")
    lines = [head]
    if report.get("goal"):
        lines.append(Text.assemble(("goal:   ", "dim"), _str(report["goal"])))
    repo, base = _str(report.get("repo")), _str(report.get("base"))
    if repo or base:
        lines.append(Text.assemble(("repo:   ", "dim"), repo or "?", ("@" + base[:12] if base else "", "dim")))
    lines.append(Text.assemble(("branch: ", "dim"), _str(report.get("branch")) or ("-", "dim")))
    if report.get("test_cmd"):
        lines.append(Text.assemble(("tests:  ", "dim"), _str(report["test_cmd"])))
    return Text("\n").join(lines)


def _token_kinds(tokens: Any) -> str:
    t = _d(tokens)
    if not t:
        return "-"
    parts = [f"{_int(t.get(k)):,} {label}" for k, label in TOKEN_KINDS]
    all_input = _int(t.get("input_tokens")) + _int(t.get("cache_read_tokens")) + _int(t.get("cache_write_tokens"))
    if all_input:
        parts.append(f"{_int(t.get('cache_read_tokens')) / all_input:.0%} of input from the cache")
    if "calls" in t:
        parts.append(f"{_int(t.get('calls')):,} calls")
    return ", ".join(parts)


def speedup(report: dict[str, Any]) -> float | None:
    """Sum of the subtasks' times over the job's wall time: how much running in parallel gained."""
    wall, summed = _num(report.get("wall_s")), _num(report.get("sum_task_s"))
    if wall is None or summed is None or wall <= 0:
        return None
    return summed / wall


def _final_tests(report: dict[str, Any]) -> Text:
    final = report.get("final_tests")
    if not isinstance(final, dict):
        return Text.assemble(("final tests: ", "bold"), ("not run", "dim"))
    ok = tests_ok(final)
    counts = ", ".join(f"{_int(final.get(k))} {k}" for k in ("passed", "failed", "errors", "skipped") if k in final)
    text = Text.assemble(
        ("final tests: ", "bold"),
        ("pass" if ok else "FAIL", "bold green" if ok else "bold red"),
        f" ({counts})" if counts else "",
    )
    for f in _items(final.get("failures")):
        message = _str(f.get("message")).strip().splitlines()
        text.append(f"\n  {_str(f.get('name')) or '?'}", style="red")
        if message:
            text.append(f": {message[0][:200]}")
    return text


def render_report(report: dict[str, Any]) -> RenderableType:
    """The full report of a job in whatever state it is in: header, subtasks, totals, tests, notes, summary."""
    report = _d(report)
    parts: list[RenderableType] = [_header(report)]
    table = _subtask_table(report, full=True)
    ended = is_terminal(_str(report.get("state")))
    parts.append(
        table
        if table is not None
        else Text("no subtasks: the job ended before any was planned" if ended else "no subtasks yet", style="dim")
    )
    details = Text()
    for r in _rows(report):
        extra = []
        if r.get("note"):
            extra.append(_str(r["note"]))
        ids = r.get("task_ids")
        if isinstance(ids, list) and ids:
            extra.append("tasks " + ", ".join(map(str, ids)))
        if extra:
            details.append(f"{_str(r.get('id'))}: ", style="bold").append("; ".join(extra) + "\n")
    if details:
        details.rstrip()
        parts.append(details)
    totals = Text()
    totals.append("tokens: ", style="bold").append(_token_kinds(report.get("tokens")) + "\n")
    totals.append("cost:   ", style="bold").append(_cost_vs_budget(report) + "\n")
    totals.append("time:   ", style="bold").append(
        f"{fmt_secs(report.get('wall_s'))} wall, {fmt_secs(report.get('sum_task_s'))} summed over subtasks"
    )
    gain = speedup(report) if table is not None else None
    if gain is not None and gain > 0:
        totals.append(f" = {gain:.2f}x parallel speedup")
    if report.get("started_at") or report.get("finished_at"):
        totals.append(
            f"\n        started {_str(report.get('started_at')) or '-'}, "
            f"finished {_str(report.get('finished_at')) or '-'}",
            style="dim",
        )
    parts += [totals, _final_tests(report)]
    notes = report.get("notes")
    if isinstance(notes, list) and notes:
        parts.append(Text.assemble(("notes:", "bold"), *(f"\n  - {_str(n)}" for n in notes)))
    if report.get("summary"):
        parts.append(Text.assemble(("summary:\n", "bold"), _str(report["summary"]).strip()))
    key_note = key_not_passed_note(json.dumps(report, default=str))
    if key_note:
        parts.append(Text(key_note, style="yellow"))
    return Group(*parts)


def key_not_passed_note(text: str) -> str | None:
    """When a failure is a missing API key and caspectl's own environment has one: say it is not passed on."""
    if "no Anthropic API key" not in text and "no-api-key" not in text:
        return None
    if not os.environ.get("ANTHROPIC_API_KEY", "").strip():
        return None
    return (
        "note: ANTHROPIC_API_KEY is set in caspectl's environment, but caspectl does not pass it on: the key must be "
        "in the environment of the casperd nodes (export it before 'casperd up' and restart the mesh) or in the "
        "file named by their anthropic_api_key_file setting"
    )


def render_live(report: dict[str, Any], elapsed: float) -> RenderableType:
    """The live view while a job runs: state and elapsed time, the plan with progress, counts, spend."""
    report = _d(report)
    parts: list[RenderableType] = [_header(report, elapsed)]
    table = _subtask_table(report, full=False)
    if table is not None:
        parts.append(table)
    elif report.get("state") in (None, "planning"):
        parts.append(Text("planning the work ...", style="dim"))
    parts.append(Text(_counts_text(report)))
    tokens = _d(report.get("tokens"))
    spent = f"tokens {total_tokens(tokens):,} ({_token_kinds(tokens)})" if tokens else "tokens -"
    parts.append(Text(f"{spent}; cost {_cost_vs_budget(report)}", style="dim"))
    return Group(*parts)


def progress_line(report: dict[str, Any]) -> str:
    """One plain line for logs and CI (no TTY): job, state, subtask counts, tokens, cost."""
    report = _d(report)
    jid = _str(report.get("job_id"))[:8] or "?"
    parts = [
        f"job {jid} {_str(report.get('state')) or '?'}",
        _counts_text(report),
        f"tokens {total_tokens(report.get('tokens')):,}",
        f"cost {_cost_vs_budget(report)}",
    ]
    if _num(report.get("wall_s")) is not None:
        parts.append(f"wall {fmt_secs(report.get('wall_s'))}")
    return " | ".join(parts)


def _progress_key(report: dict[str, Any]) -> tuple[Any, ...]:
    """What a new non-TTY line is printed for: the job's state and the subtasks' states."""
    return (report.get("state"), tuple(subtask_counts(report).items()))
