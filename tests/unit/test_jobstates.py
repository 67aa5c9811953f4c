"""Job and subtask states: one table, used by the runner and by caspectl."""

from __future__ import annotations

import itertools

import pytest

from casperd.agents import jobreport, jobstates
from casperd.agents.jobstates import JobState as J
from casperd.agents.jobstates import SubtaskState as S
from casperd.ctl import jobrender
from casperd.errors import IllegalTransitionError


def test_every_job_move_is_checked_against_the_table() -> None:
    for old, new in itertools.product(J, J):
        allowed = new == old or new in jobstates.JOB_TRANSITIONS[old]
        if allowed:
            assert jobstates.job_step(old.value, new) is new
        else:
            with pytest.raises(IllegalTransitionError, match=f"from {old.value} to {new.value}"):
                jobstates.job_step(old, new)
    assert all(not jobstates.JOB_TRANSITIONS[t] for t in jobstates.TERMINAL_JOB)


def test_every_subtask_move_is_checked_against_the_table() -> None:
    for old, new in itertools.product(S, S):
        sub = {"id": "s1", "state": old.value}
        if new == old or new in jobstates.SUBTASK_TRANSITIONS[old]:
            jobstates.subtask_step(sub, new, "why")
            assert sub == {"id": "s1", "state": new.value, "note": "why"}
        else:
            with pytest.raises(IllegalTransitionError, match="'s1'"):
                jobstates.subtask_step(sub, new)
            assert sub["state"] == old.value


def test_the_runners_paths_are_in_the_table() -> None:
    sub = {"id": "x"}  # a new subtask is pending
    for step in (S.CODING, S.TESTING, S.CODING, S.TESTING, S.TESTED, S.CODING, S.TESTED, S.INTEGRATED):
        jobstates.subtask_step(sub, step)
    job = J.PLANNING
    for step in (J.PLANNING, J.RUNNING, J.RUNNING, J.TESTING, J.DONE):
        job = jobstates.job_step(job, step)


def test_caspectl_reads_the_same_states() -> None:
    assert tuple(s.value for s in J) == jobrender.JOB_STATES
    assert tuple(s.value for s in S) == jobrender.SUBTASK_STATES
    assert set(jobrender.JOB_COLORS) == set(jobrender.JOB_STATES)
    assert set(jobrender.SUBTASK_COLORS) == set(jobrender.SUBTASK_STATES)
    assert all(jobrender.is_terminal(t.value) for t in jobstates.TERMINAL_JOB)
    assert not jobrender.is_terminal("running")


def _prog(*states: str, applied: int = 1, final_ok: bool | None = None) -> dict:
    prog: dict = {
        "subtasks": {f"s{i}": {"id": f"s{i}", "state": s} for i, s in enumerate(states)},
        "integration": {"applied": [f"s{i}" for i in range(applied)]},
        "branch": "casper/job-1",
    }
    if final_ok is not None:
        prog["final_tests"] = {"ok": final_ok}
    return prog


def test_final_state() -> None:
    tests = {"test_cmd": "pytest"}
    assert jobreport.final_state(tests, _prog("integrated", final_ok=True), False)[0] is J.DONE
    assert jobreport.final_state(tests, _prog("integrated", final_ok=False), False)[0] is J.FAILED
    assert jobreport.final_state({}, _prog("integrated", "skipped"), True)[0] is J.BUDGET_EXHAUSTED
    state, summary = jobreport.final_state({}, _prog("integrated", "failed"), False)
    assert state is J.FAILED and summary == "1 of 2 subtasks integrated on casper/job-1; not integrated: s1"


def test_tests_pass_against_the_baseline() -> None:
    def row(status: str, *failing: str) -> dict:
        return {"status": status, "output": {"failures": [{"name": n} for n in failing]}}

    base = row("complete", "tests/test_old.py::test_flaky")
    assert jobreport.tests_pass(row("complete", "tests/test_old.py::test_flaky"), base, ["tests/test_new.py"])
    assert not jobreport.tests_pass(row("complete", "tests/test_other.py::t"), base, [])
    assert not jobreport.tests_pass(row("complete", "tests/test_old.py::test_flaky"), base, ["tests/test_old.py"])
    assert not jobreport.tests_pass(row("dead"), base, [])
