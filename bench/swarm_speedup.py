"""Swarm speedup: one developer against fifteen, running the same batch of LLM tasks.

A local, Anthropic-compatible server (``tests/support/fakeclaude.py``) answers every Messages API
call after a fixed latency (``--latency``, default 1.0 s), so the model's time is known exactly and
the benchmark measures what the mesh adds around it. Every call goes through the real ``anthropic``
SDK on a developer node (``ANTHROPIC_BASE_URL`` points at the fake; the key is a dummy string).

For each mesh size (1 developer, then ``--agents`` developers; an "agent" is a developer node of
capacity 1, no prefetch, no testers), a fresh :class:`~casperd.localmesh.LocalMesh` is started on
127.0.0.1 (embedded Postgres and Redis, Curve on), warmed up (every developer registered and alive,
then ``--warmup`` ask tasks per developer, not counted, so process start, imports and the SDK's
first connection are excluded), and then ``--tasks`` distinct ``ask`` tasks (distinct prompts,
``deterministic: false``, so the result cache never answers) are submitted in one batch. Measured:
the wall time from the submit to the last DONE.

What the mesh adds to each model call (issue #13: at most 10 ms). The raw figure, the one
developer's *overhead per call* (wall time per call beyond the model's latency), also holds what
any client of the model pays without a mesh: the SDK building the request, HTTP, parsing the
streamed reply into the final message, and the fake server's own serving. So the same run also
makes ``--tasks`` direct calls (``bench.sdk_baseline``): the developer's ``ask`` request (model, no
system prompt, the prompt-cache breakpoint, ``max_tokens``, streamed) through the real
``anthropic.AsyncAnthropic``, built once, sequential after ``--warmup`` uncounted calls, from a fresh
process (the fake server's threads share the benchmark's GIL; a developer node does not), against
the same server and latency, while the one-developer mesh is still up and idle after its batch.
The benchmark fails unless the server saw the same requests (but for the prompts' text, of equal
lengths) from both sides. Reported: the direct call's time beyond the latency (median, mean), and
*the mesh adds* = raw overhead - direct mean, beside the raw overhead; and the direct client's
CPU per call beside the developer's.

    python -m bench.swarm_speedup [--tasks 30] [--agents 15] [--latency 1.0] [--permit-lease-s S]
                                  [--prefetch N] [--json]

The mesh-wide model rate limiter is opened wide (``CASPER_LLM_RPM=100000``,
``CASPER_LLM_TPM=100000000``): the permits are still requested from the policeman for every call,
but never make one wait. With the defaults (50 rpm) the limiter, not the mesh, would set the pace.

Where the time goes: every node runs with ``CASPERD_CALL_TRACE`` (``casperd.calltrace``), so the
workers mark each task's steps (TASK received, handler start, permit asked/answered or a permit
held ahead used, HTTP send, the SDK's final message, RESULT sent) and the policeman marks serving
each permit; with the task events, the fake server's arrival of each call and the client's DONEs
(one wall clock: every process is on this machine) the benchmark prints the median of every step
of one ``ask``'s path. ``--permit-lease-s S`` sets the nodes' ``llm_permit_lease_s`` (permits
ahead, off by default: one ``llm-permit`` round trip before every call).

CPU per call: every process group's CPU (the scheduler's count of every thread,
``/proc/PID/task/*/schedstat``; psutil's where there is none) over the measured batch divided by
the calls (each developer makes one call at a time, so the developers' figure is also one
developer's CPU per call), beside the same groups' idle CPU per second over 2 s before the batch
(heartbeats, ticks) and the developers' per-call CPU beyond that idle rate. On a 2-core machine the
fifteen-developer wave is CPU-bound: these, not the wall times, are what an A/B compares.

Ideal: W = ceil(tasks / agents) waves of ``latency`` each, so the ideal speedup is
(tasks * latency) / (W * latency) (15 for 30 tasks on 15 agents). The benchmark fails (exit 1)
unless every task ended ``complete`` and the fake server answered exactly one call per task
(measured and warm-up).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console
from rich.table import Table

from bench import sdk_baseline
from bench.common import exit_on_sigterm
from casperd import calltrace
from casperd.localmesh import LocalMesh, free_port_base
from casperd.messages import TaskSpec
from tests.support.fakeclaude import FakeClaude, Recorded

console = Console(width=shutil.get_terminal_size((120, 24)).columns, stderr=False)
TARGET_SPEEDUP = 13.0
TARGET_MESH_ADDS_MS = 10.0
"""Issue #13: what the mesh adds to each model call (1 developer), beyond the direct SDK call."""
ASK_MAX_TOKENS = 64
CLAIMED_SPEEDUP = 3.7
LIMITER_ENV = {"CASPER_LLM_RPM": "100000", "CASPER_LLM_TPM": "100000000"}


class BenchFailure(RuntimeError):
    pass


@dataclass
class Run:
    agents: int
    tasks: int
    latency_s: float
    wall_s: float = 0.0
    startup_s: float = 0.0
    warmup_s: float = 0.0
    calls: int = 0
    warmup_calls: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    per_node: dict[str, int] = field(default_factory=dict)
    first_call_s: float = 0.0
    """Submit -> the fake server's first request of the measured batch."""
    last_call_s: float = 0.0
    """Submit -> the fake server's last request of the measured batch."""
    phases: dict[str, float] = field(default_factory=dict)
    """Median seconds per task of each lifecycle step (from the task events, broker clock)."""
    cpu_ms: dict[str, float] = field(default_factory=dict)
    """CPU per measured call (schedstat), by process group: the developers together
    (and per developer), the policeman, Postgres; and each group's idle CPU per second."""
    shapes: list[str] = field(default_factory=list)
    """The measured calls as the server saw them (:func:`bench.sdk_baseline.request_shape`)."""

    @property
    def waves(self) -> int:
        return math.ceil(self.tasks / self.agents)

    @property
    def ideal_wall_s(self) -> float:
        return self.waves * self.latency_s

    @property
    def overhead_per_call_s(self) -> float:
        """Wall time beyond the ideal, spread over the waves (per sequential call)."""
        return (self.wall_s - self.ideal_wall_s) / self.waves


_prompt = sdk_baseline.prompt


def _ask(prompt: str) -> TaskSpec:
    return TaskSpec(type="ask", input={"prompt": prompt, "max_tokens": ASK_MAX_TOKENS, "deterministic": False})


def _user_text(rec: Recorded) -> str:
    for msg in reversed(rec.body.get("messages") or []):
        if isinstance(msg, dict) and msg.get("role") == "user":
            content = msg.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return "".join(str(b.get("text", "")) for b in content if isinstance(b, dict))
    return ""


def _run_batch(
    mesh: LocalMesh, specs: list[TaskSpec], timeout_s: float, done_at: dict[uuid.UUID, float] | None = None
) -> tuple[float, float, list[uuid.UUID], dict[uuid.UUID, str]]:
    """Submit ``specs`` in one batch; (monotonic submit time, wall seconds to the last DONE, ids,
    statuses). ``done_at`` gets the wall time each DONE arrived."""
    statuses: dict[uuid.UUID, str] = {}
    with mesh.client(timeout_s=30) as c:
        t0 = time.monotonic()
        ids = list(c.submit_until_accepted(specs, wait=True).task_ids)
        want = set(ids)
        for done in c.done_events(timeout_s=timeout_s):
            if done.task_id in want:
                statuses[done.task_id] = done.status
                if done_at is not None:
                    done_at[done.task_id] = time.time()
                if len(statuses) == len(want):
                    break
        wall = time.monotonic() - t0
    if len(statuses) < len(ids):
        raise BenchFailure(f"only {len(statuses)} of {len(ids)} DONEs arrived (no news for {timeout_s:.0f}s)")
    return t0, wall, ids, statuses


def _at(ev: dict[str, Any]) -> float:
    at = ev["at"]
    if isinstance(at, str):
        return datetime.fromisoformat(at).timestamp()
    return float(at.timestamp())


def _read_trace(path: Path) -> tuple[dict[str, dict[str, float]], list[float]]:
    """The worker-side marks of ``CASPER_CALL_TRACE`` (casperd.calltrace): task id -> mark -> first
    wall time; and the policeman's ``permit served`` times (they name no task)."""
    marks: dict[str, dict[str, float]] = {}
    served: list[float] = []
    if not path.exists():
        return marks, served
    for line in path.read_text().splitlines():
        try:
            at, name, tid, _pid = json.loads(line)
        except ValueError:
            continue
        if tid is None:
            if name == "permit served":
                served.append(float(at))
            continue
        marks.setdefault(str(tid), {}).setdefault(str(name), float(at))
    return marks, sorted(served)


PATH = (
    "assigned",
    "dev: task received",
    "dev: handler start",
    "dev: create",
    "dev: permit held",
    "dev: permit asked",
    "pol: permit served",
    "dev: permit answered",
    "dev: http start",
    "model call sent",
    "model reply due",
    "dev: sdk reply",
    "dev: handler returned",
    "dev: result sent",
    "complete",
    "client has DONE",
)
"""One ``ask``'s path, in order: task events (broker clock), the worker's marks (``dev:``, from
``casperd.calltrace``), the policeman serving the permit (``pol:``), the fake server's arrival of
the call and that plus its latency, and the benchmark's client receiving DONE. Every clock is
this machine's wall clock."""
SIDE = (("dev: processing sent", "processing"), ("complete", "next assigned"))
"""Steps off the path above: the worker's ``processing`` report reaching the policeman, and (with
one developer of capacity 1) the gap from one task's RESULT to the next task's assignment."""


def _phases(
    mesh: LocalMesh,
    ids: list[uuid.UUID],
    call_at: dict[uuid.UUID, float] | None = None,
    latency_s: float = 0.0,
    trace: Path | None = None,
    done_at: dict[uuid.UUID, float] | None = None,
) -> tuple[dict[str, float], dict[str, int], dict[str, str]]:
    """Median per-task durations between consecutive milestones of :data:`PATH` (a milestone a
    task lacks is skipped), the :data:`SIDE` steps, tasks per developer, final statuses.
    ``call_at``: the wall time the fake server received each task's model call; ``trace``: the
    ``CASPERD_CALL_TRACE`` file; ``done_at``: the wall time the client had each DONE."""
    steps: dict[str, list[float]] = {}
    per_node: dict[str, int] = {}
    final: dict[str, str] = {}
    traced, served = _read_trace(trace) if trace is not None else ({}, [])
    everyone: list[dict[str, float]] = []
    with mesh.client(timeout_s=30) as c:
        for tid in ids:
            view = c.request("get", id=str(tid))
            final[str(tid)] = str(view.get("status"))
            node = view.get("assigned_to") or "?"
            per_node[str(node)] = per_node.get(str(node), 0) + 1
            first: dict[str, float] = {}
            for ev in view.get("events") or []:
                first.setdefault(str(ev.get("to_status")), _at(ev))
            if call_at is not None and tid in call_at:
                first["model call sent"] = call_at[tid]
                first["model reply due"] = call_at[tid] + latency_s
            own = traced.get(str(tid), {})
            first.update({f"dev: {k}": v for k, v in own.items()})
            asked, answered = own.get("permit asked"), own.get("permit answered")
            if asked is not None and answered is not None:
                inside = [t for t in served if asked <= t <= answered]
                if len(inside) == 1:  # the policeman served this task's permit (unambiguous)
                    first["pol: permit served"] = inside[0]
            if done_at is not None and tid in done_at:
                first["client has DONE"] = done_at[tid]
            if "pending" in first and "assigned" in first:
                steps.setdefault("pending -> assigned", []).append(first["assigned"] - first["pending"])
            on_path = [(m, first[m]) for m in PATH if m in first]
            for (a, ta), (b, tb) in itertools.pairwise(on_path):
                steps.setdefault(f"{a} -> {b}", []).append(tb - ta)
            everyone.append(first)
    if len(per_node) == 1:  # one developer: each task's RESULT frees the slot for the next
        chain = sorted((f for f in everyone if "assigned" in f and "complete" in f), key=lambda f: f["assigned"])
        for prev, nxt in itertools.pairwise(chain):
            prev["next assigned"] = nxt["assigned"]
    for a, b in SIDE:
        got = [f[b] - f[a] for f in everyone if a in f and b in f]
        if got:
            steps[f"{a} -> {b}"] = got
    if "assigned" in PATH and everyone:
        got = [f["client has DONE"] - f["assigned"] for f in everyone if "client has DONE" in f and "assigned" in f]
        if got:
            steps["assigned -> client has DONE (whole path)"] = got
    return {k: statistics.median(v) for k, v in steps.items()}, per_node, final


def _groups(mesh: LocalMesh) -> dict[str, list[psutil.Process]]:
    """The mesh's processes by group: the developers, the policeman, Postgres (its postmaster and
    every backend and helper under it), and the benchmark's own process (the fake model server's
    threads and the client)."""
    out: dict[str, list[psutil.Process]] = {"developers": [], "policeman": [], "postgres": []}
    for node in mesh.nodes.values():
        if node.proc is not None:
            out["policeman" if node.role == "policeman" else "developers"].append(psutil.Process(node.proc.pid))
    pg = mesh.postgres.proc if mesh.postgres is not None else None
    if pg is not None:
        root = psutil.Process(pg.pid)
        out["postgres"] = [root, *root.children(recursive=True)]
    out["bench (fake server, client)"] = [psutil.Process()]
    return out


def _cpu_s(p: psutil.Process) -> float:
    """CPU seconds of ``p``'s threads so far: the scheduler's nanosecond counts on Linux
    (``/proc/PID/task/*/schedstat``; ``psutil.cpu_times`` counts 10 ms ticks, too coarse for a few
    ms per call; a thread that ended meanwhile drops out, none does here), else psutil's."""
    try:
        total = 0
        for tid in os.listdir(f"/proc/{p.pid}/task"):
            with open(f"/proc/{p.pid}/task/{tid}/schedstat", encoding="ascii") as f:
                total += int(f.read().split()[0])
        return total / 1e9
    except (OSError, ValueError, IndexError):
        t = p.cpu_times()
        return float(t.user + t.system)


def _cpu(groups: dict[str, list[psutil.Process]]) -> dict[str, float]:
    """CPU seconds of each group so far (threads included); a process gone meanwhile counts 0."""
    out: dict[str, float] = {}
    for name, procs in groups.items():
        total = 0.0
        for p in procs:
            with contextlib.suppress(psutil.Error):
                total += _cpu_s(p)
        out[name] = total
    return out


def run_mesh(
    fake: FakeClaude,
    agents: int,
    n_tasks: int,
    warmup_per_dev: int,
    keep: bool,
    lease_s: float | None = None,
    prefetch: int = 0,
    after_batch: Callable[[], None] | None = None,
) -> Run:
    """One mesh of ``agents`` developers: start, warm up, the measured batch; then ``after_batch``
    (the mesh still up and idle, as during the batch but for the calls), then stop."""
    run = Run(agents=agents, tasks=n_tasks, latency_s=fake.latency_s)
    state = Path(tempfile.mkdtemp(prefix=f"casper-bench-swarm{agents}-"))
    env = {
        "CASPER_CAPACITY": "1",
        "CASPER_PREFETCH": str(prefetch),
        **({"CASPER_LLM_PERMIT_LEASE_S": f"{lease_s:g}"} if lease_s is not None else {}),
        **LIMITER_ENV,
        "ANTHROPIC_API_KEY": "sk-bench-not-a-real-key",
        "ANTHROPIC_BASE_URL": fake.url,
        calltrace.ENV: str(state / "calltrace.jsonl"),
    }
    mesh = LocalMesh(
        state, developers=agents, testers=0, port_base=free_port_base(40), log_level="WARNING", extra_env=env
    )
    try:
        t = time.monotonic()
        mesh.start()  # waits for every developer registered and alive (the "peers" op)
        run.startup_s = time.monotonic() - t
        peers = [p for p in mesh.wait_peers(agents, timeout=60) if p["liveness"] == "alive"]
        caps = sorted({int(str(p["capacity"])) for p in peers})
        if len(peers) != agents or caps != [1 + prefetch]:  # a peer's credit: capacity + prefetch
            raise BenchFailure(
                f"expected {agents} alive developers of capacity 1 + prefetch {prefetch}, "
                f"got {len(peers)} with credits {caps}"
            )

        # warm-up: every developer imports the agents code, creates its SDK client and connects
        t = time.monotonic()
        before = len(fake.calls())
        n_warm = warmup_per_dev * agents
        if n_warm:
            _, _, wids, wstat = _run_batch(mesh, [_ask(_prompt(f"warm{agents}", i)) for i in range(n_warm)], 60)
            bad = {s for s in wstat.values() if s != "complete"}
            if bad:
                raise BenchFailure(f"warm-up tasks ended {sorted(bad)} (see {state / 'logs'})")
            _, per_node, _ = _phases(mesh, wids)
            if warmup_per_dev and len(per_node) < agents:
                console.print(f"  [yellow]note: the warm-up reached {len(per_node)} of {agents} developers[/]")
        run.warmup_calls = len(fake.calls()) - before
        run.warmup_s = time.monotonic() - t
        if run.warmup_calls != n_warm:
            raise BenchFailure(f"warm-up: the fake server answered {run.warmup_calls} calls for {n_warm} tasks")

        # idle CPU (heartbeats, ticks), then the measured batch's CPU per call by process group
        groups = _groups(mesh)
        idle_s = 2.0
        c0 = _cpu(groups)
        time.sleep(idle_s)
        c1 = _cpu(groups)
        # the measured batch
        tag = f"run{agents}-{uuid.uuid4().hex[:6]}"
        prompts = [_prompt(tag, i) for i in range(n_tasks)]
        before = len(fake.calls())
        done_at: dict[uuid.UUID, float] = {}
        wall_at_start = time.time() - time.monotonic()
        t0, run.wall_s, ids, statuses = _run_batch(
            mesh, [_ask(p) for p in prompts], max(60.0, 4 * n_tasks * fake.latency_s), done_at
        )
        c2 = _cpu(groups)
        calls = fake.calls()[before:]
        run.calls = len(calls)
        for name in groups:
            busy, idle = c2[name] - c1[name], c1[name] - c0[name]
            run.cpu_ms[f"{name}, per call"] = 1000 * busy / max(1, len(calls))
            run.cpu_ms[f"{name}, idle per s"] = 1000 * idle / idle_s
        run.cpu_ms["developers, per call beyond idle"] = (
            1000 * (c2["developers"] - c1["developers"] - (c1["developers"] - c0["developers"]) * run.wall_s / idle_s)
        ) / max(1, len(calls))
        for s in statuses.values():
            run.statuses[s] = run.statuses.get(s, 0) + 1
        seen = [_user_text(r) for r in calls]
        if run.calls != n_tasks or sorted(seen) != sorted(prompts):
            missing = set(prompts) - set(seen)
            raise BenchFailure(
                f"the fake server answered {run.calls} calls for {n_tasks} tasks "
                f"({len(missing)} prompts never seen, {len(seen) - len(set(seen))} repeated)"
            )
        run.shapes = sorted(sdk_baseline.request_shape(r.body, r.headers) for r in calls)
        if calls:
            arrivals = sorted(r.t for r in calls)
            run.first_call_s, run.last_call_s = arrivals[0] - t0, arrivals[-1] - t0
        by_prompt = {p: tid for p, tid in zip(prompts, ids, strict=True)}
        to_wall = wall_at_start  # the fake records arrivals on the monotonic clock
        call_at = {by_prompt[_user_text(r)]: r.t + to_wall for r in calls}
        run.phases, run.per_node, final = _phases(
            mesh, ids, call_at, fake.latency_s, state / "calltrace.jsonl", done_at
        )
        not_complete = {tid: s for tid, s in final.items() if s != "complete"}
        if run.statuses != {"complete": n_tasks} or not_complete:
            raise BenchFailure(
                f"not every task ended complete: DONE statuses {run.statuses}, "
                f"stored {sorted(set(not_complete.values()))} (see {state / 'logs'})"
            )
        if after_batch is not None:
            after_batch()
        return run
    finally:
        mesh.stop()
        if keep:
            console.print(f"  state kept in {state}")
        else:
            shutil.rmtree(state, ignore_errors=True)


def run_direct(fake: FakeClaude, n_tasks: int, warmup: int) -> sdk_baseline.Direct:
    """The baseline: ``n_tasks`` direct SDK calls, sequential, after ``warmup`` (see
    :mod:`bench.sdk_baseline`), with their two halves from the server's arrivals (one monotonic
    clock: ``CLOCK_MONOTONIC`` is the machine's) and their shapes for the comparison."""
    before = len(fake.calls())
    tag = f"sdk1-{uuid.uuid4().hex[:6]}"  # as long as the 1-developer mesh's "run1-" tag: same prompt sizes
    try:
        d = sdk_baseline.measure(fake.url, fake.latency_s, tag, n_tasks, warmup, ASK_MAX_TOKENS)
    except (RuntimeError, OSError, ValueError) as exc:
        raise BenchFailure(str(exc)) from exc
    calls = fake.calls()[before:]
    by_text = {_user_text(r): r for r in calls}
    if len(calls) != n_tasks + warmup or any(p not in by_text for p, _, _ in d.calls):
        raise BenchFailure(f"direct calls: the fake server answered {len(calls)} for {n_tasks} + {warmup} warm-up")
    sent = [by_text[p].t - t0 for p, t0, _ in d.calls]
    back = [t1 - (by_text[p].t + fake.latency_s) for p, _, t1 in d.calls]
    d.steps_s = {"dev: http start -> model call sent": statistics.median(sent)}
    d.steps_s["model reply due -> dev: sdk reply"] = statistics.median(back)
    d.shapes = sorted(sdk_baseline.request_shape(by_text[p].body, by_text[p].headers) for p, _, _ in d.calls)
    return d


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=30, help="measured ask tasks per mesh (default 30)")
    ap.add_argument("--agents", type=int, default=15, help="developers of the big mesh (default 15)")
    ap.add_argument("--latency", type=float, default=1.0, help="the fake model's latency per call, s (default 1.0)")
    ap.add_argument("--warmup", type=int, default=1, help="uncounted warm-up tasks per developer (default 1)")
    ap.add_argument(
        "--permit-lease-s",
        type=float,
        default=None,
        help="the nodes' llm_permit_lease_s (default: the setting's default; 0: one permit round trip per call)",
    )
    ap.add_argument("--prefetch", type=int, default=0, help="the developers' prefetch (default 0)")
    ap.add_argument("--json", action="store_true", help="also print a one-line JSON summary")
    ap.add_argument("--keep", action="store_true", help="keep the state directories (logs) afterwards")
    a = ap.parse_args()
    if a.tasks < 1 or a.agents < 1 or a.latency <= 0 or a.warmup < 0:
        ap.error("--tasks and --agents must be >= 1, --latency > 0, --warmup >= 0")

    t_start = time.monotonic()
    fake = FakeClaude(latency_s=a.latency).start()
    runs: list[Run] = []
    direct: list[sdk_baseline.Direct] = []

    def baseline() -> None:  # after the 1-developer batch, that mesh still up
        console.print(f"  direct SDK calls, no mesh: {a.tasks} sequential + {a.warmup} warm-up, one process ...")
        direct.append(run_direct(fake, a.tasks, a.warmup))

    try:
        for agents in (1, a.agents):
            console.print(
                f"mesh of {agents} developer(s) x capacity 1: {a.tasks} ask tasks, "
                f"model latency {a.latency:g}s (fake server {fake.url}) ..."
            )
            after = baseline if not runs else None
            r = run_mesh(fake, agents, a.tasks, a.warmup, a.keep, a.permit_lease_s, a.prefetch, after)
            console.print(
                f"  started in {r.startup_s:.1f}s, warm-up {r.warmup_calls} calls in {r.warmup_s:.1f}s, "
                f"measured wall {r.wall_s:.2f}s"
            )
            runs.append(r)
    except BenchFailure as exc:
        console.print(f"[bold red]FAILED:[/] {exc}")
        return 1
    finally:
        total_calls = len(fake.calls())
        fake.stop()
    base = direct[0]
    expected_calls = sum(r.calls + r.warmup_calls for r in runs) + len(base.calls) + base.warmup
    if total_calls != expected_calls:
        console.print(f"[bold red]FAILED:[/] the fake server answered {total_calls} calls, expected {expected_calls}")
        return 1

    one, many = runs
    if base.shapes != one.shapes:  # the baseline must make the developer's call, byte for byte but the prompt
        diff = sorted(set(base.shapes) ^ set(one.shapes))[:2]
        console.print(f"[bold red]FAILED:[/] the direct calls' requests differ from the developer's: {diff}")
        return 1
    mesh_adds_ms = 1000 * one.overhead_per_call_s - base.mean_ms
    speedup = one.wall_s / many.wall_s
    ideal = (a.tasks * a.latency) / many.ideal_wall_s
    ideal_one = one.ideal_wall_s
    per_call_factor = one.wall_s / (a.tasks * a.latency)
    total_s = time.monotonic() - t_start

    t = Table(
        title=f"{a.tasks} ask tasks (one model call each, fake latency {a.latency:g}s), 1 vs {a.agents} "
        f"developers of capacity 1; loopback mesh, {total_s:.0f}s in all",
        title_justify="left",
    )
    for col in (
        "developers",
        "wall s",
        "ideal s",
        "waves",
        "overhead/wave ms",
        "1st call s",
        "last call s",
        "calls",
        "complete",
        "devs used",
    ):
        t.add_column(col, justify="right")
    for r in runs:
        t.add_row(
            str(r.agents),
            f"{r.wall_s:.2f}",
            f"{r.ideal_wall_s:.2f}",
            str(r.waves),
            f"{1000 * r.overhead_per_call_s:.0f}",
            f"{r.first_call_s:.3f}",
            f"{r.last_call_s:.2f}",
            str(r.calls),
            f"{r.statuses.get('complete', 0)}/{r.tasks}",
            str(len(r.per_node)),
        )
    console.print(t)
    console.print(
        "(1st / last call: seconds from the submit to the fake server receiving the batch's first / last model call)"
    )

    p = Table(
        title="median per-task step along one ask's path, ms (task events, the workers' CASPERD_CALL_TRACE marks, "
        "the fake server's arrivals, the client's DONEs; one wall clock); direct: the same SDK call, no mesh",
        title_justify="left",
    )
    p.add_column("step")
    for r in runs:
        p.add_column(f"{r.agents} dev", justify="right")
    p.add_column("direct", justify="right")
    steps = list(dict.fromkeys(k for r in runs for k in r.phases))  # lifecycle order, as first seen
    for k in steps:
        cells = [f"{1000 * r.phases[k]:.1f}" if k in r.phases else "" for r in runs]
        p.add_row(k, *cells, f"{1000 * base.steps_s[k]:.1f}" if k in base.steps_s else "")
    console.print(p)

    c = Table(
        title="CPU (schedstat) per measured call, ms, by process group; idle: per second before the batch",
        title_justify="left",
    )
    c.add_column("CPU")
    for r in runs:
        c.add_column(f"{r.agents} dev", justify="right")
    for k in dict.fromkeys(k for r in runs for k in r.cpu_ms):
        c.add_row(k, *(f"{r.cpu_ms[k]:.2f}" if k in r.cpu_ms else "" for r in runs))
    c.add_row("direct SDK client (no mesh), per call", *(f"{base.cpu_ms_per_call:.2f}" for _ in runs[:1]))
    c.add_row(
        "developers beyond idle - direct client: the mesh's CPU per call on a developer",
        *(f"{r.cpu_ms['developers, per call beyond idle'] - base.cpu_ms_per_call:.2f}" for r in runs[:1]),
    )
    console.print(c)

    s = Table(title="speedup", title_justify="left", show_header=False)
    s.add_column("what")
    s.add_column("value", justify="right")
    s.add_row(f"speedup = wall(1) / wall({a.agents})", f"{speedup:.2f}x")
    s.add_row(f"ideal speedup = ({a.tasks} x {a.latency:g}s) / ({many.waves} waves x {a.latency:g}s)", f"{ideal:.2f}x")
    s.add_row("speedup / ideal", f"{speedup / ideal:.1%}")
    s.add_row(f"1 developer: wall / (tasks x latency) = {one.wall_s:.2f} / {ideal_one:.2f}", f"{per_call_factor:.3f}")
    s.add_row(
        "1 developer: overhead per call, raw (wall per call beyond the model's latency)",
        f"{1000 * one.overhead_per_call_s:.1f} ms",
    )
    s.add_row(
        f"direct SDK call, no mesh: beyond the model's latency, median / mean of {len(base.calls)}",
        f"{base.median_ms:.1f} / {base.mean_ms:.1f} ms",
    )
    s.add_row("the mesh adds per call = raw overhead - direct (mean)", f"{mesh_adds_ms:.1f} ms")
    s.add_row(
        f"mesh target (issue #13): <= {TARGET_MESH_ADDS_MS:g} ms",
        "met" if mesh_adds_ms <= TARGET_MESH_ADDS_MS else "NOT met",
    )
    s.add_row(f"{a.agents} developers: overhead per wave", f"{1000 * many.overhead_per_call_s:.0f} ms")
    s.add_row("original design's claim / target", f"{CLAIMED_SPEEDUP}x / >= {TARGET_SPEEDUP:g}x")
    s.add_row("target met", "yes" if speedup >= TARGET_SPEEDUP else "NO")
    console.print(s)
    console.print(
        f"rate limiter opened wide for the benchmark: CASPER_LLM_RPM={LIMITER_ENV['CASPER_LLM_RPM']}, "
        f"CASPER_LLM_TPM={LIMITER_ENV['CASPER_LLM_TPM']} (permits still requested per call, never waited "
        f"on); every task complete, the fake server answered exactly {total_calls} calls "
        f"({sum(r.calls for r in runs)} measured + {sum(r.warmup_calls for r in runs)} warm-up on the meshes, "
        f"{len(base.calls)} + {base.warmup} direct)."
    )
    if a.json:
        print(
            json.dumps(
                {
                    "tasks": a.tasks,
                    "agents": a.agents,
                    "latency_s": a.latency,
                    "wall_1_s": round(one.wall_s, 3),
                    f"wall_{a.agents}_s": round(many.wall_s, 3),
                    "speedup": round(speedup, 3),
                    "ideal_speedup": round(ideal, 3),
                    "speedup_over_ideal": round(speedup / ideal, 4),
                    "wall1_per_call_factor": round(per_call_factor, 4),
                    "overhead_per_call_1_ms": round(1000 * one.overhead_per_call_s, 1),
                    "direct_sdk_ms": {
                        "median": round(base.median_ms, 2),
                        "mean": round(base.mean_ms, 2),
                        "calls": len(base.calls),
                        "warmup": base.warmup,
                        "event_loop": base.event_loop,
                        "cpu_per_call": round(base.cpu_ms_per_call, 3),
                        "steps": {k: round(1000 * v, 2) for k, v in base.steps_s.items()},
                    },
                    "mesh_adds_per_call_ms": round(mesh_adds_ms, 1),
                    "target_mesh_adds_ms": TARGET_MESH_ADDS_MS,
                    "mesh_adds_target_met": mesh_adds_ms <= TARGET_MESH_ADDS_MS,
                    "overhead_per_wave_n_ms": round(1000 * many.overhead_per_call_s, 1),
                    "calls": total_calls,
                    "all_complete": True,
                    "target_speedup": TARGET_SPEEDUP,
                    "target_met": speedup >= TARGET_SPEEDUP,
                    "llm_rpm": int(LIMITER_ENV["CASPER_LLM_RPM"]),
                    "llm_tpm": int(LIMITER_ENV["CASPER_LLM_TPM"]),
                    "total_s": round(total_s, 1),
                    "permit_lease_s": a.permit_lease_s,
                    "prefetch": a.prefetch,
                    "cpu_ms": {str(r.agents): {k: round(v, 3) for k, v in r.cpu_ms.items()} for r in runs},
                    "steps_ms": {str(r.agents): {k: round(1000 * v, 2) for k, v in r.phases.items()} for r in runs},
                },
                separators=(",", ":"),
            )
        )
    return 0


if __name__ == "__main__":
    exit_on_sigterm()
    sys.exit(main())
