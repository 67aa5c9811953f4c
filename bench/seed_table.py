"""The seed architecture's benchmark table, measured on CASPER's local mesh.

The seed (``casper-technical-architecture.md``, "Optimization Results") claims: task assignment
50 ms, API call (cached) 10 ms, result aggregation 100 ms, database query 20 ms. This measures the
same four operations on a local mesh (embedded Postgres and Redis, CurveZMQ on, one developer)
and prints them beside the seed's figures:

* **task assignment** — submit (the client's clock) to the moment the worker starts the task it
  received: a ``shell`` task running ``date +%s.%N``, whose output is the time the handler ran
  (same host, same clock). One task at a time, so it is latency, not queueing.
* **API call (cached)** — a ``cache: true`` ``ask`` task whose result is already in Redis, submit
  to result. The model is the scripted Anthropic-compatible server of the tests
  (``tests/support/fakeclaude.py``) answering after 1 s, so a miss would show; the benchmark
  fails unless the server saw exactly one call (the first, uncached one).
* **result aggregation** — a job's integration of N subtasks' results (patches): the steps
  ``JobRunner._integrate`` runs for each (a worktree of the integration head, ``git apply``,
  commit, push of the integration ref), for N patches on a fresh repository, total and per patch.
* **database query** — ``caspectl get ID`` (the task row and its events from Postgres) and
  ``caspectl tasks --limit 50`` (recent tasks and counts), request to answer over the control
  socket.

    python -m bench.seed_table [--samples 100] [--subtasks 5] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.common import exit_on_sigterm
from casperd.agents import gitwork
from casperd.localmesh import LocalMesh, free_port_base
from casperd.messages import TaskSpec
from casperd.telemetry import percentile
from tests.support.fakeclaude import FakeClaude

console = Console(width=max(100, shutil.get_terminal_size((120, 24)).columns))
SEED = {
    "task assignment": (250.0, 50.0),
    "API call (cached)": (1000.0, 10.0),
    "result aggregation": (500.0, 100.0),
    "database query": (100.0, 20.0),
}
LIMITER_ENV = {"CASPER_LLM_RPM": "100000", "CASPER_LLM_TPM": "100000000"}


class BenchFailure(RuntimeError):
    pass


def stats_ms(samples: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in samples]
    return {
        "n": len(ms),
        "p50_ms": round(statistics.median(ms), 2),
        "p99_ms": round(percentile(ms, 99) or 0.0, 2),
        "min_ms": round(min(ms), 2),
    }


def one(c: Any, spec: TaskSpec, timeout_s: float = 60) -> tuple[float, float, Any]:
    """Submit one task and wait: (wall-clock submit time, seconds to DONE, DONE)."""
    t_wall = time.time()
    t0 = time.monotonic()
    (tid,) = c.submit([spec], wait=True).task_ids
    for ev in c.done_events(timeout_s=timeout_s):
        if ev.task_id == tid:
            if ev.status != "complete":
                raise BenchFailure(f"{spec.type} task ended {ev.status}: {ev.error}")
            return t_wall, time.monotonic() - t0, ev
    raise BenchFailure(f"no DONE for the {spec.type} task within {timeout_s:.0f}s")


def assignment(c: Any, n: int) -> list[float]:
    out = []
    for _ in range(n + 5):
        spec = TaskSpec(type="shell", input={"cmd": "date +%s.%N"}, priority=9)
        t_submit, _, ev = one(c, spec)
        started = float(ev.output["stdout"].strip())
        out.append(started - t_submit)
    return out[5:]  # the first few warm the path


def cached_ask(c: Any, fake: FakeClaude, n: int) -> tuple[list[float], float]:
    spec = TaskSpec(type="ask", input={"prompt": "Name one prime number.", "max_tokens": 32}, cache=True)
    _, miss, _ = one(c, spec)
    hits = [one(c, spec)[1] for _ in range(n)]
    calls = len(fake.calls())
    if calls != 1:
        raise BenchFailure(f"the model server saw {calls} calls; a cached ask must not call it (expected 1)")
    return hits, miss


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


def make_repo(n: int, root: Path) -> tuple[Path, str, list[bytes]]:
    """A repository with n modules and one patch per module (the subtasks' results)."""
    repo = root / "repo"
    repo.mkdir(parents=True)
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "config", "user.email", "bench@casper")
    _git(repo, "config", "user.name", "bench")
    for i in range(n):
        (repo / f"mod{i}.py").write_text(f"def f{i}():\n    return {i}\n")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "base")
    base = _git(repo, "rev-parse", "HEAD").strip()
    patches = []
    for i in range(n):
        (repo / f"mod{i}.py").write_text(f"def f{i}():\n    return {i} * 2  # fixed\n")
        patches.append(subprocess.run(["git", "diff", "--binary"], cwd=repo, check=True, capture_output=True).stdout)
        _git(repo, "checkout", "-q", "--", ".")
    return repo, base, patches


async def aggregation(repo: Path, base: str, patches: list[bytes], root: Path) -> tuple[float, list[float]]:
    """Integrate the patches the way a job does; (total seconds, seconds per patch)."""
    n = len(patches)
    head = base
    mirrors = root / "mirrors"
    per: list[float] = []
    t_all = time.monotonic()
    for i, patch in enumerate(patches):
        t0 = time.monotonic()
        wt = root / f"int-{i}"
        await gitwork.make_worktree(repo, head, wt, mirrors)
        try:
            await gitwork.apply(wt, patch)
            head = await gitwork.commit_all(wt, f"sub-{i}\n\nCASPER bench")
            await gitwork.push_ref(wt, repo, "refs/casper/jobs/bench/integration")
        finally:
            await gitwork.remove_worktree(wt)
        per.append(time.monotonic() - t0)
    total = time.monotonic() - t_all
    applied = _git(repo, "log", "--oneline", "refs/casper/jobs/bench/integration").count("\n")
    if applied != n + 1:
        raise BenchFailure(f"the integration ref has {applied} commits, expected {n + 1}")
    return total, per


def db_queries(c: Any, n: int) -> tuple[list[float], list[float]]:
    (tid,) = c.submit([TaskSpec(type="noop")], wait=False).task_ids
    time.sleep(0.5)
    gets, lists = [], []
    for _ in range(n):
        t0 = time.monotonic()
        c.request("get", id=str(tid))
        gets.append(time.monotonic() - t0)
        t0 = time.monotonic()
        c.request("tasks", limit=50)
        lists.append(time.monotonic() - t0)
    return gets, lists


def run(samples: int, subtasks: int) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="casper-seed-"))
    results: dict[str, Any] = {}
    try:
        with FakeClaude(latency_s=1.0) as fake:
            env = {"ANTHROPIC_API_KEY": "sk-bench-not-a-real-key", "ANTHROPIC_BASE_URL": fake.url, **LIMITER_ENV}
            mesh = LocalMesh(
                root / "mesh",
                developers=1,
                testers=0,
                port_base=free_port_base(20),
                log_level="WARNING",
                extra_env=env,
                policeman_env={"CASPER_SPAWNER": "none"},
            )
            try:
                t0 = time.monotonic()
                mesh.start()
                console.print(f"mesh up in {time.monotonic() - t0:.1f}s (1 developer, Curve on, embedded services)")
                with mesh.client(timeout_s=60) as c:
                    results["task assignment"] = stats_ms(assignment(c, samples))
                    hits, miss = cached_ask(c, fake, samples)
                    results["API call (cached)"] = stats_ms(hits) | {"uncached_ms": round(miss * 1000, 1)}
                    gets, lists = db_queries(c, samples)
                    results["database query"] = stats_ms(gets) | {"tasks_list": stats_ms(lists)}
            finally:
                mesh.stop()
        repo, base, patches = make_repo(subtasks, root / "agg")
        total, per = asyncio.run(aggregation(repo, base, patches, root / "agg"))
        results["result aggregation"] = stats_ms(per) | {"subtasks": subtasks, "total_ms": round(total * 1000, 1)}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return results


def show(results: dict[str, Any]) -> None:
    t = Table(title="the seed's benchmark table beside CASPER (local mesh, this machine)", header_style="bold")
    for col in ("operation", "seed before", "seed after", "CASPER p50", "CASPER p99", "what CASPER measures"):
        t.add_column(col, justify="right" if col.startswith(("seed", "CASPER")) else "left")
    what = {
        "task assignment": "submit -> the worker starts the TASK it received",
        "API call (cached)": "cache: true ask hit, submit -> result "
        f"(uncached: {results['API call (cached)']['uncached_ms']:.0f} ms)",
        "result aggregation": f"integrate 1 of {results['result aggregation']['subtasks']} subtask patches "
        f"(all: {results['result aggregation']['total_ms']:.0f} ms)",
        "database query": "caspectl get ID "
        f"(tasks --limit 50: p50 {results['database query']['tasks_list']['p50_ms']:.1f} ms)",
    }
    for op, (before, after) in SEED.items():
        r = results[op]
        t.add_row(op, f"{before:.0f} ms", f"{after:.0f} ms", f"{r['p50_ms']:.1f} ms", f"{r['p99_ms']:.1f} ms", what[op])
    console.print(t)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.seed_table", description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=100, help="samples per measure (default 100)")
    p.add_argument("--subtasks", type=int, default=5, help="patches integrated (default 5)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    a = p.parse_args(argv)
    try:
        results = run(a.samples, a.subtasks)
    except BenchFailure as exc:
        console.print(f"[red]benchmark failed:[/] {exc}")
        return 1
    if a.json:
        print(json.dumps(results, indent=2))
    else:
        show(results)
    return 0


if __name__ == "__main__":
    exit_on_sigterm()
    sys.exit(main())
