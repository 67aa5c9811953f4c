"""``caspectl run`` and ``caspectl job``: submit a Claude job to the policeman and follow it.

A job is a goal on a git repository: the policeman plans it into subtasks, runs them on the mesh,
integrates the results on a branch and runs the tests. These commands only talk to the control
socket (``job-submit``, ``job``). This module holds the commands and their arguments; the watch
loop is :mod:`casperd.ctl.jobwatch` and the rendering of a report :mod:`casperd.ctl.jobrender`
(both re-exported here).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from casperd.agents.jobstates import DEFAULT_MAX_PARALLEL, MAX_PARALLEL, is_terminal
from casperd.ctl.jobrender import (
    JOB_STATES,
    SUBTASK_STATES,
    _d,
    _str,
    fmt_secs,
    fmt_tokens,
    fmt_usd,
    key_not_passed_note,
    progress_line,
    render_live,
    render_report,
    speedup,
    subtask_counts,
    tests_ok,
    total_tokens,
)
from casperd.ctl.jobwatch import HEARTBEAT_S, MAX_MISSES, Requester, job_elapsed, watch
from casperd.errors import CommandError
from casperd.exitcodes import ExitCode

__all__ = [
    "HEARTBEAT_S",
    "JOB_STATES",
    "MAX_MISSES",
    "SUBTASK_STATES",
    "fmt_secs",
    "fmt_tokens",
    "fmt_usd",
    "job_elapsed",
    "key_not_passed_note",
    "render_live",
    "speedup",
    "subtask_counts",
    "tests_ok",
    "total_tokens",
]

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
    report = watch(client, job_id, out, a.poll, json_mode, sleep=time.sleep)
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
        help=f"subtasks running at once, 1-{MAX_PARALLEL} (default: {DEFAULT_MAX_PARALLEL})",
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
