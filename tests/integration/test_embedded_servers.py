"""The embedded servers say why they did not start: a taken port at once, else the cause from their own log."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest

from casperd.embedded import EmbeddedPostgres, EmbeddedRedis, log_tail
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
