"""Fixtures for the compose tier: the repository's compose.yaml on the local Docker engine.

Session: ``docker_client`` skips the tier, with the reason, when there is no Docker engine or no
docker-compose (set CASPER_REQUIRE_COMPOSE=1, or CI, to fail instead); ``compose_images`` runs
``containers/build-local-images.sh --app`` (cached: seconds when nothing changed, minutes on a
cold machine; CASPER_COMPOSE_BUILD=0 skips it and uses the images named by CASPER_IMAGE,
VERSION, POSTGRES_IMAGE and REDIS_IMAGE, or the casper-local ones); ``secrets_dir`` runs
``containers/make-secrets.sh`` into a temporary directory.

Module: ``mesh`` brings one compose project up on subnets of its own and always takes it down
(``down -v --remove-orphans``, then by labels), failing the teardown if anything of it is left.
Per test: ``healthy_mesh`` puts back what an earlier test may have left broken (a stopped
container, a disconnected network) and waits until the three workers are registered and alive.

The first compose test's time limit covers a cold image build (CASPER_COMPOSE_BUILD_TIMEOUT,
default 2400 s); every other test has 600 s, and every command inside has its own timeout.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.compose.composemesh import (
    CREATED,
    REPO,
    TIMINGS,
    WORKERS,
    ComposeMesh,
    compose_command,
    leftovers,
    remove_project,
    sweep_stale_projects,
    unavailable,
)

TESTS_DIR = Path(__file__).resolve().parent
BUILD_TIMEOUT = float(os.environ.get("CASPER_COMPOSE_BUILD_TIMEOUT", "2400"))
TEST_TIMEOUT = 600
LOCAL_IMAGES = {
    "CASPER_IMAGE": "casper-local/casper",
    "VERSION": "latest",
    "POSTGRES_IMAGE": "casper-local/postgres:16",
    "REDIS_IMAGE": "casper-local/redis:7",
}
EXTRA_NODES = ("developer-3",)  # keys for the developer test_mesh.py adds


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The first selected compose test also pays for the image build: give it that much longer."""
    for item in items:
        uses_images = {"mesh", "healthy_mesh", "compose_images"} & set(getattr(item, "fixturenames", ()))
        if TESTS_DIR in Path(item.path).resolve().parents and uses_images:
            item.add_marker(pytest.mark.timeout(BUILD_TIMEOUT + TEST_TIMEOUT))
            break


@pytest.fixture(scope="session")
def docker_client():  # -> docker.DockerClient
    from tests.compose.composemesh import docker

    if docker is None:
        unavailable("the docker Python package is not installed (pip install -e '.[test]')")
    try:
        client = docker.from_env(timeout=120)
        client.ping()
    except Exception as exc:  # no socket, no permission, daemon down: all mean "no engine"
        unavailable(f"no Docker engine reachable ({type(exc).__name__}: {exc})")
    if compose_command() is None:
        unavailable("neither docker-compose nor the docker compose plugin is installed")
    swept = sweep_stale_projects(client)
    if swept:
        print(f"swept compose projects of killed test runs: {swept}")
    yield client
    client.close()


@pytest.fixture(scope="session")
def compose_images(docker_client, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The images the meshes run, built (or found in the build cache) by build-local-images.sh."""
    if os.environ.get("CASPER_COMPOSE_BUILD", "1") == "0":
        return {k: os.environ.get(k, v) for k, v in LOCAL_IMAGES.items()}
    log = tmp_path_factory.mktemp("build") / "build-local-images.log"
    t0 = time.monotonic()
    with open(log, "wb") as fh:
        try:
            proc = subprocess.run(
                [str(REPO / "containers" / "build-local-images.sh"), "--app"],
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=REPO,
                timeout=BUILD_TIMEOUT,
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"build-local-images.sh --app took over {BUILD_TIMEOUT:.0f}s; log: {log}", pytrace=False)
    TIMINGS.append(("build-local-images.sh --app", time.monotonic() - t0))
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        pytest.fail(f"build-local-images.sh --app failed ({proc.returncode}); log {log}:\n{tail}", pytrace=False)
    return dict(LOCAL_IMAGES)


@pytest.fixture(scope="session")
def secrets_dir(compose_images: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secrets") / "secrets"
    # no API key in the test meshes, whatever this shell has: they must never call a real API
    env = {**{k: v for k, v in os.environ.items() if k != "ANTHROPIC_API_KEY"}, **compose_images}
    proc = subprocess.run(
        [str(REPO / "containers" / "make-secrets.sh"), str(path), *EXTRA_NODES],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, f"make-secrets.sh failed ({proc.returncode}):\n{proc.stderr}"
    return path


@pytest.fixture(scope="module")
def mesh(docker_client, compose_images: dict[str, str], secrets_dir: Path) -> Iterator[ComposeMesh]:
    m = ComposeMesh(docker_client, compose_command() or [], secrets_dir, compose_images)
    try:
        took = m.up(timeout=300)
        TIMINGS.append((f"up -> healthy mesh ({m.project}, healthchecks every {m.health_interval})", took))
        yield m
    finally:
        try:
            with contextlib.suppress(Exception):
                print(m.logs("policeman", "developer-1", "developer-2", "tester", tail=40))
            m.down()
        finally:
            remove_project(docker_client, m.project)
    left = leftovers(docker_client, m.project)
    assert not left, f"compose project {m.project} left behind: {left}"


@pytest.fixture
def healthy_mesh(mesh: ComposeMesh) -> ComposeMesh:
    """The module's mesh with every service running, every worker on claude-net, all registered."""
    for service in ("postgres", "redis", "policeman", *WORKERS):
        c = mesh.container(service)
        c.reload()
        if c.status != "running":
            c.start()
        if service in WORKERS and mesh.claude_net not in c.attrs["NetworkSettings"]["Networks"]:
            mesh.client.networks.get(mesh.claude_net).connect(c, ipv4_address=mesh.ip(service))
    mesh.wait_peers(set(WORKERS), timeout=90)
    return mesh


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if not TIMINGS and not CREATED:
        return
    terminalreporter.section("compose tier")
    for what, seconds in TIMINGS:
        terminalreporter.write_line(f"{seconds:7.1f} s  {what}")
    with contextlib.suppress(Exception):
        import docker

        client = docker.from_env(timeout=30)
        for ref in (
            "casper-local/casper:latest",
            "casper-local/python:3.11-slim",
            "casper-local/postgres:16",
            "casper-local/redis:7",
        ):
            with contextlib.suppress(docker.errors.ImageNotFound):
                size = client.images.get(ref).attrs["Size"]
                terminalreporter.write_line(f"{size / 1e6:7.0f} MB {ref}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not CREATED:
        return
    import docker

    client = docker.from_env(timeout=60)
    left = {p: leftovers(client, p) for p in CREATED}
    left = {p: v for p, v in left.items() if v}
    if left:
        for p in left:
            remove_project(client, p)
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"LEAK: compose projects left behind (now removed): {left}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
