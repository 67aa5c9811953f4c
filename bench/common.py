"""Pieces every mesh benchmark shares."""

from __future__ import annotations

import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from casperd.localmesh import LocalMesh, free_port_base


def exit_on_sigterm() -> None:
    """Make SIGTERM (``kill``, ``timeout``) end a benchmark as Ctrl-C does: through its ``finally``
    blocks, which stop the meshes and servers it started (else they outlive it)."""
    signal.signal(signal.SIGTERM, lambda _sig, _frame: sys.exit(128 + signal.SIGTERM))


def drain(c: Any, n: int, timeout_s: float = 120.0) -> None:
    """Wait for ``n`` DONE events on client ``c`` (a :class:`casperd.client.Client`)."""
    got = 0
    for _ in c.done_events(timeout_s=timeout_s):
        got += 1
        if got >= n:
            return
    raise RuntimeError(f"only {got} of {n} results arrived")


def burst_mesh(prefix: str, **env: str) -> LocalMesh:
    """The benchmarks' burst mesh, not started: a policeman and 2 developers with 2 slots and
    prefetch 32 each, in a fresh state directory (``mesh.state_dir``, the caller removes it);
    ``env`` adds or overrides ``CASPER_*`` settings."""
    return LocalMesh(
        Path(tempfile.mkdtemp(prefix=prefix)),
        developers=2,
        testers=0,
        port_base=free_port_base(),
        log_level="WARNING",
        extra_env={"CASPER_CAPACITY": "2", "CASPER_PREFETCH": "32", **env},
    )
