"""Docker Swarm: compose.swarm.yaml deployed as a stack on a single-node swarm, developers scaled.

The test makes its own swarm (``docker swarm init`` on loopback, an address pool checked against
the host's routes and Docker's networks) and always leaves it again, with the stack removed; an
engine that is already part of a swarm is not touched (the test skips and says why). No port is
published: traffic stays on the stack's own overlay networks and `docker exec`.

What it shows: the replicas find the policeman by name and advertise their own overlay address
(no fixed IPs); ``docker service scale`` adds a developer that registers and receives work.
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
    info = {"subnets": [ipaddress.ip_network(env[v]) for v in ("CASPER_SUBNET", "CASPER_INTERNAL_SUBNET")], "t0": t0}
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
