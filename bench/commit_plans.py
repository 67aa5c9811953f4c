"""The group commit's plan before and after a burst: why latency doubled after load, and the fix.

For each writer configuration — ``old`` (generic plans only, as casperd 0.1.0 ran) and ``new``
(:data:`casperd.storerows.WRITER_SETTINGS`: generic plans with hash/merge joins and sequential
scans off) — on a fresh database of its own embedded Postgres:

1. prints ``EXPLAIN (GENERIC_PLAN)`` of the group-commit statement while the partition is empty
   (the plan the writer prepares on its first commit and keeps);
2. times ``--samples`` task round trips of two commits each (insert; update to complete) on the
   writer's own connection: fresh, then right after a burst of ``--burst`` tasks written in
   batches of 500 (insert, then three updates each, leaving dead tuples behind).

    python -m bench.commit_plans --burst 20000 --samples 300
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import psycopg

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


async def _run(url: str, mode: str, burst: int, samples: int) -> None:
    store = Store(url)
    await store.open()
    await store.migrate()
    await store.close()
    conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
    for s in SETTINGS[mode]:
        await conn.execute(s)
    plain = COMMIT_ALL
    for i in range(1, 5):
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
        ms = await commit([r], [TaskEvent(st, r.id, None, "pending", "c", 0)])
        for s in (Status.ASSIGNED, Status.PROCESSING, Status.COMPLETE):
            r.move(s, st)
        return ms + await commit([r], [TaskEvent(st, r.id, "processing", "complete", "d", 1)])

    for _ in range(20):
        await round_trip()
    fresh = [await round_trip() for _ in range(samples)]
    recs = [_rec() for _ in range(burst)]
    for step in (None, Status.ASSIGNED, Status.PROCESSING, Status.COMPLETE):
        for i in range(0, burst, 500):
            chunk, st = recs[i : i + 500], utcnow()
            for r in chunk:
                if step is not None:
                    r.move(step, st)
            await commit(chunk, [TaskEvent(st, r.id, None, (step or Status.PENDING).value, "c", 0) for r in chunk])
    after = [await round_trip() for _ in range(samples)]
    await conn.close()
    q = int(samples * 0.99) - 1
    for name, xs in (("fresh", fresh), (f"after {burst}", after)):
        xs.sort()
        print(f"{mode}: two commits per task, {name}: p50 {statistics.median(xs):.2f} ms, p99 {xs[q]:.2f} ms")


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
            asyncio.run(_run(pg.url, mode, a.burst, a.samples))
        finally:
            pg.stop()
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
