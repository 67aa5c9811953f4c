"""caspectl run / job: the watch loop, the renderings and the local checks, with a fake control client."""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from casperd.ctl import jobs
from casperd.ctl import main as ctl_main
from casperd.errors import CommandError, RequestTimeoutError, TaskNotFoundError
from casperd.exitcodes import ExitCode

pytestmark = pytest.mark.unit

JOB_ID = "0192f7a0-1a2b-7c3d-8e4f-1234567890ab"
TOKENS = {"input_tokens": 1200, "output_tokens": 340, "cache_read_tokens": 5000, "cache_write_tokens": 80, "calls": 5}


def subtask(sid: str, state: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": sid,
        "title": f"do {sid}",
        "state": state,
        "rounds": 1,
        "attempts": 1,
        "tokens": TOKENS,
        "cost_usd": 0.001,
        "time_s": 3.2,
        "task_ids": [],
        "tests": None,
        "note": None,
        **extra,
    }


def report(state: str, *states: str, **extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "job_id": JOB_ID,
        "goal": "fix the parser",
        "repo": "/src/app",
        "base": "a1b2c3d4e5f60718293a",
        "test_cmd": "pytest -q",
        "state": state,
        "branch": None,
        "summary": "",
        "budget_usd": 5.0,
        "cost_usd": 0.0123,
        "tokens": TOKENS,
        "wall_s": 10.0,
        "sum_task_s": 25.0,
        "started_at": "2024-05-01T10:00:00+00:00",
        "finished_at": None,
        "plan": [{"id": f"s{i}", "title": f"do s{i}", "depends_on": []} for i in range(len(states))],
        "subtasks": [subtask(f"s{i}", st) for i, st in enumerate(states)],
        "final_tests": None,
        "notes": [],
    }
    base.update(extra)
    return base


FULL = report(
    "done",
    "integrated",
    "integrated",
    "failed",
    branch="casper/job-1a2b3c4d",
    summary="Fixed it.",
    finished_at="2024-05-01T10:00:10+00:00",
    notes=["subtask s2 gave up after 3 attempts"],
    final_tests={"passed": 10, "failed": 0, "errors": 0, "skipped": 1, "ok": True, "failures": []},
)


class FakeClient:
    """Answers ``job`` with canned reports in order (the last one repeats); records every request."""

    def __init__(self, reports: list[Any], submit: dict[str, Any] | None = None) -> None:
        self.reports = list(reports)
        self.submit = submit or {"job_id": JOB_ID, "existing": False}
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def request(self, op: str, **args: Any) -> Any:
        self.calls.append((op, args))
        if op == "job-submit":
            return self.submit
        assert op == "job" and args == {"id": JOB_ID}
        item = self.reports.pop(0) if len(self.reports) > 1 else self.reports[0]
        if isinstance(item, BaseException):
            raise item
        return item


def text_of(renderable: Any, width: int = 160) -> str:
    console = Console(record=True, width=width, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def plain_console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=200, force_terminal=False), buf


# --- watch -----------------------------------------------------------------------------------------
def test_watch_polls_until_terminal_and_returns_the_final_report() -> None:
    seq = [
        report("planning"),
        report("running", "coding", "pending"),
        report("running", "tested", "coding"),
        report("integrating", "integrated", "tested"),
        FULL,
    ]
    client = FakeClient(seq)
    sleeps: list[float] = []
    console, buf = plain_console()
    final = jobs.watch(client, JOB_ID, console, 0.25, sleep=sleeps.append)
    assert final is FULL
    assert [op for op, _ in client.calls] == ["job"] * 5
    assert sleeps == [0.25] * 4  # no sleep after the terminal report
    lines = buf.getvalue().splitlines()
    assert len(lines) == 5 and lines[0].startswith("job 0192f7a0 planning") and "done" in lines[-1]


def test_watch_without_tty_prints_a_line_only_when_state_or_counts_change() -> None:
    running = report("running", "coding", "pending")
    client = FakeClient(
        [
            running,
            dict(running, cost_usd=0.02),
            running,
            report("running", "tested", "pending"),
            report("failed", "tested", "failed"),
        ]
    )
    console, buf = plain_console()
    final = jobs.watch(client, JOB_ID, console, 1.0, sleep=lambda s: None)
    assert final["state"] == "failed"
    assert len(buf.getvalue().splitlines()) == 3


def test_watch_json_mode_is_silent() -> None:
    console, buf = plain_console()
    final = jobs.watch(
        FakeClient([report("running", "coding"), FULL]), JOB_ID, console, 1.0, True, sleep=lambda s: None
    )
    assert final is FULL and buf.getvalue() == ""


def test_watch_live_view_on_a_terminal() -> None:
    buf = io.StringIO()
    console = Console(file=buf, width=120, force_terminal=True)
    final = jobs.watch(
        FakeClient([report("running", "coding"), report("testing", "integrated"), FULL]),
        JOB_ID,
        console,
        0.01,
        sleep=lambda s: None,
    )
    assert final is FULL


def test_watch_tolerates_a_few_unanswered_polls_then_gives_up() -> None:
    timeout = RequestTimeoutError("no answer")
    console, _ = plain_console()
    ok = FakeClient([report("running", "coding"), timeout, timeout, FULL])
    assert jobs.watch(ok, JOB_ID, console, 1.0, sleep=lambda s: None) is FULL
    bad = FakeClient([report("running", "coding"), timeout, timeout, timeout, FULL])
    with pytest.raises(RequestTimeoutError):
        jobs.watch(bad, JOB_ID, console, 1.0, sleep=lambda s: None)


def test_watch_ctrl_c_returns_the_last_report_seen() -> None:
    running = report("running", "coding")

    def interrupt(_: float) -> None:
        raise KeyboardInterrupt

    console, _ = plain_console()
    assert jobs.watch(FakeClient([running]), JOB_ID, console, 1.0, sleep=interrupt) is running


def test_watch_not_found_propagates() -> None:
    console, _ = plain_console()
    with pytest.raises(TaskNotFoundError):
        jobs.watch(FakeClient([TaskNotFoundError("no job")]), JOB_ID, console, 1.0, sleep=lambda s: None)


# --- progress line, renderings, exit codes ----------------------------------------------------------
def test_progress_line_follows_state_counts_and_cost() -> None:
    a = jobs.progress_line(report("running", "coding", "pending", "pending"))
    b = jobs.progress_line(report("running", "tested", "coding", "pending", cost_usd=0.5))
    assert a != b
    assert "running" in a and "1 coding" in a and "2 pending" in a and "$0.0123" in a and "$5.00" in a
    assert "1 tested" in b and "1 pending" in b and "$0.5000" in b
    assert "3 subtasks" in a
    assert "planning" in jobs.progress_line({"state": "planning"})
    assert jobs.progress_line({})  # never fails


def test_render_report_complete() -> None:
    text = text_of(jobs.render_report(FULL))
    for needle in (
        "s0",
        "s1",
        "s2",
        "casper/job-1a2b3c4d",
        "$0.0123",
        "$5.00",
        "2.50x",
        "a1b2c3d4e5f6",
        "fix the parser",
        "Fixed it.",
        "gave up after 3 attempts",
        "10 passed",
        "pass",
        "1,200 input",
        "340 output",
        "5,000 cache read",
        "80 cache write",
        "80% of input from the cache",  # 5,000 of 1,200 + 5,000 + 80
        "integrated",
        "failed",
    ):
        assert needle in text, needle
    assert "a1b2c3d4e5f607" not in text  # the base is shown short


def test_render_report_sparse_and_odd_values() -> None:
    for sparse in (
        {},
        {"job_id": JOB_ID},
        {
            "state": "running",
            "tokens": None,
            "plan": None,
            "subtasks": None,
            "final_tests": None,
            "notes": None,
            "wall_s": None,
            "cost_usd": None,
        },
        {
            "state": "odd",
            "subtasks": [None, {"id": 3}, {"tests": {}, "tokens": "x"}],
            "cost_usd": "x",
            "wall_s": 0,
            "sum_task_s": 5,
            "budget_usd": 0,
            "final_tests": {"failures": [None, {}]},
        },
        {"plan": [{"id": "only-planned", "title": "later", "depends_on": ["x"]}]},
    ):
        text = text_of(jobs.render_report(sparse))
        assert "final tests" in text
        live = text_of(jobs.render_live(sparse, 3.0))
        assert live
        assert jobs.progress_line(sparse)
    planned = text_of(jobs.render_report({"plan": [{"id": "only-planned", "title": "later", "depends_on": ["x"]}]}))
    assert "only-planned" in planned and "pending" in planned


def test_render_report_failing_tests_and_budget() -> None:
    r = report(
        "budget-exhausted",
        "integrated",
        "skipped",
        cost_usd=5.01,
        final_tests={
            "passed": 3,
            "failed": 1,
            "errors": 0,
            "ok": False,
            "failures": [{"name": "tests/test_x.py::test_y", "message": "AssertionError: 1 != 2"}],
        },
    )
    text = text_of(jobs.render_report(r))
    assert "budget-exhausted" in text and "FAIL" in text and "test_x.py::test_y" in text and "$5.01 of $5.00" in text


def test_render_live_shows_plan_counts_spend_and_elapsed() -> None:
    text = text_of(jobs.render_live(report("running", "coding", "pending"), 75.0))
    for needle in ("running", "1m15s", "s0", "s1", "coding", "1 pending, 1 coding", "$0.0123 of $5.00", "1/1"):
        assert needle in text, needle
    assert "planning the work" in text_of(jobs.render_live({"state": "planning"}, 1.0))


@pytest.mark.parametrize(
    ("rep", "code"),
    [
        (FULL, ExitCode.OK),
        (dict(FULL, final_tests=None), ExitCode.OK),
        (dict(FULL, final_tests={"passed": 3, "failed": 1, "ok": False}), ExitCode.FAILURE),
        (dict(FULL, final_tests={"passed": 3, "failed": 1}), ExitCode.FAILURE),
        (report("failed", "failed"), ExitCode.FAILURE),
        (report("budget-exhausted", "integrated"), ExitCode.FAILURE),
        (report("cancelled"), ExitCode.TASK_FAILED),
        (report("running", "coding"), ExitCode.OK),
        ({}, ExitCode.OK),
    ],
)
def test_exit_code_for(rep: dict[str, Any], code: int) -> None:
    assert jobs.exit_code_for(rep) == code


def test_is_terminal() -> None:
    assert all(jobs.is_terminal(s) for s in ("done", "failed", "budget-exhausted", "cancelled"))
    assert not any(jobs.is_terminal(s) for s in ("planning", "running", "integrating", "testing", None, ""))


# --- the parser and the commands --------------------------------------------------------------------
def test_parser_accepts_run_and_job() -> None:
    a = ctl_main.build_parser().parse_args(
        [
            "run",
            "goal",
            "--repo",
            ".",
            "--budget-usd",
            "1",
            "--max-parallel",
            "3",
            "--detach",
            "--allow",
            "src/*",
            "--allow",
            "tests/*",
        ]
    )
    assert (a.command, a.goal, a.repo, a.budget_usd, a.max_parallel, a.detach) == ("run", "goal", ".", 1.0, 3, True)
    assert a.allow == ["src/*", "tests/*"] and a.poll == 1.0 and a.test_cmd is None
    j = ctl_main.build_parser().parse_args(["job", JOB_ID, "--watch", "--poll", "0.5", "-o", "json"])
    assert (j.command, j.id, j.watch, j.poll, j.output) == ("job", JOB_ID, True, 0.5, "json")


@pytest.mark.parametrize(
    "bad",
    [
        ["--budget-usd", "0"],
        ["--budget-usd", "-1"],
        ["--budget-usd", "nan"],
        ["--budget-usd", "lots"],
        ["--max-parallel", "0"],
        ["--max-parallel", "65"],
        ["--poll", "0"],
        [],
    ],
)
def test_parser_rejects_bad_run_arguments(bad: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    args = ["run", "goal", *bad] if bad else ["run", "goal"]  # [] = no --repo
    if bad:
        args += ["--repo", "."]
    with pytest.raises(SystemExit) as exc:
        ctl_main.build_parser().parse_args(args)
    assert exc.value.code == 2


@pytest.fixture
def no_mesh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No daemon anywhere, and git never looks above tmp_path."""
    for name in list(os.environ):
        if name.upper().startswith("CASPER_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("CASPER_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))

    def no_daemon(*a: Any, **k: Any) -> Any:
        raise AssertionError("reached for a daemon")

    monkeypatch.setattr(ctl_main, "find_control", no_daemon)
    monkeypatch.setattr(ctl_main, "ControlClient", no_daemon)
    return tmp_path


def test_run_on_a_non_git_directory_fails_before_any_daemon(no_mesh: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plain = no_mesh / "plain"
    plain.mkdir()
    assert ctl_main.main(["run", "fix it", "--repo", str(plain)]) == ExitCode.USAGE
    err = capsys.readouterr().err
    assert "plain" in err and "not a git work tree" in err and "hint" in err
    assert ctl_main.main(["run", "fix it", "--repo", str(no_mesh / "missing")]) == ExitCode.USAGE
    assert "missing" in capsys.readouterr().err
    assert ctl_main.main(["run", "fix it", "--repo", str(plain), "-o", "json"]) == ExitCode.USAGE
    body = json.loads(capsys.readouterr().out)
    assert body["exit_code"] == 2 and str(plain) in body["error"]["message"]
    assert ctl_main.main(["run", "  ", "--repo", str(plain)]) == ExitCode.USAGE


def test_check_run_accepts_a_git_repo_and_makes_the_path_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    a = argparse.Namespace(goal="g", repo="repo", budget_usd=None, max_parallel=None)
    jobs.check_run(a)
    assert a.repo == str(repo.resolve())


def test_git_work_tree_through_git(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    try:
        subprocess.run(["git", "init", "-q", str(tmp_path / "r")], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("git is not available")
    (tmp_path / "r" / "sub").mkdir()
    assert jobs.git_work_tree(tmp_path / "r" / "sub")
    assert not jobs.git_work_tree(tmp_path)


def run_args(**kw: Any) -> argparse.Namespace:
    base = {
        "goal": "fix it",
        "repo": "/src/app",
        "test_cmd": None,
        "budget_usd": 2.0,
        "max_parallel": 3,
        "allow": None,
        "detach": False,
        "poll": 0.01,
        "output": "table",
    }
    return argparse.Namespace(**{**base, **kw})


def test_cmd_run_detach_prints_the_job_id(capsys: pytest.CaptureFixture[str]) -> None:
    client = FakeClient([FULL])
    out, _ = plain_console()
    assert jobs.cmd_run(client, run_args(detach=True, allow=["src/*"]), out, out) == ExitCode.OK
    assert capsys.readouterr().out.strip() == JOB_ID
    assert client.calls == [
        (
            "job-submit",
            {
                "goal": "fix it",
                "repo": "/src/app",
                "test_cmd": None,
                "budget_usd": 2.0,
                "max_parallel": 3,
                "allowed": ["src/*"],
            },
        )
    ]
    assert jobs.cmd_run(FakeClient([FULL]), run_args(detach=True, output="json"), out, out) == ExitCode.OK
    assert json.loads(capsys.readouterr().out)["job_id"] == JOB_ID


def test_cmd_run_follows_to_the_end(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(jobs.time, "sleep", lambda s: None)
    out, buf = plain_console()
    failed = report("failed", "failed")
    assert jobs.cmd_run(FakeClient([report("running", "coding"), failed]), run_args(), out, out) == ExitCode.FAILURE
    assert "s0" in buf.getvalue() and "failed" in buf.getvalue()
    assert jobs.cmd_run(FakeClient([report("running", "coding"), FULL]), run_args(output="json"), out, out) == 0
    assert json.loads(capsys.readouterr().out)["branch"] == "casper/job-1a2b3c4d"


def test_cmd_run_ctrl_c_leaves_the_job_running(monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupt(_: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(jobs.time, "sleep", interrupt)
    out, buf = plain_console()
    assert jobs.cmd_run(FakeClient([report("running", "coding")]), run_args(), out, out) == ExitCode.OK
    assert f"job {JOB_ID} keeps running; see it with: caspectl job {JOB_ID}" in buf.getvalue()


def test_cmd_job(capsys: pytest.CaptureFixture[str]) -> None:
    out, buf = plain_console()
    a = argparse.Namespace(id=JOB_ID, watch=False, poll=1.0, output="table")
    assert jobs.cmd_job(FakeClient([report("running", "coding")]), a, out, out) == ExitCode.OK
    assert "running" in buf.getvalue()
    assert jobs.cmd_job(FakeClient([report("cancelled")]), a, out, out) == ExitCode.TASK_FAILED
    with pytest.raises(CommandError):
        jobs.cmd_job(FakeClient([FULL]), argparse.Namespace(id="nope", watch=False, poll=1.0, output="table"))


def test_job_not_found_exits_not_found(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    class Ctx(FakeClient):
        def __init__(self, *a: Any) -> None:
            super().__init__([TaskNotFoundError(f"no job {JOB_ID}", hint="see caspectl run")])

        def __enter__(self) -> Ctx:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

    monkeypatch.setattr(ctl_main, "find_control", lambda *a: "ipc:///nowhere")
    monkeypatch.setattr(ctl_main, "ControlClient", Ctx)
    assert ctl_main.main(["job", JOB_ID]) == ExitCode.NOT_FOUND
    assert "no job" in capsys.readouterr().err
