"""Suite-wide hooks only: every test is marked by the directory it lives in.

tests/unit -> ``unit``, tests/integration -> ``integration``, tests/faults -> ``faults``,
tests/compose -> ``compose``, tests/security -> ``security`` (the markers are declared in
pyproject.toml), so ``-m unit`` and friends select by layer. Fixtures belong in the conftest.py of
each subdirectory, but for the mesh fixtures (tests/support/mesh.py), loaded here as a plugin so
that the integration and security tiers share one session Postgres.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from casperd.childserver import free_port
from casperd.embedded_redis import EmbeddedRedis

pytest_plugins = ["tests.support.mesh"]

TESTS_DIR = Path(__file__).resolve().parent
LAYERS = ("unit", "integration", "faults", "compose", "security")


def layer_of(path: Path) -> str | None:
    """The layer a test file belongs to: the first directory under tests/, if it is a known layer."""
    try:
        rel = Path(path).resolve().relative_to(TESTS_DIR)
    except ValueError:
        return None
    top = rel.parts[0] if len(rel.parts) > 1 else None
    return top if top in LAYERS else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        layer = layer_of(item.path)
        if layer is not None:
            item.add_marker(getattr(pytest.mark, layer))


@pytest.fixture
def embedded_redis() -> Iterator[EmbeddedRedis]:
    """A real Redis of the project's own (password on), started for one test and removed after."""
    root = Path(tempfile.mkdtemp(prefix="casper-test-redis-"))
    server = EmbeddedRedis(root / "redis", free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
