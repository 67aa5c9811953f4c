"""The group commit's plan, time and Postgres CPU, before and after a burst.

For each writer configuration — ``old`` (generic plans only, as casperd 0.1.0 ran) and ``new``
(:data:`casperd.storerows.WRITER_SETTINGS`: generic plans with hash/merge joins and sequential
scans off) — on a fresh database of its own embedded Postgres:

1. prints ``EXPLAIN (GENERIC_PLAN)`` of the group-commit statement while the partition is empty
   (the plan the writer prepares on its first commit and keeps);
2. times ``--samples`` task round trips of two commits each, as a mesh makes them at one task in
   flight (the new task already assigned, with its ``pending`` and ``assigned`` events; then the
   update to ``complete``, with its ``processing`` and ``complete`` events) on the writer's own
   connection: fresh, then right after a burst of ``--burst`` tasks written in batches of 500
   (insert, then three updates each, leaving dead tuples behind);
3. prints the CPU Postgres spent per commit in each phase: all its processes (the writer's backend,
   the WAL writer, autovacuum ...), and the writer's backend alone; and, for scale, the CPU of a
   single-row INSERT + COMMIT into a one-column table on the same server (the floor of any commit).

CPU is read from ``/proc/PID/schedstat`` (nanoseconds) where there is one, else from psutil's
``cpu_times`` (clock ticks). Figures move with the machine's load: compare trees in the same minutes.

    python -m bench.commit_plans --burst 20000 --samples 300
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import psycopg

from bench.common import exit_on_sigterm
from casperd.embedded import EmbeddedPostgres
from casperd.lifecycle import Status
from casperd.localmesh import free_port_base
from casperd.messages import TaskSpec, new_task_id
from casperd.store import Store
from casperd.storerows import COMMIT_ALL, WRITER_SETTINGS, commit_params
from casperd.taskrecord import TaskEvent, TaskRecord, utcnow

SETTINGS = {"old": ("SET plan_cache_mode = force_generic_plan",), "new": WRITER_SETTINGS}


def _rec() -> TaskRecord:
    return TaskRecord.from_spec(new_task_id(), TaskSpec(type="noop", input={"pad": "x" * 64}), 3, "bench")


def _cpu_s(p: psutil.Process) -> float:
    """CPU seconds a process has used (ns resolution from schedstat where the kernel has it)."""
    try:
        with open(f"/proc/{p.pid}/schedstat") as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        t = p.cpu_times()
        return float(t.user + t.system)


class PgCpu:
    """CPU of a Postgres server's processes (the postmaster and its children) between two reads."""

    def __init__(self, postmaster_pid: int) -> None:
        self.root = psutil.Process(postmaster_pid)

    def read(self) -> dict[int, float]:
        out = {}
        for p in [self.root, *self.root.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                out[p.pid] = _cpu_s(p)
        return out

    @staticmethod
    def spent(a: dict[int, float], b: dict[int, float], pid: int | None = None) -> float:
        """Seconds used between reads ``a`` and ``b`` (by ``pid`` only if given); a process born
        in between counts from zero, one gone in between is missed (an autovacuum worker)."""
        return sum(t - a.get(p, 0.0) for p, t in b.items() if pid is None or p == pid)


async def _floor_cpu_us(conn: psycopg.AsyncConnection[Any], cpu: PgCpu, backend: int, n: int) -> tuple[float, float]:
    await conn.execute("CREATE TABLE IF NOT EXISTS bench_commit_floor (v bigint)")
    for i in range(50):
        await conn.execute("INSERT INTO bench_commit_floor VALUES (%s)", (i,), prepare=True)
    a = cpu.read()
    for i in range(n):
        await conn.execute("INSERT INTO bench_commit_floor VALUES (%s)", (i,), prepare=True)
    b = cpu.read()
    return cpu.spent(a, b) / n * 1e6, cpu.spent(a, b, backend) / n * 1e6


async def _run(url: str, mode: str, burst: int, samples: int, cpu: PgCpu) -> None:
    store = Store(url)
    await store.open()
    await store.migrate()
    await store.close()
    conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
    for s in SETTINGS[mode]:
        await conn.execute(s)
    row = await (await conn.execute("SELECT pg_backend_pid()")).fetchone()
    assert row is not None
    backend = int(row[0])
    plain = COMMIT_ALL
    for i in range(1, COMMIT_ALL.count("%s") + 1):
        plain = plain.replace("%s::json", f"${i}::json", 1)
    cur = await conn.execute("EXPLAIN (GENERIC_PLAN) " + plain)
    plan = [r[0] for r in await cur.fetchall()]
    upd = plan.index(next(line for line in plan if "CTE upd" in line))
    print(f"--- {mode}: plan of the UPDATE part, prepared on an empty partition")
    print("\n".join(line for line in plan[upd : upd + 16] if "CTE keys" not in line))

    async def commit(recs: list[TaskRecord], events: list[TaskEvent]) -> float:
        t = time.perf_counter()
        await conn.execute(COMMIT_ALL, commit_params(recs, events, []), prepare=True)
        for r in recs:
            r.persisted = True
        return (time.perf_counter() - t) * 1000

    async def round_trip() -> float:
        r, st = _rec(), utcnow()
        r.move(Status.ASSIGNED, st)
        r.attempts, r.assigned_to, r.assigned_at = 1, "d", st
        ms = await commit(
            [r], [TaskEvent(st, r.id, None, "pending", "c", 0), TaskEvent(st, r.id, "pending", "assigned", "d", 1)]
        )
        for s in (Status.PROCESSING, Status.COMPLETE):
            r.move(s, st)
        r.finished_at, r.output_json = st, '{"ok": true}'
        return ms + await commit(
            [r],
            [
                TaskEvent(st, r.id, "assigned", "processing", "d", 1),
                TaskEvent(st, r.id, "processing", "complete", "d", 1),
            ],
        )

    async def measured() -> tuple[list[float], float, float]:
        a = cpu.read()
        xs = [await round_trip() for _ in range(samples)]
        b = cpu.read()
        return xs, cpu.spent(a, b) / (2 * samples) * 1e6, cpu.spent(a, b, backend) / (2 * samples) * 1e6

    for _ in range(20):
        await round_trip()
    fresh = await measured()
    recs = [_rec() for _ in range(burst)]
    for step in (None, Status.ASSIGNED, Status.PROCESSING, Status.COMPLETE):
        for i in range(0, burst, 500):
            chunk, st = recs[i : i + 500], utcnow()
            for r in chunk:
                if step is not None:
                    r.move(step, st)
            await commit(chunk, [TaskEvent(st, r.id, None, (step or Status.PENDING).value, "c", 0) for r in chunk])
    after = await measured()
    floor = await _floor_cpu_us(conn, cpu, backend, 2 * samples)
    await conn.close()
    q = int(samples * 0.99) - 1
    for name, (xs, all_us, backend_us) in (("fresh", fresh), (f"after {burst}", after)):
        xs.sort()
        print(
            f"{mode}: two commits per task, {name}: p50 {statistics.median(xs):.2f} ms, p99 {xs[q]:.2f} ms;"
            f" Postgres CPU per commit {all_us:.0f} us (writer's backend {backend_us:.0f} us)"
        )
    print(f"{mode}: single-row INSERT+COMMIT floor: Postgres CPU {floor[0]:.0f} us (backend {floor[1]:.0f} us)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--burst", type=int, default=20000)
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--modes", default="old,new")
    a = ap.parse_args()
    for mode in a.modes.split(","):
        root = Path(tempfile.mkdtemp(prefix="casper-bench-plan-"))
        pg = EmbeddedPostgres(root / "pg", free_port_base() + 100)
        pg.start()
        os.environ.update(pg.env())  # PGPASSFILE
        try:
            assert pg.proc is not None
            asyncio.run(_run(pg.url, mode, a.burst, a.samples, PgCpu(pg.proc.pid)))
        finally:
            pg.stop()
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    exit_on_sigterm()
    main()
