"""A CASPER mesh spread over the hosts of a :class:`~tests.faults.netns.NetnsLab`.

Hosts (fixed IPs on the lab subnet)::

    db            .10   Postgres (as casper-pg) and Redis, listening on the lab IP only
    policeman     .11   casperd policeman, mesh ROUTER on tcp://.11:5555
    developer-1   .12   casperd developer, connects to the policeman over the lab bridge
    developer-2   .13   ...

All mesh, database and cache traffic crosses the lab's bridge; nothing listens on, or talks
to, an address outside the lab. The test process in the root namespace reaches the mesh and the
ledger only through files: the nodes' ``ipc://`` control sockets and Postgres's unix socket
(filesystem sockets work across network namespaces).

Postgres: the cluster is made with :class:`casperd.embedded.EmbeddedPostgres` (initdb, the
``casper`` database and the SCRAM password, on 127.0.0.1 of the root namespace, then stopped),
then the same binaries and data run inside the ``db`` host with a ``pg_hba`` line for the lab
subnet. Data lives under ``tempfile.mkdtemp`` (not pytest's 0700 tmp tree: casper-pg must
traverse it).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import redis

from casperd.childserver import free_port
from casperd.embedded import PG_DB, PG_SYSTEM_USER, PG_USER, EmbeddedPostgres, postgres_bin
from casperd.embedded_redis import redis_server_bin
from casperd.localmesh import LocalMesh
from tests.faults.netns import NetnsLab

PG_PORT = 5432
REDIS_PORT = 6379
MESH_PORT = 5555


@dataclass
class NetnsMesh:
    lab: NetnsLab
    root: Path
    developers: int = 2
    heartbeat_s: float = 0.5
    extra_env: dict[str, str] = field(default_factory=dict)
    mesh: LocalMesh | None = None
    password: str = ""
    passfile: Path | None = None
    pg_proc: subprocess.Popen[bytes] | None = None
    redis_proc: subprocess.Popen[bytes] | None = None

    @property
    def pg_socket_dir(self) -> Path:
        return self.root / "pgsock"

    @property
    def log_dir(self) -> Path:
        return self.root / "logs"

    # --- services in the db host --------------------------------------------------------------
    def start_services(self) -> None:
        self.lab.add_host("db")
        db_ip = self.lab.ip("db")
        # initdb + CREATE DATABASE + password, on the root namespace's loopback; then stopped
        pg = EmbeddedPostgres(self.root / "postgres", free_port())
        pg.start()
        pg.stop()
        self.password = pg.passfile.read_text().strip().rsplit(":", 1)[1]
        pgdata = pg.data_dir / "pgdata"
        with open(pgdata / "pg_hba.conf", "a") as fh:
            fh.write(f"\n# the fault lab's hosts\nhost all all {self.lab.subnet} scram-sha-256\n")
        passfile = self.root / "secrets" / "pgpass-lab"
        fd = os.open(passfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(f"*:{PG_PORT}:*:{PG_USER}:{self.password}\n")
        self.passfile = passfile
        user = pwd.getpwnam(PG_SYSTEM_USER)
        self.pg_socket_dir.mkdir(mode=0o700)
        os.chown(self.pg_socket_dir, user.pw_uid, user.pw_gid)
        self.log_dir.mkdir(exist_ok=True)
        with open(self.log_dir / "postgres-db-host.log", "ab") as logf:
            self.pg_proc = self.lab.run(
                "db",
                [
                    postgres_bin() / "postgres",
                    "-D",
                    pgdata,
                    "-p",
                    PG_PORT,
                    "-c",
                    f"listen_addresses={db_ip}",
                    "-c",
                    f"unix_socket_directories={self.pg_socket_dir}",
                    "-c",
                    "max_connections=60",
                    "-c",
                    "shared_buffers=32MB",
                    "-c",
                    "fsync=off",
                    "-c",
                    "logging_collector=off",
                ],
                user=PG_SYSTEM_USER,
                stdout=logf,
                stderr=logf,
            )
        redis_dir = self.root / "redis"
        redis_dir.mkdir()
        with open(self.log_dir / "redis-db-host.log", "ab") as logf:
            self.redis_proc = self.lab.run(
                "db",
                [
                    redis_server_bin(),
                    "--port",
                    REDIS_PORT,
                    "--bind",
                    db_ip,
                    "--protected-mode",
                    "no",
                    "--unixsocket",
                    redis_dir / "redis.sock",
                    "--unixsocketperm",
                    "700",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    redis_dir,
                    "--maxmemory",
                    "64mb",
                ],
                stdout=logf,
                stderr=logf,
            )
        self._wait(lambda: self.ledger("SELECT 1"), "Postgres in the db host", self.pg_proc)
        self._wait(
            lambda: redis.Redis(unix_socket_path=str(redis_dir / "redis.sock")).ping(),
            "Redis in the db host",
            self.redis_proc,
        )

    def _wait(self, probe: Any, what: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with {proc.returncode}; see {self.log_dir}")
            try:
                probe()
                return
            except Exception as exc:
                last = exc
            time.sleep(0.1)
        raise RuntimeError(f"{what} not up within {timeout:.0f}s: {last}")

    def ledger(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Query the policeman's Postgres through its unix socket (no network from the root namespace)."""
        with psycopg.connect(
            host=str(self.pg_socket_dir),
            port=PG_PORT,
            dbname=PG_DB,
            user=PG_USER,
            password=self.password,
            connect_timeout=5,
        ) as conn:
            return conn.execute(sql, params).fetchall()

    # --- the mesh -----------------------------------------------------------------------------
    def start_mesh(
        self, developers: int | None = None, heartbeat_s: float | None = None, extra_env: dict[str, str] | None = None
    ) -> LocalMesh:
        """The policeman and ``developers`` developers, each in a host of its own; returns once
        every developer is registered."""
        lab = self.lab
        self.developers = self.developers if developers is None else developers
        self.heartbeat_s = heartbeat_s or self.heartbeat_s
        self.extra_env.update(extra_env or {})
        lab.add_host("policeman")
        for i in range(1, self.developers + 1):
            lab.add_host(f"developer-{i}")
        env = {
            "CASPER_HEARTBEAT_S": str(self.heartbeat_s),
            "CASPER_DRAIN_TIMEOUT_S": "2",
            "PGPASSFILE": str(self.passfile),
            **self.extra_env,
        }
        mesh = LocalMesh(
            self.root / "mesh",
            developers=self.developers,
            testers=0,
            port_base=MESH_PORT,
            database_url=f"postgresql://{PG_USER}@{lab.ip('db')}:{PG_PORT}/{PG_DB}",
            redis_url=f"redis://{lab.ip('db')}:{REDIS_PORT}/0",
            curve=True,
            extra_env=env,
            broker_endpoint=f"tcp://{lab.ip('policeman')}:{MESH_PORT}",
        )
        self.mesh = mesh
        mesh.add_node(
            "policeman", "policeman", MESH_PORT, host=lab.ip("policeman"), prefix=lab.exec_prefix("policeman")
        )
        mesh.wait_healthy("policeman", timeout=60)
        for i in range(1, self.developers + 1):
            name = f"developer-{i}"
            mesh.add_node(name, "developer", MESH_PORT + i, host=lab.ip(name), prefix=lab.exec_prefix(name))
        mesh.wait_peers(self.developers, timeout=60)
        return mesh

    def log_tails(self, lines: int = 25) -> str:
        out = []
        for path in sorted([*self.log_dir.glob("*.log"), *(self.root / "mesh" / "logs").glob("*.log")]):
            with contextlib.suppress(OSError):
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(out)

    def stop(self) -> None:
        if self.mesh is not None:
            for node in self.mesh.nodes.values():  # a paused node must wake up to drain
                if node.alive and node.proc is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(node.proc.pid, signal.SIGCONT)
            with contextlib.suppress(Exception):
                self.mesh.stop()
        for proc, sig in ((self.redis_proc, signal.SIGTERM), (self.pg_proc, signal.SIGINT)):
            if proc is not None and proc.poll() is None:
                proc.send_signal(sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)


def make_root() -> Path:
    return Path(tempfile.mkdtemp(prefix="casper-faults-"))


def remove_root(root: Path) -> None:
    shutil.rmtree(root, ignore_errors=True)
