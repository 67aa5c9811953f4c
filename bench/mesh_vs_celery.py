"""Baseline benchmark: the CASPER local mesh against Celery (Redis broker + result backend).

Same machine, same run, same payload, same number of worker slots (executions at once):

* CASPER: ``LocalMesh`` — embedded Postgres with durability on (fsync, synchronous_commit: every
  state change committed before it is acted on, group commit), embedded Redis as result cache,
  CurveZMQ on, a policeman and ``--nodes`` developers with ``slots / nodes`` capacity each and a
  prefetch window (credit = capacity + prefetch). Tasks go in through the control socket in
  SUBMIT batches of 500 with wait=True; a task counts when its DONE arrives.
* Celery 5 with ``task_acks_late=True``: once with prefetch multiplier 1 (the usual acks_late
  setting), once with the prefetch window matched to CASPER's credit window.

Measured: throughput of N no-op tasks (first submit to last result) and submit->result latency
p50/p99 over sequential round trips at low load (one task in flight). Run it on an otherwise idle
machine; it prints a table with each system and the ratios.

    python -m bench.mesh_vs_celery --tasks 20000
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.common import drain, exit_on_sigterm
from casperd.localmesh import LocalMesh
from casperd.messages import TaskSpec

console = Console()


def _pct(values: list[float], q: int) -> float:
    return float(statistics.quantiles(sorted(values), n=100, method="inclusive")[q - 1])


def run_casper(n_tasks: int, slots: int, nodes: int, prefetch: int, samples: int, port_base: int) -> dict[str, Any]:
    state = Path(tempfile.mkdtemp(prefix="casper-bench-mesh-"))
    per_node = max(1, slots // nodes)
    mesh = LocalMesh(
        state,
        developers=nodes,
        testers=0,
        port_base=port_base,
        log_level="WARNING",
        extra_env={"CASPER_CAPACITY": str(per_node), "CASPER_PREFETCH": str(prefetch)},
    )
    try:
        mesh.start()
        with mesh.client(timeout_s=120) as c:
            specs = [TaskSpec(type="noop", input={"i": i, "pad": "x" * 64}) for i in range(n_tasks)]
            # warm up (connections, prepared statements)
            c.submit(specs[:200], wait=True)
            drain(c, 200, 60.0)
            t0 = time.perf_counter()
            for i in range(0, n_tasks, 500):
                c.submit(specs[i : i + 500], wait=True)
            drain(c, n_tasks, 60.0)
            wall = time.perf_counter() - t0
            lat: list[float] = []
            one = [TaskSpec(type="noop", input={"pad": "x" * 64})]
            for i in range(samples + 50):
                s = time.perf_counter()
                c.submit(one, wait=True)
                drain(c, 1, 60.0)
                if i >= 50:
                    lat.append((time.perf_counter() - s) * 1000)
            store = c.request("status")["store"]
        return {
            "system": f"casper mesh ({nodes} nodes, credit {per_node}+{prefetch} each)",
            "tasks": n_tasks,
            "slots": per_node * nodes,
            "throughput_tps": n_tasks / wall,
            "wall_s": wall,
            "p50_ms": _pct(lat, 50),
            "p99_ms": _pct(lat, 99),
            "commits": store["commits"],
        }
    finally:
        mesh.stop()
        shutil.rmtree(state, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=20000)
    ap.add_argument("--slots", type=int, default=4, help="worker slots on each side (default 4)")
    ap.add_argument("--nodes", type=int, default=2, help="CASPER developer nodes sharing the slots (default 2)")
    ap.add_argument("--prefetch", type=int, default=32, help="CASPER prefetch per node (default 32)")
    ap.add_argument("--samples", type=int, default=500, help="latency round trips (default 500)")
    ap.add_argument("--port-base", type=int, default=27000)
    ap.add_argument("--skip-celery", action="store_true")
    a = ap.parse_args()
    from bench.celery_side import run_celery_benchmark

    rows = []
    console.print(f"CASPER: {a.tasks} no-op tasks, {a.slots} slots ...")
    casper = run_casper(a.tasks, a.slots, a.nodes, a.prefetch, a.samples, a.port_base)
    rows.append(casper)
    if not a.skip_celery:
        window = (a.slots // a.nodes + a.prefetch) * a.nodes
        for mult in (1, max(1, window // a.slots)):
            console.print(f"Celery: prefetch multiplier {mult} ...")
            r = run_celery_benchmark(a.tasks, a.slots, a.samples, prefetch_multiplier=mult)
            r["system"] = f"celery+redis (acks_late, prefetch x{mult})"
            rows.append(r)
    t = Table(
        title=f"{a.tasks} no-op tasks, {a.slots} worker slots, latency over {a.samples} round trips",
        title_justify="left",
    )
    for col in ("system", "tasks/s", "p50 ms", "p99 ms", "throughput vs casper", "p50 vs casper"):
        t.add_column(col)
    for r in rows:
        t.add_row(
            r["system"],
            f"{r['throughput_tps']:.0f}",
            f"{r['p50_ms']:.2f}",
            f"{r['p99_ms']:.2f}",
            f"{casper['throughput_tps'] / r['throughput_tps']:.2f}x",
            f"{r['p50_ms'] / casper['p50_ms']:.2f}x",
        )
    console.print(t)
    console.print(f"casper group commits: {casper['commits']} for {a.tasks + 200 + a.samples + 50} tasks")


if __name__ == "__main__":
    exit_on_sigterm()
    main()
