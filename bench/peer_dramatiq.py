"""Dramatiq + Redis for bench/peers.py (not durable: Redis without persistence, as in the Celery
run): one worker process with ``slots`` threads; results through Dramatiq's Redis result backend.
Throughput: ``n`` messages sent, then every result awaited; latency: send one, block on its result."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.celery_side import REPO_ROOT, _redis_server


def run(n: int, slots: int, samples: int) -> dict[str, Any]:
    wd = Path(tempfile.mkdtemp(prefix="casper-bench-dramatiq-"))
    try:
        return _run(wd, n, slots, samples)
    finally:
        shutil.rmtree(wd, ignore_errors=True)


def _run(wd: Path, n: int, slots: int, samples: int) -> dict[str, Any]:
    with _redis_server(wd) as (port, _):
        url = f"redis://127.0.0.1:{port}/0"
        os.environ["CASPER_BENCH_REDIS_URL"] = url
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        worker = subprocess.Popen(
            [sys.executable, "-m", "dramatiq", "bench.dramatiq_app", "--processes", "1", "--threads", str(slots)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            import dramatiq

            from bench.dramatiq_app import noop

            payload = {"pad": "x" * 64}
            for _ in range(50):
                noop.send(payload).get_result(block=True, timeout=60_000)
            t0 = time.perf_counter()
            msgs = [noop.send({"i": i, **payload}) for i in range(n)]
            for m in msgs:
                m.get_result(block=True, timeout=600_000)
            wall = time.perf_counter() - t0
            lat = []
            for _ in range(samples):
                t = time.perf_counter()
                noop.send(payload).get_result(block=True, timeout=30_000)
                lat.append((time.perf_counter() - t) * 1000)
        finally:
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()
    return {
        "system": f"dramatiq {dramatiq.__version__} + redis",
        "durable": False,
        "throughput_tps": n / wall,
        "lat_ms": lat,
    }
