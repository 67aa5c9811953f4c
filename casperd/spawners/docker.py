"""The ``docker`` spawner: developer containers from the casper image, on the mesh's network.

The policeman reaches the Docker engine only through the socket proxy (``DOCKER_HOST``, see
:mod:`casperd.spawners.proxy` and ``compose.spawner.yaml``). A spawned peer copies the *template*
container (``spawner_template``, default ``developer-1`` of the policeman's own compose project):
its image, settings, secrets (the same read-only files) and the ``repos`` volume, but not its key
pair: spawned developers share the *developer pool* key pair (``developer-pool.key``/``.pub`` of
make-secrets.sh, enrolled as ``developer-pool-*``; compose.spawner.yaml mounts it into the
docker-proxy service, whose mounts tell where the files are on the host), as the swarm's replicas
do, so each gets a node id ``developer-pool-<tag><n>`` (the autoscaler's ``developer-<tag><n>``
renamed) that the pattern admits and no fixed node's id. It gets its own fixed address on
``claude-net`` (the next free one from .30 up, the seed's addresses below stay reserved), its own
home volume (anonymous: removed with the container), and the labels ``casper.spawned=true`` and
the project's. Retiring stops it (it drains: SIGTERM) and
removes it with its volume. Every engine call runs in a thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import Any
from urllib.parse import urlsplit

from casperd.errors import SpawnError
from casperd.settings import Settings
from casperd.spawners.base import Spawner
from casperd.spawners.proxy import (
    NODE_KEY_FILES,
    POOL_KEY,
    POOL_PUB,
    PROJECT_LABEL,
    SERVICE_LABEL,
    SPAWNED_LABEL,
    TASK_USER_CAPS,
)

log = logging.getLogger("casperd.spawners.docker")
FIRST_HOST = 30
"""Spawned containers take addresses from .30 up; the seed's plan uses .1-.29."""
POOL_PREFIX = "developer-pool-"
"""Spawned developers' ids: what make-secrets.sh enrolls the pool key for (``developer-pool-*``)."""
PROXY_SERVICE = "docker-proxy"
_OVERRIDDEN = ("CASPER_NODE_ID=", "CASPER_ADVERTISE=", "CASPER_CONTROL=", "CASPER_ROLE=", "CASPER_CAPABILITIES=")


class DockerSpawner(Spawner):
    kind = "docker"

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self._client: Any = None
        self.project = ""
        self.live: set[str] = set()
        self.error: str | None = None

    def _docker(self) -> Any:
        if self._client is None:
            import docker

            try:
                self._client = docker.from_env(timeout=60)
            except docker.errors.DockerException as exc:
                raise SpawnError(
                    f"cannot reach the Docker engine: {exc}",
                    hint="run with compose.spawner.yaml (DOCKER_HOST=tcp://docker-proxy:2375)",
                ) from None
        return self._client

    def _call(self, what: str, fn: Any, *args: Any, **kw: Any) -> Any:
        import docker

        try:
            return fn(*args, **kw)
        except docker.errors.APIError as exc:
            explanation = getattr(exc, "explanation", None) or str(exc)
            raise SpawnError(
                f"the Docker engine refused to {what}: {explanation}",
                hint="see the docker-proxy service's log for the rule that refused it",
            ) from None
        except docker.errors.DockerException as exc:
            raise SpawnError(f"could not {what}: {exc}", hint="is the docker-proxy service up?") from None

    def _template(self) -> Any:
        """The template container of the policeman's own project (found by the policeman's address)."""
        client = self._docker()
        my_ip = urlsplit(self.s.advertise).hostname or ""
        mine = self._call("list containers", client.containers.list, filters={"label": f"{SERVICE_LABEL}=policeman"})
        for c in mine:
            nets = c.attrs.get("NetworkSettings", {}).get("Networks", {}) or {}
            if any(n.get("IPAddress") == my_ip for n in nets.values()):
                self.project = c.labels.get(PROJECT_LABEL, "")
                break
        if not self.project:
            raise SpawnError(
                f"cannot find the policeman's own container (address {my_ip})",
                hint="the docker spawner runs in the compose mesh, with CASPER_ADVERTISE set",
            )
        found = self._call(
            "list containers",
            client.containers.list,
            filters={"label": [f"{PROJECT_LABEL}={self.project}", f"{SERVICE_LABEL}={self.s.spawner_template}"]},
        )
        if not found:
            raise SpawnError(
                f"no running template container {self.s.spawner_template!r} in project {self.project}",
                hint="set spawner_template to a running developer service of this compose project",
            )
        return found[0]

    def _pool_key(self) -> dict[str, str]:
        """Host paths of the pool key pair: where the docker-proxy service has them mounted.
        Keyed by where a node reads its own pair (``/run/secrets/curve.key``, ``curve.pub``)."""
        found = self._call(
            "list containers",
            self._docker().containers.list,
            filters={"label": [f"{PROJECT_LABEL}={self.project}", f"{SERVICE_LABEL}={PROXY_SERVICE}"]},
        )
        mounts = {m.get("Destination"): m.get("Source") for c in found for m in c.attrs.get("Mounts") or []}
        if not (mounts.get(POOL_KEY) and mounts.get(POOL_PUB)):
            raise SpawnError(
                "no developer pool key pair: spawned developers need one of their own",
                hint="run containers/make-secrets.sh (it makes developer-pool.key) and start with compose.spawner.yaml",
            )
        return dict(zip(NODE_KEY_FILES, (mounts[POOL_KEY], mounts[POOL_PUB]), strict=True))

    def _free_ip(self, network: Any) -> str:
        subnet = ipaddress.ip_network(network.attrs["IPAM"]["Config"][0]["Subnet"])
        used = {
            str(ipaddress.ip_interface(c["IPv4Address"]).ip)
            for c in (network.attrs.get("Containers") or {}).values()
            if c.get("IPv4Address")
        }
        for host in list(subnet.hosts())[FIRST_HOST - 1 :]:
            if str(host) not in used:
                return str(host)
        raise SpawnError(f"no free address left on {network.name}", hint="retire peers or widen CASPER_SUBNET")

    def _spawn(self, node_id: str, role: str, capabilities: list[str]) -> str:
        from docker.types import Mount

        if role != "developer":
            raise SpawnError(
                f"the docker spawner starts developers, not {role}s", hint="only developers have a pool key"
            )
        node_id = POOL_PREFIX + node_id.removeprefix("developer-")
        client = self._docker()
        tpl = self._template()
        pool = self._pool_key()
        net_name = f"{self.project}_claude-net"
        net = self._call("inspect the mesh network", client.networks.get, net_name)
        ip = self._free_ip(net)
        cfg = tpl.attrs["Config"]
        host = tpl.attrs["HostConfig"]
        env = [e for e in cfg.get("Env") or [] if not e.startswith(_OVERRIDDEN)]
        env += [
            f"CASPER_NODE_ID={node_id}",
            f"CASPER_ROLE={role}",
            f"CASPER_ADVERTISE=tcp://{ip}:5555",
            f"CASPER_CONTROL=ipc:///home/casper/.local/state/casper/{node_id}.ctl",
        ]
        if capabilities:
            env.append(f"CASPER_CAPABILITIES={','.join(capabilities)}")
        binds = []
        for m in tpl.attrs.get("Mounts") or []:
            if m.get("Type") == "bind" and not m.get("RW", True):
                source = pool.get(m["Destination"], m["Source"])  # the pool's key pair, not the template's
                binds.append(f"{source}:{m['Destination']}:ro")
            elif m.get("Type") == "volume" and m.get("Name") == f"{self.project}_repos":
                binds.append(f"{m['Name']}:{m['Destination']}:rw")
        api = client.api
        host_config = api.create_host_config(
            binds=binds,
            mounts=[Mount("/home/casper", None, type="volume")],
            network_mode=net_name,
            restart_policy={"Name": "unless-stopped"},
            log_config=host.get("LogConfig"),
            init=True,
            read_only=True,
            tmpfs={"/tmp": "size=256m,mode=1777"},
            cap_drop=["ALL"],
            cap_add=list(TASK_USER_CAPS),  # as compose.yaml: the entrypoint keeps them for casperd
            security_opt=["no-new-privileges:true"],
            mem_limit=host.get("Memory") or None,
            nano_cpus=host.get("NanoCpus") or None,
        )
        networking = api.create_networking_config({net_name: api.create_endpoint_config(ipv4_address=ip)})
        created = self._call(
            f"create {node_id}",
            api.create_container,
            image=cfg["Image"],
            command=["--role", role],
            hostname=node_id,
            user="0:0",  # the image's entrypoint becomes casper at once (compose.yaml's x-casper)
            environment=env,
            labels={
                SPAWNED_LABEL: "true",
                PROJECT_LABEL: self.project,
                SERVICE_LABEL: node_id,  # `docker-compose down --remove-orphans` removes it
                "casper.node-id": node_id,
                "casper.role": role,
            },
            host_config=host_config,
            networking_config=networking,
            healthcheck=cfg.get("Healthcheck"),
            name=f"{self.project}-{node_id}",
        )
        self._call(f"start {node_id}", api.start, created["Id"])
        self.live.add(node_id)
        log.info("started container %s-%s at %s", self.project, node_id, ip)
        return node_id

    def _retire(self, node_id: str) -> None:
        client = self._docker()
        name = f"{self.project}-{node_id}"
        import docker

        try:
            container = client.containers.get(name)
        except docker.errors.NotFound:
            self.live.discard(node_id)
            log.info("container %s is already gone", name)
            return
        except docker.errors.DockerException as exc:
            raise SpawnError(f"could not find {name}: {exc}", hint="is the docker-proxy service up?") from None
        if container.labels.get(SPAWNED_LABEL) != "true":
            raise SpawnError(f"{name} was not spawned by the policeman", hint="only spawned containers are retired")
        self._call(f"stop {name}", container.stop, timeout=int(self.s.drain_timeout_s) + 10)
        self._call(f"remove {name}", container.remove, v=True)
        self.live.discard(node_id)
        log.info("removed container %s", name)

    def _refresh(self) -> None:
        if not self.project:
            self._template()
        found = self._call(
            "list spawned containers",
            self._docker().containers.list,
            filters={"label": [f"{PROJECT_LABEL}={self.project}", f"{SPAWNED_LABEL}=true"]},
        )
        self.live = {c.labels.get("casper.node-id", "") for c in found} - {""}

    async def spawn(self, node_id: str, role: str, capabilities: list[str]) -> str:
        return await asyncio.to_thread(self._spawn, node_id, role, capabilities)

    async def retire(self, node_id: str) -> None:
        await asyncio.to_thread(self._retire, node_id)

    async def refresh(self) -> None:
        try:
            await asyncio.to_thread(self._refresh)
            self.error = None
        except SpawnError as exc:
            self.error = str(exc)

    def spawned(self) -> set[str]:
        return set(self.live)

    def view(self) -> dict[str, Any]:
        return {**super().view(), "project": self.project, "error": self.error}

    async def close(self) -> None:
        if self._client is not None:
            await asyncio.to_thread(self._client.close)
