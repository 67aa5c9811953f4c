"""The docker socket proxy's rules (what the policeman may ask of the Docker engine), and the
local spawner's order exchange with casperd up's supervisor."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from casperd.spawners.local import LocalSpawner
from casperd.spawners.proxy import Policy, check, check_create

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
