"""Mesh fixtures for the integration and security tiers: real embedded Postgres, real casperd processes.

A pytest plugin (tests/conftest.py loads it), so both tiers share one session Postgres rather than
each starting its own. One embedded Postgres serves the whole session; every test gets its own database, its own Redis
and its own mesh (ports from a free range), and everything is stopped even when the test fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from casperd.embedded import EmbeddedPostgres
from casperd.errors import EmbeddedServiceError
from casperd.localmesh import LocalMesh
from tests.support.isolation import mesh_task_user


def _ports_free(base: int, count: int) -> bool:
    for port in range(base, base + count):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def free_port_base(span: int = 110) -> int:
    """A base port such that base..base+span are all free (nodes, then Postgres +100, Redis +101)."""
    for _ in range(200):
        base = int.from_bytes(os.urandom(2), "big") % 30000 + 20000
        if _ports_free(base, 12) and _ports_free(base + 100, 2):
            return base
    raise RuntimeError("no free port range found")


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns a truthy value; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def server_dir(prefix: str) -> Path:
    """A directory for an embedded server's data outside pytest's tmp tree: pytest keeps its base
    directory at mode 0700 (and re-applies it at every session start), which an unprivileged
    server user cannot traverse when the tests run as root."""
    return Path(tempfile.mkdtemp(prefix=prefix))


def start_session_postgres(attempts: int = 2) -> tuple[EmbeddedPostgres, Path]:
    """Start the session's Postgres; a start that fails (a port taken between the check and the
    bind, a slow machine) is reported on stderr and retried once on a fresh port and directory,
    since every test of two tiers hangs on it."""
    for attempt in range(1, attempts + 1):
        root = server_dir("casper-test-pg-")
        pg = EmbeddedPostgres(root / "postgres", free_port_base() + 100)
        try:
            pg.start()
            return pg, root
        except EmbeddedServiceError as exc:
            pg.stop()
            print(f"session Postgres, attempt {attempt}: {exc}", file=sys.stderr)
            if attempt == attempts:
                raise
            shutil.rmtree(root, ignore_errors=True)
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def postgres() -> Iterator[EmbeddedPostgres]:
    pg, root = start_session_postgres()
    os.environ.update(pg.env())  # PGPASSFILE for this process and the nodes it starts
    try:
        yield pg
    finally:
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def database_url(postgres: EmbeddedPostgres) -> Iterator[str]:
    """A fresh database for one test, dropped afterwards."""
    name = "t_" + uuid.uuid4().hex[:12]
    admin = postgres.url
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    url = postgres.url_for(name)
    try:
        yield url
    finally:
        with contextlib.suppress(Exception), psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def make_mesh(tmp_path: Path, database_url: str) -> Iterator[Callable[..., LocalMesh]]:
    """Build and start a mesh: ``make_mesh(developers=2, testers=1, start=True, **LocalMesh kwargs)``."""
    meshes: list[LocalMesh] = []

    def factory(developers: int = 2, testers: int = 1, start: bool = True, **kw: Any) -> LocalMesh:
        kw.setdefault("curve", True)
        kw.setdefault("redis_url", "")
        env = {"CASPER_HEARTBEAT_S": "0.5", "CASPER_TASK_USER": mesh_task_user(), **kw.pop("extra_env", {})}
        mesh = LocalMesh(
            tmp_path / f"mesh{len(meshes)}",
            developers=developers,
            testers=testers,
            port_base=free_port_base(),
            database_url=database_url,
            extra_env=env,
            **kw,
        )
        meshes.append(mesh)
        if start:
            mesh.start()
        return mesh

    try:
        yield factory
    finally:
        for mesh in meshes:
            with contextlib.suppress(Exception):
                mesh.stop()
        for mesh in meshes:
            for node in mesh.nodes.values():
                if node.proc is not None and node.proc.poll() is None:
                    node.proc.kill()


def db_rows(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql, params).fetchall()
