"""The spawner interface (see :mod:`casperd.spawners`); the ``none`` backend is this base class."""

from __future__ import annotations

from typing import Any


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
