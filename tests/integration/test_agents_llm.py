"""Claude calls on a live mesh: ``ask`` tasks on real developer nodes (the real anthropic SDK)
against FakeClaude on loopback, with the policeman's mesh-wide rate limit, the shared Redis
result cache and a job's budget.

Every test is bounded (well under a minute) and checks what the fake server actually received:
request arrival times (monotonic clock of this process) and answers."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from casperd.ctl.client import ControlClient
from casperd.localmesh import LocalMesh
from casperd.messages import TaskSpec
from tests.integration.agentkit import agent_env, make_repo, run_job
from tests.support.brains import ScriptedTeam, fix
from tests.support.fakeclaude import (
    FakeClaude,
    Recorded,
    Response,
    last_user_text,
    overloaded,
    rate_limited,
    reply,
    text,
)
from tests.support.mesh import db_rows, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

MeshFactory = Callable[..., LocalMesh]


def ask(prompt: str, **extra: Any) -> TaskSpec:
    return TaskSpec(type="ask", input={"prompt": prompt, "max_tokens": 64, **extra})


def run_asks(mesh: LocalMesh, specs: list[TaskSpec], timeout: float = 60.0) -> list[dict[str, Any]]:
    """Submit all at once, wait for every DONE, return the ``get`` view of each (in submit order)."""
    with ControlClient(mesh.policeman.control, timeout_s=20) as c:
        ids = [str(t) for t in c.submit_until_accepted(specs, wait=True).task_ids]
        done: set[str] = set()
        deadline = time.monotonic() + timeout
        for ev in c.done_events(timeout_s=timeout):
            done.add(str(ev.task_id))
            if done >= set(ids) or time.monotonic() > deadline:
                break
        assert done >= set(ids), f"{len(set(ids) - done)} of {len(ids)} tasks never finished"
        return [c.request("get", id=t) for t in ids]


def holder(view: dict[str, Any]) -> str | None:
    """The node that ran the task's last attempt (its assignment event, or ``assigned_to``)."""
    peers = [e.get("peer") for e in view.get("events") or [] if e.get("to_status") in ("assigned", "running")]
    return view.get("assigned_to") or next((p for p in reversed(peers) if p), None)


def statuses(fake: FakeClaude) -> list[int]:
    return [r.status for r in sorted(fake.recorded(), key=lambda r: r.t)]


# --- 1. no API key ----------------------------------------------------------------------------------
def test_ask_without_api_key_is_dead_at_once(
    make_mesh: MeshFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # LocalMesh passes this process's environment to the nodes: a key here would leak into them
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("ANTHROPIC_AUTH_TOKEN", raising=False)
    with FakeClaude() as fake:
        env = {k: v for k, v in agent_env(fake.url).items() if k != "ANTHROPIC_API_KEY"}
        mesh = make_mesh(developers=1, testers=0, extra_env=env)
        t0 = time.monotonic()
        [view] = run_asks(mesh, [ask("Name three primes")], timeout=30)
        elapsed = time.monotonic() - t0
        # a job needs the policeman's planner: it fails at once too, saying what is missing
        job = run_job(mesh, timeout=30, goal="anything", repo=str(make_repo(tmp_path)))
        assert fake.recorded() == []
    assert job["state"] == "failed" and any("ANTHROPIC_API_KEY" in n for n in job["notes"]), job
    assert view["status"] == "dead", view
    assert view["attempts"] == 1, view  # not retryable: no second attempt, no backoff
    assert elapsed < 15, elapsed
    last = view["error"][-1]
    assert last["code"] == "no-api-key", last
    assert "ANTHROPIC_API_KEY" in last["message"], last


# --- 2. the result cache across developers -----------------------------------------------------------
def test_deterministic_ask_is_paid_once_across_developers(make_mesh: MeshFactory, database_url: str) -> None:
    # one slot per developer and a slow answer: both tasks are in flight at once, on different nodes
    with FakeClaude(latency_s=2.0) as fake:
        fake.push(reply(text("2, 3 and 5")))
        mesh = make_mesh(
            developers=2, testers=0, extra_env=agent_env(fake.url, CASPER_CAPACITY="1", CASPER_PREFETCH="0")
        )
        assert mesh.redis is not None  # embedded Redis: the shared result cache is on
        views = run_asks(mesh, [ask("Name three primes", deterministic=True) for _ in range(2)], timeout=40)
        calls = fake.calls()
        recorded = fake.recorded()
    assert [v["status"] for v in views] == ["complete", "complete"], views
    holders = {holder(v) for v in views}
    assert len(holders) == 2 and all(h and h.startswith("developer") for h in holders), holders
    assert len(recorded) == 1 and len(calls) == 1, [(r.status, r.t) for r in recorded]
    assert calls[0].body.get("temperature") == 0.0  # deterministic: temperature 0
    outs = [v["output"] for v in views]
    assert [o["text"] for o in outs] == ["2, 3 and 5"] * 2
    assert sorted(o["cached"] for o in outs) == [False, True], outs
    hit = next(o for o in outs if o["cached"])
    paid = next(o for o in outs if not o["cached"])
    assert hit["usage"]["input_tokens"] == 0 and hit["usage"]["cost_usd"] == 0, hit
    assert paid["usage"]["input_tokens"] > 0 and paid["usage"]["cost_usd"] > 0, paid
    # the policeman writes an ask's llm_calls row from its committed output, right after the commit
    sql = "SELECT cached, input_tokens, cost_usd FROM llm_calls ORDER BY cached"
    rows = wait_for(lambda: len(db_rows(database_url, sql)) >= 2 and db_rows(database_url, sql), 10, "2 llm_calls rows")
    assert [r[0] for r in rows] == [False, True], rows
    assert rows[1][1] == 0 and float(rows[1][2]) == 0.0, rows


# --- 3. the mesh-wide rate limit -----------------------------------------------------------------------
RPM = 12
BURST = RPM  # the API's bucket holds a whole minute, and so does the mesh's
N_RATE = 16


def test_rate_limit_holds_for_the_whole_mesh(make_mesh: MeshFactory) -> None:
    # 4 developers x 4 slots could send 16 requests at once; the account allows 12 a minute (the fake
    # enforces it and says so in its headers): the policeman grants 12, then one every 5 s
    with FakeClaude(latency_s=0.1, rpm_limit=RPM) as fake:
        mesh = make_mesh(
            developers=4, testers=0, extra_env=agent_env(fake.url, CASPER_LLM_RPM=str(RPM), CASPER_CAPACITY="4")
        )
        views = run_asks(mesh, [ask(f"question {i}") for i in range(N_RATE)], timeout=60)
        recorded = sorted(fake.recorded(), key=lambda r: r.t)
    assert all(v["status"] == "complete" for v in views), [(v["status"], v["error"]) for v in views]
    # the mesh's bucket and the server's refill on two clocks: a request may arrive a hair early and
    # be told to wait (429 + retry-after, then retried); never more than the odd one
    assert {r.status for r in recorded} <= {200, 429} and statuses(fake).count(429) <= 2, statuses(fake)
    recorded = [r for r in recorded if r.status == 200]
    assert len(recorded) == N_RATE
    arrivals = [r.t for r in recorded]
    # token bucket: any run of k consecutive arrivals spanning dt seconds has k <= burst + rpm*dt/60 (+1 slack)
    for i in range(len(arrivals)):
        for j in range(i, len(arrivals)):
            k, dt = j - i + 1, arrivals[j] - arrivals[i]
            assert k <= BURST + RPM * dt / 60 + 1, (
                f"{k} requests within {dt:.2f}s (allowed {BURST} + {RPM}/min); "
                f"arrivals: {[round(a - arrivals[0], 2) for a in arrivals]}"
            )
    # the limit really bit (about (N - burst) / (rpm/60) seconds), and the work was spread over the mesh
    assert arrivals[-1] - arrivals[0] >= (N_RATE - BURST - 1) * 60 / RPM - 1
    task_of = {v["input"]["prompt"]: v for v in views}
    senders = {holder(task_of[last_user_text(r.body)]) for r in recorded}
    assert len(senders) > 1 and all(s and s.startswith("developer") for s in senders), senders


# --- permits ahead: the next call goes without a permit round trip ------------------------------------
@pytest.mark.parametrize("lease_s", ["1", "0"])
def test_sequential_calls_use_permits_granted_ahead(make_mesh: MeshFactory, lease_s: str) -> None:
    # one developer, one slot: each call's settle report asks for the next call's permit, and the
    # next call uses it; with the lease off (0) every call asks and nothing is held ahead
    with FakeClaude(latency_s=0.05) as fake:
        # a starting token limit above the fake's: the learned limit leaves the bucket full (one
        # below it starts as low as the setting and refills at the learned rate, holding none ahead)
        env = agent_env(
            fake.url,
            CASPER_CAPACITY="1",
            CASPER_PREFETCH="0",
            CASPER_LLM_PERMIT_LEASE_S=lease_s,
            CASPER_LLM_TPM="10000000",
        )
        mesh = make_mesh(developers=1, testers=0, extra_env=env)
        views = run_asks(mesh, [ask(f"one after another {i}") for i in range(4)], timeout=60)
        assert all(v["status"] == "complete" for v in views), [(v["status"], v["error"]) for v in views]
        assert len(fake.calls()) == 4
        with ControlClient(mesh.policeman.control, timeout_s=20) as c:

            def settled() -> dict[str, Any] | None:  # every permit settled or given back
                rate = c.request("status")["llm"]["rate_limit"]
                # without permits ahead the last call's settle waits for the next permit request
                return rate if rate["in_flight"] == (0 if lease_s != "0" else 1) else None

            rate = wait_for(settled, 20, "every permit settled or given back")
    used_ahead = rate["leased"] - rate["released"]
    if lease_s == "0":
        assert rate["leased"] == 0 and rate["grants"] == 4, str(rate)
    else:
        assert used_ahead >= 1 and rate["grants"] == 4, str(rate)  # the permits ahead that calls used


# --- 4. a 429 pauses every developer until retry-after ---------------------------------------------------
def _first_k_rate_limited(k: int, retry_after_s: float, delay_s: float) -> Callable[[dict[str, Any]], Response]:
    lock = threading.Lock()
    seen = [0]

    def script(body: dict[str, Any]) -> Response:
        with lock:
            seen[0] += 1
            n = seen[0]
        if n <= k:
            return rate_limited(retry_after_s)
        return reply(text(f"answer to {last_user_text(body)}"), delay_s=delay_s)

    return script


def test_429_pauses_the_whole_mesh_for_retry_after(make_mesh: MeshFactory) -> None:
    k, retry_after, in_flight_s, tolerance_s = 2, 2.0, 0.2, 0.1
    # one slot per developer: the developer that was not refused finishes its call (0.3 s) and its next
    # task's request must wait for the pause another developer's 429 started
    with FakeClaude(script=_first_k_rate_limited(k, retry_after, delay_s=0.3)) as fake:
        mesh = make_mesh(
            developers=3, testers=0, extra_env=agent_env(fake.url, CASPER_CAPACITY="1", CASPER_PREFETCH="0")
        )
        views = run_asks(mesh, [ask(f"storm {i}") for i in range(9)], timeout=60)
        recorded: list[Recorded] = sorted(fake.recorded(), key=lambda r: r.t)
    assert all(v["status"] == "complete" for v in views), [(v["status"], v["error"]) for v in views]
    assert all(v["attempts"] == 1 for v in views), [v["attempts"] for v in views]  # retried by the client
    limited = [r for r in recorded if r.status == 429]
    assert len(limited) == k, [(round(r.t - recorded[0].t, 2), r.status) for r in recorded]
    assert len(recorded) > 9 and len(fake.calls()) == 9
    by_prompt = {v["input"]["prompt"]: holder(v) for v in views}
    timeline = [(round(r.t - recorded[0].t, 3), r.status, by_prompt[last_user_text(r.body)]) for r in recorded]
    for lim in limited:
        early = [r for r in recorded if lim.t + in_flight_s < r.t < lim.t + retry_after - tolerance_s]
        assert not early, f"requests during the pause after the 429 at {lim.t - recorded[0].t:.3f}s: {timeline}"
    # the pause really held other developers back: one of them asked right after a pause ended
    held = [
        lim
        for lim in limited
        if any(
            by_prompt[last_user_text(r.body)] != by_prompt[last_user_text(lim.body)]
            and lim.t + retry_after - tolerance_s <= r.t <= lim.t + retry_after + 1.0
            for r in recorded
        )
    ]
    assert held, timeline


# --- 5. 529 overloaded, then success ------------------------------------------------------------------
def test_overloaded_is_retried_inside_the_client(make_mesh: MeshFactory, database_url: str) -> None:
    with FakeClaude() as fake:
        fake.push(overloaded(), overloaded(), reply(text("fine now")))
        mesh = make_mesh(developers=1, testers=0, extra_env=agent_env(fake.url))
        [view] = run_asks(mesh, [ask("are you there?")], timeout=40)
        got = statuses(fake)
    assert view["status"] == "complete", view
    assert view["attempts"] == 1, view  # the mesh never saw a failure
    assert view["output"]["text"] == "fine now" and view["output"]["cached"] is False
    assert got == [529, 529, 200], got
    sql = "SELECT task_id::text, cached FROM llm_calls"
    rows = wait_for(lambda: db_rows(database_url, sql), 10, "the llm_calls row")
    time.sleep(0.2)  # and no second row for the failed attempts
    rows = db_rows(database_url, sql)
    assert rows == [(view["id"], False)], rows  # failed attempts are not billed calls


# --- 6. a spent budget stops new work -------------------------------------------------------------------
def test_budget_spent_by_the_planner_stops_the_job(make_mesh: MeshFactory, tmp_path: Path, database_url: str) -> None:
    plan = [
        {
            "id": "fix-add",
            "title": "Fix add",
            "instructions": "[fix-add] add() subtracts; make it add.",
            "paths": ["calc/add.py"],
        },
        {
            "id": "fix-mul",
            "title": "Fix mul",
            "instructions": "[fix-mul] mul() adds; make it multiply.",
            "paths": ["calc/mul.py"],
        },
    ]
    team = ScriptedTeam(
        plan, {"fix-add": [fix("calc/add.py", "a - b", "a + b")], "fix-mul": [fix("calc/mul.py", "a + b", "a * b")]}
    )

    def script(body: dict[str, Any]) -> Response:
        resp = team(body)
        if any(t.get("name") == "submit_plan" for t in body.get("tools") or []):
            resp.usage = {"input_tokens": 2_000_000}  # $6 at sonnet prices
        return resp

    repo = make_repo(tmp_path)
    with FakeClaude(script=script) as fake:
        mesh = make_mesh(developers=2, testers=0, extra_env=agent_env(fake.url))
        report = run_job(mesh, timeout=60, goal="make the tests pass", repo=str(repo), test_cmd=None, budget_usd=1.0)
        recorded = fake.recorded()
    assert report["state"] == "budget-exhausted", report
    assert team.planned == 1 and len(recorded) == 1, [last_user_text(r.body)[:80] for r in recorded]
    assert any(t["name"] == "submit_plan" for t in recorded[0].body["tools"])
    assert not team.seen, dict(team.seen)  # no developer ever asked the model
    assert [(s["id"], s["state"], s["note"], s["task_ids"]) for s in report["subtasks"]] == [
        ("fix-add", "skipped", "budget spent", []),
        ("fix-mul", "skipped", "budget spent", []),
    ]
    assert any("budget spent" in n for n in report["notes"]), report["notes"]
    assert report["cost_usd"] >= 6.0, report["cost_usd"]
    assert db_rows(database_url, "SELECT count(*) FROM tasks WHERE type = 'code'") == [(0,)]
    rows = db_rows(database_url, "SELECT role, job_id::text, input_tokens FROM llm_calls")
    assert rows == [("policeman", report["job_id"], 2_000_000)], rows
