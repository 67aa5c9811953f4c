"""Ray core tasks for bench/peers.py (not durable): a local Ray with ``slots`` CPUs; throughput is
``n`` no-op remote calls submitted at once and gathered; latency is one remote call and its
``ray.get``."""

from __future__ import annotations

import logging
import time
from typing import Any


def run(n: int, slots: int, samples: int) -> dict[str, Any]:
    import ray

    ray.init(num_cpus=slots, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    try:

        @ray.remote
        def noop(x: dict[str, Any]) -> None:
            return None

        payload = {"pad": "x" * 64}
        ray.get([noop.remote(payload) for _ in range(200)])
        t0 = time.perf_counter()
        ray.get([noop.remote({"i": i, **payload}) for i in range(n)], timeout=600)
        wall = time.perf_counter() - t0
        lat = []
        for _ in range(samples + 50):
            t = time.perf_counter()
            ray.get(noop.remote(payload), timeout=30)
            lat.append((time.perf_counter() - t) * 1000)
    finally:
        ray.shutdown()
    return {
        "system": f"ray {ray.__version__} core tasks",
        "durable": False,
        "throughput_tps": n / wall,
        "lat_ms": lat[50:],
    }
