"""Running a server as a supervised child process of ours: find the wheel that ships its binary,
wait for its port, refuse a port already taken, quote its log when it fails, stop it.

Shared by the embedded servers (:mod:`casperd.embedded`: Postgres, :mod:`casperd.embedded_redis`)
and the fault tests that run the same binaries themselves.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import time
from pathlib import Path

from casperd.errors import EmbeddedServiceError


def need_wheel(module: str, extra: str = "embedded") -> Path:
    spec = importlib.util.find_spec(module)  # locate the wheel without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedServiceError(
            f"the embedded default needs the {module!r} package",
            hint=f"pip install 'casper-mesh[{extra}]' (or point --database-url/--redis-url at your own servers)",
        )
    return Path(next(iter(spec.submodule_search_locations)))


def wait_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None, what: str, log_path: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise EmbeddedServiceError(
                f"{what} exited with code {proc.returncode} while starting; its log ends:\n{log_tail(log_path)}",
                hint=f"fix what the log names (a port in use, a full disk); full log: {log_path}",
            )
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise EmbeddedServiceError(
        f"{what} did not open port {port} within {timeout:.0f}s; its log ends:\n{log_tail(log_path)}",
        hint=f"is the port taken? full log: {log_path}",
    )


def check_port_free(port: int, what: str) -> None:
    """Refuse at once when something already listens on the port: the server would fail to bind
    (or, worse, a client would wait on whatever holds it)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: TIME_WAIT is no obstacle
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            raise EmbeddedServiceError(
                f"{what} cannot start: port {port} on 127.0.0.1 is already in use ({exc.strerror})",
                hint="stop what holds it (ss -ltnp) or choose other ports (casperd up --port-base)",
            ) from None


def log_tail(path: Path, lines: int = 15) -> str:
    """The last lines of a server's log, for an error that says why it did not start."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 4096))
            text = fh.read().decode(errors="replace")
    except OSError as exc:
        return f"  (log unreadable: {exc.strerror})"
    tail = text.splitlines()[-lines:]
    return "\n".join("  " + line for line in tail) if tail else "  (log empty)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_child(proc: subprocess.Popen[bytes] | None, sig: int, timeout: float) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(5)
