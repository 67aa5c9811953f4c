"""The embedded servers say why they did not start: a taken port at once, else the cause from their own log."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import psycopg
import pytest

from casperd.childserver import log_tail
from casperd.embedded import EmbeddedPostgres, postgres_bin
from casperd.embedded_redis import EmbeddedRedis
from casperd.errors import EmbeddedServiceError
from tests.support.mesh import server_dir


def test_postgres_and_redis_on_a_taken_port_say_so_at_once() -> None:
    root = server_dir("casper-test-pg-taken-")
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    pg = EmbeddedPostgres(root / "postgres", squatter.getsockname()[1])
    try:
        with pytest.raises(EmbeddedServiceError) as err:
            pg.start(timeout=30)
        text = str(err.value)
        assert f"port {pg.port} on 127.0.0.1 is already in use" in text, text
        assert "--port-base" in text
        redis = EmbeddedRedis(root / "redis", squatter.getsockname()[1])
        with pytest.raises(EmbeddedServiceError, match="already in use"):
            redis.start(timeout=30)
    finally:
        pg.stop()
        squatter.close()
        shutil.rmtree(root, ignore_errors=True)


def test_log_tail_keeps_the_last_lines_and_survives_a_missing_log(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)))
    tail = log_tail(log, lines=3)
    assert tail.splitlines() == ["  line 97", "  line 98", "  line 99"]
    assert "unreadable" in log_tail(tmp_path / "missing.log")


def test_the_mesh_user_connects_on_the_socket_without_a_password_and_no_one_else(postgres: EmbeddedPostgres) -> None:
    """The nodes' URL is the Unix socket with peer auth (no SCRAM, no password); TCP still needs the
    password; another OS user (task code runs as one) gets nothing from the socket."""
    assert postgres.socket_dir is not None and f"host={postgres.socket_dir}" in postgres.url
    no_passfile = "passfile=/nonexistent"
    with psycopg.connect(postgres.url, passfile="/nonexistent") as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("casper",)
        assert conn.info.host == str(postgres.socket_dir)
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(f"host=127.0.0.1 port={postgres.port} user=casper dbname=casper {no_passfile}")
    if os.geteuid() == 0:
        psql = postgres_bin() / "psql"
        res = subprocess.run(
            [str(psql), "-h", str(postgres.socket_dir), "-p", str(postgres.port), "-U", "casper", "-c", "SELECT 1"],
            capture_output=True,
            text=True,
            user="nobody",
            env={"PATH": "/usr/bin:/bin", "PGCONNECT_TIMEOUT": "5"},
            timeout=30,
        )
        assert res.returncode != 0 and ("Permission denied" in res.stderr or "authentication" in res.stderr), res.stderr


def test_a_socket_path_too_long_for_sun_path_falls_back_to_tcp() -> None:
    deep = Path("/tmp") / ("d" * 120) / "postgres"
    pg = EmbeddedPostgres(deep, 5432)
    assert pg.socket_dir is None and pg.url == "postgresql://casper@127.0.0.1:5432/casper"
    short = EmbeddedPostgres(Path("/tmp/casper-x/postgres"), 5432)
    assert short.url == "postgresql://casper@/casper?host=/tmp/casper-x/run/pg&port=5432"
    assert short.url_for("t_1").startswith("postgresql://casper@/t_1?host=")
