"""The ``swarm`` spawner: ``docker service scale`` of the stack's developer service.

Replicas are named by their slot (``CASPER_NODE_ID=developer-pool-{{.Task.Slot}}`` in
compose.swarm.yaml: they share the developer pool's key, enrolled as ``developer-pool-*``), so a
scale from N to N+1 brings ``developer-pool-<N+1>``. Swarm picks which task
a scale-down removes (it prefers tasks that are not running), so retiring ``developer-pool-K`` stops
that replica's container first (it drains: SIGTERM; the policeman drained it already) and then
scales down by one. Replicas above the count the service had when the policeman started count as
spawned. The engine must be a swarm manager's (``DOCKER_HOST``); every call runs in a thread.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from casperd.errors import SpawnError
from casperd.settings import Settings
from casperd.spawners.base import Spawner

log = logging.getLogger("casperd.spawners.swarm")
REPLICA_PREFIX = "developer-pool-"
"""compose.swarm.yaml's replica ids: the pool key's pattern (make-secrets.sh) admits them."""


class SwarmSpawner(Spawner):
    kind = "swarm"

    def __init__(self, settings: Settings, client: Any = None) -> None:
        self.s = settings
        self._client = client
        self.base: int | None = None
        self.replicas = 0
        self.error: str | None = None

    def _docker(self) -> Any:
        if self._client is None:
            import docker

            try:
                self._client = docker.from_env(timeout=60)
            except docker.errors.DockerException as exc:
                raise SpawnError(
                    f"cannot reach the Docker engine: {exc}", hint="set DOCKER_HOST to a swarm manager's API"
                ) from None
        return self._client

    def _service(self) -> Any:
        import docker

        client = self._docker()
        try:
            if self.s.swarm_service:
                return client.services.get(self.s.swarm_service)
            found = [s for s in client.services.list() if s.name.endswith("_developer") or s.name == "developer"]
        except docker.errors.DockerException as exc:
            raise SpawnError(
                f"cannot list the swarm's services: {exc}", hint="is this engine a swarm manager?"
            ) from None
        if len(found) != 1:
            raise SpawnError(f"found {len(found)} developer services", hint="set swarm_service to the service to scale")
        return found[0]

    def _count(self, svc: Any) -> int:
        svc.reload()
        n = int(svc.attrs["Spec"]["Mode"]["Replicated"]["Replicas"])
        if self.base is None:
            self.base = n
        self.replicas = n
        return n

    def _scale(self, svc: Any, n: int) -> None:
        import docker

        try:
            svc.scale(n)
        except docker.errors.DockerException as exc:
            raise SpawnError(f"cannot scale {svc.name} to {n}: {exc}", hint="see docker service ps") from None
        self.replicas = n

    def _spawn(self, node_id: str, role: str) -> str:
        if role != "developer":
            raise SpawnError(f"the swarm spawner scales developers, not {role}s", hint="bound only developer")
        svc = self._service()
        n = self._count(svc)
        self._scale(svc, n + 1)
        log.info("scaled %s to %d", svc.name, n + 1)
        return f"{REPLICA_PREFIX}{n + 1}"

    def _retire(self, node_id: str) -> None:
        svc = self._service()
        n = self._count(svc)
        slot = int(node_id.rsplit("-", 1)[1])
        for task in svc.tasks(filters={"desired-state": "running"}):
            if task.get("Slot") == slot:
                cid = task.get("Status", {}).get("ContainerStatus", {}).get("ContainerID")
                if cid:
                    try:
                        self._docker().containers.get(cid).stop(timeout=int(self.s.drain_timeout_s) + 10)
                    except Exception as exc:  # on another node: the scale-down alone has to do
                        log.info("could not stop %s's container here (%s); scaling down", node_id, exc)
        self._scale(svc, max(0, n - 1))
        log.info("retired %s: scaled %s to %d", node_id, svc.name, n - 1)

    def _refresh(self) -> None:
        self._count(self._service())

    async def spawn(self, node_id: str, role: str, capabilities: list[str]) -> str:
        return await asyncio.to_thread(self._spawn, node_id, role)

    async def retire(self, node_id: str) -> None:
        await asyncio.to_thread(self._retire, node_id)

    async def refresh(self) -> None:
        try:
            await asyncio.to_thread(self._refresh)
            self.error = None
        except SpawnError as exc:
            self.error = str(exc)

    def spawned(self) -> set[str]:
        if self.base is None:
            return set()
        return {f"{REPLICA_PREFIX}{slot}" for slot in range(self.base + 1, self.replicas + 1)}

    def view(self) -> dict[str, Any]:
        return {**super().view(), "base_replicas": self.base, "replicas": self.replicas, "error": self.error}
