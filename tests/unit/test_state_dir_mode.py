"""The state directory under a separate task user: passable (o+x, for the workspace in it) but not
listable or writable by group and others."""

from __future__ import annotations

import stat
from pathlib import Path

from casperd import taskenv


def test_the_state_dir_loses_group_and_other_read_and_write(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o775)
    taskenv.unlistable(state)
    assert stat.S_IMODE(state.stat().st_mode) == 0o711
    taskenv.make_traversable(state / "workspaces" / "developer-1")  # what grant_tree does later
    assert stat.S_IMODE(state.stat().st_mode) == 0o711
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    private.chmod(0o700)
    taskenv.unlistable(private)
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    taskenv.unlistable(tmp_path / "missing")  # nothing to do, no error
