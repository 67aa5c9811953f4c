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
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from casperd.ctl.client import MESH_FILE
from casperd.errors import CasperError
from casperd.exitcodes import ExitCode
from casperd.localmesh import LocalMesh
from casperd.logsetup import redact
from casperd.meshconfig import node_settings_env
from casperd.ports import check_ports
from casperd.settings import DEFAULT_STATE_DIR
from casperd.spawners.local import LocalSupervisor

console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="casperd up",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run a local CASPER mesh: embedded Postgres + Redis, a policeman, developers and a tester, "
        "each its own process on 127.0.0.1. Ctrl-C stops everything; data survives a restart.",
        epilog="examples:\n  casperd up --demo                 # a one-minute show of what the mesh is for\n"
        "  casperd up --developers 4\n"
        "  casperd up --database-url postgresql://me@db/casper --redis-url redis://cache:6379/0\n"
        "  CASPER_LLM_RPM=4000 casperd up --config mesh.toml   # settings for every node\n"
        "then, in another terminal:\n  caspectl status | caspectl peers | "
        "caspectl submit echo --input '{}' --wait\n"
        "  caspectl top                      # watch the autoscaler add and retire developers under load",
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
        help="policeman port; nodes take the next ones; Postgres +100, Redis +101 (default 5555). All are "
        "checked before anything starts: a port in use is named, with a free base to use instead",
    )
    p.add_argument("--database-url", default="", help="use this Postgres instead of the embedded one")
    p.add_argument("--redis-url", default="", help="use this Redis instead of the embedded one")
    p.add_argument("--no-redis", action="store_true", help="run without the result cache")
    p.add_argument("--no-curve", action="store_true", help="plain TCP between nodes (default: CurveZMQ)")
    p.add_argument(
        "--demo",
        action="store_true",
        help="about a minute of work you can watch: spread over developers, one killed and its tasks finishing "
        "elsewhere, the policeman restarted, the cache answering repeats, a dead letter retried; then a summary",
    )
    p.add_argument(
        "--demo-scale",
        type=float,
        default=1.0,
        help="the demo's length as a fraction of a minute (default 1.0; tests use less)",
    )
    p.add_argument("--demo-exit", action="store_true", help="stop the mesh when the demo ends (exit 1 if it failed)")
    p.add_argument("--duration", type=float, default=0, help="stop after this many seconds (default: run until ^C)")
    p.add_argument("--log-level", default="INFO", help="nodes' log level (default INFO)")
    p.add_argument(
        "--config",
        type=Path,
        default=Path(os.environ["CASPER_CONFIG"]) if os.environ.get("CASPER_CONFIG") else None,
        help="a casperd settings file (TOML) for every node: models, rate limits, prices, agent limits... "
        "CASPER_* variables override it; up decides ports, ids, keys and state paths [CASPER_CONFIG]",
    )
    p.add_argument(
        "--spawner",
        choices=("local", "none"),
        default="local",
        help="local: the policeman's autoscaler adds developers under load and retires them when idle; "
        "none: fixed size (default local)",
    )
    p.add_argument(
        "--max-developers",
        type=int,
        default=None,
        help="most developers the autoscaler keeps (default: --developers + 2); --developers is the minimum",
    )
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
        f"postgres: {redact(mesh.database_url)}   redis: {redact(mesh.redis_url) if mesh.redis_url else 'off'}   "
        f"state: {mesh.state_dir}   curve: {'on' if mesh.curve else 'off'}"
    )
    console.print(reach_hint(mesh.state_dir), highlight=False)
    console.print("Ctrl-C stops the mesh.")


def reach_hint(state_dir: Path) -> str:
    """How caspectl finds this mesh: by itself in the default state dir, else the exact line to type."""
    if state_dir == DEFAULT_STATE_DIR.expanduser().resolve():
        return "caspectl finds this mesh by itself: try caspectl status, caspectl peers, caspectl tasks."
    return (
        f"this mesh is not in the default state dir, so tell caspectl where it is: "
        f"caspectl --state-dir {shlex.quote(str(state_dir))} status, or in that shell first: "
        f"export CASPER_STATE_DIR={shlex.quote(str(state_dir))}"
    )


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.developers < 0 or a.testers < 0 or a.developers + a.testers == 0:
        console.print("casperd up: need at least one developer or tester")
        return ExitCode.USAGE
    if a.max_developers is not None and a.max_developers < a.developers:
        console.print(f"casperd up: --max-developers ({a.max_developers}) is below --developers ({a.developers})")
        return ExitCode.USAGE
    state_dir = a.state_dir.expanduser().resolve()
    other = _already_running(state_dir)
    if other is not None:
        console.print(
            f"[red]casperd up:[/] a mesh is already running from {state_dir} (supervisor pid {other})\n"
            "  hint: stop it (Ctrl-C in its terminal, or kill the pid), or use another --state-dir"
        )
        return ExitCode.USAGE
    try:
        settings_env, dropped = node_settings_env(a.config, os.environ)
    except CasperError as exc:
        console.print(f"[red]casperd up:[/] {exc.message}" + (f"\n  hint: {exc.hint}" if exc.hint else ""))
        return ExitCode.USAGE
    if dropped:
        console.print(
            f"[yellow]casperd up decides {', '.join(dropped)} for its nodes; your value is not used[/] "
            "(use up's own flags: --state-dir, --port-base, --database-url, --redis-url, --no-curve, --log-level)"
        )
    try:
        check_ports(
            a.port_base,
            1 + a.developers + a.testers,
            postgres=not a.database_url,
            redis=not (a.no_redis or a.redis_url),
        )
    except CasperError as exc:
        console.print(f"[red]casperd up:[/] {exc.message}\n  hint: {exc.hint}", highlight=False)
        return ExitCode.USAGE
    _announce_root_user(a.database_url)
    mesh = LocalMesh(
        state_dir,
        settings_env=settings_env,
        developers=a.developers,
        testers=a.testers,
        port_base=a.port_base,
        database_url=a.database_url,
        redis_url=None if a.no_redis else a.redis_url,
        curve=not a.no_curve,
        log_level=a.log_level,
        policeman_env=autoscale_env(a.spawner, a.developers, a.max_developers),
    )
    supervisor = LocalSupervisor(mesh, say=console.print) if a.spawner == "local" else None
    stop = {"now": False, "stopping": False}

    def on_signal(signum: int, frame: Any) -> None:
        if stop["stopping"]:
            console.print("[red]second signal: killing the nodes now[/] (their tasks are recovered at the next start)")
            mesh.kill()
            return
        stop["now"] = True
        raise KeyboardInterrupt  # interrupt whatever runs (the start, the demo, the wait) at once

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    t0 = time.monotonic()
    code = ExitCode.OK
    try:
        with console.status("starting Postgres, Redis, the policeman and the peers..."):
            mesh.start()
        mesh.write_description()
        if supervisor is not None:
            supervisor.start()  # carries out the autoscaler's orders, during the demo too
        console.print(f"mesh up in {time.monotonic() - t0:.1f}s")
        show_mesh(mesh)
        if a.demo:
            from casperd.demo import run_demo

            summary = run_demo(mesh, console, scale=a.demo_scale)
            code = ExitCode.OK if summary.ok else ExitCode.FAILURE
            if a.duration == 0 and a.demo_exit:
                stop["now"] = True
        deadline = time.monotonic() + a.duration if a.duration else None
        while not stop["now"] and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.2)
            supervise(mesh)
    except KeyboardInterrupt:
        pass
    except CasperError as exc:
        console.print(f"[red]casperd up:[/] {exc.message}" + (f"\n  hint: {exc.hint}" if exc.hint else ""))
        code = ExitCode.FAILURE
    finally:
        stop["stopping"] = True
        if supervisor is not None:
            supervisor.stop()
        console.print("stopping the mesh (Ctrl-C again to kill the nodes at once)")
        mesh.stop(say=lambda text: console.print(f"  {text}", highlight=False))
        console.print("mesh stopped")
    return code


def _announce_root_user(database_url: str) -> None:
    """Postgres refuses to run as root: as root, the embedded one runs as a system user we create."""
    if database_url or os.geteuid() != 0:
        return
    import pwd

    from casperd.embedded import PG_SYSTEM_USER

    try:
        pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        console.print(
            f"running as root: creating the system user {PG_SYSTEM_USER} (useradd --system, no home, no login) "
            "to run the embedded Postgres, which refuses to run as root. Run casperd up as a normal user to avoid it."
        )


def autoscale_env(spawner: str, developers: int, max_developers: int | None) -> dict[str, str]:
    """The policeman's autoscaler settings on the local mesh."""
    if spawner != "local":
        return {"CASPER_SPAWNER": "none"}
    top = developers + 2 if max_developers is None else max_developers
    tuning = {
        k: v for k, v in os.environ.items() if k.startswith("CASPER_AUTOSCALE_") and k != "CASPER_AUTOSCALE_ROLES"
    }
    return {
        **tuning,  # CASPER_AUTOSCALE_IDLE_S etc. in casperd up's environment reach the policeman
        "CASPER_SPAWNER": "local",
        "CASPER_AUTOSCALE_ROLES": json.dumps({"developer": {"min": developers, "max": top}}),
    }


def supervise(mesh: LocalMesh) -> None:
    """Restart a node that died on its own (with a growing pause), and say so."""
    for node in list(mesh.nodes.values()):  # the autoscaler's supervisor thread adds and removes nodes
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
