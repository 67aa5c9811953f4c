"""Spawners: how the policeman adds and removes peers (the autoscaler's effects).

One interface, four backends chosen by the ``spawner`` setting:

* ``none``   — a fixed mesh; the autoscaler only reports tasks whose capability no peer offers.
* ``local``  — ``casperd up``'s supervisor starts and stops the processes (:mod:`.local`).
* ``docker`` — containers from the casper image, through the socket proxy (:mod:`.docker`).
* ``swarm``  — ``docker service scale`` of the developer service (:mod:`.swarm`).

A spawner names the peers it started (``spawned()``): only those are ever retired by the
autoscaler, and only after the policeman drained them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from casperd.settings import Settings


class Spawner:
    """Start and stop peers. Methods may block on I/O only in ``await`` (never the loop)."""

    kind = "none"

    async def spawn(self, node_id: str, role: str, capabilities: list[str]) -> str:
        """Start a peer of ``role`` named ``node_id`` (a backend that cannot choose names returns
        the name the new peer will register with). Raises :class:`~casperd.errors.SpawnError`."""
        from casperd.errors import SpawnError

        raise SpawnError(
            f"this mesh has a fixed size (spawner none); cannot start a {role}",
            hint="set spawner to local, docker or swarm to let the policeman add peers",
        )

    async def retire(self, node_id: str) -> None:
        """Stop a peer this spawner started (the policeman drained it first)."""

    async def refresh(self) -> None:
        """Update what ``spawned()`` knows from the backend (called every few seconds)."""

    def spawned(self) -> set[str]:
        """Node ids of the peers this spawner started that are still up."""
        return set()

    def view(self) -> dict[str, Any]:
        return {"kind": self.kind, "spawned": sorted(self.spawned())}

    async def close(self) -> None:
        """Release clients; peers already started keep running."""


def make_spawner(settings: Settings) -> Spawner:
    """The backend the ``spawner`` setting names."""
    if settings.spawner == "local":
        from casperd.spawners.local import LocalSpawner

        return LocalSpawner()
    if settings.spawner == "docker":
        from casperd.spawners.docker import DockerSpawner

        return DockerSpawner(settings)
    if settings.spawner == "swarm":
        from casperd.spawners.swarm import SwarmSpawner

        return SwarmSpawner(settings)
    return Spawner()
