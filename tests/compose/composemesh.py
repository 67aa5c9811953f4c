"""A CASPER mesh from compose.yaml, as one docker-compose project on subnets of its own.

Theory of operation. :class:`ComposeMesh` runs the repository's ``compose.yaml`` (plus the test
tuning in ``compose.test.yaml``) with ``docker-compose -p casper-test-PID-HEX up -d``. Its
addresses come from the variables compose.yaml reads (``CASPER_SUBNET``, ``CASPER_NET``,
``CASPER_INTERNAL_SUBNET``): a pair of /24s in 10.233.0.0/16 that no Docker network and no host
route uses, so it never meets the default 172.20.0.0/16 mesh, another test run, or the
network-namespace lab of tests/faults (10.231.X). Every command is bounded by a timeout; the
tests reach the mesh only through ``docker exec``/``docker-compose exec`` into its own
containers, never through the network.

``down()`` is ``docker-compose down -v --remove-orphans`` and, should that fail, removes the
project's containers, networks and volumes through the Docker API by their compose labels.
:func:`leftovers` lists what remains of a project (the leak check). Projects of a killed test run
(its pid, part of the project name, is gone) are swept by :func:`sweep_stale_projects`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import random
import secrets
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import pytest

try:  # a [test] dependency; without it the tier skips (conftest.py) instead of failing to import
    import docker
    import docker.errors
except ImportError:  # pragma: no cover
    docker = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from docker.models.containers import Container

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "compose.yaml"
TEST_OVERRIDE = Path(__file__).with_name("compose.test.yaml")
PROJECT_PREFIX = "casper-test-"
LABEL_PROJECT = "com.docker.compose.project"
LABEL_SERVICE = "com.docker.compose.service"

SERVICES = ("postgres", "redis", "policeman", "developer-1", "developer-2", "tester")
NODES = ("policeman", "developer-1", "developer-2", "tester")
WORKERS = ("developer-1", "developer-2", "tester")
#: last octet of each service's fixed address on claude-net (compose.yaml's plan)
ADDRESS = {
    "policeman": 10,
    "developer-1": 11,
    "developer-2": 12,
    "tester": 13,
    "developer-3": 14,
    "redis": 20,
    "postgres": 21,
}
CASPER_UID = 10001
#: casper-task: the user task code runs as in the casper image (casperd --task-user auto)
TASK_UID = 10002
#: services that are not casperd nodes (their own users; ``exec`` does not switch to casper)
DATA_SERVICES = ("postgres", "redis", "docker-proxy")

#: every project made by this process, for the session-end leak check
CREATED: list[str] = []
#: (what, seconds) measurements, printed at the end of the session
TIMINGS: list[tuple[str, float]] = []


class ComposeError(RuntimeError):
    """A docker-compose or docker command failed or did not finish in time."""


def unavailable(reason: str) -> NoReturn:
    """Skip (on a laptop without Docker), or fail where the tier is required (CI, or
    CASPER_REQUIRE_COMPOSE=1)."""
    if os.environ.get("CASPER_REQUIRE_COMPOSE") == "1" or os.environ.get("CI"):
        pytest.fail(f"compose tier required but unavailable: {reason}", pytrace=False)
    pytest.skip(f"compose tier: {reason}")


def compose_command() -> list[str] | None:
    """``docker-compose`` (v1), else the ``docker compose`` plugin (v2), else None."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            if subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30).returncode == 0:
                return ["docker", "compose"]
    return None


def clean_env() -> dict[str, str]:
    """This process's environment without anything compose.yaml reads (CASPER_*, COMPOSE_*, the
    image variables): a developer's shell settings must not leak into the test meshes."""
    drop = {"VERSION", "PYTHON_IMAGE", "POSTGRES_IMAGE", "REDIS_IMAGE", "POSTGRES_UID", "POSTGRES_GID"}
    return {k: v for k, v in os.environ.items() if not k.startswith(("CASPER_", "COMPOSE_")) and k not in drop}


# --- addresses ------------------------------------------------------------------------------------
def _host_routes() -> list[ipaddress.IPv4Network]:
    nets = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/route").read_text().splitlines()[1:]:
            cols = line.split()
            if len(cols) < 8:
                continue
            dest = ipaddress.IPv4Address(int(cols[1], 16).to_bytes(4, "little"))
            mask = ipaddress.IPv4Address(int(cols[7], 16).to_bytes(4, "little"))
            if int(mask):  # the default route covers everything; ignore it
                nets.append(ipaddress.IPv4Network(f"{dest}/{mask}", strict=False))
    return nets


def _docker_subnets(client: docker.DockerClient) -> list[ipaddress.IPv4Network]:
    nets = []
    for net in client.networks.list():
        for cfg in (net.attrs.get("IPAM") or {}).get("Config") or []:
            with contextlib.suppress(KeyError, ValueError, TypeError):
                sub = ipaddress.ip_network(cfg["Subnet"], strict=False)
                if isinstance(sub, ipaddress.IPv4Network):
                    nets.append(sub)
    return nets


def free_subnet_pair(client: docker.DockerClient, avoid: Iterable[int] = ()) -> int:
    """A k such that 10.233.(2k).0/24 (claude-net) and 10.233.(2k+1).0/24 (internal) are unused."""
    taken = _host_routes() + _docker_subnets(client)
    candidates = [k for k in range(1, 127) if k not in set(avoid)]
    random.shuffle(candidates)
    for k in candidates:
        pair = [ipaddress.IPv4Network(f"10.233.{2 * k + i}.0/24") for i in (0, 1)]
        if not any(p.overlaps(t) for p in pair for t in taken):
            return k
    raise ComposeError("no free /24 pair left in 10.233.0.0/16 (docker networks or host routes use them all)")


# --- the mesh -------------------------------------------------------------------------------------
@dataclass
class ComposeMesh:
    client: docker.DockerClient
    compose: list[str]
    secrets_dir: Path
    images: dict[str, str]
    """CASPER_IMAGE, VERSION, POSTGRES_IMAGE, REDIS_IMAGE"""
    health_interval: str = "5s"
    project: str = field(default_factory=lambda: f"{PROJECT_PREFIX}{os.getpid()}-{secrets.token_hex(3)}")
    files: list[Path] = field(default_factory=lambda: [COMPOSE_FILE, TEST_OVERRIDE])
    k: int = 0

    # --- addresses and environment ------------------------------------------------------------
    @property
    def net(self) -> str:
        return f"10.233.{2 * self.k}"

    def ip(self, service: str) -> str:
        return f"{self.net}.{ADDRESS[service]}"

    @property
    def claude_net(self) -> str:
        return f"{self.project}_claude-net"

    @property
    def env(self) -> dict[str, str]:
        env = clean_env()
        env.update(self.images)
        env.update(
            {
                "CASPER_SUBNET": f"{self.net}.0/24",
                "CASPER_NET": self.net,
                "CASPER_INTERNAL_SUBNET": f"10.233.{2 * self.k + 1}.0/24",
                "CASPER_SECRETS_DIR": str(self.secrets_dir),
                "CASPER_HEALTHCHECK_INTERVAL": self.health_interval,
            }
        )
        return env

    # --- docker-compose -----------------------------------------------------------------------
    def run(
        self,
        *args: str,
        stdin: str | None = None,
        timeout: float = 120,
        check: bool = True,
        files: Sequence[Path] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        cmd = [*self.compose, "-p", self.project]
        for f in files if files is not None else self.files:
            cmd += ["-f", str(f)]
        cmd += list(args)
        try:
            proc = subprocess.run(
                cmd,
                input=stdin,
                capture_output=True,
                text=True,
                timeout=timeout,
                env=self.env,
                cwd=REPO,
                stdin=None if stdin is not None else subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as exc:
            raise ComposeError(f"{' '.join(cmd[:8])} ... did not finish within {timeout:.0f}s") from exc
        if check and proc.returncode != 0:
            raise ComposeError(
                f"{' '.join(args[:3])} failed ({proc.returncode}):\n{proc.stderr[-4000:]}\n{proc.stdout[-2000:]}"
            )
        return proc

    def up(self, timeout: float = 300) -> float:
        """Create the project on a free subnet pair and wait until every service is healthy and
        every worker is registered; returns the seconds that took."""
        self.check_images()
        tried: list[int] = []
        for attempt in range(3):
            self.k = free_subnet_pair(self.client, tried)
            tried.append(self.k)
            if self.project not in CREATED:
                CREATED.append(self.project)
            t0 = time.monotonic()
            proc = self.run("up", "-d", "--no-build", timeout=timeout, check=False)
            if proc.returncode == 0:
                self.wait_healthy(SERVICES, timeout=max(30.0, timeout - (time.monotonic() - t0)))
                self.wait_peers(set(WORKERS), timeout=60)
                return time.monotonic() - t0
            logs = self.logs(*SERVICES, tail=30)
            self.down()
            if "overlap" not in proc.stderr.lower() or attempt == 2:  # a race for the subnet: try another
                raise ComposeError(f"docker-compose up failed ({proc.returncode}):\n{proc.stderr[-4000:]}\n{logs}")
        raise AssertionError("unreachable")

    def check_images(self) -> None:
        """Every image must be here already: the tests never pull (no traffic leaves the host)."""
        wanted = [
            f"{self.images['CASPER_IMAGE']}:{self.images['VERSION']}",
            self.images["POSTGRES_IMAGE"],
            self.images["REDIS_IMAGE"],
        ]
        for ref in wanted:
            try:
                self.client.images.get(ref)
            except docker.errors.ImageNotFound:
                raise ComposeError(
                    f"image {ref} is not on this engine; build it first (containers/build-local-images.sh --app)"
                ) from None

    def down(self) -> None:
        """Remove everything of the project (containers, networks, volumes), whatever state it is in."""
        with contextlib.suppress(ComposeError):
            self.run("down", "-v", "--remove-orphans", "-t", "15", timeout=180)
        remove_project(self.client, self.project)

    # --- containers -----------------------------------------------------------------------------
    def containers(self) -> list[Container]:
        return self.client.containers.list(all=True, filters={"label": f"{LABEL_PROJECT}={self.project}"})

    def container(self, service: str) -> Container:
        found = self.client.containers.list(
            all=True, filters={"label": [f"{LABEL_PROJECT}={self.project}", f"{LABEL_SERVICE}={service}"]}
        )
        if len(found) != 1:
            raise ComposeError(f"expected one container of {service} in {self.project}, found {len(found)}")
        return found[0]

    def health(self, service: str) -> str:
        c = self.container(service)
        c.reload()
        state = c.attrs["State"]
        return (state.get("Health") or {}).get("Status") or state["Status"]

    def wait_healthy(self, services: Iterable[str], timeout: float) -> None:
        services = list(services)
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            states = {s: self.health(s) for s in services}
            if all(v == "healthy" for v in states.values()):
                return
            bad = {s: v for s, v in states.items() if v in ("exited", "dead", "unhealthy")}
            if bad:
                raise ComposeError(f"services failed: {bad}\n{self.logs(*bad, tail=30)}")
            time.sleep(0.5)
        raise ComposeError(f"not healthy within {timeout:.0f}s: {states}\n{self.logs(*services, tail=20)}")

    def logs(self, *services: str, tail: int = 50) -> str:
        out = []
        for s in services:
            with contextlib.suppress(ComposeError, docker.errors.APIError):
                text = self.container(s).logs(tail=tail).decode(errors="replace")
                out.append(f"--- {s} (last {tail} lines)\n{text}")
        return "\n".join(out)

    def exec(
        self,
        service: str,
        cmd: Sequence[str],
        *,
        user: str | None = None,
        stdin: str | None = None,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        """``docker exec`` into the service's container (its environment: CASPER_CONTROL etc.).

        In a casperd container it runs as casper unless ``user`` says otherwise: the containers
        start as root (the entrypoint then becomes casper), and that root cannot read casper's
        files or reach the control socket."""
        if user is None and service not in DATA_SERVICES:
            user = "casper"
        args = ["docker", "exec"]
        if stdin is not None:
            args.append("-i")
        if user:
            args += ["-u", user]
        args += [self.container(service).id, *cmd]
        try:
            return subprocess.run(
                args,
                input=stdin,
                capture_output=True,
                text=True,
                timeout=timeout,
                stdin=None if stdin is not None else subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as exc:
            raise ComposeError(f"docker exec {service} {' '.join(cmd)[:80]} took over {timeout:.0f}s") from exc

    # --- CASPER -----------------------------------------------------------------------------------
    def caspectl(self, *args: str, service: str = "policeman", timeout: float = 30) -> Any:
        proc = self.exec(service, ["caspectl", *args, "-o", "json", "--timeout", "10"], timeout=timeout)
        if proc.returncode != 0:
            raise ComposeError(
                f"caspectl {' '.join(args)} on {service}: exit {proc.returncode}: "
                f"{proc.stdout[-2000:]} {proc.stderr[-2000:]}"
            )
        return json.loads(proc.stdout)

    def peers(self) -> dict[str, dict[str, Any]]:
        return {p["node_id"]: p for p in self.caspectl("peers")["peers"]}

    def wait_peers(self, alive: set[str], timeout: float, absent: Iterable[str] = ()) -> dict[str, Any]:
        """Until every node in ``alive`` is registered and alive and none in ``absent`` is."""
        absent = set(absent)
        deadline = time.monotonic() + timeout
        peers: dict[str, Any] = {}
        while time.monotonic() < deadline:
            with contextlib.suppress(ComposeError, ValueError):
                peers = self.peers()
                live = {n for n, p in peers.items() if p["liveness"] == "alive"}
                if alive <= live and not (absent & set(peers)):
                    return peers
            time.sleep(0.5)
        raise ComposeError(
            f"peers not {sorted(alive)} alive (and {sorted(absent)} gone) within {timeout:.0f}s: "
            f"{ {n: (p['liveness'], p['breaker']) for n, p in peers.items()} }"
        )

    def submit(self, tasks: list[dict[str, Any]], timeout: float = 60) -> list[str]:
        """Submit without waiting (``caspectl submit-bulk -``); returns the task ids."""
        lines = "".join(json.dumps(t) + "\n" for t in tasks)
        proc = self.exec(
            "policeman", ["caspectl", "submit-bulk", "-", "-o", "json", "--timeout", "30"], stdin=lines, timeout=timeout
        )
        if proc.returncode != 0:
            raise ComposeError(f"submit-bulk: exit {proc.returncode}: {proc.stdout[-2000:]} {proc.stderr[-2000:]}")
        ids = json.loads(proc.stdout)["ids"]
        assert len(ids) == len(tasks)
        return ids

    def psql(self, sql: str, timeout: float = 30) -> list[list[str]]:
        """Rows of ``psql -tA`` inside the postgres container (local socket, user casper)."""
        proc = self.exec(
            "postgres", ["psql", "-U", "casper", "-d", "casper", "-v", "ON_ERROR_STOP=1", "-tAc", sql], timeout=timeout
        )
        if proc.returncode != 0:
            raise ComposeError(f"psql failed ({proc.returncode}): {proc.stderr[-2000:]}")
        return [line.split("|") for line in proc.stdout.splitlines() if line]

    def counts(self, tag: str) -> dict[str, int]:
        """Tasks tagged ``tag`` (see :func:`tagged`), by status (the database's view)."""
        rows = self.psql(f"select status, count(*) from tasks where {tagged(tag)} group by 1")
        return {status: int(n) for status, n in rows}

    def wait_complete(self, tag: str, n: int, timeout: float) -> dict[str, int]:
        deadline = time.monotonic() + timeout
        counts: dict[str, int] = {}
        while time.monotonic() < deadline:
            with contextlib.suppress(ComposeError):
                counts = self.counts(tag)
                if counts.get("complete", 0) >= n or counts.get("dead") or counts.get("cancelled"):
                    return counts
            time.sleep(1.0)
        return counts

    def ran_on(self, tag: str) -> dict[str, int]:
        """Completed tasks tagged ``tag`` (see :func:`tagged`), by the node that completed them."""
        rows = self.psql(
            f"select assigned_to, count(*) from tasks where {tagged(tag)} and status = 'complete' group by 1"
        )
        return {node: int(n) for node, n in rows}


def sleep_tasks(n: int, seconds: float, tag: str) -> list[dict[str, Any]]:
    """``n`` sleeps tagged ``tag``: ``sleep`` takes only ``seconds`` (and ``fail``), so the tag is in
    each task's idempotency key (``TAG:i``) and the i-th sleeps i microseconds longer."""
    return [
        {"type": "sleep", "input": {"seconds": seconds + i * 1e-6}, "idempotency_key": f"{tag}:{i}"} for i in range(n)
    ]


def tagged(tag: str, table: str = "") -> str:
    """SQL: the task row (of ``table``, an alias, if given) is tagged ``tag`` — its input's ``tag``
    (echo tasks) or an idempotency key ``TAG:…`` (sleep tasks, see :func:`sleep_tasks`)."""
    t, p = _sql_str(tag), f"{table}." if table else ""
    keyed = f"select task_id from task_idempotency where starts_with(key, '{t}:')"
    return f"({p}input->>'tag' = '{t}' or {p}id in ({keyed}))"


def new_tag(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def _sql_str(text: str) -> str:
    return text.replace("'", "''")


def poll(predicate: Any, timeout: float, interval: float = 0.5, what: str = "condition") -> Any:
    """Call ``predicate()`` until it returns something truthy; ComposeError after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except (ComposeError, ValueError, KeyError) as exc:
            last_exc = exc
        time.sleep(interval)
    raise ComposeError(f"{what}: not within {timeout:.0f}s" + (f" (last error: {last_exc})" if last_exc else ""))


# --- cleanup --------------------------------------------------------------------------------------
def remove_project(client: docker.DockerClient, project: str) -> None:
    """Force-remove a project's containers, then its networks and volumes (by compose labels)."""
    label = {"label": f"{LABEL_PROJECT}={project}"}
    for c in client.containers.list(all=True, filters=label):
        with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
            c.remove(force=True, v=True)
    for n in client.networks.list(filters=label):
        with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
            n.remove()
    for v in client.volumes.list(filters=label):
        with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
            v.remove(force=True)


def leftovers(client: docker.DockerClient, project: str) -> list[str]:
    label = {"label": f"{LABEL_PROJECT}={project}"}
    return (
        [f"container {c.name}" for c in client.containers.list(all=True, filters=label)]
        + [f"network {n.name}" for n in client.networks.list(filters=label)]
        + [f"volume {v.name}" for v in client.volumes.list(filters=label)]
    )


def sweep_stale_projects(client: docker.DockerClient) -> list[str]:
    """Remove test projects whose owning process (the pid in their name) is gone."""
    projects = set()
    for c in client.containers.list(all=True, filters={"label": LABEL_PROJECT}):
        projects.add(c.labels.get(LABEL_PROJECT, ""))
    for n in client.networks.list(filters={"label": LABEL_PROJECT}):
        projects.add((n.attrs.get("Labels") or {}).get(LABEL_PROJECT, ""))
    for v in client.volumes.list(filters={"label": LABEL_PROJECT}):
        projects.add((v.attrs.get("Labels") or {}).get(LABEL_PROJECT, ""))
    swept = []
    for project in sorted(p for p in projects if p.startswith(PROJECT_PREFIX)):
        try:
            pid = int(project[len(PROJECT_PREFIX) :].split("-")[0])
            os.kill(pid, 0)
            continue  # its owner still runs: leave it alone
        except ProcessLookupError:
            pass
        except (ValueError, OSError):
            continue
        remove_project(client, project)
        swept.append(project)
    return swept
