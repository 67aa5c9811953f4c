"""Idle memory of every ``casperd`` (issue #13 target: <= 60 MB RSS each), by role.

Measured on a local mesh (``LocalMesh``: embedded Postgres and Redis, CurveZMQ, a policeman,
``--developers`` developers and one tester; the developers' model calls go to the scripted local
server of ``tests/support/fakeclaude.py``):

1. **imports**: the max RSS of a fresh interpreter after ``import casperd.node`` (what every node
   loads before it knows its role), and which heavy packages that pulled in;
2. **idle**: RSS (and USS, the pages only this process holds) of every node ``--idle-s`` seconds
   after the mesh is up;
3. **after a burst**: ``--tasks`` no-op tasks submitted in batches of 500 and drained, then
   ``--settle-s`` seconds of idle (the policeman returns freed memory to the OS when its queue
   drains: ``gc.collect()`` and glibc's ``malloc_trim``, see ``casperd/memtrim.py``), then the
   same burst again (the policeman only: it must not keep more after the second);
4. **after one model call**: one ``ask`` task; the developer that ran it has loaded the
   ``anthropic`` SDK (it loads on a node's first model call, not at start).

    python -m bench.idle_memory [--developers 2] [--tasks 20000] [--idle-s 5] [--settle-s 5]

RSS on a shared machine is steady (unlike timings), but the burst's peak depends on how far the
workers lag behind the submitter.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from bench.common import drain, exit_on_sigterm
from casperd.localmesh import LocalMesh, free_port_base
from casperd.messages import TaskSpec
from tests.support.fakeclaude import FakeClaude

TARGET_MB = 60.0
HEAVY = ("anthropic", "httpx", "psycopg", "psycopg_pool", "rich", "opentelemetry", "redis", "prometheus_client")
_PROBE = f"""
import resource, sys, json
import casperd.node
print(json.dumps({{"max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
  "modules": len(sys.modules), "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""


def import_cost() -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True)
    return dict(json.loads(out.stdout))


def _mem(p: psutil.Process) -> tuple[float, float]:
    info = p.memory_full_info()
    return info.rss / 2**20, info.uss / 2**20


def run(developers: int, tasks: int, idle_s: float, settle_s: float) -> dict[str, Any]:
    state = Path(tempfile.mkdtemp(prefix="casper-bench-idlemem-"))
    fake = FakeClaude().start()
    mesh = LocalMesh(
        state,
        developers=developers,
        testers=1,
        port_base=free_port_base(),
        log_level="WARNING",
        extra_env={"ANTHROPIC_API_KEY": "sk-bench-not-a-real-key", "ANTHROPIC_BASE_URL": fake.url},
    )
    phases: dict[str, dict[str, tuple[float, float]]] = {}
    try:
        mesh.start()
        procs = {nid: psutil.Process(nd.proc.pid) for nid, nd in mesh.nodes.items() if nd.proc is not None}
        time.sleep(idle_s)
        phases["idle"] = {nid: _mem(p) for nid, p in procs.items()}
        with mesh.client(timeout_s=120) as c:
            specs = [TaskSpec(type="noop", input={"i": i, "pad": "x" * 64}) for i in range(tasks)]
            for i in range(0, tasks, 500):
                c.submit(specs[i : i + 500], wait=True)
            drain(c, tasks)
            phases["peak"] = {"policeman": _mem(procs["policeman"])}
            time.sleep(settle_s)
            phases["burst"] = {nid: _mem(p) for nid, p in procs.items()}
            for i in range(0, tasks, 500):  # the same burst again: what the first kept is reused, not added to
                c.submit(specs[i : i + 500], wait=True)
            drain(c, tasks)
            time.sleep(settle_s)
            phases["burst2"] = {"policeman": _mem(procs["policeman"])}
            c.submit([TaskSpec(type="ask", input={"prompt": "Name one prime", "max_tokens": 16})], wait=True)
            drain(c, 1)
            time.sleep(1.0)
            phases["ask"] = {nid: _mem(p) for nid, p in procs.items()}
        return {"phases": phases, "roles": {nid: nd.role for nid, nd in mesh.nodes.items()}, "calls": len(fake.calls())}
    finally:
        mesh.stop()
        fake.stop()
        shutil.rmtree(state, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--developers", type=int, default=2)
    ap.add_argument("--tasks", type=int, default=20000, help="no-op tasks in the burst (default 20000)")
    ap.add_argument("--idle-s", type=float, default=5.0, help="idle seconds before the first sample")
    ap.add_argument("--settle-s", type=float, default=5.0, help="idle seconds after the burst drained")
    ap.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    a = ap.parse_args()

    imp = import_cost()
    print(
        f"import casperd.node: max RSS {imp['max_rss_mb']:.0f} MB, {imp['modules']} modules; "
        f"heavy packages loaded: {', '.join(imp['heavy']) or 'none'}"
    )
    r = run(a.developers, a.tasks, a.idle_s, a.settle_s)
    ph = r["phases"]
    print(f"\nRSS / USS per casperd, MB (target: RSS <= {TARGET_MB:.0f} MB each)")
    print(f"{'node':<14}{'role':<11}{'idle':>13}{'after burst':>15}{'after 1 ask':>15}")
    for nid, role in r["roles"].items():
        cols = [f"{ph[k][nid][0]:.1f} / {ph[k][nid][1]:.1f}" for k in ("idle", "burst", "ask")]
        print(f"{nid:<14}{role:<11}{cols[0]:>13}{cols[1]:>15}{cols[2]:>15}")
    peak = ph["peak"]["policeman"][0]
    print(
        f"\npoliceman right as the {a.tasks}-task burst drained: {peak:.1f} MB; {a.settle_s:g}s later: "
        f"{ph['burst']['policeman'][0]:.1f} MB"
    )
    print(f"policeman after a second {a.tasks}-task burst and {a.settle_s:g}s: {ph['burst2']['policeman'][0]:.1f} MB")
    worst = max(ph["idle"][n][0] for n in r["roles"])
    print(
        f"largest idle RSS {worst:.1f} MB: {'within' if worst <= TARGET_MB else 'ABOVE'} the {TARGET_MB:.0f} MB"
        " target (after a burst the policeman keeps some of the burst's peak: CPython returns an arena of"
        " its allocator only once every object in it is gone; a second burst reuses it)"
    )
    if a.json:
        print(json.dumps({"imports": imp, **r}, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    exit_on_sigterm()
    sys.exit(main())
