"""Cost of confinement: wall time per call of ``/bin/true`` through casperd.subproc.

Prints the wall-time median and p90 per call and the CPU time the children used per call:
unconfined (git, validation), confined as the daemon's own
user, and confined as the task user (when this process may switch users). Bounded: N calls each.

    .venv/bin/python bench/subproc_overhead.py [N]
"""

from __future__ import annotations

import asyncio
import os
import resource
import statistics
import sys
import time

from casperd import subproc, taskenv
from casperd.subproc import Confinement, Limits

ENV = {"PATH": "/usr/bin:/bin"}


async def measure(n: int, confine: Confinement | None) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        run = await subproc.run(["/bin/true"], cwd="/", env=ENV, timeout_s=30, confine=confine)
        out.append(time.perf_counter() - t0)
        assert run.returncode == 0, run
    return out


async def main(n: int) -> None:
    cases: list[tuple[str, Confinement | None]] = [
        ("unconfined", None),
        ("confined, own user", Confinement(Limits(cpu_s=60, memory_bytes=1 << 32, processes=1024))),
    ]
    run_as = taskenv.resolve_user("auto")
    if run_as is not None:
        cases.append((f"confined, as {run_as.name}", Confinement(Limits(cpu_s=60), run_as)))
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    for name, confine in cases:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        times = sorted(await measure(n, confine))
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / n
        p90 = times[int(0.9 * (len(times) - 1))]
        print(
            f"{name:28s} n={n}  wall median {statistics.median(times) * 1000:6.1f} ms  p90 {p90 * 1000:6.1f} ms"
            f"  child CPU {cpu * 1000:5.1f} ms/call"
        )


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 50))
