"""``casperd up``: one command, a whole local mesh — the embedded default.

Starts an embedded Postgres and Redis (real servers from pip wheels), a policeman, N developers
and a tester as separate processes on 127.0.0.1, with Curve keys and logs in the state
directory; prints the addresses; with ``--demo`` submits a sample workload and shows it move;
restarts a node that crashes; stops everything cleanly on Ctrl-C. Data survives a restart.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from casperd.ctl.client import MESH_FILE
from casperd.errors import CasperError
from casperd.exitcodes import ExitCode
from casperd.localmesh import LocalMesh
from casperd.messages import TaskSpec
from casperd.settings import DEFAULT_STATE_DIR

console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="casperd up",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run a local CASPER mesh: embedded Postgres + Redis, a policeman, developers and a tester, "
        "each its own process on 127.0.0.1. Ctrl-C stops everything; data survives a restart.",
        epilog="examples:\n  casperd up --demo                 # watch a sample workload move through the mesh\n"
        "  casperd up --developers 4\n"
        "  casperd up --database-url postgresql://me@db/casper --redis-url redis://cache:6379/0\n"
        "then, in another terminal:\n  caspectl status | caspectl peers | "
        "caspectl submit echo --input '{}' --wait",
    )
    p.add_argument("--developers", type=int, default=2, help="developer nodes (default 2)")
    p.add_argument("--testers", type=int, default=1, help="tester nodes (default 1)")
    p.add_argument(
        "--state-dir",
        type=Path,
        default=Path(os.environ.get("CASPER_STATE_DIR") or DEFAULT_STATE_DIR),
        help=f"keys, data, logs, sockets (default {DEFAULT_STATE_DIR}) [CASPER_STATE_DIR]",
    )
    p.add_argument(
        "--port-base",
        type=int,
        default=5555,
        help="policeman port; nodes take the next ones; Postgres +100, Redis +101 (default 5555)",
    )
    p.add_argument("--database-url", default="", help="use this Postgres instead of the embedded one")
    p.add_argument("--redis-url", default="", help="use this Redis instead of the embedded one")
    p.add_argument("--no-redis", action="store_true", help="run without the result cache")
    p.add_argument("--no-curve", action="store_true", help="plain TCP between nodes (default: CurveZMQ)")
    p.add_argument("--demo", action="store_true", help="submit a sample workload and show its progress")
    p.add_argument("--demo-tasks", type=int, default=300, help="tasks in the demo workload (default 300)")
    p.add_argument("--duration", type=float, default=0, help="stop after this many seconds (default: run until ^C)")
    p.add_argument("--log-level", default="INFO", help="nodes' log level (default INFO)")
    return p


def _already_running(state_dir: Path) -> int | None:
    mesh = state_dir / MESH_FILE
    try:
        pid = int(json.loads(mesh.read_text())["supervisor_pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    return pid


def show_mesh(mesh: LocalMesh) -> None:
    t = Table(title="CASPER local mesh", title_justify="left", header_style="bold")
    for col in ("node", "role", "mesh endpoint", "control socket", "pid", "log"):
        t.add_column(col)
    for n in mesh.nodes.values():
        t.add_row(n.node_id, n.role, n.bind, n.control, str(n.proc.pid if n.proc else "-"), str(n.log_path))
    console.print(t)
    console.print(
        f"postgres: {mesh.database_url}   redis: {mesh.redis_url or 'off'}   "
        f"state: {mesh.state_dir}   curve: {'on' if mesh.curve else 'off'}"
    )
    console.print(
        "caspectl finds this mesh by itself: try [bold]caspectl status[/], [bold]caspectl peers[/], "
        "[bold]caspectl tasks[/]. Ctrl-C stops the mesh."
    )


def demo_specs(n: int) -> list[TaskSpec]:
    """A mixed workload: shell commands, echoes (some cached), sleeps, a validated shell check."""
    specs: list[TaskSpec] = []
    for i in range(n):
        kind = i % 5
        if kind == 0:
            specs.append(
                TaskSpec(
                    type="shell",
                    input={"cmd": f"python3 -c 'print(sum(range({i * 1000})))'", "expect_exit": 0},
                    priority=6,
                )
            )
        elif kind == 1:
            specs.append(TaskSpec(type="echo", input={"n": i % 10}, cache=True))
        elif kind == 2:
            specs.append(TaskSpec(type="sleep", input={"seconds": 0.05}, affinity=f"group-{i % 3}"))
        elif kind == 3:
            specs.append(TaskSpec(type="shell", input={"cmd": "git --version || uname -a"}, requires=("shell",)))
        else:
            specs.append(TaskSpec(type="noop", priority=9))
    return specs


def run_demo(mesh: LocalMesh, n: int) -> dict[str, int]:
    specs = demo_specs(n)
    statuses: dict[str, int] = {}
    with (
        mesh.client(timeout_s=30) as c,
        Progress(
            TextColumn("[bold]demo workload"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            console=console,
        ) as progress,
    ):
        bar = progress.add_task("demo", total=len(specs), detail="submitting")
        ids: set[str] = set()
        for i in range(0, len(specs), 100):
            acc = c.submit(specs[i : i + 100], wait=True)
            ids.update(str(t) for t in acc.task_ids)
        done = 0
        for ev in c.done_events(timeout_s=60):
            if str(ev.task_id) in ids:
                done += 1
                statuses[ev.status] = statuses.get(ev.status, 0) + 1
                progress.update(bar, completed=done, detail=" ".join(f"{k}={v}" for k, v in sorted(statuses.items())))
            if done >= len(ids):
                break
    return statuses


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.developers < 0 or a.testers < 0 or a.developers + a.testers == 0:
        console.print("casperd up: need at least one developer or tester")
        return ExitCode.USAGE
    state_dir = a.state_dir.expanduser().resolve()
    other = _already_running(state_dir)
    if other is not None:
        console.print(
            f"[red]casperd up:[/] a mesh is already running from {state_dir} (supervisor pid {other})\n"
            "  hint: stop it (Ctrl-C in its terminal, or kill the pid), or use another --state-dir"
        )
        return ExitCode.USAGE
    mesh = LocalMesh(
        state_dir,
        developers=a.developers,
        testers=a.testers,
        port_base=a.port_base,
        database_url=a.database_url,
        redis_url=None if a.no_redis else a.redis_url,
        curve=not a.no_curve,
        log_level=a.log_level,
    )
    stop = {"now": False}

    def on_signal(signum: int, frame: Any) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    t0 = time.monotonic()
    try:
        with console.status("starting Postgres, Redis, the policeman and the peers..."):
            mesh.start()
        mesh.write_description()
        console.print(f"mesh up in {time.monotonic() - t0:.1f}s")
        show_mesh(mesh)
        if a.demo:
            result = run_demo(mesh, a.demo_tasks)
            console.print(f"demo finished: {result}. Inspect it: caspectl tasks, caspectl get ID")
        deadline = time.monotonic() + a.duration if a.duration else None
        while not stop["now"] and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.2)
            supervise(mesh)
    except CasperError as exc:
        console.print(f"[red]casperd up:[/] {exc.message}" + (f"\n  hint: {exc.hint}" if exc.hint else ""))
        return ExitCode.FAILURE
    finally:
        with console.status("stopping: peers drain, then the policeman, Redis and Postgres..."):
            mesh.stop()
        console.print("mesh stopped")
    return ExitCode.OK


def supervise(mesh: LocalMesh) -> None:
    """Restart a node that died on its own (with a growing pause), and say so."""
    for node in mesh.nodes.values():
        if node.proc is not None and node.proc.poll() is not None:
            code = node.proc.returncode
            node.restarts += 1
            if node.restarts > 5:
                continue
            console.print(
                f"[yellow]{node.node_id} exited with code {code}; restarting "
                f"(restart {node.restarts}/5, log: {node.log_path})"
            )
            time.sleep(min(5.0, 0.5 * node.restarts))
            mesh.start_node(node.node_id)


if __name__ == "__main__":
    sys.exit(main())
