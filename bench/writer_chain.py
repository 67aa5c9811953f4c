"""Where the group-commit writer's time goes during a burst (issue #13).

During a burst the single writer has a commit in flight nearly all the time, so its time per task
bounds the throughput. This splits that time, on a fresh local mesh (the workload of
``bench.peers``: no-op tasks, 2 developers x 2 slots, prefetch 32, SUBMITs of 500):

* in flight: from the start of a commit (its rows' encoding included) to its reply being handled
  (``status`` -> ``store.busy_s``);
* encoding the rows (``store.encode_s``);
* Postgres executing the statements (``log_min_duration_statement = 0`` on the embedded server,
  the ``execute casper_commit_*`` durations summed);
* the rest: the commit itself (its WAL flush), the wake-ups, and the policeman's loop busy
  elsewhere when the reply arrives.

    python -m bench.writer_chain --tasks 20000 --rounds 2
"""

from __future__ import annotations

import argparse
import re
import shutil
import time

import psycopg

from bench.common import burst_mesh, drain, exit_on_sigterm
from casperd.messages import TaskSpec

_EXECUTE = re.compile(r"duration: ([0-9.]+) ms\s+execute casper_commit")


def measure(n: int) -> dict[str, float]:
    mesh = burst_mesh("casper-bench-chain-", CASPER_EVENT_LOOP="auto")
    try:
        mesh.start()
        assert mesh.postgres is not None
        with psycopg.connect(mesh.postgres.url, autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET log_min_duration_statement = 0")
            conn.execute("SELECT pg_reload_conf()")
        time.sleep(1.0)
        with mesh.client(timeout_s=120) as c:
            c.submit([TaskSpec(type="noop", input={"i": i}) for i in range(200)], wait=True)
            drain(c, 200)
            specs = [TaskSpec(type="noop", input={"i": i, "pad": "x" * 64}) for i in range(n)]
            w0 = c.request("status")["store"]
            log_at = mesh.postgres.log_path.stat().st_size
            t0 = time.perf_counter()
            for i in range(0, n, 500):
                c.submit(specs[i : i + 500], wait=True)
            drain(c, n)
            wall = time.perf_counter() - t0
            w1 = c.request("status")["store"]
        log = mesh.postgres.log_path.read_bytes()[log_at:].decode(errors="replace")
        pg_s = sum(float(ms) for ms in _EXECUTE.findall(log)) / 1000
        busy = w1["busy_s"] - w0["busy_s"]
        enc = w1["encode_s"] - w0["encode_s"]
        commits = max(1, w1["commits"] - w0["commits"])
        return {
            "tps": n / wall,
            "busy_pct": 100 * busy / wall,
            "per_commit": n / commits,
            "flight_us": 1e6 * busy / n,
            "encode_us": 1e6 * enc / n,
            "pg_us": 1e6 * pg_s / n,
            "rest_us": 1e6 * (busy - enc - pg_s) / n,
            "rest_ms_per_commit": 1e3 * (busy - enc - pg_s) / commits,
        }
    finally:
        mesh.stop()
        shutil.rmtree(mesh.state_dir, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=20000, help="tasks in the burst (default 20000)")
    ap.add_argument("--rounds", type=int, default=2, help="fresh meshes, one burst each (default 2)")
    a = ap.parse_args()
    for r in range(a.rounds):
        m = measure(a.tasks)
        print(
            f"round {r + 1}: {m['tps']:,.0f} tasks/s, a commit in flight {m['busy_pct']:.0f}% of the burst, "
            f"{m['per_commit']:.0f} tasks per commit; per task in flight {m['flight_us']:.1f} µs = "
            f"Postgres executing {m['pg_us']:.1f} + encoding {m['encode_us']:.1f} + the rest {m['rest_us']:.1f} "
            f"({m['rest_ms_per_commit']:.2f} ms per commit: the commit, wake-ups, the loop busy elsewhere)"
        )


if __name__ == "__main__":
    exit_on_sigterm()
    main()
