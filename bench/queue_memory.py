"""The policeman's memory per queued task: RSS before and after N tasks wait in its queue.

A local mesh with no workers (so nothing is dispatched), durability on; N ``noop`` tasks go in
through the control socket in SUBMIT batches; once every one is committed and queued, the
policeman's RSS (psutil) is read again. Two runs, each on a fresh mesh:

* small inputs (``{"i": n}``, batches of 500). Target (issue #9): at most 1 KB per queued task
  beyond the baseline;
* large inputs (``--large-bytes`` each, batches within the message limit): a queued task's input
  above ``inline_input_bytes`` (4 KiB) waits in Postgres, not in memory, so the bytes per task
  stay far below the input's size (``--large-tasks 0`` skips this run).

    python -m bench.queue_memory --tasks 100000 --large-tasks 10000 --large-bytes 16384 [--restart]

Figures are noisy on a shared machine (RSS includes the allocator's slack): compare the two runs.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from bench.common import exit_on_sigterm
from casperd.localmesh import LocalMesh, free_port_base
from casperd.messages import TaskSpec


def rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def measure(
    label: str, tasks: int, batch: int, make_input: Callable[[int], dict[str, Any]], restart: bool = False
) -> float:
    """Queue ``tasks`` noop tasks on a fresh mesh; print and return the policeman's RSS per task.
    With ``restart``, the policeman is then restarted and its RSS read again once it has recovered
    the queue from Postgres (against the first process's baseline)."""
    state = Path(tempfile.mkdtemp(prefix="casper-bench-queue-"))
    mesh = LocalMesh(
        state,
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
            c.submit([TaskSpec(type="noop", input=make_input(-1))])  # warm: pool, statements, imports
            time.sleep(2)
            before = rss(proc.pid)
            t0 = time.perf_counter()
            for i in range(0, tasks, batch):
                c.submit([TaskSpec(type="noop", input=make_input(n)) for n in range(i, min(tasks, i + batch))])
            wall = time.perf_counter() - t0
            queued = c.request("status")["queued"]
            time.sleep(2)
            after = rss(proc.pid)
        recovered = None
        if restart:
            mesh.stop_node("policeman", timeout=120)
            mesh.start_node("policeman")
            mesh.wait_healthy("policeman", 300)
            with mesh.client(timeout_s=120) as c:
                while c.request("status")["queued"] < tasks + 1:
                    time.sleep(0.5)
            time.sleep(2)
            new = mesh.policeman.proc
            assert new is not None
            recovered = rss(new.pid)
    finally:
        mesh.stop()
        shutil.rmtree(state, ignore_errors=True)  # its embedded Postgres: ~160 MB a run
    per_task = (after - before) / tasks
    print(f"{label}: {tasks} queued tasks (queue: {queued}) in {wall:.1f}s")
    print(f"  policeman RSS: {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB")
    print(f"  per queued task: {per_task:.0f} bytes")
    if recovered is not None:
        print(
            f"  after a restart (queue recovered from Postgres): {recovered / 2**20:.1f} MiB, "
            f"{(recovered - before) / tasks:.0f} bytes per queued task over the first baseline"
        )
    return per_task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=100_000, help="queued tasks with a small input (0: skip)")
    ap.add_argument("--large-tasks", type=int, default=10_000, help="queued tasks with a large input (0: skip)")
    ap.add_argument("--large-bytes", type=int, default=16 * 1024, help="size of each large input, bytes")
    ap.add_argument("--restart", action="store_true", help="also restart the policeman and measure the recovered queue")
    a = ap.parse_args()
    if a.tasks > 0:
        small = measure("small inputs", a.tasks, 500, lambda n: {"i": n}, a.restart)
        print(f"  target <= 1024 bytes per queued task: {'met' if small <= 1024 else 'NOT met'}")
    if a.large_tasks > 0:
        pad = "x" * a.large_bytes
        batch = max(1, min(500, (2 * 1024 * 1024) // (a.large_bytes + 64)))  # well within max_message_bytes
        large = measure(f"{a.large_bytes} B inputs", a.large_tasks, batch, lambda n: {"i": n, "pad": pad}, a.restart)
        print(f"  {large / a.large_bytes:.1%} of each input's size stays in memory (inputs wait in Postgres)")


if __name__ == "__main__":
    exit_on_sigterm()
    main()
