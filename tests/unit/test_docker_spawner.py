"""The docker spawner's container spec, against a fake Docker client: the developer pool's key
pair (never the template's), an id the pool's pattern admits, root with only the task-user
capabilities; and the proxy's bind rule that goes with it."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any

import pytest

from casperd.errors import SpawnError
from casperd.spawners.docker import DockerSpawner
from casperd.spawners.proxy import Policy, allowed_binds, check_create


def bind(src: str, dst: str, rw: bool = False) -> dict[str, Any]:
    return {"Type": "bind", "Source": src, "Destination": dst, "RW": rw}


TEMPLATE_MOUNTS = [
    bind("/srv/s/developer-1.key", "/run/secrets/curve.key"),
    bind("/srv/s/developer-1.pub", "/run/secrets/curve.pub"),
    bind("/srv/s/authorized_keys", "/run/secrets/authorized_keys"),
    {"Type": "volume", "Name": "mesh1_repos", "Destination": "/repos", "RW": True},
]
PROXY_MOUNTS = [
    bind("/srv/s/developer-pool.key", "/run/secrets/developer-pool.key"),
    bind("/srv/s/developer-pool.pub", "/run/secrets/developer-pool.pub"),
    bind("/var/run/docker.sock", "/var/run/docker.sock", rw=True),
]


class FakeApi:
    def __init__(self) -> None:
        self.created: dict[str, Any] = {}

    def create_host_config(self, **kw: Any) -> dict[str, Any]:
        return kw

    def create_networking_config(self, cfg: Any) -> Any:
        return cfg

    def create_endpoint_config(self, **kw: Any) -> dict[str, Any]:
        return kw

    def create_container(self, **kw: Any) -> dict[str, str]:
        self.created = kw
        return {"Id": "c1"}

    def start(self, cid: str) -> None:
        pass


class FakeClient:
    def __init__(self, proxy_mounts: list[dict[str, Any]]) -> None:
        self.api = FakeApi()
        ctr = SimpleNamespace
        self.by_service = {
            "policeman": ctr(
                labels={"com.docker.compose.project": "mesh1"},
                attrs={"NetworkSettings": {"Networks": {"mesh1_claude-net": {"IPAddress": "172.20.0.10"}}}},
            ),
            "developer-1": ctr(
                labels={},
                attrs={
                    "Config": {"Image": "casper:latest", "Env": ["CASPER_NODE_ID=developer-1", "X=1"]},
                    "HostConfig": {},
                    "Mounts": TEMPLATE_MOUNTS,
                },
            ),
            "docker-proxy": ctr(labels={}, attrs={"Mounts": proxy_mounts}),
        }
        net = SimpleNamespace(name="mesh1_claude-net", attrs={"IPAM": {"Config": [{"Subnet": "172.20.0.0/16"}]}})
        self.containers = SimpleNamespace(list=self._list)
        self.networks = SimpleNamespace(get=lambda name: net)

    def _list(self, filters: dict[str, Any]) -> list[Any]:
        labels = filters["label"] if isinstance(filters["label"], list) else [filters["label"]]
        service = next(x.split("=", 1)[1] for x in labels if x.startswith("com.docker.compose.service="))
        return [self.by_service[service]] if service in self.by_service else []


def spawner(client: FakeClient) -> DockerSpawner:
    settings: Any = SimpleNamespace(advertise="tcp://172.20.0.10:5555", spawner_template="developer-1")
    sp = DockerSpawner(settings)
    sp._client = client
    return sp


def test_a_spawned_developer_gets_the_pool_key_and_a_pool_id() -> None:
    client = FakeClient(PROXY_MOUNTS)
    sp = spawner(client)
    actual = asyncio.run(sp.spawn("developer-ab1", "developer", []))
    assert actual == "developer-pool-ab1" and sp.spawned() == {"developer-pool-ab1"}
    spec = client.api.created
    assert spec["user"] == "0:0" and spec["name"] == "mesh1-developer-pool-ab1"
    assert "CASPER_NODE_ID=developer-pool-ab1" in spec["environment"]
    assert "CASPER_NODE_ID=developer-1" not in spec["environment"]
    host = spec["host_config"]
    assert host["cap_drop"] == ["ALL"] and sorted(host["cap_add"]) == ["CHOWN", "KILL", "SETGID", "SETUID"]
    assert host["security_opt"] == ["no-new-privileges:true"]
    assert sorted(host["binds"]) == [
        "/srv/s/authorized_keys:/run/secrets/authorized_keys:ro",
        "/srv/s/developer-pool.key:/run/secrets/curve.key:ro",
        "/srv/s/developer-pool.pub:/run/secrets/curve.pub:ro",
        "mesh1_repos:/repos:rw",
    ]


def test_no_pool_key_no_spawn_and_only_developers() -> None:
    sp = spawner(FakeClient(PROXY_MOUNTS[2:]))
    with pytest.raises(SpawnError, match="no developer pool key"):
        asyncio.run(sp.spawn("developer-ab1", "developer", []))
    with pytest.raises(SpawnError, match="not testers"):
        asyncio.run(spawner(FakeClient(PROXY_MOUNTS)).spawn("tester-ab1", "tester", []))


def test_the_proxy_allows_the_pool_key_never_the_templates() -> None:
    allowed = allowed_binds(TEMPLATE_MOUNTS, PROXY_MOUNTS)
    assert allowed == {"/srv/s/authorized_keys", "/srv/s/developer-pool.key", "/srv/s/developer-pool.pub"}
    policy = Policy("casper:latest", "mesh1", allowed)

    def create(binds: list[str]) -> bytes:
        return json.dumps(
            {
                "Image": "casper:latest",
                "User": "0:0",
                "Labels": {"casper.spawned": "true", "com.docker.compose.project": "mesh1"},
                "HostConfig": {
                    "NetworkMode": "mesh1_claude-net",
                    "Binds": binds,
                    "CapDrop": ["ALL"],
                    "CapAdd": ["SETUID", "SETGID", "CHOWN", "KILL"],
                    "SecurityOpt": ["no-new-privileges:true"],
                },
            }
        ).encode()

    assert check_create(create(["/srv/s/developer-pool.key:/run/secrets/curve.key:ro"]), policy) is None
    problem = check_create(create(["/srv/s/developer-1.key:/run/secrets/curve.key:ro"]), policy)
    assert problem is not None and "not one of the template's" in problem
