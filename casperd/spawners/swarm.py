"""The ``swarm`` spawner: ``docker service scale`` of the stack's developer service.

Replicas are named by their slot (``CASPER_NODE_ID=developer-pool-{{.Task.Slot}}`` in
compose.swarm.yaml: they share the developer pool's key, enrolled as ``developer-pool-*``; the
spawner reads the prefix from the service's own ``CASPER_NODE_ID``). A
scale from N to N+1 makes Swarm start a task in the lowest slot that has no runnable task, so the
spawner reads the service's tasks, predicts that slot's name, scales, and waits (a few seconds)
for the task to appear; spawns are serialised, so two never predict the same slot.

Swarm picks which task a scale-down removes: one that is not running, if there is one. So retiring
``developer-pool-K`` (which the policeman drained already) stops that replica's container first (it
exits on SIGTERM), waits until Swarm sees its slot not running (its restart is delayed by the
stack's restart policy), then scales down by one: the stopped slot is the one removed.

Which replicas are the autoscaler's: slots above ``swarm_base_replicas`` (the stack's own
replica count; when unset, the count the service had when the policeman first looked). The engine
is a swarm manager's (``DOCKER_HOST``; in the stack, the socket proxy of
``compose.swarm-spawner.yaml``); every call runs in a thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from casperd.errors import SpawnError
from casperd.settings import Settings
from casperd.spawners.base import Spawner

log = logging.getLogger("casperd.spawners.swarm")
_GONE = frozenset({"shutdown", "remove", "orphaned", "complete", "failed", "rejected"})
"""Desired states of tasks that no longer hold their slot."""
APPEAR_S = 20.0
"""How long a spawn waits for Swarm to create the new slot's task."""
SETTLE_S = 15.0
"""How long a retire waits for Swarm to see the stopped replica's slot not running."""
SLOT = "{{.Task.Slot}}"


def replica_prefix(spec: dict[str, Any]) -> str:
    """What comes before the slot in the service's ``CASPER_NODE_ID`` template (``developer-``)."""
    env = spec.get("TaskTemplate", {}).get("ContainerSpec", {}).get("Env") or []
    for item in env:
        name, _, value = str(item).partition("=")
        if name == "CASPER_NODE_ID" and SLOT in value:
            return value.split(SLOT, 1)[0]
    return "developer-"


class SwarmSpawner(Spawner):
    kind = "swarm"

    def __init__(self, settings: Settings, client: Any = None) -> None:
        self.s = settings
        self._client = client
        self.base: int | None = settings.swarm_base_replicas
        self.replicas = 0
        self.slots: set[int] = set()
        self.prefix = "developer-"
        self.error: str | None = None
        self._lock = asyncio.Lock()

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
                f"cannot find the swarm's developer service: {exc}",
                hint="is DOCKER_HOST a swarm manager (or its proxy), and swarm_service the service's name?",
            ) from None
        if len(found) != 1:
            raise SpawnError(f"found {len(found)} developer services", hint="set swarm_service to the service to scale")
        return found[0]

    def _tasks(self, svc: Any) -> list[dict[str, Any]]:
        import docker

        try:
            return list(svc.tasks())
        except docker.errors.DockerException as exc:
            raise SpawnError(f"cannot list the tasks of {svc.name}: {exc}", hint="see docker service ps") from None

    def _read(self, svc: Any) -> tuple[int, dict[int, dict[str, Any]]]:
        """The service's replica count and its slots' current tasks (slot -> the newest runnable task)."""
        import docker

        try:
            svc.reload()
        except docker.errors.DockerException as exc:
            raise SpawnError(f"cannot inspect {svc.name}: {exc}", hint="see docker service ls") from None
        n = int(svc.attrs["Spec"]["Mode"]["Replicated"]["Replicas"])
        self.prefix = replica_prefix(svc.attrs["Spec"])
        if self.base is None:
            self.base = n
        slots: dict[int, dict[str, Any]] = {}
        for t in self._tasks(svc):
            slot = t.get("Slot")
            if not isinstance(slot, int) or t.get("DesiredState") in _GONE:
                continue
            if slot not in slots or t.get("CreatedAt", "") > slots[slot].get("CreatedAt", ""):
                slots[slot] = t
        self.replicas = n
        self.slots = set(slots)
        return n, slots

    def _scale(self, svc: Any, n: int) -> None:
        import docker

        try:
            svc.scale(n)
        except docker.errors.DockerException as exc:
            raise SpawnError(f"cannot scale {svc.name} to {n}: {exc}", hint="see docker service ps") from None
        self.replicas = n

    def _spawn(self, role: str) -> str:
        if role != "developer":
            raise SpawnError(f"the swarm spawner scales developers, not {role}s", hint="bound only developer")
        svc = self._service()
        n, slots = self._read(svc)
        slot = next(s for s in range(1, len(slots) + 2) if s not in slots)
        self._scale(svc, n + 1)
        log.info("scaled %s to %d: %s%d", svc.name, n + 1, self.prefix, slot)
        deadline = time.monotonic() + APPEAR_S
        while time.monotonic() < deadline:
            _, slots = self._read(svc)
            if slot in slots:
                break
            time.sleep(0.5)
        else:
            log.warning("%s: no task in slot %d after %.0fs; the name may differ", svc.name, slot, APPEAR_S)
        return f"{self.prefix}{slot}"

    def _retire(self, node_id: str) -> None:
        svc = self._service()
        n, slots = self._read(svc)
        try:
            slot = int(node_id.removeprefix(self.prefix))
        except ValueError:
            raise SpawnError(
                f"{node_id} is not a replica of the developer service", hint=f"{self.prefix}<slot>"
            ) from None
        task = slots.get(slot)
        if task is None:
            log.info("%s has no task in slot %d any more; nothing to retire", svc.name, slot)
            return
        cid = task.get("Status", {}).get("ContainerStatus", {}).get("ContainerID")
        if cid:
            self._stop(cid, node_id)
            deadline = time.monotonic() + SETTLE_S
            while time.monotonic() < deadline:
                _, slots = self._read(svc)
                current = slots.get(slot)
                if current is None or current.get("Status", {}).get("State") != "running":
                    break
                time.sleep(0.5)
        self._scale(svc, max(0, n - 1))
        self.slots.discard(slot)  # Swarm removes the task a moment later; refresh() sees the rest
        log.info("retired %s: scaled %s to %d", node_id, svc.name, n - 1)

    def _stop(self, cid: str, node_id: str) -> None:
        import docker

        try:
            self._docker().containers.get(cid).stop(timeout=int(self.s.drain_timeout_s) + 10)
        except docker.errors.DockerException as exc:  # on another node: the scale-down alone has to do
            log.info("could not stop %s's container here (%s); scaling down", node_id, exc)

    def _refresh(self) -> None:
        self._read(self._service())

    async def spawn(self, node_id: str, role: str, capabilities: list[str]) -> str:
        async with self._lock:
            return await asyncio.to_thread(self._spawn, role)

    async def retire(self, node_id: str) -> None:
        async with self._lock:
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
        return {f"{self.prefix}{slot}" for slot in self.slots if slot > self.base}

    def view(self) -> dict[str, Any]:
        return {**super().view(), "base_replicas": self.base, "replicas": self.replicas, "error": self.error}
