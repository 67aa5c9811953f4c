"""Jobs end to end: the real SDK against a scripted Anthropic-compatible server on loopback, real
developers editing real git worktrees, a real tester running pytest, and the policeman planning,
validating and integrating."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from casperd.ctl.client import ControlClient
from tests.integration.agentkit import FIXED, TEST_CMD, agent_env, checkout_and_test, git, make_repo, run_job
from tests.support.brains import ScriptedTeam, fix
from tests.support.fakeclaude import FakeClaude, Response, reply, text
from tests.support.mesh import wait_for

pytestmark = pytest.mark.integration

PLAN3 = [
    {
        "id": "fix-add",
        "title": "Fix add",
        "instructions": "[fix-add] add() subtracts; make it add.",
        "paths": ["calc/add.py"],
        "tests": ["tests/test_add.py"],
    },
    {
        "id": "fix-mul",
        "title": "Fix mul",
        "instructions": "[fix-mul] mul() adds; make it multiply.",
        "paths": ["calc/mul.py"],
        "tests": ["tests/test_mul.py"],
    },
    {
        "id": "fix-neg",
        "title": "Fix neg",
        "instructions": "[fix-neg] neg() returns its input; negate it.",
        "paths": ["calc/neg.py"],
    },
]


def _sub(report: dict[str, Any], sid: str) -> dict[str, Any]:
    return next(s for s in report["subtasks"] if s["id"] == sid)


def test_job_plans_codes_tests_and_integrates(make_mesh: Any, tmp_path: Path) -> None:
    team = ScriptedTeam(
        PLAN3,
        {
            "fix-add": [fix("calc/add.py", "a - b", "a + b")],
            # the first fix is wrong: the tester's failure goes back to the developer, who fixes it
            "fix-mul": [fix("calc/mul.py", "a + b", "a ** b"), fix("calc/mul.py", "a ** b", "a * b")],
            "fix-neg": [fix("calc/neg.py", "return a", "return -a")],
        },
    )
    repo = make_repo(tmp_path)
    with FakeClaude(script=team) as fake:
        mesh = make_mesh(developers=3, testers=1, extra_env=agent_env(fake.url))
        report = run_job(mesh, goal="make the tests pass", repo=str(repo), test_cmd=TEST_CMD, max_parallel=3)
        billed = fake.billed()
    assert report["state"] == "done", [(s["id"], s["state"], s["note"], s["tests"]) for s in report["subtasks"]]
    assert [s["state"] for s in report["subtasks"]] == ["integrated"] * 3
    # the usage report is the server's bill, token for token, every call once
    assert {k: report["tokens"][k] for k in billed} == billed
    # the mul developer was told its own test fails, apart from the other subtasks' (failing on the base too)
    mul_fed = [json.dumps(r.body["messages"][-1]) for r in fake.calls() if "[fix-mul]" in str(r.body["messages"][0])]
    assert any("Your subtask's tests that still fail" in m or "your change broke them" in m for m in mul_fed)
    assert any("Failing on the base commit too" in m and "test_add" in m for m in mul_fed)
    # the job's working ref is gone from the user's repository; the branch stays
    assert "refs/casper/jobs/" not in git(repo, "for-each-ref")
    assert git(repo, "rev-parse", report["branch"]).strip()
    assert _sub(report, "fix-mul")["rounds"] == 2 and _sub(report, "fix-add")["rounds"] == 1
    assert report["final_tests"]["ok"] and report["final_tests"]["passed"] == 4
    assert report["tokens"]["input_tokens"] > 0 and report["cost_usd"] > 0
    assert all(s["cost_usd"] > 0 and s["time_s"] > 0 for s in report["subtasks"])
    assert report["wall_s"] > 0 and report["sum_task_s"] > 0
    # every test task went straight from its developer to the tester, and the policeman recorded it
    assert all(s["handed_off"] for s in report["subtasks"]), report["subtasks"]
    with ControlClient(mesh.policeman.control, timeout_s=20) as c:
        test_task = c.request("get", id=_sub(report, "fix-add")["task_ids"][-1])
    assert test_task["type"] == "test" and test_task["submitted_by"].startswith("developer-")
    first = test_task["events"][1]
    assert (first["from_status"], first["to_status"], first["peer"]) == ("pending", "assigned", "tester")
    # the failing test really reached the developer
    mul_bodies = [r.body for r in fake.calls() if "[fix-mul]" in str(r.body["messages"][0])]
    assert any("The tests fail" in str(b["messages"][-1]) and "test_mul" in str(b["messages"][-1]) for b in mul_bodies)
    # the branch really passes its tests, and the original branch is untouched
    result = checkout_and_test(repo, report["branch"], tmp_path / "check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 passed" in result.stdout
    assert git(repo, "rev-parse", "main").strip() == report["base"]


def test_validation_rejects_and_the_developer_fixes(make_mesh: Any, tmp_path: Path) -> None:
    key = "sk-ant-api03-" + "Q" * 20 + "x7Yz" * 10
    team = ScriptedTeam(
        PLAN3,
        {
            "fix-add": [  # writes outside its allowed paths
                [
                    ("write_file", {"path": "calc/extra.py", "content": "X = 1\n"}),
                    *fix("calc/add.py", "a - b", "a + b"),
                ],
                [("run_command", {"command": "rm calc/extra.py"}), ("finish", {"summary": "removed extra.py"})],
            ],
            "fix-mul": [  # leaves a key in the code
                [
                    (
                        "write_file",
                        {"path": "calc/mul.py", "content": f'KEY = "{key}"\n\n\ndef mul(a, b):\n    return a * b\n'},
                    ),
                    ("finish", {"summary": "fixed"}),
                ],
                [
                    ("write_file", {"path": "calc/mul.py", "content": "def mul(a, b):\n    return a * b\n"}),
                    ("finish", {"summary": "removed the key"}),
                ],
            ],
            "fix-neg": [  # a syntax error
                fix("calc/neg.py", "return a", "return -a -"),
                fix("calc/neg.py", "return -a -", "return -a"),
            ],
        },
    )
    repo = make_repo(tmp_path)
    with FakeClaude(script=team) as fake:
        mesh = make_mesh(developers=3, testers=1, extra_env=agent_env(fake.url))
        report = run_job(mesh, goal="make the tests pass", repo=str(repo), test_cmd=TEST_CMD, max_parallel=3)
        bodies = [r.body for r in fake.calls()]
    assert report["state"] == "done", [(s["id"], s["state"], s["note"], s["tests"]) for s in report["subtasks"]]
    for sid, needle in (("fix-add", "calc/extra.py"), ("fix-mul", "key"), ("fix-neg", "neg.py")):
        sub = _sub(report, sid)
        assert sub["attempts"] >= 2, sub  # the rejected attempt and the fixed one
        fed = [b for b in bodies if f"[{sid}]" in str(b["messages"][0]) and "rejected your patch" in str(b)]
        assert fed, f"{sid}: the validation feedback never reached the developer"
        assert needle.lower() in str(fed[0]["messages"][-1]).lower()
    check = tmp_path / "check"
    result = checkout_and_test(repo, report["branch"], check)
    assert result.returncode == 0, result.stdout
    assert not (check / "calc" / "extra.py").exists()
    assert key not in (check / "calc" / "mul.py").read_text()


def test_merge_conflict_becomes_a_rebase_task(make_mesh: Any, tmp_path: Path) -> None:
    plan = [
        {
            "id": "name-a",
            "title": "Rename A",
            "instructions": "[name-a] suffix the name with -a",
            "paths": ["calc/names.py"],
        },
        {
            "id": "name-b",
            "title": "Rename B",
            "instructions": "[name-b] suffix the name with -b",
            "paths": ["calc/names.py"],
        },
    ]
    merged = [
        ("write_file", {"path": "calc/names.py", "content": 'NAME = "calc-ab"\n'}),
        ("finish", {"summary": "merged both names"}),
    ]
    team = ScriptedTeam(
        plan,
        {
            "name-a": [fix("calc/names.py", '"calc"', '"calc-a"'), merged],
            "name-b": [fix("calc/names.py", '"calc"', '"calc-b"'), merged],
        },
    )
    repo = make_repo(tmp_path, FIXED)
    with FakeClaude(script=team) as fake:
        mesh = make_mesh(developers=2, testers=1, extra_env=agent_env(fake.url))
        # through the real caspectl: progress lines while it runs (no TTY), then the report
        ctl = [sys.executable, "-m", "casperd.ctl.main", "--control", mesh.policeman.control]
        run = subprocess.run(
            [
                *ctl,
                "run",
                "rename the package",
                "--repo",
                str(repo),
                "--test-cmd",
                TEST_CMD,
                "--max-parallel",
                "2",
                "--poll",
                "0.5",
            ],
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        job_id = re.search(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", run.stdout).group(0)
        assert "integrated" in run.stdout and "casper/job-" in run.stdout
        later = subprocess.run([*ctl, "job", job_id, "-o", "json"], capture_output=True, text=True, timeout=60)
        report = json.loads(later.stdout)
        bodies = [r.body for r in fake.calls()]
    assert report["state"] == "done", [(s["id"], s["state"], s["note"], s["tests"]) for s in report["subtasks"]]
    rounds = sorted(s["rounds"] for s in report["subtasks"])
    assert rounds == [1, 2], report["subtasks"]  # the second to land was rebased once
    assert any("no longer applies" in str(b["messages"][-1]) for b in bodies)
    check = tmp_path / "check"
    assert checkout_and_test(repo, report["branch"], check).returncode == 0
    assert (check / "calc" / "names.py").read_text() == 'NAME = "calc-ab"\n'


def test_developer_killed_mid_loop_resumes_elsewhere(make_mesh: Any, tmp_path: Path) -> None:
    plan = [PLAN3[0]]
    # the second turn takes long: the developer holding it is killed meanwhile
    team = ScriptedTeam(plan, {"fix-add": [fix("calc/add.py", "a - b", "a + b")]}, delays={("fix-add", 0, 1): 8.0})
    repo = make_repo(tmp_path, {**FIXED, "calc/add.py": "def add(a, b):\n    return a - b\n"})
    with FakeClaude(script=team) as fake:
        mesh = make_mesh(developers=2, testers=1, extra_env=agent_env(fake.url))
        with ControlClient(mesh.policeman.control, timeout_s=20) as c:
            job = c.request("job-submit", goal="fix add", repo=str(repo), test_cmd=TEST_CMD)
            wait_for(lambda: 3 in team.seen["fix-add"], 60, "the developer's second turn")
            report = c.request("job", id=job["job_id"])
            code_task = report["subtasks"][0]["task_ids"][0]
            holder = c.request("get", id=code_task)["assigned_to"]
            assert holder and holder.startswith("developer")
            mesh.nodes[holder].proc.kill()
            killed_at = time.monotonic()
        with ControlClient(mesh.policeman.control, timeout_s=20) as c:
            final = wait_for(
                lambda: (r := c.request("job", id=job["job_id"]))["state"] in ("done", "failed") and r,
                120,
                "the job to end",
            )
        seen = list(team.seen["fix-add"])
    assert final["state"] == "done", (final["subtasks"], final["notes"])
    # one fresh start only: after the kill the conversation continued from the saved turns
    assert seen.count(1) == 1, seen
    assert seen[seen.index(3) + 1 :], seen
    assert all(n >= 3 for n in seen[seen.index(3) + 1 :]), seen
    assert time.monotonic() - killed_at < 120
    get = None
    with ControlClient(mesh.policeman.control, timeout_s=20) as c:
        get = c.request("get", id=code_task)
    assert get["attempts"] == 2 and get["status"] == "complete"
    assert get["output"]["resumed_at_message"] == 3
    assert checkout_and_test(repo, final["branch"], tmp_path / "check").returncode == 0


def test_handoff_falls_back_to_the_policeman_when_the_tester_is_unreachable(make_mesh: Any, tmp_path: Path) -> None:
    team = ScriptedTeam([PLAN3[0]], {"fix-add": [fix("calc/add.py", "a - b", "a + b")]})
    repo = make_repo(tmp_path, {**FIXED, "calc/add.py": "def add(a, b):\n    return a - b\n"})
    with FakeClaude(script=team) as fake:
        mesh = make_mesh(developers=1, testers=0, extra_env=agent_env(fake.url))
        node = mesh.add_node("tester", "tester", mesh.port_base + 9, start=False)
        node.env["CASPER_ADVERTISE"] = f"tcp://127.0.0.1:{mesh.port_base + 10}"  # nobody listens there
        mesh.start_node("tester")
        mesh.wait_peers(2, timeout=60)
        report = run_job(mesh, goal="fix add", repo=str(repo), test_cmd=TEST_CMD)
        with ControlClient(mesh.policeman.control, timeout_s=20) as c:
            code = c.request("get", id=report["subtasks"][0]["task_ids"][0])
            test = c.request("get", id=report["subtasks"][0]["task_ids"][-1])
    assert report["state"] == "done", report["subtasks"]
    assert code["output"]["handoff"]["direct"] is False  # the direct send failed ...
    assert test["submitted_by"] == "developer-1" and test["status"] == "complete"  # ... the policeman took it
    assert test["assigned_to"] == "tester"


def test_job_survives_a_policeman_restart(make_mesh: Any, tmp_path: Path) -> None:
    plan = [PLAN3[0], PLAN3[2]]
    team = ScriptedTeam(
        plan,
        {"fix-add": [fix("calc/add.py", "a - b", "a + b")], "fix-neg": [fix("calc/neg.py", "return a", "return -a")]},
        delays={("fix-add", 0, 1): 4.0, ("fix-neg", 0, 1): 4.0},
    )
    repo = make_repo(
        tmp_path,
        {**FIXED, "calc/add.py": "def add(a, b):\n    return a - b\n", "calc/neg.py": "def neg(a):\n    return a\n"},
    )
    with FakeClaude(script=team) as fake:
        mesh = make_mesh(developers=2, testers=1, extra_env=agent_env(fake.url))
        with ControlClient(mesh.policeman.control, timeout_s=20) as c:
            job = c.request("job-submit", goal="fix add and neg", repo=str(repo), test_cmd=TEST_CMD)
        wait_for(lambda: 3 in team.seen["fix-add"] and 3 in team.seen["fix-neg"], 60, "both developers mid-loop")
        mesh.nodes["policeman"].proc.kill()  # SIGKILL: no clean shutdown
        mesh.nodes["policeman"].proc.wait(10)
        mesh.start_node("policeman")
        mesh.wait_healthy("policeman", timeout=60)
        with ControlClient(mesh.policeman.control, timeout_s=20) as c:
            final = wait_for(
                lambda: (
                    (r := c.request("job", id=job["job_id"]))["state"] in ("done", "failed", "budget-exhausted") and r
                ),
                120,
                "the job to end",
            )
        del fake
    assert final["state"] == "done", (final["subtasks"], final["notes"])
    assert team.planned == 1  # the plan was kept, not made again
    assert team.seen["fix-add"].count(1) == 1 and team.seen["fix-neg"].count(1) == 1  # no developer restarted
    assert checkout_and_test(repo, final["branch"], tmp_path / "check").returncode == 0


def test_cancelling_a_job_stops_it_and_its_tasks(make_mesh: Any, tmp_path: Path) -> None:
    team = ScriptedTeam(
        [PLAN3[0]], {"fix-add": [fix("calc/add.py", "a - b", "a + b")]}, delays={("fix-add", 0, 1): 6.0}
    )
    repo = make_repo(tmp_path)
    with FakeClaude(script=team) as fake:
        mesh = make_mesh(developers=1, testers=1, extra_env=agent_env(fake.url))
        with ControlClient(mesh.policeman.control, timeout_s=20) as c:
            job = c.request("job-submit", goal="fix add", repo=str(repo), test_cmd=TEST_CMD)
            wait_for(lambda: 3 in team.seen["fix-add"], 60, "the developer mid-loop")
            code_task = c.request("job", id=job["job_id"])["subtasks"][0]["task_ids"][0]
            c.request("cancel", id=job["job_id"])
            report = wait_for(
                lambda: (r := c.request("job", id=job["job_id"]))["state"] == "cancelled" and r,
                30,
                "the job to be cancelled",
            )
            code = wait_for(
                lambda: (t := c.request("get", id=code_task))["status"] == "cancelled" and t,
                30,
                "its code task to be cancelled",
            )
    assert any("cancelled" in n for n in report["notes"]), report
    assert code["status"] == "cancelled"


def test_a_refusal_fails_its_subtask_with_the_named_reason_and_the_job_ends(make_mesh: Any, tmp_path: Path) -> None:
    team = ScriptedTeam(
        PLAN3,
        {
            "fix-add": [fix("calc/add.py", "a - b", "a + b")],
            "fix-mul": [fix("calc/mul.py", "a + b", "a * b")],
            "fix-neg": [fix("calc/neg.py", "return a", "return -a")],
        },
    )

    def script(body: dict[str, Any]) -> Response:
        if "[fix-neg]" in str(body["messages"][0]):
            return reply(text("I can't help with that."), stop_reason="refusal")
        return team(body)

    repo = make_repo(tmp_path)
    with FakeClaude(script=script) as fake:
        mesh = make_mesh(developers=2, testers=1, extra_env=agent_env(fake.url))
        report = run_job(mesh, goal="make the tests pass", repo=str(repo), test_cmd=TEST_CMD, max_parallel=3)
        refused = [r for r in fake.calls() if "[fix-neg]" in str(r.body["messages"][0])]
    assert report["state"] == "failed", report["state"]
    neg = _sub(report, "fix-neg")
    assert neg["state"] == "failed" and "refus" in str(neg["note"]), neg
    assert len(refused) == 1  # not retried: the same conversation would be refused again
    assert [_sub(report, s)["state"] for s in ("fix-add", "fix-mul")] == ["integrated", "integrated"]
