"""The docker socket proxy's rules (what the policeman may ask of the Docker engine), and the
local spawner's order exchange with casperd up's supervisor; on a swarm, the proxy's rules and the
swarm spawner's slot bookkeeping against Swarm's scale rules."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any

import pytest

from casperd.errors import SpawnError
from casperd.spawners.local import LocalSpawner
from casperd.spawners.proxy import Policy, check, check_create, route
from casperd.spawners.swarmproxy import Need, SwarmPolicy, check_swarm, is_replica, is_service, query_of, scaled_spec

POLICY = Policy("casper-local/casper:latest", "mesh1", {"/srv/secrets/developer-1.key", "/srv/secrets/broker.pub"})


def create(**over: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "Image": "casper-local/casper:latest",
        "Cmd": ["--role", "developer"],
        "User": "0:0",
        "Env": ["CASPER_NODE_ID=developer-ab1"],
        "Labels": {"casper.spawned": "true", "com.docker.compose.project": "mesh1"},
        "HostConfig": {
            "NetworkMode": "mesh1_claude-net",
            "Binds": ["/srv/secrets/developer-1.key:/run/secrets/curve.key:ro", "mesh1_repos:/repos:rw"],
            "Mounts": [{"Target": "/home/casper", "Source": None, "Type": "volume"}],
            "ReadonlyRootfs": True,
            "CapDrop": ["ALL"],
            "CapAdd": ["SETUID", "SETGID", "CHOWN", "KILL"],
            "SecurityOpt": ["no-new-privileges:true"],
            "Init": True,
        },
        "NetworkingConfig": {"EndpointsConfig": {"mesh1_claude-net": {"IPAMConfig": {"IPv4Address": "172.20.0.30"}}}},
    }
    for key, value in over.items():
        if key.startswith("Host_"):
            spec["HostConfig"][key[5:]] = value
        else:
            spec[key] = value
    return spec


def refusal(spec: dict[str, Any]) -> str | None:
    return check_create(json.dumps(spec).encode(), POLICY)


def test_a_spawner_create_is_allowed() -> None:
    assert refusal(create()) is None
    assert check(
        "POST", "/v1.41/containers/create?name=mesh1-developer-ab1", json.dumps(create()).encode(), POLICY
    ) == (
        None,
        None,
    )


@pytest.mark.parametrize(
    ("over", "why"),
    [
        ({"Image": "alpine:latest"}, "not the casper image"),
        ({"User": "10001:10001"}, "starts as 0:0"),
        ({"User": "0"}, "starts as 0:0"),
        ({"User": ""}, "starts as 0:0"),
        ({"Host_CapAdd": ["SETUID", "DAC_OVERRIDE"]}, "CapAdd ['DAC_OVERRIDE']"),
        ({"Host_CapAdd": ["CAP_SYS_PTRACE"]}, "CapAdd ['SYS_PTRACE']"),
        ({"Host_CapDrop": []}, "CapDrop: [ALL]"),
        ({"Host_CapDrop": ["NET_RAW"]}, "CapDrop: [ALL]"),
        ({"Host_SecurityOpt": []}, "no-new-privileges"),
        ({"Labels": {"com.docker.compose.project": "mesh1"}}, "casper.spawned=true"),
        ({"Labels": {"casper.spawned": "true", "com.docker.compose.project": "other"}}, "casper.spawned=true"),
        ({"Entrypoint": ["/bin/sh"]}, "Entrypoint may not be set"),
        ({"Host_Privileged": True}, "HostConfig.Privileged"),
        ({"Host_CapAdd": ["SYS_ADMIN"]}, "CapAdd ['SYS_ADMIN']"),
        ({"Host_Devices": [{"PathOnHost": "/dev/sda"}]}, "HostConfig.Devices"),
        ({"Host_PidMode": "host"}, "HostConfig.PidMode"),
        ({"Host_NetworkMode": "host"}, "network mode"),
        ({"Host_NetworkMode": "other_claude-net"}, "network mode"),
        ({"Host_SecurityOpt": ["apparmor=unconfined"]}, "no-new-privileges"),
        ({"Host_Binds": ["/var/run/docker.sock:/var/run/docker.sock"]}, "not one of the template's"),
        ({"Host_Binds": ["/:/host:ro"]}, "not one of the template's"),
        ({"Host_Binds": ["/srv/secrets/developer-1.key:/run/secrets/curve.key:rw"]}, "not one of the template's"),
        ({"Host_Binds": ["other_data:/data"]}, "not the mesh's repos volume"),
        ({"Host_Mounts": [{"Target": "/h", "Source": "/etc", "Type": "bind"}]}, "anonymous volumes"),
        ({"NetworkingConfig": {"EndpointsConfig": {"bridge": {}}}}, "are not this mesh's"),
    ],
)
def test_dangerous_creates_are_refused(over: dict[str, Any], why: str) -> None:
    problem = refusal(create(**over))
    assert problem is not None and why in problem


@pytest.mark.parametrize(
    ("method", "path", "allowed", "verify"),
    [
        ("GET", "/v1.41/_ping", True, None),
        ("GET", "/v1.41/version", True, None),
        ("GET", "/v1.41/containers/json?all=1&filters=%7B%7D", True, None),
        ("GET", "/v1.41/containers/abc123/json", True, None),
        ("GET", "/v1.41/networks/mesh1_claude-net", True, None),
        ("GET", "/v1.41/networks/other_claude-net", False, None),
        ("POST", "/v1.41/containers/abc123/start", True, "abc123"),
        ("POST", "/v1.41/containers/abc123/stop?t=20", True, "abc123"),
        ("DELETE", "/v1.41/containers/abc123?v=1", True, "abc123"),
        ("POST", "/v1.41/containers/abc123/exec", False, None),
        ("POST", "/v1.41/containers/abc123/kill", False, None),
        ("POST", "/v1.41/images/create?fromImage=alpine", False, None),
        ("POST", "/v1.41/volumes/create", False, None),
        ("POST", "/v1.41/build", False, None),
        ("GET", "/v1.41/containers/abc123/archive?path=/run/secrets", False, None),
        ("POST", "/v1.41/swarm/init", False, None),
    ],
)
def test_only_the_spawner_calls_pass(method: str, path: str, allowed: bool, verify: str | None) -> None:
    problem, cid = check(method, path, b"", POLICY)
    assert (problem is None) is allowed, problem
    assert cid == verify


def test_local_spawner_orders_round_trip() -> None:
    failed: list[tuple[str, str]] = []
    sp = LocalSpawner()
    sp.on_failed = lambda n, why: failed.append((n, why))
    asyncio.run(sp.spawn("developer-ab1", "developer", []))
    asyncio.run(sp.spawn("developer-ab2", "developer", ["gpu"]))
    assert sp.spawned() == {"developer-ab1", "developer-ab2"}
    orders = sp.exchange({"running": [], "done": []})["orders"]
    assert [(o["op"], o["node_id"]) for o in orders] == [("spawn", "developer-ab1"), ("spawn", "developer-ab2")]
    assert orders[1]["capabilities"] == ["gpu"]
    # the supervisor started the first, failed the second
    left = sp.exchange(
        {
            "running": ["developer-ab1"],
            "done": [{"seq": orders[0]["seq"], "ok": True}, {"seq": orders[1]["seq"], "ok": False, "error": "no port"}],
        }
    )["orders"]
    assert left == []
    assert failed == [("developer-ab2", "no port")]
    assert sp.spawned() == {"developer-ab1"}
    asyncio.run(sp.retire("developer-ab1"))
    (order,) = sp.exchange({"running": ["developer-ab1"]})["orders"]
    assert order["op"] == "retire"
    sp.exchange({"running": [], "done": [{"seq": order["seq"], "ok": True}]})
    assert sp.spawned() == set()


# --- the swarm spawner and the proxy's swarm rules -------------------------------------------------
SWARM = SwarmPolicy("casper", "casper_developer", 4)


@pytest.mark.parametrize(
    ("method", "path", "body", "allowed", "need"),
    [
        ("GET", "/v1.41/_ping", b"", True, None),
        ("GET", "/v1.41/services/casper_developer", b"", True, Need("service", "casper_developer")),
        ("GET", "/v1.41/services/abc?insertDefaults=true", b"", True, Need("service", "abc")),
        ("GET", '/v1.41/tasks?filters={"service":["abc"]}', b"", True, Need("tasks", "abc")),
        ("GET", "/v1.41/tasks", b"", False, None),
        ("GET", '/v1.41/tasks?filters={"service":["a","b"]}', b"", False, None),
        ("GET", "/v1.41/services", b"", False, None),
        ("GET", "/v1.41/containers/c1/json", b"", True, Need("container", "c1")),
        ("GET", "/v1.41/secrets", b"", False, None),
        ("GET", "/v1.41/nodes", b"", False, None),
        ("POST", "/v1.41/services/abc/update?version=3", b'{"Mode": {"Replicated": {"Replicas": 3}}}', True, None),
        ("POST", "/v1.41/services/abc/update?version=3", b'{"Mode": {"Replicated": {"Replicas": 5}}}', False, None),
        # the docker SDK's ServiceMode says "replicated"; the engine reads keys in any case
        ("POST", "/v1.41/services/abc/update?version=3", b'{"Mode": {"replicated": {"Replicas": 3}}}', True, None),
        ("POST", "/v1.41/services/abc/update?version=3", b'{"Mode": {"replicated": {"Replicas": true}}}', False, None),
        ("POST", "/v1.41/services/abc/update?version=3", b'{"TaskTemplate": {}}', False, None),
        ("POST", "/v1.41/services/create", b"{}", False, None),
        ("DELETE", "/v1.41/services/abc", b"", False, None),
        ("POST", "/v1.41/containers/c1/stop?t=20", b"", True, Need("container", "c1")),
        ("POST", "/v1.41/containers/c1/exec", b"", False, None),
        ("POST", "/v1.41/containers/create", b"{}", False, None),
        ("POST", "/v1.41/swarm/leave", b"", False, None),
    ],
)
def test_on_a_swarm_the_proxy_only_lets_the_developer_service_scale(
    method: str, path: str, body: bytes, allowed: bool, need: Need | None
) -> None:
    problem, got = check_swarm(method, route(path), query_of(path), body, SWARM)
    assert (problem is None) is allowed, problem
    if need is not None:
        assert got == need
    elif allowed and "update" in path:
        assert got == Need("scale", "abc", 3)


def test_the_proxy_scales_with_the_current_spec_and_checks_whose_things_they_are() -> None:
    current = {
        "Spec": {"Name": "casper_developer", "TaskTemplate": {"ContainerSpec": {"Image": "casper"}}, "Mode": {}},
        "Version": {"Index": 42},
    }
    body, version = scaled_spec(current, 3)
    assert version == 42
    assert json.loads(body) == {**current["Spec"], "Mode": {"Replicated": {"Replicas": 3}}}
    assert is_service(current, SWARM) and not is_service({"Spec": {"Name": "casper_policeman"}}, SWARM)
    assert is_replica({"Config": {"Labels": {"com.docker.swarm.service.name": "casper_developer"}}}, SWARM)
    assert not is_replica({"Config": {"Labels": {"com.docker.swarm.service.name": "casper_postgres"}}}, SWARM)
    assert not is_replica({"Config": {"Labels": None}}, SWARM)


class FakeSwarm:
    """Swarm's slot rules: a scale-up fills the lowest free slot; a scale-down removes a slot
    whose task is not running if there is one (else the highest); a stopped replica's slot gets a
    new task that waits out the restart delay (not running)."""

    def __init__(self, replicas: int) -> None:
        self.by_slot: dict[int, dict[str, Any]] = {}
        self.stopped: list[str] = []
        self.services = self
        self.containers = self
        self.name = "casper_developer"
        self.attrs: dict[str, Any] = {}
        self._n = 0
        self._apply(replicas)

    def _task(self, slot: int, state: str) -> dict[str, Any]:
        self._n += 1
        return {
            "Slot": slot,
            "DesiredState": "running",
            "CreatedAt": f"{self._n:06d}",
            "Status": {"State": state, "ContainerStatus": {"ContainerID": f"ctr{slot}-{self._n}"}},
        }

    def _apply(self, n: int) -> None:
        while len(self.by_slot) < n:
            slot = next(s for s in range(1, n + 1) if s not in self.by_slot)
            self.by_slot[slot] = self._task(slot, "running")
        while len(self.by_slot) > n:
            idle = [s for s, t in self.by_slot.items() if t["Status"]["State"] != "running"]
            del self.by_slot[min(idle) if idle else max(self.by_slot)]
        env = ["CASPER_ROLE=developer", "CASPER_NODE_ID=developer-pool-{{.Task.Slot}}"]
        self.attrs = {
            "Spec": {"Mode": {"Replicated": {"Replicas": n}}, "TaskTemplate": {"ContainerSpec": {"Env": env}}}
        }

    # the docker SDK's surface the spawner uses
    def get(self, name: str) -> Any:
        if name.startswith("ctr"):
            return SimpleNamespace(stop=lambda timeout: self._stop(name))
        assert name == "casper_developer"
        return self

    def reload(self) -> None:
        pass

    def scale(self, n: int) -> None:
        self._apply(n)

    def _stop(self, cid: str) -> None:
        self.stopped.append(cid)
        slot = next(s for s, t in self.by_slot.items() if t["Status"]["ContainerStatus"]["ContainerID"] == cid)
        self.by_slot[slot] = self._task(slot, "pending")  # the restart, delayed

    def tasks(self) -> list[dict[str, Any]]:
        return list(self.by_slot.values())


def test_swarm_spawner_names_the_slot_swarm_fills_and_retires_exactly_that_replica() -> None:
    from casperd.settings import load_settings
    from casperd.spawners.swarm import SwarmSpawner

    fake = FakeSwarm(2)
    settings = load_settings({"role": "policeman", "swarm_service": "casper_developer", "swarm_base_replicas": 2})
    sp = SwarmSpawner(settings, client=fake)
    asyncio.run(sp.refresh())
    assert sp.error is None and sp.spawned() == set()
    # the name comes from the service's own CASPER_NODE_ID template
    assert asyncio.run(sp.spawn("developer-xx1", "developer", [])) == "developer-pool-3"
    assert asyncio.run(sp.spawn("developer-xx2", "developer", [])) == "developer-pool-4"
    assert sp.spawned() == {"developer-pool-3", "developer-pool-4"}
    # the idle one is not the newest: retiring developer-3 leaves a gap, which the next spawn fills
    asyncio.run(sp.retire("developer-pool-3"))
    assert sorted(fake.by_slot) == [1, 2, 4] and fake.stopped[0].startswith("ctr3-")
    assert sp.spawned() == {"developer-pool-4"}
    assert asyncio.run(sp.spawn("developer-xx3", "developer", [])) == "developer-pool-3"
    with pytest.raises(SpawnError):
        asyncio.run(sp.retire("tester-1"))
    with pytest.raises(SpawnError):
        asyncio.run(sp.spawn("tester-xx1", "tester", []))


def test_the_proxy_looks_up_what_it_touches_and_scales_with_the_current_spec() -> None:
    from casperd.spawners.swarmproxy import scale, verify

    calls: list[tuple[str, str, bytes]] = []
    services = {
        "svc-dev": {
            "Spec": {"Name": "casper_developer", "Mode": {"Replicated": {"Replicas": 2}}},
            "Version": {"Index": 7},
        },
        "svc-pol": {"Spec": {"Name": "casper_policeman"}, "Version": {"Index": 3}},
    }
    containers = {"ctr-dev": "casper_developer", "ctr-pg": "casper_postgres"}

    async def engine(method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        calls.append((method, path, body))
        kind, name = path.split("/")[1:3]
        if kind == "services" and method == "GET" and name in services:
            return 200, json.dumps(services[name]).encode()
        if kind == "containers" and name in containers:
            labels = {"com.docker.swarm.service.name": containers[name]}
            return 200, json.dumps({"Config": {"Labels": labels}}).encode()
        if method == "POST":
            return 200, b'{"Warnings": null}'
        return 404, b"{}"

    assert asyncio.run(verify(engine, SWARM, Need("service", "svc-dev"))) is None
    assert "not casper_developer" in (asyncio.run(verify(engine, SWARM, Need("tasks", "svc-pol"))) or "")
    assert "not casper_developer" in (asyncio.run(verify(engine, SWARM, Need("service", "nope"))) or "")
    assert asyncio.run(verify(engine, SWARM, Need("container", "ctr-dev"))) is None
    assert "not a replica" in (asyncio.run(verify(engine, SWARM, Need("container", "ctr-pg"))) or "")
    calls.clear()
    assert asyncio.run(scale(engine, SWARM, Need("scale", "svc-dev", 3))) == (200, b'{"Warnings": null}')
    (_, _, _), (method, path, body) = calls
    assert (method, path) == ("POST", "/services/svc-dev/update?version=7")
    assert json.loads(body) == {"Name": "casper_developer", "Mode": {"Replicated": {"Replicas": 3}}}
