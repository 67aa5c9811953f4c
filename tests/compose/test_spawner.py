"""The docker spawner on a real compose mesh (compose.yaml + compose.spawner.yaml).

The policeman's autoscaler sees a backlog on the two developers, starts a developer container
through the socket proxy (with the developer pool's key pair and an id its pattern admits: it
registers and takes work), and removes it once it has been idle, draining it first: no task lost
or run twice. The proxy refuses what the spawner does not need.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.compose.composemesh import (
    COMPOSE_FILE,
    REPO,
    TEST_OVERRIDE,
    TIMINGS,
    ComposeMesh,
    compose_command,
    new_tag,
    poll,
    remove_project,
)

pytestmark = pytest.mark.compose
SPAWNER_FILE = REPO / "compose.spawner.yaml"


@pytest.fixture(scope="module")
def spawner_mesh(docker_client: Any, compose_images: dict[str, str], secrets_dir: Any) -> Iterator[ComposeMesh]:
    tuning = {
        "CASPER_SPAWN_MAX_DEVELOPERS": "3",
        "CASPER_AUTOSCALE_WAIT_S": "1",
        "CASPER_AUTOSCALE_IDLE_S": "8",
    }
    m = ComposeMesh(
        docker_client,
        compose_command() or [],
        secrets_dir,
        {**compose_images, **tuning},
        files=[COMPOSE_FILE, TEST_OVERRIDE, SPAWNER_FILE],
    )
    try:
        took = m.up(timeout=300)
        TIMINGS.append((f"up -> healthy mesh with the docker spawner ({m.project})", took))
        yield m
    finally:
        try:
            with contextlib.suppress(Exception):
                print(m.logs("policeman", "docker-proxy", tail=60))
            m.down()
        finally:
            remove_project(docker_client, m.project)


def spawned_containers(m: ComposeMesh) -> list[Any]:
    return m.client.containers.list(
        all=True, filters={"label": [f"com.docker.compose.project={m.project}", "casper.spawned=true"]}
    )


def test_docker_spawner_adds_a_developer_that_takes_work_and_removes_it_when_idle(
    spawner_mesh: ComposeMesh, secrets_dir: Path
) -> None:
    m = spawner_mesh
    assert m.caspectl("status")["autoscale"]["spawner"]["kind"] == "docker"
    tag = new_tag("spawn")
    # only developers may run these (requires llm): 8 slots on two developers, 4 s each: about a
    # minute of work, so a container that takes half a minute to start still finds some
    # (sleep's input is only seconds: each distinct by a microsecond; the tasks are found by id)
    tasks = [
        {"type": "sleep", "input": {"seconds": 4 + i * 1e-6}, "requires": ["llm"], "idempotency_key": f"{tag}-{i}"}
        for i in range(128)
    ]
    t0 = time.monotonic()
    ids = m.submit(tasks)
    spawned = poll(
        lambda: [p for p in m.peers().values() if p.get("spawned") and p["liveness"] == "alive"],
        timeout=180,
        what="a spawned developer registered",
    )
    up_s = time.monotonic() - t0
    (peer,) = spawned
    name = peer["node_id"]
    # the pool's id and key: enrolled as developer-pool-*, never developer-1's key
    assert name.startswith("developer-pool-") and "waiting" in (peer["spawn_reason"] or ""), peer
    pool_pub = (secrets_dir / "developer-pool.pub").read_text().strip()
    enrolled = {k["key"]: k for k in m.caspectl("keys", "list")["keys"]}
    assert enrolled[pool_pub]["pattern"] == "developer-pool-*" and enrolled[pool_pub]["online"] == name, enrolled
    (container,) = spawned_containers(m)
    assert container.labels["casper.node-id"] == name
    # started as compose.yaml starts casperd: root, cap_drop ALL + the four, the entrypoint drops
    assert container.attrs["Config"]["User"] == "0:0"
    assert container.attrs["HostConfig"]["CapDrop"] == ["ALL"]
    assert sorted(container.attrs["HostConfig"]["CapAdd"]) == ["CHOWN", "KILL", "SETGID", "SETUID"]
    mounts = {mt["Destination"]: mt["Source"] for mt in container.attrs["Mounts"]}
    assert mounts["/run/secrets/curve.key"].endswith("/developer-pool.key"), mounts
    assert mounts["/run/secrets/curve.pub"].endswith("/developer-pool.pub"), mounts
    ip = peer["endpoint"].removeprefix("tcp://").rsplit(":", 1)[0]
    assert ip.startswith(m.net + ".") and int(ip.rsplit(".", 1)[1]) >= 30
    where = "id in (" + ",".join(f"'{i}'" for i in ids) + ")"
    counts = poll(
        lambda: (
            (c := dict(m.psql(f"select status, count(*) from tasks where {where} group by 1")))
            and (c.get("complete") == str(len(ids)) or c.get("dead"))
            and c
        ),
        timeout=300,
        what="the burst finished",
    )
    assert counts == {"complete": str(len(ids))}, counts
    ran = {n: int(k) for n, k in m.psql(f"select assigned_to, count(*) from tasks where {where} group by 1")}
    assert ran.get(name, 0) > 0, f"the spawned developer took no work: {ran}"
    # idle: drained, then its container stopped and removed (with its volume)
    t1 = time.monotonic()
    poll(lambda: not spawned_containers(m), timeout=180, what="the spawned container removed")
    gone_s = time.monotonic() - t1
    assert name not in m.peers()
    attempts = m.psql(f"select max(attempts) from tasks where {where}")
    assert attempts == [["1"]], attempts  # none interrupted and run again
    kinds = [d["kind"] for d in m.caspectl("status")["autoscale"]["decisions"]]
    assert kinds.index("drain") < kinds.index("retire"), kinds
    TIMINGS.append((f"docker spawner: submit -> spawned developer alive ({name})", up_s))
    TIMINGS.append(("docker spawner: all done -> spawned container removed (idle 8 s)", gone_s))


def test_the_proxy_refuses_what_the_spawner_does_not_need(spawner_mesh: ComposeMesh) -> None:
    m = spawner_mesh
    code = (
        "import docker, json\n"
        "c = docker.from_env()\n"
        "out = {}\n"
        "def t(name, fn):\n"
        "    try:\n"
        "        fn(); out[name] = 'allowed'\n"
        "    except docker.errors.APIError as e:\n"
        "        out[name] = e.status_code\n"
        "t('ping', c.ping)\n"
        "t('run alpine', lambda: c.containers.create('alpine', 'true'))\n"
        "t('privileged', lambda: c.api.create_container(\n"
        "    c.containers.list(filters={'label': 'com.docker.compose.service=developer-1'})[0]\n"
        "    .attrs['Config']['Image'],\n"
        "    host_config=c.api.create_host_config(privileged=True)))\n"
        "t('exec', lambda: c.api.exec_create(c.containers.list()[0].id, 'id'))\n"
        "t('stop postgres', lambda: c.containers.list(\n"
        "    filters={'label': 'com.docker.compose.service=postgres'})[0].stop())\n"
        "t('images', lambda: c.images.list())\n"
        "print(json.dumps(out))\n"
    )
    proc = m.exec("policeman", ["/opt/casper/bin/python", "-c", code], timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {
        "ping": "allowed",
        "run alpine": 403,
        "privileged": 403,
        "exec": 403,
        "stop postgres": 403,
        "images": 403,
    }
