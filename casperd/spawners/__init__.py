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

from typing import TYPE_CHECKING

from casperd.spawners.base import Spawner

if TYPE_CHECKING:
    from casperd.settings import Settings

__all__ = ["Spawner", "make_spawner"]


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
