"""Fixtures for the fault tier: a multi-host lab of network namespaces (see ``netns.py``).

``lab`` gives each test a fresh :class:`~tests.faults.netns.NetnsLab` and always cleans it up
(then fails the test's teardown if anything of it is left). ``netns_mesh`` adds Postgres and
Redis in a ``db`` host and starts CASPER nodes in other hosts (see ``meshlab.py``). It skips, with the reason, on a
machine that cannot make one: not root, no ``ip``, ``ip netns add`` refused, no bridge or veth.
At the end of the session every lab made in this process is checked once more for leaks; at
its start, labs left by a killed run (owner process gone) are swept.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.faults.meshlab import NetnsMesh, make_root, remove_root
from tests.faults.netns import CREATED, LabUnavailable, NetnsLab, leftovers_of, sweep_stale_labs


def make_lab_or_skip() -> NetnsLab:
    try:
        return NetnsLab()
    except LabUnavailable as exc:
        pytest.skip(f"no network-namespace lab on this machine: {exc}")


@pytest.fixture
def lab() -> Iterator[NetnsLab]:
    netlab = make_lab_or_skip()
    try:
        yield netlab
    finally:
        netlab.cleanup()
    left = netlab.leftovers()
    assert not left, f"lab {netlab.uid} left behind: {left}"


@pytest.fixture
def netns_mesh(lab: NetnsLab) -> Iterator[NetnsMesh]:
    """Postgres and Redis running in the lab's ``db`` host; call ``start_mesh()`` for the nodes.
    Everything is stopped (and the node logs printed, shown when the test fails) afterwards."""
    nm = NetnsMesh(lab, make_root())
    try:
        nm.start_services()
        yield nm
    finally:
        try:
            nm.stop()
            print(nm.log_tails())
        finally:
            lab.cleanup()
            remove_root(nm.root)


def pytest_sessionstart(session: pytest.Session) -> None:
    swept = sweep_stale_labs()  # labs of runs killed before their cleanup (their owner is dead)
    if swept:
        print(f"swept stale network-namespace labs: {swept}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    left = leftovers_of(CREATED)
    if not left:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"LEAK: network-namespace labs left behind: {left}", red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
