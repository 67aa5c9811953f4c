"""Whether the task user (see casperd.taskenv) can run this interpreter on this machine."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path


def others_can_run(path: str | Path) -> bool:
    """True when a user with no relation to the owner could execute ``path`` (o+x on the file and
    on every directory above it)."""
    real = Path(os.path.realpath(path))
    try:
        if not real.stat().st_mode & stat.S_IXOTH:
            return False
        return all(p.stat().st_mode & stat.S_IXOTH for p in real.parents)
    except OSError:
        return False


def mesh_task_user() -> str:
    """The task_user for test meshes whose task code runs this interpreter (tests, python -c):
    ``auto`` when the task user can run it; else ``none`` (e.g. a Python under /root, mode 0700).
    The security tier tests the separate user with commands that do not need this interpreter."""
    return "auto" if os.geteuid() != 0 or others_can_run(sys.executable) else "none"
