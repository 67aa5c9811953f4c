"""The floors a durable task round trip cannot go below on this machine, measured in the same run:

* ``commit_ms``: one single-row INSERT + COMMIT on the embedded Postgres (fsync and
  synchronous_commit on), p50 over ``samples`` — a durable round trip needs two (accept, result);
* ``copy_rows_s``: rows per second of one batched COPY into an ordinary (logged, durable) table;
* ``zmq_rtt_ms``: a raw pyzmq DEALER -> ROUTER -> DEALER round trip over loopback TCP between two
  processes (no CurveZMQ, no decoding), p50 — a CASPER round trip has four hops (two round trips);
* ``commit_cold_ms`` and ``zmq_rtt_cold_ms``: the same, each sample after ``COLD_GAP_S`` (1 ms) of
  idleness. Back to back, the processes never sleep; at one task in flight every hop wakes a
  process that has been idle for a millisecond or more, and on this VM a wake-up from idle costs
  tens of microseconds more per hop (the "cold" floor is the one a one-in-flight round trip meets);
* ``core_us``: not a floor but the machine's scale for CASPER's own CPU figures: the policeman's
  rules alone (``bench.core_events``: PolicemanCore with no I/O, 5,000 tasks, the node's collector
  settings), µs per task, best of three in a fresh interpreter. The policeman, developers and
  client are CPython: the same tree's policeman CPU per task has differed 3x between the 2-core
  VMs of this workplace, and a tight interpreter loop is no guide to it (44-68 ns per iteration
  on the VM where the policeman took 150 µs per task). Divide the mesh's policeman CPU per task
  by this to compare machines.

    python -m bench.floors
"""

from __future__ import annotations

import io
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
import zmq

from bench.common import exit_on_sigterm
from casperd.embedded import EmbeddedPostgres
from casperd.localmesh import free_port_base

COLD_GAP_S = 0.001


def postgres_floors(url: str, samples: int = 500, copy_rows: int = 100_000) -> dict[str, float]:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS floor_t")
        conn.execute("CREATE TABLE floor_t (id bigint PRIMARY KEY, at timestamptz NOT NULL, body jsonb)")
        lat: list[float] = []
        cold: list[float] = []
        for i in range(2 * samples + 20):
            if i >= samples + 20:
                time.sleep(COLD_GAP_S)
            t = time.perf_counter()
            conn.execute("INSERT INTO floor_t VALUES (%s, now(), '{\"pad\": 1}')", (i,), prepare=True)
            if i >= 20:
                (lat if i < samples + 20 else cold).append((time.perf_counter() - t) * 1000)
        buf = io.StringIO()
        for i in range(copy_rows):
            buf.write(f'{10_000_000 + i}\t2026-01-01 00:00:00+00\t{{"i": {i}}}\n')
        data = buf.getvalue()
        t = time.perf_counter()
        with conn.transaction(), conn.cursor() as cur, cur.copy("COPY floor_t FROM STDIN") as cp:
            cp.write(data)
        copy_s = time.perf_counter() - t
        conn.execute("DROP TABLE floor_t")
    return {
        "commit_ms": statistics.median(lat),
        "commit_cold_ms": statistics.median(cold),
        "copy_rows_s": copy_rows / copy_s,
    }


def _echo(endpoint: str, n: int) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.ROUTER)
    s.bind(endpoint)
    for _ in range(n):
        s.send_multipart(s.recv_multipart())
    s.close(linger=0)
    ctx.term()


def zmq_floor(samples: int = 2000, gap_s: float = 0.0) -> float:
    port = free_port_base(2)
    endpoint = f"tcp://127.0.0.1:{port}"
    proc = multiprocessing.get_context("spawn").Process(target=_echo, args=(endpoint, samples + 100), daemon=True)
    proc.start()
    ctx = zmq.Context()
    d = ctx.socket(zmq.DEALER)
    d.connect(endpoint)
    lat = []
    try:
        for i in range(samples + 100):
            if gap_s:
                time.sleep(gap_s)
            t = time.perf_counter()
            d.send_multipart([b"\x01", b"x" * 100])
            if not d.poll(10_000):
                raise RuntimeError("the zmq echo process did not answer within 10 s")
            d.recv_multipart()
            if i >= 100:
                lat.append((time.perf_counter() - t) * 1000)
    finally:
        d.close(linger=0)
        ctx.term()
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    return statistics.median(lat)


def core_scale(tasks: int = 5000, runs: int = 3) -> float:
    """µs per task of the policeman's rules alone (bench.core_events), the best of ``runs`` in a
    fresh interpreter (a run takes well under a second: the best one is the least disturbed)."""
    from bench import core_events

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return min(float(pool.apply(core_events.measure, (tasks, True))["us_per_task"]) for _ in range(runs))


def describe_scale(f: dict[str, Any]) -> str:
    return f"CPU scale: the policeman's rules alone (bench.core_events, no I/O) {f['core_us']:.0f} µs per task"


def measure(pg_url: str | None = None) -> dict[str, Any]:
    """Every floor; with no URL, on an embedded Postgres of its own."""
    out: dict[str, Any] = {"zmq_rtt_ms": zmq_floor(), "zmq_rtt_cold_ms": zmq_floor(500, COLD_GAP_S)}
    out["core_us"] = core_scale()
    if pg_url is not None:
        out.update(postgres_floors(pg_url))
        return out
    root = Path(tempfile.mkdtemp(prefix="casper-bench-floor-"))
    pg = EmbeddedPostgres(root / "pg", free_port_base() + 100)
    pg.start()
    os.environ.update(pg.env())
    try:
        out.update(postgres_floors(pg.url))
    finally:
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)
    return out


def durable_floor_ms(f: dict[str, Any], *, cold: bool = False) -> float:
    """Two commits plus four hops (two zmq round trips); ``cold``: each after a millisecond idle."""
    if cold:
        return 2 * float(f["commit_cold_ms"]) + 2 * float(f["zmq_rtt_cold_ms"])
    return 2 * float(f["commit_ms"]) + 2 * float(f["zmq_rtt_ms"])


if __name__ == "__main__":
    exit_on_sigterm()
    f = measure()
    print(
        f"single-row commit p50 {f['commit_ms']:.2f} ms; COPY {f['copy_rows_s']:,.0f} rows/s; "
        f"raw zmq round trip p50 {f['zmq_rtt_ms']:.3f} ms; durable round-trip floor {durable_floor_ms(f):.2f} ms\n"
        f"after 1 ms idle (as at one task in flight): commit {f['commit_cold_ms']:.2f} ms, zmq round trip "
        f"{f['zmq_rtt_cold_ms']:.3f} ms; durable round-trip floor {durable_floor_ms(f, cold=True):.2f} ms\n"
        f"{describe_scale(f)}"
    )
