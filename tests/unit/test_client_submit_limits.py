"""The control client refuses a SUBMIT the protocol would refuse, before sending anything, and says
why: too many tasks (SPEC 6.4: 1 to 10,000) is not an integer that does not fit in 64 bits."""

from __future__ import annotations

from pathlib import Path

import pytest

from casperd.ctl.client import ControlClient
from casperd.errors import CommandError
from casperd.messages import SUBMIT_MAX_TASKS, TaskSpec


@pytest.mark.parametrize("n", [0, SUBMIT_MAX_TASKS + 1])
def test_a_submit_of_the_wrong_size_names_the_limit(tmp_path: Path, n: int) -> None:
    sock = tmp_path / "ctl"
    sock.touch()
    with ControlClient(f"ipc://{sock}", timeout_s=0.2) as c, pytest.raises(CommandError) as err:
        c.submit([TaskSpec(type="noop", input={})] * n)
    assert f"1 to {SUBMIT_MAX_TASKS:,} tasks, not {n:,}" in err.value.message
    assert "64 bits" not in err.value.message and "submit-bulk --batch" in (err.value.hint or "")


def test_an_integer_too_large_still_says_so(tmp_path: Path) -> None:
    sock = tmp_path / "ctl"
    sock.touch()
    with ControlClient(f"ipc://{sock}", timeout_s=0.2) as c, pytest.raises(CommandError) as err:
        c.submit([TaskSpec(type="noop", input={"n": 2**70})])
    assert "64 bits" in err.value.message
