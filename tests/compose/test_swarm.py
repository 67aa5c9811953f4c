"""Docker Swarm: compose.swarm.yaml deployed as a stack on a single-node swarm, developers scaled.

The test makes its own swarm (``docker swarm init`` on loopback, an address pool checked against
the host's routes and Docker's networks) and always leaves it again, with the stack removed; an
engine that is already part of a swarm is not touched (the test skips and says why). No port is
published: traffic stays on the stack's own overlay networks and `docker exec`.

What it shows: the replicas find the policeman by name and advertise their own overlay address
(no fixed IPs); ``docker service scale`` adds a developer that registers and receives work. Then
the stack is deployed again with ``compose.swarm-spawner.yaml`` (the opt-in): the policeman's
autoscaler, through the socket proxy, scales the developer service up under a burst (the new
replica registers and takes work) and back down once it is idle (drained first, no task lost), and
the proxy refuses anything but that.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.compose.composemesh import REPO, _docker_subnets, _host_routes, clean_env, free_subnet_pair

STACK = f"casperswarm{os.getpid()}{secrets.token_hex(2)}"
CASPER_UID = 10001


def sh(
    *cmd: str, env: dict[str, str] | None = None, timeout: float = 120, check: bool = True, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        list(cmd),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd[:5])} failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return proc


def _free_pool(client: Any) -> str:
    taken = _host_routes() + _docker_subnets(client)
    for second in range(240, 250):
        pool = ipaddress.IPv4Network(f"10.{second}.0.0/16")
        if not any(pool.overlaps(t) for t in taken):
            return str(pool)
    pytest.fail("no free /16 in 10.240-249.0.0 for the swarm's address pool", pytrace=False)


@pytest.fixture(scope="module")
def swarm(docker_client: Any) -> Iterator[str]:
    state = docker_client.info().get("Swarm", {}).get("LocalNodeState", "")
    if state != "inactive":
        pytest.skip(
            f"this Docker engine is already in a swarm (state {state!r}); the test only uses a swarm it "
            "creates and removes itself"
        )
    sh(
        "docker",
        "swarm",
        "init",
        "--advertise-addr",
        "127.0.0.1",
        "--listen-addr",
        "127.0.0.1:2377",
        "--default-addr-pool",
        _free_pool(docker_client),
        "--default-addr-pool-mask-length",
        "24",
    )
    try:
        node = docker_client.info()["Swarm"]["NodeID"]
        sh("docker", "node", "update", "--label-add", "type=worker", "--label-add", "casper.data=true", node)
        yield node
    finally:
        sh("docker", "swarm", "leave", "--force", check=False, timeout=120)


@pytest.fixture(scope="module")
def stack(
    swarm: str, docker_client: Any, compose_images: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    secrets_dir = tmp_path_factory.mktemp("swarm") / "secrets"
    # Swarm refuses empty secrets: the API key file gets a placeholder (no Claude work runs here)
    sh(
        str(REPO / "containers" / "make-secrets.sh"),
        str(secrets_dir),
        env={**os.environ, **compose_images, "ANTHROPIC_API_KEY": "placeholder-no-claude-work-in-this-test"},
        timeout=300,
    )
    pg = compose_images["POSTGRES_IMAGE"]
    uid = sh("docker", "run", "--rm", "--network", "none", "--entrypoint", "id", pg, "-u", "postgres").stdout.strip()
    gid = sh("docker", "run", "--rm", "--network", "none", "--entrypoint", "id", pg, "-g", "postgres").stdout.strip()
    k = free_subnet_pair(docker_client)
    env = {
        **clean_env(),
        **compose_images,
        "CASPER_SUBNET": f"10.233.{2 * k}.0/24",
        "CASPER_INTERNAL_SUBNET": f"10.233.{2 * k + 1}.0/24",
        "CASPER_SECRETS_DIR": str(secrets_dir),
        "POSTGRES_UID": uid,
        "POSTGRES_GID": gid,
        "CASPER_DEVELOPERS": "2",
        "CASPER_WORKER_CPUS_RESERVED": "0.1",
        "CASPER_POLICEMAN_CPUS_RESERVED": "0.1",
        "CASPER_DB_CPUS_RESERVED": "0.1",
    }
    t0 = time.monotonic()
    sh("docker", "stack", "deploy", "--resolve-image", "never", "-c", "compose.swarm.yaml", STACK, env=env, timeout=300)
    info = {
        "subnets": [ipaddress.ip_network(env[v]) for v in ("CASPER_SUBNET", "CASPER_INTERNAL_SUBNET")],
        "t0": t0,
        "env": env,
    }
    try:
        yield info
    finally:
        sh("docker", "stack", "rm", STACK, check=False, timeout=120)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the stack's containers and networks go away asynchronously
            label = f"com.docker.stack.namespace={STACK}"
            # sparse: no inspect per container, which races with the removal (404 on a vanished one)
            if not docker_client.containers.list(
                all=True, filters={"label": label}, sparse=True
            ) and not docker_client.networks.list(filters={"label": label}):
                break
            time.sleep(1)
        with contextlib.suppress(Exception):
            for vol in docker_client.volumes.list(filters={"label": f"com.docker.stack.namespace={STACK}"}):
                vol.remove(force=True)


def _policeman(client: Any) -> Any:
    found = client.containers.list(
        filters={"label": f"com.docker.swarm.service.name={STACK}_policeman", "status": "running"}
    )
    return found[0] if found else None


def caspectl(client: Any, *args: str, stdin_cmd: str | None = None, timeout: float = 60) -> Any:
    c = _policeman(client)
    assert c is not None, "the policeman is not running"
    cmd = ["caspectl", *args, "-o", "json"]
    if stdin_cmd:
        cmd = ["sh", "-c", f"{stdin_cmd} | caspectl {' '.join(args)} -o json"]
    proc = sh("docker", "exec", "-u", f"{CASPER_UID}", c.id, *cmd, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"caspectl {' '.join(args)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


def wait_peers(client: Any, names: set[str], timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        with contextlib.suppress(AssertionError, ValueError):
            peers = {p["node_id"]: p for p in caspectl(client, "peers")["peers"]}
            last = peers
            if names <= {n for n, p in peers.items() if p["liveness"] == "alive"}:
                return peers
        time.sleep(2)
    raise AssertionError(f"peers {sorted(names)} not all alive within {timeout:.0f}s; last: {last}")


def test_stack_deploys_and_scaled_developers_receive_work(docker_client: Any, stack: dict[str, Any]) -> None:
    peers = wait_peers(docker_client, {"developer-pool-1", "developer-pool-2", "tester-1"}, timeout=240)
    up_s = time.monotonic() - stack["t0"]
    # no fixed addresses: every replica advertises its own address on the stack's overlay networks
    # (the one its route to the policeman takes), which every other peer can reach
    for name in ("developer-pool-1", "developer-pool-2", "tester-1"):
        host = peers[name]["endpoint"].removeprefix("tcp://").rsplit(":", 1)[0]
        assert any(ipaddress.ip_address(host) in net for net in stack["subnets"]), (name, peers[name]["endpoint"])
    gen = 'for i in $(seq 1 60); do echo "{\\"type\\": \\"echo\\", \\"input\\": {\\"i\\": $i}}"; done'
    caspectl(docker_client, "submit-bulk", "-", "--wait", stdin_cmd=gen, timeout=180)
    tasks = caspectl(docker_client, "tasks", "--limit", "100")
    assert tasks["counts"].get("complete", 0) >= 60, tasks["counts"]

    sh("docker", "service", "scale", "--detach", f"{STACK}_developer=3", timeout=120)
    wait_peers(docker_client, {"developer-pool-1", "developer-pool-2", "developer-pool-3", "tester-1"}, timeout=180)
    for old in ("developer-pool-1", "developer-pool-2", "tester-1"):  # only the new replica may take work now
        caspectl(docker_client, "drain", old)
    gen = 'for i in $(seq 1 20); do echo "{\\"type\\": \\"echo\\", \\"input\\": {\\"n\\": $i}}"; done'
    caspectl(docker_client, "submit-bulk", "-", "--wait", stdin_cmd=gen, timeout=180)
    recent = caspectl(docker_client, "tasks", "--limit", "20")["tasks"]
    assert {t["assigned_to"] for t in recent} == {"developer-pool-3"}, recent
    assert all(t["status"] == "complete" for t in recent), recent
    for old in ("developer-pool-1", "developer-pool-2", "tester-1"):
        caspectl(docker_client, "resume", old)
    print(f"swarm stack: deploy -> 3 peers alive in {up_s:.1f}s")


def _status(client: Any) -> dict[str, Any]:
    return dict(caspectl(client, "status"))


def _wait(what: str, timeout: float, probe: Any) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        with contextlib.suppress(AssertionError, ValueError, KeyError, TypeError):
            last = probe()
            if last:
                return last
        time.sleep(2)
    raise AssertionError(f"{what}: not within {timeout:.0f}s; last: {last}")


def _diagnose(client: Any) -> str:
    """The autoscaler's view, the peers and the proxy's and policeman's last log lines (for a failure)."""
    parts = []
    with contextlib.suppress(Exception):
        parts.append(f"autoscale: {json.dumps(_status(client)['autoscale'])}")
    with contextlib.suppress(Exception):
        parts.append(f"peers: {[(p['node_id'], p['liveness']) for p in caspectl(client, 'peers')['peers']]}")
    with contextlib.suppress(Exception):
        police = client.services.get(f"{STACK}_policeman")
        parts.append(f"policeman update: {police.attrs.get('UpdateStatus')}")
    for svc in ("docker-proxy", "policeman"):
        logs = sh("docker", "service", "logs", "--tail", "40", f"{STACK}_{svc}", check=False, timeout=60)
        lines = [
            ln
            for ln in (logs.stdout + logs.stderr).splitlines()
            if "autoscal" in ln or "spawn" in ln or svc == "docker-proxy"
        ]
        parts.append(f"{svc} log: " + "\n".join(lines[-25:]))
    return "\n".join(parts)


PROXY_PROBE = """
import json, sys, urllib.request, urllib.error
def ask(method, path, body=None):
    req = urllib.request.Request("http://docker-proxy:2375/v1.41" + path, method=method, data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        return urllib.request.urlopen(req, timeout=20).status
    except urllib.error.HTTPError as exc:
        return exc.code
stack = sys.argv[1]
spec = json.dumps({"Mode": {"Replicated": {"Replicas": 1}}}).encode()
print(json.dumps({
    "ping": ask("GET", "/_ping"),
    "list_services": ask("GET", "/services"),
    "list_containers": ask("GET", "/containers/json"),
    "inspect_policeman": ask("GET", "/services/" + stack + "_policeman"),
    "scale_policeman": ask("POST", "/services/" + stack + "_policeman/update?version=1", spec),
    "too_many": ask("POST", "/services/" + stack + "_developer/update?version=1",
                    json.dumps({"Mode": {"Replicated": {"Replicas": 50}}}).encode()),
}))
"""


def test_the_policemans_swarm_spawner_scales_developers_up_under_a_burst_and_down_when_idle(
    docker_client: Any, stack: dict[str, Any]
) -> None:
    """compose.swarm-spawner.yaml on the real stack: the policeman's autoscaler (the swarm spawner,
    through the socket proxy) adds developer-3 when tasks wait, the replica registers and takes
    work, and once idle it is drained, its container stopped and the service scaled back to 2."""
    import asyncio

    from casperd.settings import load_settings
    from casperd.spawners.swarm import SwarmSpawner

    service = f"{STACK}_developer"
    # replica ids are the service's CASPER_NODE_ID template with the slot (developer-<slot>)
    host = SwarmSpawner(
        load_settings({"role": "policeman", "swarm_service": service, "drain_timeout_s": 5}), client=docker_client
    )
    asyncio.run(host.refresh())
    d1, d2, d3 = (f"{host.prefix}{slot}" for slot in (1, 2, 3))
    wait_peers(docker_client, {d1, d2, "tester-1"}, timeout=300)  # the stack settled
    # the stack as deployed (2 developers, slots 1 and 2): the previous test's manual third replica
    # goes the way the spawner retires one (its container stopped, then scaled down), so the
    # remaining slots are 1 and 2 whatever Swarm would otherwise pick
    asyncio.run(host.refresh())
    if host.replicas > 2:
        asyncio.run(host.retire(d3))

    def slots_1_and_2() -> Any:
        asyncio.run(host.refresh())
        return host.slots == {1, 2}

    _wait("the developer service back to slots 1 and 2", 120, slots_1_and_2)

    env = {
        **stack["env"],
        "CASPER_SPAWN_MAX_DEVELOPERS": "3",
        "CASPER_AUTOSCALE_WAIT_S": "2",
        "CASPER_AUTOSCALE_IDLE_S": "20",
        "CASPER_AUTOSCALE_SPAWN_TIMEOUT_S": "300",
    }
    sh(
        "docker", "stack", "deploy", "--resolve-image", "never", "-c", "compose.swarm.yaml",
        "-c", "compose.swarm-spawner.yaml", STACK, env=env, timeout=300,
    )  # fmt: skip
    t0 = time.monotonic()

    def swarm_spawner_ready() -> Any:
        auto = _status(docker_client)["autoscale"]
        sp = auto["spawner"]
        return sp["kind"] == "swarm" and sp["error"] is None and sp["base_replicas"] == 2 and sp["replicas"] == 2

    try:
        _wait("the policeman restarted with the swarm spawner", 300, swarm_spawner_ready)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; {_diagnose(docker_client)}") from None
    wait_peers(docker_client, {d1, d2, "tester-1"}, timeout=240)
    ready_s = time.monotonic() - t0

    # the proxy lets through what the spawner needs and refuses the rest
    c = _policeman(docker_client)
    probe = sh("docker", "exec", "-u", f"{CASPER_UID}", c.id, "/opt/casper/bin/python", "-c", PROXY_PROBE, STACK)
    codes = json.loads(probe.stdout)
    assert codes == {
        "ping": 200,
        "list_services": 403,
        "list_containers": 403,
        "inspect_policeman": 403,
        "scale_policeman": 403,
        "too_many": 403,
    }, codes

    # a burst: 12 slots (2 developers and the tester, 4 each) and 60 twenty-second tasks keep tasks
    # waiting for over a minute and a half, long enough for a new replica to start and register
    gen = 'for i in $(seq 1 60); do echo "{\\"type\\": \\"sleep\\", \\"input\\": {\\"seconds\\": 20}}"; done'
    t1 = time.monotonic()
    caspectl(docker_client, "submit-bulk", "-", "--wait", "--wait-timeout", "600", stdin_cmd=gen, timeout=660)
    burst_s = time.monotonic() - t1
    tasks = caspectl(docker_client, "tasks", "--limit", "60")["tasks"]
    assert len(tasks) == 60 and {t["status"] for t in tasks} == {"complete"}, tasks
    holders = {t["assigned_to"] for t in tasks}
    assert d3 in holders, f"the spawned replica took no work: {holders}; {_diagnose(docker_client)}"
    decisions = _status(docker_client)["autoscale"]["decisions"]
    spawns = [d for d in decisions if d["kind"] == "spawn"]
    assert [d["node_id"] for d in spawns] == [d3], decisions
    assert spawns[0]["why"] == "backlog" and "tasks waiting" in spawns[0]["reason"], spawns

    # idle: drained, its container stopped, the service back to the stack's 2 replicas
    def retired() -> Any:
        names = {p["node_id"] for p in caspectl(docker_client, "peers")["peers"]}
        svc = docker_client.services.get(service)
        return d3 not in names and svc.attrs["Spec"]["Mode"]["Replicated"]["Replicas"] == 2

    t2 = time.monotonic()
    try:
        _wait(f"{d3} retired and the service scaled back to 2", 300, retired)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; {_diagnose(docker_client)}") from None
    shrink_s = time.monotonic() - t2
    kinds = [(d["kind"], d["node_id"]) for d in _status(docker_client)["autoscale"]["decisions"]]
    assert kinds.index(("drain", d3)) < kinds.index(("retire", d3)), kinds
    _wait(f"Swarm removed {d3}'s slot", 120, slots_1_and_2)
    print(
        f"swarm spawner: redeploy -> spawner ready {ready_s:.1f}s; burst of 60x20s tasks {burst_s:.1f}s "
        f"(holders {sorted(holders)}); idle -> scaled back in {shrink_s:.1f}s"
    )
