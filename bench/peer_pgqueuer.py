"""pgqueuer (Postgres-backed, durable) for bench/peers.py, through its asyncpg driver: a worker
process taking ``slots`` jobs at once on its own embedded Postgres; the client enqueues and waits
for completion through pgqueuer's CompletionWatcher (LISTEN/NOTIFY). Throughput: ``n`` jobs
enqueued in batches of 500, first enqueue to last completion. Latency: enqueue one job, wait for
its completion."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from typing import Any

import psycopg


async def _connect(url: str) -> Any:
    """pgqueuer's own driver (asyncpg): its LISTEN/NOTIFY wake-ups are what its latency rests on."""
    import asyncpg

    return await asyncpg.connect(url)  # the password from PGPASSFILE, as libpq does


async def _worker(url: str, slots: int) -> None:
    from pgqueuer import AsyncpgDriver, PgQueuer

    pgq = PgQueuer(AsyncpgDriver(await _connect(url)))

    @pgq.entrypoint("noop")
    async def noop(job: Any) -> None:
        return None

    # batch_size 1: each job's status is logged (hence its completion seen) as soon as it ends
    await pgq.run(dequeue_timeout=timedelta(seconds=1), batch_size=1, max_concurrent_tasks=max(2, slots))


async def _client(url: str, n: int, samples: int) -> dict[str, Any]:
    from pgqueuer import AsyncpgDriver, Queries
    from pgqueuer.core.completion import CompletionWatcher

    conn, listen = await _connect(url), await _connect(url)
    q = Queries(AsyncpgDriver(conn))
    payload = b'{"pad": "' + b"x" * 64 + b'"}'
    async with CompletionWatcher(
        AsyncpgDriver(listen),
        queries=Queries(AsyncpgDriver(listen)),
        refresh_interval=timedelta(milliseconds=500),
        debounce=timedelta(milliseconds=1),
    ) as w:
        for _ in range(50):
            await w.wait_for((await q.enqueue("noop", payload))[0])
        t0 = time.perf_counter()
        ids = []
        for i in range(0, n, 500):
            k = min(500, n - i)
            ids += await q.enqueue(["noop"] * k, [payload] * k, [0] * k)
        await asyncio.wait_for(asyncio.gather(*(w.wait_for(j) for j in ids)), 600)
        wall = time.perf_counter() - t0
        lat = []
        for _ in range(samples):
            t = time.perf_counter()
            await asyncio.wait_for(w.wait_for((await q.enqueue("noop", payload))[0]), 30)
            lat.append((time.perf_counter() - t) * 1000)
    await conn.close()
    await listen.close()
    return {"throughput_tps": n / wall, "lat_ms": lat}


def run(url: str, n: int, slots: int, samples: int) -> dict[str, Any]:
    from pgqueuer import PsycopgDriver, Queries

    async def install() -> None:
        conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
        await Queries(PsycopgDriver(conn)).install()
        await conn.close()

    asyncio.run(install())
    worker = subprocess.Popen(
        [sys.executable, "-m", "bench.peer_pgqueuer", url, str(slots)],
        env=os.environ.copy(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        out = asyncio.run(asyncio.wait_for(_client(url, n, samples), 900))
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
    import pgqueuer

    out["system"] = f"pgqueuer {getattr(pgqueuer, '__version__', '')} (Postgres)".replace("  ", " ")
    out["durable"] = True
    return out


if __name__ == "__main__":
    asyncio.run(_worker(sys.argv[1], int(sys.argv[2])))
