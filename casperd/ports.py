"""Port pre-flight for ``casperd up``: every port the mesh will bind is checked before anything starts.

Without it a clash surfaces late and disguised (the embedded Postgres fails to bind, the policeman
then fails to log in to whatever holds the port: "password authentication failed"). Here the first
port in use is named with its purpose and, when the system tells us, the process holding it, and
the error suggests a ``--port-base`` whose whole range is free.
"""

from __future__ import annotations

import contextlib
import os
import socket

import psutil

from casperd.errors import ConfigError

HOST = "127.0.0.1"


class PortInUseError(ConfigError):
    """A port ``casperd up`` needs is taken (by another mesh, another user's, any program)."""


def port_plan(base: int, nodes: int, *, postgres: bool, redis: bool) -> list[tuple[int, str]]:
    """(port, purpose) for every port a local mesh binds: nodes from ``base``, Postgres +100, Redis +101."""
    plan = [(base, "the policeman")] + [(base + i, f"node {i}") for i in range(1, nodes)]
    if postgres:
        plan.append((base + 100, "the embedded Postgres"))
    if redis:
        plan.append((base + 101, "the embedded Redis"))
    return plan


def port_free(port: int, host: str = HOST) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # like the servers: TIME_WAIT is no clash
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def holder(port: int) -> str | None:
    """Who listens on ``port`` ("pid 123 (postgres, user alice)"), when the system lets us see it."""
    with contextlib.suppress(psutil.Error, OSError):
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                if conn.pid is None:
                    return "another user's process"
                proc = psutil.Process(conn.pid)
                who = proc.name()
                with contextlib.suppress(psutil.Error, KeyError):
                    who += f", user {proc.username()}"
                return f"pid {conn.pid} ({who})"
    return None


def suggest_base(span_nodes: int, tries: int = 200) -> int | None:
    """A base port whose whole plan (nodes, +100, +101) is free, or None."""
    for _ in range(tries):
        base = int.from_bytes(os.urandom(2), "big") % 30000 + 20000
        if all(port_free(p) for p, _ in port_plan(base, span_nodes, postgres=True, redis=True)):
            return base
    return None


def check_ports(base: int, nodes: int, *, postgres: bool, redis: bool) -> None:
    """Raise :class:`PortInUseError` naming the first port in use, its holder and a free ``--port-base``."""
    for port, purpose in port_plan(base, nodes, postgres=postgres, redis=redis):
        if not 0 < port < 65536:
            raise PortInUseError(
                f"port {port} for {purpose} is out of range (--port-base {base})", hint="pick --port-base 1024..65000"
            )
        if port_free(port):
            continue
        who = holder(port)
        other = suggest_base(nodes)
        raise PortInUseError(
            f"port {port} on {HOST}, needed for {purpose}, is already in use"
            + (f" by {who}" if who else "")
            + " (another mesh, or another program)",
            hint=(f"start on free ports with --port-base {other}" if other else "pick another --port-base")
            + f" (the mesh takes that port and the next {nodes - 1}, plus +100 and +101), or stop what holds {port}",
        )
