"""The policeman's memory per queued task: RSS before and after N small tasks wait in its queue.

A local mesh with no workers (so nothing is dispatched), durability on; N ``noop`` tasks with a
small input go in through the control socket in SUBMIT batches of 500; once every one is
committed and queued, the policeman's RSS (psutil) is read again. Target (issue #9): at most
1 KB per queued task beyond the baseline.

    python -m bench.queue_memory --tasks 100000
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import psutil

from casperd.localmesh import LocalMesh, free_port_base
from casperd.messages import TaskSpec


def rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=100_000)
    a = ap.parse_args()
    mesh = LocalMesh(
        Path(tempfile.mkdtemp(prefix="casper-bench-queue-")),
        developers=0,
        testers=0,
        port_base=free_port_base(),
        log_level="WARNING",
        redis_url=None,
    )
    try:
        mesh.start()
        proc = mesh.policeman.proc
        assert proc is not None
        with mesh.client(timeout_s=120) as c:
            c.submit([TaskSpec(type="noop", input={"warm": True})])  # warm: pool, statements, imports
            time.sleep(2)
            before = rss(proc.pid)
            t0 = time.perf_counter()
            for i in range(0, a.tasks, 500):
                c.submit([TaskSpec(type="noop", input={"i": n}) for n in range(i, min(a.tasks, i + 500))])
            wall = time.perf_counter() - t0
            queued = c.request("status")["queued"]
            time.sleep(2)
            after = rss(proc.pid)
        per_task = (after - before) / a.tasks
        print(f"{a.tasks} queued tasks (queue: {queued}) in {wall:.1f}s")
        print(f"policeman RSS: {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB")
        print(f"per queued task: {per_task:.0f} bytes (target <= 1024)")
    finally:
        mesh.stop()


if __name__ == "__main__":
    main()
