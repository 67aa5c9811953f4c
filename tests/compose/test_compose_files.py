"""The compose files as docker-compose reads them: valid, variables honoured, no secret values.

Only ``docker-compose config`` runs here (no engine, no containers), so these take seconds.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.compose.composemesh import COMPOSE_FILE, REPO, clean_env, compose_command, unavailable

pytestmark = [pytest.mark.compose, pytest.mark.timeout(120)]

SWARM_FILE = REPO / "compose.swarm.yaml"
NODES = ("policeman", "developer-1", "developer-2", "tester")


def config(*files: Path, env: dict[str, str] | None = None) -> str:
    cmd = compose_command()
    if cmd is None:
        unavailable("neither docker-compose nor the docker compose plugin is installed")
    base = {**clean_env(), **(env or {})}
    args = [*cmd, "-p", "casper-config-check"]
    for f in files:
        args += ["-f", str(f)]
    proc = subprocess.run(
        [*args, "config"], capture_output=True, text=True, timeout=60, env=base, cwd=REPO, stdin=subprocess.DEVNULL
    )
    assert proc.returncode == 0, f"{' '.join(args)} config failed:\n{proc.stderr}"
    return proc.stdout


def test_defaults_are_the_seed_plan_and_public_images() -> None:
    out = config(COMPOSE_FILE)
    for service, octet in (("policeman", 10), ("developer-1", 11), ("developer-2", 12), ("tester", 13)):
        assert f"ipv4_address: 172.20.0.{octet}" in out, service
    # Postgres and Redis are on the internal network only (issue #9)
    assert "172.20.0.20" not in out and "172.20.0.21" not in out
    assert "subnet: 172.20.0.0/16" in out and "gateway: 172.20.0.1" in out
    assert "internal: true" in out
    assert "image: casper:latest" in out
    assert "image: postgres:16-alpine" in out and "image: redis:7-alpine" in out
    assert "PYTHON_IMAGE: python:3.11-slim" in out
    assert out.count("condition: service_healthy") >= 2 + 2 * 3  # policeman: 2, each worker: 2
    assert "max-size: 10m" in out and "max-file: '3'" in out


def test_variables_move_the_mesh_and_its_images() -> None:
    out = config(
        COMPOSE_FILE,
        env={
            "CASPER_SUBNET": "10.99.1.0/24",
            "CASPER_NET": "10.99.1",
            "CASPER_INTERNAL_SUBNET": "10.99.2.0/24",
            "CASPER_IMAGE": "casper-local/casper",
            "VERSION": "0.1.0",
            "POSTGRES_IMAGE": "casper-local/postgres:16",
            "REDIS_IMAGE": "casper-local/redis:7",
            "CASPER_SECRETS_DIR": "/somewhere/secrets",
        },
    )
    assert "172.20." not in out and "172.21." not in out
    assert "ipv4_address: 10.99.1.10" in out and "CASPER_BROKER: tcp://10.99.1.10:5555" in out
    assert "subnet: 10.99.2.0/24" in out
    assert "image: casper-local/casper:0.1.0" in out
    assert "file: /somewhere/secrets/policeman.key" in out


def test_no_secret_values_in_the_environment() -> None:
    """Secrets reach the containers as files: every secret-looking variable is a *_FILE path."""
    out = config(COMPOSE_FILE)
    names = set(re.findall(r"^\s+([A-Z][A-Z0-9_]*):", out, re.M))
    secretish = {n for n in names if re.search(r"PASSWORD|SECRET|API_KEY|TOKEN", n)}
    assert secretish, "expected the *_FILE settings"
    assert all(n.endswith("_FILE") for n in secretish), sorted(secretish)
    assert "postgresql://casper@postgres:5432/casper" in out  # no password in the URL


def services_of(out: str) -> dict[str, str]:
    """Each service's block of `docker-compose config` output (top-level keys are unindented)."""
    section = out.split("\nservices:\n", 1)[1]
    section = re.split(r"^\S", section, maxsplit=1, flags=re.M)[0]
    parts = re.split(r"^  ([A-Za-z0-9_-]+):\n", section, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_trust_settings_reach_every_node_and_the_api_key_only_claude_users() -> None:
    """Enrollment, the Redis password and the cache key on every casperd; the API key only on the
    policeman and the developers; Postgres and Redis on the internal network only (issue #9)."""
    services = services_of(config(COMPOSE_FILE))
    for name in NODES:
        block = services[name]
        assert "CASPER_AUTHORIZED_KEYS_FILE: /run/secrets/authorized_keys" in block, name
        for secret in ("authorized_keys", "redis_password", "cache_key"):
            assert f"source: {secret}" in block, (name, secret)
        assert ("source: anthropic_api_key" in block) == (name != "tester"), name
    for name in ("redis", "postgres"):
        nets = services[name].split("networks:", 1)[1]
        assert "claude-internal" in nets and "claude-net" not in nets, name
    assert "requirepass" in services["redis"] and "REDISCLI_AUTH" in services["redis"]


def test_swarm_file_is_valid_and_scales_developers() -> None:
    out = config(SWARM_FILE)
    assert "replicas:" in out and "update_config:" in out and "constraints:" in out
    assert "driver: overlay" in out


def test_swarm_spawner_override_adds_the_proxy_and_opts_the_policeman_in() -> None:
    out = config(SWARM_FILE, REPO / "compose.swarm-spawner.yaml", env={"CASPER_DEVELOPERS": "3"})
    assert "docker-proxy:" in out and "/var/run/docker.sock:/var/run/docker.sock" in out
    assert "CASPER_SPAWNER: swarm" in out and "DOCKER_HOST: tcp://docker-proxy:2375" in out
    assert "CASPER_SWARM_BASE_REPLICAS: '3'" in out or 'CASPER_SWARM_BASE_REPLICAS: "3"' in out
    assert "com.docker.stack.namespace" in out and "PROXY_MAX_REPLICAS: '8'" in out
    # the socket only in the proxy, and the proxy only on the internal spawner-net
    assert out.count("/var/run/docker.sock:/var/run/docker.sock") == 1
    proxy = out.split("\n  docker-proxy:\n", 1)[1].split("\n  policeman:\n", 1)[0]
    assert "docker.sock" in proxy and "spawner-net" in proxy and "claude-" not in proxy
    police = out.split("\n  policeman:\n", 1)[1].split("\n  postgres:\n", 1)[0]
    assert "spawner-net" in police and "claude-net" in police and "claude-internal" in police


def test_casperd_starts_as_root_with_only_the_task_user_capabilities() -> None:
    """Issue #9 point 5: every casperd container (compose, the spawner override, the swarm stack)
    starts as root with cap_drop ALL and cap_add exactly SETUID, SETGID, CHOWN, KILL, for the
    entrypoint to become casper and casperd to run task code as casper-task; the healthcheck
    runs caspectl as casper through the entrypoint."""
    spawner = REPO / "compose.spawner.yaml"
    developer_3 = REPO / "tests" / "compose" / "compose.developer-3.yaml"
    for files, nodes in (
        ((COMPOSE_FILE,), NODES),
        ((COMPOSE_FILE, developer_3), ("developer-3",)),
        ((COMPOSE_FILE, spawner), NODES),
        ((SWARM_FILE,), ("policeman", "developer", "tester")),
    ):
        services = yaml.safe_load(config(*files))["services"]
        for name in nodes:
            svc = services[name]
            assert str(svc["user"]) == "0:0", (files, name)
            assert svc["cap_drop"] == ["ALL"], (files, name)
            assert sorted(svc["cap_add"]) == ["CHOWN", "KILL", "SETGID", "SETUID"], (files, name)
            assert svc["healthcheck"]["test"][:3] == ["CMD", "casper-entrypoint", "caspectl"], (files, name)
            if files != (SWARM_FILE,):
                assert svc["security_opt"] == ["no-new-privileges:true"], (files, name)


def test_pool_key_for_spawned_and_replica_developers() -> None:
    """Spawned developers (compose.spawner.yaml) and swarm replicas share the developer pool's key
    pair, with ids the pool's pattern (developer-pool-*) admits."""
    spawner = yaml.safe_load(config(COMPOSE_FILE, REPO / "compose.spawner.yaml"))
    proxy = {s["target"]: s["source"] for s in spawner["services"]["docker-proxy"]["secrets"]}
    assert proxy == {"developer-pool.key": "developer_pool_curve_key", "developer-pool.pub": "developer_pool_curve_pub"}
    assert spawner["secrets"]["developer_pool_curve_key"]["file"].endswith("/developer-pool.key")
    assert not any("pool" in str(s) for s in spawner["services"]["policeman"]["secrets"])  # never the policeman
    swarm = yaml.safe_load(config(SWARM_FILE))
    dev = swarm["services"]["developer"]
    assert dev["environment"]["CASPER_NODE_ID"] == "developer-pool-{{.Task.Slot}}"
    keys = {s["target"]: s["source"] for s in dev["secrets"] if s.get("target") in ("curve.key", "curve.pub")}
    assert keys == {"curve.key": "developer_pool_curve_key", "curve.pub": "developer_pool_curve_pub"}
    assert swarm["secrets"]["developer_pool_curve_key"]["file"].endswith("/developer-pool.key")
