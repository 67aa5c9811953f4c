"""How much the policeman's rules cost per task, without any I/O: PolicemanCore alone.

Registers 4 in-memory peers (capacity 250 each), submits N echo tasks in SUBMITs of 500, then runs
dispatch → TASK frames → RESULT frames (batches as a worker sends them) → complete until every task
is complete (each step's rows marked committed, as the group commit would), decoding and encoding
real frames on the way. Prints tasks/s and µs per task for the
whole lifecycle (submit, dispatch, start, complete; 4 staged rows each), and the time the cyclic
garbage collector took (per generation): with ``gc`` the collector as CPython sets it, with
``tuned`` as a started node sets it (``casperd.eventloop.tune_gc``). Bounded: N tasks, one run.

    .venv/bin/python -m bench.core_events [N] [tuned|gc]
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from casperd import codec
from casperd.eventloop import tune_gc
from casperd.handlers import Catalog
from casperd.messages import Progress, Ready, ResultBatch, Role, Submit, TaskBatch, TaskSpec, outcome_body
from casperd.metrics import Metrics
from casperd.policeman import Now, PolicemanCore, Sender
from casperd.policeman.actions import Replay, Send, Stage
from casperd.settings import load_settings


def measure(n: int, tuned: bool = False) -> dict[str, Any]:
    """Run ``n`` tasks through a PolicemanCore; their cost: ``us_per_task``, ``tasks_s``,
    ``actions``, ``gc_s`` (seconds in each generation's collections)."""
    s = load_settings({"role": "policeman", "node_id": "policeman", "lease_s": 600, "heartbeat_s": 600})
    core = PolicemanCore(s, Catalog(), Metrics(), time.monotonic())

    def now() -> Now:
        return Now(time.monotonic(), datetime.now(UTC))

    routes = []
    for i in range(4):
        ready = Ready(
            node_id=f"dev-{i}", epoch="e", role=Role.DEVELOPER, endpoint="tcp://127.0.0.1:1", pid=1, host="h",
            capabilities=("echo",), capacity=250, tasks=(), heartbeat_ms=600_000, version="0.1.0",
        )  # fmt: skip
        route = f"dev-{i}/e".encode()
        routes.append(route)
        core.on_mesh(route, codec.encode(ready), now())
    core.take()
    if tuned:
        tune_gc()
    gc_s = [0.0, 0.0, 0.0]
    started: list[float] = []

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            gc_s[info["generation"]] += time.perf_counter() - started.pop()

    gc.callbacks.append(on_gc)
    t0 = time.perf_counter()
    for start in range(0, n, 500):
        specs = tuple(TaskSpec(type="echo", input={"i": i}) for i in range(start, min(n, start + 500)))
        core.submit_from(Sender.control(), b"ctl", Submit(req_id=1, tasks=specs), {}, now())
    rows = 0

    def commit(actions: Sequence[object]) -> int:
        """What the group commit does for the core: staged rows become persisted; a report that
        waited for them (a TASK leaves before its commit, SPEC 11) is replayed. Returns the count."""
        for a in actions:
            if isinstance(a, Stage):
                a.rec.mark_persisted()
        for a in actions:
            if isinstance(a, Replay):
                core.replay(a.node_id, a.epoch, a.report, a.attachments, now())
        return len(actions)

    rows += commit(core.take())
    done = 0
    while done < n:
        core.dirty = True
        core.dispatch(now())
        actions = core.take()
        commit(actions)  # the tasks' rows and assignments, committed before their reports arrive
        for a in actions:
            if not isinstance(a, Send) or not a.tasks:
                rows += 1
                continue
            batch = codec.decode(a.frames).message
            assert isinstance(batch, TaskBatch)
            ids = tuple(t.task_id for t in batch.tasks)
            core.on_mesh(a.route, codec.encode(Progress(task_ids=ids)), now())
            results = [outcome_body(t.task_id, t.attempt, t.input, 0.1) for t in batch.tasks]
            core.on_mesh(a.route, codec.encode_raw(ResultBatch.COMMAND, {"results": results}), now())
            done += len(ids)
        rows += commit(core.take())
    dt = time.perf_counter() - t0
    assert not core.tasks, f"{len(core.tasks)} tasks not complete"
    gc.callbacks.remove(on_gc)
    return {"seconds": dt, "tasks_s": n / dt, "us_per_task": dt / n * 1e6, "actions": rows, "gc_s": gc_s}


def main(n: int, tuned: bool = False) -> None:
    r = measure(n, tuned)
    print(
        f"tasks: {n}  seconds: {r['seconds']:.3f}  tasks/s: {r['tasks_s']:,.0f}  us/task: {r['us_per_task']:.1f}  "
        f"actions: {r['actions']}"
    )
    gc_s = r["gc_s"]
    gcs = " / ".join(f"{x:.3f}" for x in gc_s)
    print(f"garbage collector ({'tuned' if tuned else 'default'}): {sum(gc_s):.3f} s of it (generations 0/1/2: {gcs})")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20_000, len(sys.argv) > 2 and sys.argv[2] == "tuned")
