"""What trust costs: the local mesh with enrollment (ZAP handler, User-Id read from every frame,
identity bound to the key) against the same mesh with ``curve_enrollment`` off (Curve still on).

Both runs apply the role table (casperd/authz.py) — it is not switchable; its own cost per message
is measured separately here (a pure function call, microseconds). Runs alternate in ABBA order
(on, off, off, on, ...) so drift on a shared machine hits both sides; each figure is the median
over the rounds.

    python -m bench.trust_overhead --tasks 5000 --rounds 2
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.common import burst_mesh, drain, exit_on_sigterm
from bench.mesh_vs_celery import _pct
from casperd import authz
from casperd.enrollment import Entry
from casperd.messages import Heartbeat, TaskSpec

console = Console()


def run(enrollment: bool, n_tasks: int, samples: int) -> dict[str, Any]:
    mesh = burst_mesh("casper-bench-trust-", CASPER_CURVE_ENROLLMENT="true" if enrollment else "false")
    try:
        mesh.start()
        with mesh.client(timeout_s=120) as c:
            specs = [TaskSpec(type="noop", input={"i": i, "pad": "x" * 64}) for i in range(n_tasks)]
            c.submit(specs[:200], wait=True)
            drain(c, 200, 60.0)
            t0 = time.perf_counter()
            for i in range(0, n_tasks, 500):
                c.submit(specs[i : i + 500], wait=True)
            drain(c, n_tasks, 60.0)
            wall = time.perf_counter() - t0
            lat: list[float] = []
            one = [TaskSpec(type="noop", input={"pad": "x" * 64})]
            for i in range(samples + 20):
                s = time.perf_counter()
                c.submit(one, wait=True)
                drain(c, 1, 60.0)
                if i >= 20:
                    lat.append((time.perf_counter() - s) * 1000)
            trust = c.request("status")["trust"]
        assert trust["enrollment"] is enrollment, trust
        return {"tps": n_tasks / wall, "p50": _pct(lat, 50), "p99": _pct(lat, 99)}
    finally:
        mesh.stop()
        shutil.rmtree(mesh.state_dir, ignore_errors=True)


def authz_cost_us(n: int = 200_000) -> float:
    """One authz.admit of a HEARTBEAT from a registered, enrolled peer (the per-frame check)."""
    entry = Entry("k" * 40, "developer-*", "developer")
    msg = Heartbeat()
    t0 = time.perf_counter()
    for _ in range(n):
        authz.admit(msg, enforced=True, entry=entry, key="k" * 40, peer_role="developer", peer_key="k" * 40)
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=5000)
    ap.add_argument("--samples", type=int, default=200, help="latency round trips per run")
    ap.add_argument("--rounds", type=int, default=2, help="runs of each side, alternating")
    a = ap.parse_args()
    results: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
    for r in range(a.rounds):
        for side in (True, False) if r % 2 == 0 else (False, True):  # ABBA: drift hits both sides
            console.print(f"round {r + 1}: enrollment {'on' if side else 'off'} ...")
            results[side].append(run(side, a.tasks, a.samples))
    med = {
        side: {k: statistics.median(x[k] for x in rs) for k in ("tps", "p50", "p99")} for side, rs in results.items()
    }
    t = Table(
        title=f"{a.tasks} no-op tasks, 2 developers x credit 2+32, {a.samples} round trips, median of {a.rounds}",
        title_justify="left",
    )
    for col in ("mesh", "tasks/s", "p50 ms", "p99 ms"):
        t.add_column(col)
    for side in (False, True):
        m = med[side]
        t.add_row(
            f"curve, enrollment {'on' if side else 'off'}", f"{m['tps']:.0f}", f"{m['p50']:.2f}", f"{m['p99']:.2f}"
        )
    console.print(t)
    on, off = med[True], med[False]
    console.print(
        f"enrollment on vs off: throughput {on['tps'] / off['tps'] - 1:+.1%}, p50 {on['p50'] / off['p50'] - 1:+.1%} "
        f"(target: within 5%); authz.admit per frame: {authz_cost_us():.2f} us"
    )
    for side in (True, False):
        runs = ", ".join(f"{x['tps']:.0f}/s p50 {x['p50']:.2f}ms" for x in results[side])
        console.print(f"  runs with enrollment {'on' if side else 'off'}: {runs}")


if __name__ == "__main__":
    exit_on_sigterm()
    main()
