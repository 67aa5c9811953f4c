"""CASPER against Celery, Dramatiq, Ray and pgqueuer in one run, with the machine's floors.

Every system runs ``--tasks`` no-op tasks with ``--slots`` worker slots, then ``--samples``
sequential round trips (submit one task, wait for its result: one task in flight). CASPER is the
local mesh (embedded Postgres with fsync and synchronous_commit on, CurveZMQ, a policeman and
``--nodes`` developers sharing the slots) and is measured in more detail:

* idle RSS of every ``casperd`` after start-up (target <= 60 MB);
* round-trip latency on a fresh mesh, and again right after the ``--tasks`` burst (targets: p50
  <= 2.0 ms, p99 <= 5 ms, both times);
* CPU per round trip of every process together (policeman, developers, Postgres, the client;
  target <= 3 ms), split by process;
* throughput (target >= 5,000 tasks/s) and the policeman's CPU per task under it (target <= 100 µs).

The floors (bench/floors.py) are measured on the same machine in the same run: a single-row commit,
a batched COPY, a raw zmq round trip; CASPER's distance to them is printed, and so is the machine's
CPU scale (the policeman's rules alone, ``bench.core_events``), which every CPU figure of CASPER's
Python processes moves with. Figures move ±25% between runs on a shared machine: compare
ratios within one run.

    python -m bench.peers --tasks 20000 --samples 500            # everything
    python -m bench.peers --only casper,floors --tasks 5000      # a quick look
    python -m bench.peers --only casper,celery --rounds 3        # one ratio, three times in turn
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from bench import floors
from bench.common import drain, exit_on_sigterm
from casperd.localmesh import LocalMesh, free_port_base
from casperd.messages import TaskSpec

TARGETS = {"p50_ms": 2.0, "p99_ms": 5.0, "cpu_rt_ms": 3.0, "tps": 5000, "police_us": 100, "rss_mb": 60}


def _pct(xs: list[float], q: int) -> float:
    return float(statistics.quantiles(sorted(xs), n=100, method="inclusive")[q - 1])


def _cpu(procs: dict[str, list[psutil.Process]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, ps in procs.items():
        total = 0.0
        for p in ps:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        out[name] = total
    return out


def _delta(a: dict[str, float], b: dict[str, float], per: int, scale: float) -> dict[str, float]:
    return {k: (b[k] - a[k]) / per * scale for k in a}


def _round_trips(c: Any, samples: int, accepted: list[float] | None = None) -> list[float]:
    """Round trips in ms; with ``accepted``, also the submit -> ACCEPTED part of each."""
    one = [TaskSpec(type="noop", input={"pad": "x" * 64})]
    lat = []
    for _ in range(samples):
        s = time.perf_counter()
        c.submit(one, wait=True)
        a = time.perf_counter()
        drain(c, 1)
        lat.append((time.perf_counter() - s) * 1000)
        if accepted is not None:
            accepted.append((a - s) * 1000)
    return lat


def _writer_share(w0: dict[str, Any], w1: dict[str, Any], n: int, wall: float) -> dict[str, float]:
    """What the single group-commit writer did during a burst of ``n`` tasks over ``wall`` seconds
    (from two ``status`` snapshots): its commits are serial (the after-commit actions run while the
    next commit is in flight), so ``n`` over the time in flight is the most one writer carries at
    this pace."""
    busy, after = w1["busy_s"] - w0["busy_s"], w1["after_s"] - w0["after_s"]
    return {
        "busy_pct": 100 * busy / wall,
        "tasks_per_commit": n / max(1, w1["commits"] - w0["commits"]),
        "busy_us": 1e6 * busy / n,
        "encode_us": 1e6 * (w1["encode_s"] - w0["encode_s"]) / n,
        "after_us": 1e6 * after / n,
        "ceiling_tps": n / max(busy, 1e-9),
    }


def run_casper(n: int, slots: int, nodes: int, prefetch: int, samples: int) -> dict[str, Any]:
    state = Path(tempfile.mkdtemp(prefix="casper-bench-peers-"))
    per_node = max(1, slots // nodes)
    mesh = LocalMesh(
        state,
        developers=nodes,
        testers=0,
        port_base=free_port_base(),
        log_level="WARNING",
        extra_env={
            "CASPER_CAPACITY": str(per_node),
            "CASPER_PREFETCH": str(prefetch),
            "CASPER_EVENT_LOOP": "auto",  # uvloop when installed (the bench extra has it)
        },
    )
    try:
        mesh.start()
        time.sleep(3.0)  # idle
        node_procs = {nid: psutil.Process(nd.proc.pid) for nid, nd in mesh.nodes.items() if nd.proc is not None}
        rss = {nid: p.memory_info().rss / 2**20 for nid, p in node_procs.items()}
        assert mesh.postgres is not None and mesh.postgres.proc is not None
        pg_root = psutil.Process(mesh.postgres.proc.pid)
        me = psutil.Process()

        def procs() -> dict[str, list[psutil.Process]]:
            return {
                "policeman": [node_procs["policeman"]],
                "developers": [p for nid, p in node_procs.items() if nid != "policeman"],
                "postgres": [pg_root, *pg_root.children(recursive=True)],
                "client": [me],
            }

        out: dict[str, Any] = {"system": f"CASPER ({nodes} developers x {per_node}, CurveZMQ, group commit)"}
        out["rss_mb"] = rss
        with mesh.client(timeout_s=120) as c:
            c.submit([TaskSpec(type="noop", input={"i": i}) for i in range(200)], wait=True)
            drain(c, 200)
            _round_trips(c, 50)
            a = _cpu(procs())
            out["acc_fresh"] = []
            out["lat_fresh"] = _round_trips(c, samples, out["acc_fresh"])
            out["cpu_fresh_ms"] = _delta(a, _cpu(procs()), samples, 1000)
            specs = [TaskSpec(type="noop", input={"i": i, "pad": "x" * 64}) for i in range(n)]
            a = _cpu(procs())
            w0 = c.request("status")["store"]
            t0 = time.perf_counter()
            for i in range(0, n, 500):
                c.submit(specs[i : i + 500], wait=True)
            drain(c, n)
            wall = time.perf_counter() - t0
            out["throughput_tps"] = n / wall
            out["writer"] = _writer_share(w0, c.request("status")["store"], n, wall)
            out["cpu_task_us"] = _delta(a, _cpu(procs()), n, 1e6)
            out["rss_police_after_mb"] = node_procs["policeman"].memory_info().rss / 2**20
            a = _cpu(procs())
            out["acc_after"] = []
            out["lat_ms"] = _round_trips(c, samples, out["acc_after"])  # right after the burst
            out["cpu_after_ms"] = _delta(a, _cpu(procs()), samples, 1000)
            out["commits"] = c.request("status")["store"]["commits"]
        out["durable"] = True
        return out
    finally:
        mesh.stop()
        shutil.rmtree(state, ignore_errors=True)  # its embedded Postgres: ~125 MB a run


def _celery(n: int, slots: int, samples: int) -> dict[str, Any]:
    from bench.celery_side import run_celery_benchmark

    r = run_celery_benchmark(n, slots, samples, prefetch_multiplier=1)
    return {"system": "celery + redis (acks_late)", "durable": False, **r}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=20000)
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--prefetch", type=int, default=32)
    ap.add_argument("--samples", type=int, default=500)
    ap.add_argument("--only", default="floors,casper,ray,dramatiq,pgqueuer,celery")
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run everything this many times in turn, a report per round, then CASPER's throughput ratio "
        "to each peer round by round and its median (on a shared machine one round's ratio moves by a tenth)",
    )
    a = ap.parse_args()
    if a.rounds < 1:
        ap.error("--rounds must be at least 1")
    ratios: dict[str, list[float]] = {}
    for round_no in range(1, a.rounds + 1):
        if a.rounds > 1:
            print(f"\n=== round {round_no} of {a.rounds}", flush=True)
        rows, casper = _one_round(a)
        if casper is None:
            continue
        for r in rows:
            if r is not casper and r["throughput_tps"] > 0:
                ratios.setdefault(r["system"], []).append(casper["throughput_tps"] / r["throughput_tps"])
    if a.rounds > 1 and ratios:
        print(f"\nCASPER tasks/s ÷ each peer's, round by round ({a.rounds} rounds), and the median:")
        for system, xs in ratios.items():
            each = " / ".join(f"{x:.1f}x" for x in xs)
            print(f"  {system}: {each}; median {statistics.median(xs):.1f}x")


def _one_round(a: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Floors, CASPER and each peer asked for, once, with the report; the rows and CASPER's."""
    want = set(a.only.split(","))
    rows: list[dict[str, Any]] = []
    fl: dict[str, Any] | None = None
    if "floors" in want:
        print("floors ...", flush=True)
        fl = floors.measure()
    casper: dict[str, Any] | None = None
    if "casper" in want:
        print(f"CASPER: {a.tasks} tasks, {a.slots} slots ...", flush=True)
        casper = run_casper(a.tasks, a.slots, a.nodes, a.prefetch, a.samples)
        rows.append(casper)
    peers = {
        "ray": lambda: __import__("bench.peer_ray", fromlist=["run"]).run(a.tasks, a.slots, a.samples),
        "dramatiq": lambda: __import__("bench.peer_dramatiq", fromlist=["run"]).run(a.tasks, a.slots, a.samples),
        "pgqueuer": lambda: _pgqueuer(a.tasks, a.slots, a.samples),
        "celery": lambda: _celery(a.tasks, a.slots, a.samples),
    }
    for name, fn in peers.items():
        if name in want:
            print(f"{name} ...", flush=True)
            try:
                rows.append(fn())
            except Exception as exc:  # a peer that fails is reported, the run goes on
                print(f"  {name} failed: {type(exc).__name__}: {exc}")
    _report(rows, casper, fl, a)
    return rows, casper


def _pgqueuer(n: int, slots: int, samples: int) -> dict[str, Any]:
    import shutil

    from bench.peer_pgqueuer import run
    from casperd.embedded import EmbeddedPostgres

    root = Path(tempfile.mkdtemp(prefix="casper-bench-pgq-"))
    pg = EmbeddedPostgres(root / "pg", free_port_base() + 100)
    pg.start()
    os.environ.update(pg.env())
    try:
        return run(pg.url, n, slots, samples)
    finally:
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)


def _report(rows: list[dict[str, Any]], casper: dict[str, Any] | None, fl: dict[str, Any] | None, a: Any) -> None:
    print(f"\n{a.tasks} no-op tasks, {a.slots} worker slots; latency over {a.samples} round trips, one in flight")
    print("| system | durable | tasks/s | p50 ms | p99 ms | CASPER tasks/s ÷ this | this p50 ÷ CASPER p50 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        lat = r.get("lat_ms")
        p50 = _pct(lat, 50) if lat else r["p50_ms"]
        p99 = _pct(lat, 99) if lat else r["p99_ms"]
        ratio_t = f"{casper['throughput_tps'] / r['throughput_tps']:.1f}x" if casper else "-"
        ratio_l = f"{p50 / _pct(casper['lat_ms'], 50):.2f}x" if casper else "-"
        durable = "yes" if r.get("durable") else "no"
        tps = f"{r['throughput_tps']:,.0f}"
        print(f"| {r['system']} | {durable} | {tps} | {p50:.2f} | {p99:.2f} | {ratio_t} | {ratio_l} |")
    if fl:
        floor = floors.durable_floor_ms(fl)
        print(
            f"\nfloors: single-row commit p50 {fl['commit_ms']:.2f} ms; COPY {fl['copy_rows_s']:,.0f} rows/s; "
            f"raw zmq round trip p50 {fl['zmq_rtt_ms']:.3f} ms; durable round trip (2 commits + 4 hops) "
            f"{floor:.2f} ms\n"
            f"floors after 1 ms idle (each hop wakes an idle process, as at one task in flight): commit "
            f"{fl['commit_cold_ms']:.2f} ms, zmq round trip {fl['zmq_rtt_cold_ms']:.3f} ms; durable round trip "
            f"{floors.durable_floor_ms(fl, cold=True):.2f} ms\n"
            f"{floors.describe_scale(fl)}"
        )
    if not casper:
        return
    t = TARGETS
    fresh, after = casper["lat_fresh"], casper["lat_ms"]
    print("\nCASPER against the targets of issue #13:")
    phases = (
        ("fresh", fresh, casper["acc_fresh"], casper["cpu_fresh_ms"]),
        ("after burst", after, casper["acc_after"], casper["cpu_after_ms"]),
    )
    for name, xs, acc, cpu in phases:
        split = ", ".join(f"{k} {v:.2f}" for k, v in cpu.items())
        print(
            f"  {name}: p50 {_pct(xs, 50):.2f} ms (target {t['p50_ms']}), p99 {_pct(xs, 99):.2f} ms "
            f"(target {t['p99_ms']}); CPU per round trip {sum(cpu.values()):.2f} ms (target {t['cpu_rt_ms']}): {split}"
        )
        rest = [x - a for x, a in zip(xs, acc, strict=True)]
        print(f"    p50 submit -> ACCEPTED {_pct(acc, 50):.2f} ms, ACCEPTED -> DONE {_pct(rest, 50):.2f} ms")
        if fl:
            print(
                f"    distance to the durable floor: {_pct(xs, 50) - floors.durable_floor_ms(fl):+.2f} ms "
                f"(to the floor after 1 ms idle: {_pct(xs, 50) - floors.durable_floor_ms(fl, cold=True):+.2f} ms)"
            )
    cpu = casper["cpu_task_us"]
    print(
        f"  throughput {casper['throughput_tps']:,.0f} tasks/s (target {t['tps']:,}); CPU per task under load: "
        + ", ".join(f"{k} {v:.0f} µs" for k, v in cpu.items())
        + f" (policeman target {t['police_us']} µs)"
    )
    if fl:
        print(f"    Postgres COPY floor for one row per task: {fl['copy_rows_s']:,.0f} tasks/s")
        print(f"    the policeman in the mesh: {cpu['policeman'] / fl['core_us']:.1f}x the CPU of its rules alone")
    print(
        "  idle RSS per casperd: "
        + ", ".join(f"{k} {v:.1f} MB" for k, v in casper["rss_mb"].items())
        + f" (target {t['rss_mb']} MB); policeman after the burst {casper['rss_police_after_mb']:.0f} MB"
    )
    print(f"  group commits: {casper['commits']}")
    w = casper["writer"]
    print(
        f"  the group-commit writer during the burst: a commit in flight {w['busy_pct']:.0f}% of the time, "
        f"{w['tasks_per_commit']:.0f} tasks per commit; per task {w['busy_us']:.0f} µs in flight (encoding "
        f"{w['encode_us']:.0f}), {w['after_us']:.0f} µs of after-commit actions beside it: one writer at this pace "
        f"carries at most {w['ceiling_tps']:,.0f} tasks/s"
    )


if __name__ == "__main__":
    exit_on_sigterm()
    main()
