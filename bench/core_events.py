"""How much the policeman's rules cost per task, without any I/O: PolicemanCore alone.

Registers 4 in-memory peers (capacity 250 each), submits N echo tasks in SUBMITs of 500, then runs
dispatch → TASK frames → RESULT frames (batches as a worker sends them) → complete until every task
is complete, decoding and encoding real frames on the way. Prints tasks/s and µs per task for the
whole lifecycle (submit, dispatch, start, complete; 4 staged rows each). Bounded: N tasks, one run.

    .venv/bin/python -m bench.core_events [N]
"""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime

from casperd import codec
from casperd.handlers import Catalog
from casperd.messages import Progress, Ready, ResultBatch, Role, Submit, TaskBatch, TaskSpec, outcome_body
from casperd.metrics import Metrics
from casperd.policeman import Now, PolicemanCore, Sender
from casperd.policeman.actions import Send
from casperd.settings import load_settings


def main(n: int) -> None:
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
    t0 = time.perf_counter()
    for start in range(0, n, 500):
        specs = tuple(TaskSpec(type="echo", input={"i": i}) for i in range(start, min(n, start + 500)))
        core.submit_from(Sender.control(), b"ctl", Submit(req_id=1, tasks=specs), {}, now())
    rows = sum(1 for _ in core.take())
    done = 0
    while done < n:
        core.dirty = True
        core.dispatch(now())
        for a in core.take():
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
        rows += len(core.take())
    dt = time.perf_counter() - t0
    assert not core.tasks, f"{len(core.tasks)} tasks not complete"
    print(f"tasks: {n}  seconds: {dt:.3f}  tasks/s: {n / dt:,.0f}  us/task: {dt / n * 1e6:.1f}  actions: {rows}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20_000)
