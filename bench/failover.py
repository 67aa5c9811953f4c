"""Failover benchmark: how fast the mesh recovers from a lost developer and from a lost policeman.

A plain :class:`~casperd.localmesh.LocalMesh` on 127.0.0.1 (embedded Postgres and Redis, Curve
on; loopback only, no network namespaces, so no root is needed) with the DEFAULT liveness
settings: heartbeat 1 s, 3 misses, lease 30 s. One setting is changed: the breaker recovery
(``CASPER_BREAKER_RECOVERY_S=1`` instead of 60 s), so that a developer brought back after a kill
earns work again within a round instead of a minute; it does not enter any measured path (the
killed developer's tasks go to the others, whose breakers are closed).

(a) Developer SIGKILL: ``--developers`` developers (capacity 4) run 2 long sleep tasks each; one
    developer (round robin) is SIGKILLed; measured from the kill to the moment its tasks are
    *assigned* to another peer (the ``assigned`` events in the ledger, broker's clock), and from the
    kill to the ``peer ... dead`` event (detection). Its tasks are then cancelled, the developer
    started again, and the mesh settled (all peers alive, breakers closed) before the next round.
    Target: reassigned within 3.5 s of the kill (3 s of silence + a 0.25 s tick + dispatch).
(b) Policeman SIGKILL + restart, with tasks in flight: measured from the restart (process start)
    to health ok, to every developer re-registered, and to a new top-priority task's DONE (the
    mesh fully serving). Target: fully serving within 5 s of the restart.

    python -m bench.failover [--developers 3] [--kills 8] [--restarts 3]

Each number is a p50 and a max over the repetitions; the machine should be otherwise idle.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from rich.console import Console
from rich.table import Table

from bench.common import exit_on_sigterm
from casperd.ctl.client import ControlClient
from casperd.errors import CasperError
from casperd.localmesh import LocalMesh, free_port_base
from casperd.messages import TaskSpec

console = Console(width=shutil.get_terminal_size((120, 24)).columns)
TARGET_REASSIGN_S = 3.5
TARGET_SERVING_S = 5.0


class Bench:
    def __init__(self, mesh: LocalMesh) -> None:
        self.mesh = mesh
        self.devs = sorted(n for n, node in mesh.nodes.items() if node.role != "policeman")
        assert mesh.postgres is not None
        os.environ["PGPASSFILE"] = str(mesh.postgres.passfile)
        self.db = psycopg.connect(mesh.database_url, autocommit=True)

    def close(self) -> None:
        self.db.close()

    def sql(self, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return self.db.execute(query, params).fetchall()

    def client(self, timeout: float = 10.0) -> ControlClient:
        return ControlClient(self.mesh.policeman.control, timeout)

    def peers(self) -> dict[str, dict[str, Any]]:
        with self.client(2.0) as c:
            return {p["node_id"]: p for p in c.request("peers")["peers"]}

    def wait(self, pred: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(CasperError, psycopg.Error):
                got = pred()
                if got:
                    return got
            time.sleep(interval)
        raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")

    def settle(self) -> None:
        """Every developer registered and alive with its breaker closed (feeding no-op tasks to
        let half-open probes through)."""
        self.mesh.wait_peers(len(self.devs), timeout=60)
        deadline = time.monotonic() + 60
        with self.client(30) as c:
            while True:
                peers = self.peers()
                if all(
                    d in peers and peers[d]["liveness"] == "alive" and peers[d]["breaker"] == "closed"
                    for d in self.devs
                ):
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the mesh did not settle: {peers}")
                batch = 4 * len(self.devs)
                c.submit([TaskSpec(type="noop") for _ in range(batch)], wait=True)
                for got, _ in enumerate(c.done_events(timeout_s=10), 1):
                    if got >= batch:
                        break

    def submit(self, specs: list[TaskSpec]) -> list[uuid.UUID]:
        with self.client(30) as c:
            return list(c.submit(specs).task_ids)

    def cancel_open(self, ids: list[uuid.UUID]) -> None:
        with self.client(10) as c:
            for tid in ids:
                with contextlib.suppress(CasperError):
                    c.request("cancel", id=str(tid))

    # --- (a) ------------------------------------------------------------------------------------
    def developer_kill(self, victim: str) -> dict[str, Any]:
        self.settle()
        n = len(self.devs)
        ids = self.submit([TaskSpec(type="sleep", input={"seconds": 60}) for _ in range(2 * n)])
        self.wait(
            lambda: (
                self.sql("SELECT count(*) FROM tasks WHERE id = ANY(%s) AND status = 'processing'", (ids,))[0][0]
                == len(ids)
            ),
            30,
            "every task running",
        )
        held = [r[0] for r in self.sql("SELECT id FROM tasks WHERE id = ANY(%s) AND assigned_to = %s", (ids, victim))]
        node = self.mesh.nodes[victim]
        assert node.proc is not None and held
        t_kill = datetime.now(UTC)
        os.kill(node.proc.pid, signal.SIGKILL)
        node.proc.wait(10)

        def reassigned() -> list[tuple[Any, ...]]:
            rows = self.sql(
                "SELECT task_id, min(at), min(peer) FROM task_events WHERE task_id = ANY(%s) "
                "AND to_status = 'assigned' AND peer <> %s AND at >= %s GROUP BY task_id",
                (held, victim, t_kill),
            )
            return rows if len(rows) == len(held) else []

        rows = self.wait(reassigned, 60, f"{victim}'s tasks assigned elsewhere")
        dead = self.sql(
            "SELECT min(at) FROM task_events WHERE task_id = ANY(%s) AND to_status = 'pending' "
            "AND detail->>'reason' = %s",
            (held, f"peer {victim} dead"),
        )[0][0]
        self.cancel_open(ids)
        self.mesh.start_node(victim)
        return {
            "victim": victim,
            "held": len(held),
            "to": sorted({r[2] for r in rows}),
            "detect_s": (dead - t_kill).total_seconds() if dead else float("nan"),
            "reassign_s": max((r[1] - t_kill).total_seconds() for r in rows),
        }

    # --- (b) ------------------------------------------------------------------------------------
    def policeman_restart(self) -> dict[str, Any]:
        self.settle()
        n = len(self.devs)
        # half the slots busy: the probe below measures service, not waiting for a slot
        ids = self.submit([TaskSpec(type="sleep", input={"seconds": 1.0}) for _ in range(2 * n)])
        self.wait(
            lambda: (
                self.sql("SELECT count(*) FROM tasks WHERE id = ANY(%s) AND status = 'processing'", (ids,))[0][0] >= n
            ),
            30,
            "tasks running",
        )
        pm = self.mesh.policeman
        assert pm.proc is not None
        os.kill(pm.proc.pid, signal.SIGKILL)
        pm.proc.wait(10)
        t0 = time.monotonic()
        self.mesh.start_node("policeman")

        def healthy() -> bool:
            with ControlClient(pm.control, 1.0) as c:
                return bool(c.request("health")["healthy"])

        self.wait(healthy, 60, "policeman healthy", interval=0.02)
        t_health = time.monotonic() - t0
        self.wait(
            lambda: sum(p["liveness"] == "alive" for p in self.peers().values()) >= n,
            60,
            "every developer re-registered",
            interval=0.02,
        )
        t_peers = time.monotonic() - t0
        with self.client(30) as c:
            c.submit([TaskSpec(type="echo", input={"probe": True}, priority=9)], wait=True)
            if next(iter(c.done_events(timeout_s=30)), None) is None:
                raise RuntimeError("the probe task never completed")
        t_task = time.monotonic() - t0
        self.wait(
            lambda: (
                self.sql("SELECT count(*) FROM tasks WHERE id = ANY(%s) AND status = 'complete'", (ids,))[0][0]
                == len(ids)
            ),
            60,
            "the in-flight tasks complete",
            interval=0.1,
        )
        t_all = time.monotonic() - t0
        return {"healthy_s": t_health, "peers_s": t_peers, "serving_s": t_task, "backlog_done_s": t_all}


def _stats(values: list[float]) -> tuple[str, str]:
    return f"{statistics.median(values):.2f}", f"{max(values):.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--developers", type=int, default=3)
    ap.add_argument("--kills", type=int, default=8, help="developer SIGKILL rounds (default 8)")
    ap.add_argument("--restarts", type=int, default=3, help="policeman SIGKILL + restart rounds (default 3)")
    ap.add_argument("--port-base", type=int, default=0, help="default: a free random range")
    ap.add_argument("--keep", action="store_true", help="keep the state directory (logs) afterwards")
    a = ap.parse_args()
    state = Path(tempfile.mkdtemp(prefix="casper-bench-failover-"))
    mesh = LocalMesh(
        state,
        developers=a.developers,
        testers=0,
        port_base=a.port_base or free_port_base(12),
        extra_env={"CASPER_BREAKER_RECOVERY_S": "1"},
    )
    kills: list[dict[str, Any]] = []
    restarts: list[dict[str, Any]] = []
    t_start = time.monotonic()
    try:
        console.print(f"starting a local mesh: policeman + {a.developers} developers in {state} ...")
        mesh.start()
        bench = Bench(mesh)
        try:
            for k in range(a.kills):
                r = bench.developer_kill(bench.devs[k % len(bench.devs)])
                kills.append(r)
                console.print(
                    f"  kill {k + 1}/{a.kills}: {r['victim']} held {r['held']}, dead after "
                    f"{r['detect_s']:.2f}s, reassigned to {','.join(r['to'])} after {r['reassign_s']:.2f}s"
                )
            for k in range(a.restarts):
                r = bench.policeman_restart()
                restarts.append(r)
                console.print(
                    f"  policeman restart {k + 1}/{a.restarts}: healthy {r['healthy_s']:.2f}s, peers "
                    f"{r['peers_s']:.2f}s, serving {r['serving_s']:.2f}s"
                )
        finally:
            bench.close()
    finally:
        mesh.stop()
        if a.keep:
            console.print(f"state kept in {state}")
        else:
            shutil.rmtree(state, ignore_errors=True)

    t = Table(
        title=f"Failover, default liveness (heartbeat 1 s x 3 misses), {a.developers} developers, "
        f"loopback mesh; {time.monotonic() - t_start:.0f}s in all",
        title_justify="left",
    )
    for col in ("measure", "n", "p50 s", "max s", "target", "met"):
        t.add_column(col, justify="left" if col == "measure" else "right")

    def row(name: str, values: list[float], target: float | None) -> None:
        p50, mx = _stats(values)
        met = (
            ""
            if target is None
            else ("yes" if max(values) <= target else "p50 only" if statistics.median(values) <= target else "NO")
        )
        t.add_row(name, str(len(values)), p50, mx, f"<= {target:g} s" if target else "", met)

    if kills:
        row("developer SIGKILL -> declared dead", [k["detect_s"] for k in kills], None)
        row("developer SIGKILL -> its tasks assigned elsewhere", [k["reassign_s"] for k in kills], TARGET_REASSIGN_S)
    if restarts:
        row("policeman restart -> health ok", [r["healthy_s"] for r in restarts], None)
        row("policeman restart -> all developers re-registered", [r["peers_s"] for r in restarts], None)
        row("policeman restart -> new task done (fully serving)", [r["serving_s"] for r in restarts], TARGET_SERVING_S)
        row("policeman restart -> in-flight backlog complete", [r["backlog_done_s"] for r in restarts], None)
    console.print(t)


if __name__ == "__main__":
    exit_on_sigterm()
    main()
