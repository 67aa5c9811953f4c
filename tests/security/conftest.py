"""The security tier: every attack of issue #9 replayed against a real local mesh (Curve and
enrollment on), asserting it now fails, plus the defences that already held.

The mesh fixtures (embedded Postgres, a LocalMesh per test) come from the suite-wide plugin
tests/support/mesh.py, so this tier shares the integration tier's session Postgres;
tests/conftest.py marks every test here ``security``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from casperd.localmesh import LocalMesh
from tests.security.peer import Peer, key_of
from tests.support.mesh import free_port_base, wait_for

__all__ = ["free_port_base", "wait_for"]


def policeman_peer(mesh: LocalMesh, routing_id: bytes, keypair: tuple[bytes, bytes] | None = None) -> Peer:
    return Peer(
        mesh.policeman.bind, key_of(mesh.state_dir / "keys" / "policeman.pub"), routing_id=routing_id, keypair=keypair
    )


def enroll(mesh: LocalMesh, pattern: str, role: str) -> tuple[bytes, bytes]:
    """A new key pair enrolled through the policeman's control socket (caspectl keys add)."""
    import zmq

    public, secret = zmq.curve_keypair()
    with mesh.client() as c:
        c.request("keys-add", key=public.decode(), pattern=pattern, role=role)
    return public, secret


@pytest.fixture
def peers() -> Iterator[list[Peer]]:
    """Attacker peers made by a test, closed afterwards."""
    made: list[Peer] = []
    yield made
    for p in made:
        p.close()


def status(mesh: LocalMesh) -> dict[str, Any]:
    with mesh.client() as c:
        return dict(c.request("status"))


def state_file(mesh: LocalMesh, *parts: str) -> Path:
    return mesh.state_dir.joinpath(*parts)
