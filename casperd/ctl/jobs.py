"""``caspectl run`` and ``caspectl job``: submit a Claude job to the policeman and follow it.

A job is a goal on a git repository: the policeman plans it into subtasks, runs them on the mesh,
integrates the results on a branch and runs the tests. These commands only talk to the control
socket (``job-submit``, ``job``); everything here except :func:`cmd_run` / :func:`cmd_job` is a
pure function of a job report, so it is tested without a daemon.

The report (every key may be missing or ``None``; rendering never fails on a sparse report)::

    {"job_id", "goal", "repo", "base", "test_cmd", "state", "branch", "summary", "budget_usd",
     "cost_usd", "tokens": {...}, "wall_s", "sum_task_s", "started_at", "finished_at",
     "plan": [{"id", "title", "depends_on"}], "subtasks": [{"id", "title", "state", "rounds",
     "attempts", "tokens", "cost_usd", "time_s", "task_ids", "tests", "note"}],
     "final_tests": {"passed", "failed", "errors", "skipped", "ok", "failures"}, "notes": [...]}
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from casperd.errors import CommandError, RequestTimeoutError
from casperd.exitcodes import ExitCode

TERMINAL_STATES = frozenset({"done", "failed", "budget-exhausted", "cancelled"})
JOB_STATES = ("planning", "running", "integrating", "testing", *sorted(TERMINAL_STATES))
SUBTASK_STATES = ("pending", "coding", "validating", "testing", "tested", "integrated", "failed", "skipped")
TOKEN_KINDS = (
    ("input_tokens", "input"),
    ("output_tokens", "output"),
    ("cache_read_tokens", "cache read"),
    ("cache_write_tokens", "cache write"),
)
MAX_PARALLEL = 64
HEARTBEAT_S = 60.0
"""Without a TTY, a progress line is printed at least this often, even when nothing changed."""
MAX_MISSES = 3
"""Polls in a row that may go unanswered before watching gives up."""

JOB_COLORS = {
    "planning": "cyan",
    "running": "cyan",
    "integrating": "cyan",
    "testing": "cyan",
    "done": "bold green",
    "failed": "bold red",
    "budget-exhausted": "bold magenta",
    "cancelled": "yellow",
}
SUBTASK_COLORS = {
    "pending": "dim",
    "coding": "cyan",
    "validating": "cyan",
    "testing": "cyan",
    "tested": "green",
    "integrated": "bold green",
    "failed": "red",
    "skipped": "dim yellow",
}

RUN_EPILOG = """\
examples:
  caspectl run "fix the flaky parser test" --repo . --budget-usd 2
  caspectl run "add type hints to utils/" --repo ~/src/app --test-cmd "pytest -q" --max-parallel 4 --detach
  caspectl job JOB_ID --watch

Ctrl-C stops watching, not the job: it keeps running (see it with caspectl job ID).

exit codes: 0 done and the final tests pass, 1 failed, budget exhausted or final tests failing,
            2 bad usage (e.g. --repo is not a git work tree), 3 no daemon reachable,
            5 cancelled, 6 timed out; 0 also when watching is stopped with Ctrl-C.
"""

JOB_EPILOG = """\
exit codes: 0 still running, or done and the final tests pass; 1 failed, budget exhausted or final
            tests failing; 4 no such job; 5 cancelled (with --watch: once the job ends).
"""


class Requester(Protocol):
    """What the commands need of a control client (``ControlClient`` in life, a fake in tests)."""

    def request(self, op: str, **args: Any) -> Any: ...


# --- argument types and local checks --------------------------------------------------------------
def usd(text: str) -> float:
    """A positive, finite amount of US dollars (argparse type)."""
    try:
        value = float(text.strip().removeprefix("$"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an amount of dollars") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive amount of dollars, e.g. 2.50")
    return value


def parallelism(text: str) -> int:
    """How many subtasks may run at once: 1 to MAX_PARALLEL (argparse type)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= value <= MAX_PARALLEL:
        raise argparse.ArgumentTypeError(f"{text!r} must be between 1 and {MAX_PARALLEL}")
    return value


def poll_seconds(text: str) -> float:
    """Seconds between two polls: positive and finite (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive, finite number of seconds")
    return value


def git_work_tree(path: Path) -> bool:
    """Whether ``path`` is (inside) a git work tree."""
    if (path / ".git").exists():
        return True
    try:
        res = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "--is-inside-work-tree"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return res.returncode == 0 and res.stdout.strip() == "true"


def check_run(a: argparse.Namespace) -> None:
    """Local checks of ``caspectl run``, before any daemon is contacted; makes ``a.repo`` absolute."""
    if not a.goal.strip():
        raise CommandError("the goal is empty", hint='say what to do, e.g. caspectl run "fix the parser" --repo .')
    repo = Path(a.repo).expanduser()
    try:
        repo = repo.resolve(strict=True)
    except OSError:
        raise CommandError(
            f"--repo {a.repo}: no such directory", hint="give the path of a git work tree (a clone of the repository)"
        ) from None
    if not repo.is_dir():
        raise CommandError(f"--repo {repo} is not a directory", hint="give the path of a git work tree")
    if not git_work_tree(repo):
        raise CommandError(
            f"--repo {repo} is not a git work tree",
            hint=f"jobs work on git repositories: 'git -C {repo} init' and commit first, or point --repo at a clone",
        )
    a.repo = str(repo)
    if a.budget_usd is not None and not (math.isfinite(a.budget_usd) and a.budget_usd > 0):
        raise CommandError(f"--budget-usd {a.budget_usd} must be a positive amount of dollars", hint="e.g. 2.50")
    if a.max_parallel is not None and not 1 <= a.max_parallel <= MAX_PARALLEL:
        raise CommandError(f"--max-parallel {a.max_parallel} must be between 1 and {MAX_PARALLEL}")


def job_id_arg(text: str) -> str:
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise CommandError(f"{text!r} is not a job id", hint="job ids are UUIDs, as printed by caspectl run") from None


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


def is_terminal(state: str | None) -> bool:
    """Whether a job in this state has ended (nothing more will happen to it)."""
    return state in TERMINAL_STATES


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


def exit_code_for(report: dict[str, Any]) -> int:
    """0 for done with passing (or no) final tests and for jobs still running; 1 failed, budget
    exhausted or final tests failing; 5 cancelled."""
    state = report.get("state")
    if state == "done":
        final = report.get("final_tests")
        return int(ExitCode.FAILURE if isinstance(final, dict) and not tests_ok(final) else ExitCode.OK)
    if state in ("failed", "budget-exhausted"):
        return int(ExitCode.FAILURE)
    if state == "cancelled":
        return int(ExitCode.TASK_FAILED)
    return int(ExitCode.OK)


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
    ended = _str(report.get("state")) in TERMINAL_STATES
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


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        at = datetime.fromisoformat(value)
    except ValueError:
        return None
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def job_elapsed(report: dict[str, Any], fallback: float) -> float:
    """Seconds the job has run: from its own timestamps when they make sense, else ``fallback``."""
    started = _parse_time(report.get("started_at"))
    if started is not None:
        end = _parse_time(report.get("finished_at")) or datetime.now(UTC)
        seconds = (end - started).total_seconds()
        if seconds >= 0:
            return seconds
    return fallback


# --- the loop --------------------------------------------------------------------------------------
def watch(
    client: Requester,
    job_id: str,
    console: Console,
    poll_s: float = 1.0,
    json_mode: bool = False,
    *,
    sleep: Callable[[float], None] | None = None,
    clock: Callable[[], float] | None = None,
    live: bool | None = None,
) -> dict[str, Any]:
    """Poll ``job`` every ``poll_s`` seconds until the job ends, showing progress on ``console``:
    a ``rich`` live view on a terminal (or ``live=True``), one plain line per change otherwise,
    nothing with ``json_mode``. Returns the last report: terminal, unless watching was stopped
    with Ctrl-C (then the last report seen, at least ``{"job_id": job_id}``). A few unanswered
    polls in a row are tolerated; more raise RequestTimeoutError. Errors of the server (not found, ...)
    propagate. ``sleep`` and ``clock`` default to ``time.sleep`` and ``time.monotonic``."""
    sleep = sleep or time.sleep
    clock = clock or time.monotonic
    start = clock()
    last: dict[str, Any] = {"job_id": job_id}
    misses = 0

    def poll() -> dict[str, Any]:
        nonlocal last, misses
        try:
            data = client.request("job", id=job_id)
        except RequestTimeoutError:
            misses += 1
            if misses >= MAX_MISSES:
                raise
            return last
        misses = 0
        if isinstance(data, dict):
            last = data
        return last

    use_live = (console.is_terminal if live is None else live) and not json_mode
    try:
        if use_live:

            def view() -> RenderableType:
                return render_live(last, job_elapsed(last, clock() - start))

            with Live(console=console, get_renderable=view, refresh_per_second=4, transient=True):
                while not is_terminal(poll().get("state")):
                    sleep(poll_s)
            return last
        printed: tuple[Any, ...] | None = None
        printed_at = start
        while True:
            report = poll()
            key = _progress_key(report)
            if not json_mode and "state" in report and (key != printed or clock() - printed_at >= HEARTBEAT_S):
                console.print(progress_line(report), markup=False, highlight=False, soft_wrap=True)
                printed, printed_at = key, clock()
            if is_terminal(report.get("state")):
                return report
            sleep(poll_s)
    except KeyboardInterrupt:
        return last


# --- the commands ----------------------------------------------------------------------------------
def _consoles(out: Console | None, err: Console | None) -> tuple[Console, Console]:
    return (
        out or Console(width=None if sys.stdout.isatty() else 200),
        err or Console(stderr=True, width=None if sys.stderr.isatty() else 200),
    )


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def follow(client: Requester, a: argparse.Namespace, job_id: str, out: Console, err: Console) -> int:
    """Watch a job to its end and print its report; on Ctrl-C leave it running and exit 0."""
    json_mode = a.output == "json"
    report = watch(client, job_id, out, a.poll, json_mode)
    if not is_terminal(report.get("state")):
        message = f"job {job_id} keeps running; see it with: caspectl job {job_id}"
        if json_mode:
            _print_json({"job_id": job_id, "state": report.get("state"), "watching": False})
            err.print(message, highlight=False, markup=False)
        else:
            out.print(progress_line(report), highlight=False, markup=False)
            out.print(message, highlight=False, markup=False)
        return int(ExitCode.OK)
    if json_mode:
        _print_json(report)
    else:
        out.print(render_report(report))
    return exit_code_for(report)


def cmd_run(client: Requester, a: argparse.Namespace, out: Console | None = None, err: Console | None = None) -> int:
    """``caspectl run``: submit a job (``check_run`` has vetted the arguments), then follow it or detach."""
    out, err = _consoles(out, err)
    data = client.request(
        "job-submit",
        goal=a.goal,
        repo=a.repo,
        test_cmd=a.test_cmd or None,
        budget_usd=a.budget_usd,
        max_parallel=a.max_parallel,
        allowed=a.allow or None,
    )
    data = _d(data)
    job_id = _str(data.get("job_id"))
    if not job_id:
        raise CommandError(
            "the policeman accepted the job but returned no job id",
            hint="is the policeman the same version as caspectl? see caspectl status",
        )
    existing = bool(data.get("existing"))
    if a.detach:
        if a.output == "json":
            _print_json({"job_id": job_id, "existing": existing})
        else:
            print(job_id)
            err.print(
                f"{'existing' if existing else 'submitted'} job {job_id}; "
                f"follow it with: caspectl job {job_id} --watch",
                highlight=False,
                markup=False,
            )
        return int(ExitCode.OK)
    if a.output != "json":
        out.print(
            f"{'existing job' if existing else 'job'} {job_id} "
            f"{'(the same goal on the same repository)' if existing else 'submitted'}; Ctrl-C stops watching, "
            "not the job",
            highlight=False,
            markup=False,
        )
    return follow(client, a, job_id, out, err)


def cmd_job(client: Requester, a: argparse.Namespace, out: Console | None = None, err: Console | None = None) -> int:
    """``caspectl job ID [--watch]``: one job's report, or follow it live."""
    out, err = _consoles(out, err)
    job_id = job_id_arg(a.id)
    if a.watch:
        return follow(client, a, job_id, out, err)
    report = _d(client.request("job", id=job_id))
    if a.output == "json":
        _print_json(report)
    else:
        out.print(render_report(report))
    return exit_code_for(report)


def add_parsers(add: Callable[[str, Any, str], argparse.ArgumentParser], out: Console, err: Console) -> None:
    """Register ``run`` and ``job`` through caspectl's ``add(name, fn, help)``."""
    sp = add("run", lambda c, a: cmd_run(c, a, out, err), "run a Claude job on a git repository and follow it")
    sp.epilog, sp.formatter_class = RUN_EPILOG, argparse.RawDescriptionHelpFormatter
    sp.add_argument("goal", help="what to do, in words")
    sp.add_argument("--repo", required=True, metavar="PATH", help="the git work tree to work on")
    sp.add_argument(
        "--test-cmd", metavar="CMD", help="the command that runs the tests (default: decided by the policeman)"
    )
    sp.add_argument(
        "--budget-usd",
        type=usd,
        metavar="X",
        help="US dollars; no new Claude work is dispatched once spent (default: none)",
    )
    sp.add_argument(
        "--max-parallel",
        type=parallelism,
        metavar="N",
        help=f"subtasks running at once, 1-{MAX_PARALLEL} (default: mesh setting)",
    )
    sp.add_argument(
        "--allow", action="append", metavar="GLOB", help="a path glob the agents may change (repeat for more)"
    )
    sp.add_argument("--detach", action="store_true", help="print the job id and return at once")
    sp.add_argument("--poll", type=poll_seconds, default=1.0, metavar="S", help="seconds between updates (default 1)")
    sp = add("job", lambda c, a: cmd_job(c, a, out, err), "a job's report: plan, subtasks, spend, tests")
    sp.epilog, sp.formatter_class = JOB_EPILOG, argparse.RawDescriptionHelpFormatter
    sp.add_argument("id", help="the job id printed by caspectl run")
    sp.add_argument("--watch", action="store_true", help="follow the job live until it ends (Ctrl-C stops watching)")
    sp.add_argument("--poll", type=poll_seconds, default=1.0, metavar="S", help="seconds between updates (default 1)")
