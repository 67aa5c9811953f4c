"""Embedded Postgres: the real server, shipped as a pip wheel, run as a child process.

Postgres comes from the ``pgserver`` wheel (its bundled PostgreSQL 16 binaries: initdb, postgres);
Redis, the same way, from :mod:`casperd.embedded_redis`. We use only the binaries and run
them ourselves, in the foreground as supervised children listening on 127.0.0.1, so ``casperd up``
controls their lifetime and data lives in the state directory (it survives restarts).

Postgres refuses to run as root; when we are root, the server runs as a system user
``casper-pg`` (created if missing) that owns the data directory. Over TCP, Postgres uses password
(SCRAM) auth with a generated password kept in a 0600 file and handed to clients through
PGPASSFILE, never on a command line or in a URL. The mesh's own nodes connect through a Unix socket
in a 0700 directory of the server user's with ``peer`` auth, which admits only the OS user that
started the mesh (issue #13: a SCRAM handshake starts OpenSSL's random generator in libpq's
libcrypto, 2.6 MB of every connecting process's memory, and a password adds nothing when the
kernel already says who connects); where the socket path would be too long, they use TCP too.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

from casperd.childserver import check_port_free, log_tail, need_wheel, stop_child, wait_port
from casperd.enrollment import write_private
from casperd.errors import EmbeddedServiceError

PG_USER = "casper"
PG_DB = "casper"
PG_SYSTEM_USER = "casper-pg"
_SOCKET_PATH_MAX = 107
"""sun_path holds 108 bytes with its NUL: a longer socket path cannot be bound."""


def postgres_bin() -> Path:
    return need_wheel("pgserver") / "pginstall" / "bin"


def _isready_meaning(code: int) -> str:
    return {1: "rejecting connections", 2: "no response", 3: "no attempt made"}.get(code, f"exit {code}")


def _make_traversable(path: Path) -> None:
    """Let the unprivileged server user reach ``path`` (o+x on each parent directory)."""
    for parent in [path, *path.parents]:
        with contextlib.suppress(OSError):
            mode = parent.stat().st_mode
            if not mode & stat.S_IXOTH:
                parent.chmod(mode | stat.S_IXOTH)


def _system_user() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        useradd = shutil.which("useradd") or "/usr/sbin/useradd"
        subprocess.run(
            [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_SYSTEM_USER],
            check=True,
            capture_output=True,
        )
        return pwd.getpwnam(PG_SYSTEM_USER)


class EmbeddedPostgres:
    def __init__(self, data_dir: Path, port: int) -> None:
        self.data_dir = data_dir
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None
        self.passfile = data_dir.parent / "secrets" / "pgpass"
        self.log_path = data_dir.parent / "logs" / "postgres.log"
        self.socket_dir: Path | None = data_dir.parent / "run" / "pg"
        if len(str(self.socket_dir / f".s.PGSQL.{port}").encode()) > _SOCKET_PATH_MAX:
            self.socket_dir = None  # TCP only

    @property
    def url(self) -> str:
        """What the mesh's nodes use: the Unix socket (peer auth) where there is one, else TCP."""
        return self.url_for(PG_DB)

    def url_for(self, dbname: str) -> str:
        """:attr:`url` for another database of this server."""
        if self.socket_dir is None:
            return f"postgresql://{PG_USER}@127.0.0.1:{self.port}/{dbname}"
        return f"postgresql://{PG_USER}@/{dbname}?host={quote(str(self.socket_dir), safe='/')}&port={self.port}"

    def env(self) -> dict[str, str]:
        """Environment a client needs (the password comes from the 0600 passfile)."""
        return {"PGPASSFILE": str(self.passfile)}

    def _password(self) -> str:
        pw_file = self.passfile.parent / "pg_password"
        if pw_file.exists():
            return pw_file.read_text().strip()
        self.passfile.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        pw = secrets.token_urlsafe(24)
        write_private(pw_file, pw + "\n")
        return pw

    def start(self, timeout: float = 60.0) -> None:
        bindir = postgres_bin()
        user = _system_user()
        password = self._password()
        write_private(self.passfile, f"127.0.0.1:{self.port}:*:{PG_USER}:{password}\n")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        run_as = {"user": user.pw_uid, "group": user.pw_gid} if user else {}
        if user:
            _make_traversable(bindir.parent)
            _make_traversable(self.data_dir.parent)
        self._make_socket_dir(user)
        if not (self.data_dir / "pgdata" / "PG_VERSION").exists():
            self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            pwfile = self.data_dir / ".initdb_pw"  # readable by the server user, removed right after
            write_private(pwfile, password + "\n")
            if user:
                os.chown(self.data_dir, user.pw_uid, user.pw_gid)
                os.chown(pwfile, user.pw_uid, user.pw_gid)
            try:
                res = subprocess.run(
                    [
                        str(bindir / "initdb"),
                        "-D",
                        str(self.data_dir / "pgdata"),
                        "-U",
                        PG_USER,
                        "--pwfile",
                        str(pwfile),
                        "--auth-local=scram-sha-256",
                        "--auth-host=scram-sha-256",
                        "-E",
                        "UTF8",
                        "--no-instructions",
                    ],
                    capture_output=True,
                    **run_as,
                )
            finally:
                pwfile.unlink(missing_ok=True)
            if res.returncode != 0:
                raise EmbeddedServiceError(
                    f"initdb failed: {res.stderr.decode(errors='replace')[-2000:]}",
                    hint=f"remove {self.data_dir} if it is a broken half-made cluster",
                )
            self._create_db(bindir, run_as, password)
        self._write_hba(user)
        self._spawn(bindir, run_as)
        wait_port(self.port, timeout, self.proc, "embedded Postgres", self.log_path)
        self._wait_ready(bindir, timeout)

    def _write_hba(self, server_user: pwd.struct_passwd | None) -> None:
        """Who may connect, written at every start (a cluster made by an older casperd gets it too):
        on the socket, only the OS user starting the mesh (``peer``, mapped to the ``casper`` role);
        over loopback TCP, anyone with the password; nothing else."""
        pgdata = self.data_dir / "pgdata"
        me = pwd.getpwuid(os.geteuid()).pw_name
        files = {
            "pg_hba.conf": "# written by casperd at every start (casperd/embedded.py)\n"
            + (f"local all {PG_USER} peer map=casper\n" if self.socket_dir is not None else "")
            + "host all all 127.0.0.1/32 scram-sha-256\n",
            "pg_ident.conf": f"# written by casperd at every start\ncasper {me} {PG_USER}\n",
        }
        for name, text in files.items():
            write_private(pgdata / name, text)
            if server_user:
                os.chown(pgdata / name, server_user.pw_uid, server_user.pw_gid)

    def _make_socket_dir(self, server_user: pwd.struct_passwd | None) -> None:
        """The socket's directory: 0700, the server user's (the mesh's user reaches it as its owner
        or as root; task code, run as another user, cannot)."""
        if self.socket_dir is None:
            return
        self.socket_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.socket_dir.chmod(0o700)
        if server_user:
            _make_traversable(self.socket_dir.parent)
            os.chown(self.socket_dir, server_user.pw_uid, server_user.pw_gid)

    def _wait_ready(self, bindir: Path, timeout: float) -> None:
        """The port opens before the server accepts connections: wait for pg_isready."""
        deadline = time.monotonic() + timeout
        while True:
            res = subprocess.run(
                [str(bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-q", "-t", "5"],
                capture_output=True,
                timeout=30,
            )
            if res.returncode == 0:
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise EmbeddedServiceError(
                    f"embedded Postgres exited with code {self.proc.returncode} while starting"
                    f" (pg_isready: {_isready_meaning(res.returncode)}); its log ends:\n{log_tail(self.log_path)}",
                    hint=f"fix what the log names (a port in use, a full disk); full log: {self.log_path}",
                )
            if time.monotonic() > deadline:
                raise EmbeddedServiceError(
                    f"embedded Postgres not ready within {timeout:.0f}s"
                    f" (pg_isready: {_isready_meaning(res.returncode)}); its log ends:\n{log_tail(self.log_path)}",
                    hint=f"is the machine overloaded or the disk full? full log: {self.log_path}",
                )
            time.sleep(0.05)

    def _spawn(self, bindir: Path, run_as: dict[str, int]) -> None:
        check_port_free(self.port, "embedded Postgres")
        logf = open(self.log_path, "ab")  # noqa: SIM115 (handed to the child)
        with contextlib.suppress(FileNotFoundError):
            # a stale pid file from a killed run would stop the server from starting
            pid_file = self.data_dir / "pgdata" / "postmaster.pid"
            pid = int(pid_file.read_text().split()[0])
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                pid_file.unlink()
        self.proc = subprocess.Popen(
            [
                str(bindir / "postgres"),
                "-D",
                str(self.data_dir / "pgdata"),
                "-p",
                str(self.port),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                f"unix_socket_directories={self.socket_dir or ''}",
                "-c",
                "max_connections=200",
                "-c",
                "shared_buffers=128MB",
                "-c",
                "fsync=on",
                "-c",
                "synchronous_commit=on",
                "-c",
                "logging_collector=off",
            ],
            stdout=logf,
            stderr=logf,
            start_new_session=True,
            **run_as,
        )
        logf.close()

    def _create_db(self, bindir: Path, run_as: dict[str, int], password: str) -> None:
        self._spawn(bindir, run_as)
        try:
            wait_port(self.port, 60, self.proc, "embedded Postgres", self.log_path)
            env = {**os.environ, "PGPASSWORD": password, "PGCONNECT_TIMEOUT": "5"}
            deadline = time.monotonic() + 60
            while True:  # the port opens before the server accepts connections
                res = subprocess.run(
                    [
                        str(bindir / "psql"),
                        "-h",
                        "127.0.0.1",
                        "-p",
                        str(self.port),
                        "-U",
                        PG_USER,
                        "-d",
                        "postgres",
                        "-v",
                        "ON_ERROR_STOP=1",
                        "-c",
                        f"CREATE DATABASE {PG_DB}",
                    ],
                    capture_output=True,
                    env=env,
                    timeout=30,
                )
                if res.returncode == 0 or b"already exists" in res.stderr:
                    break
                if b"starting up" not in res.stderr or time.monotonic() > deadline:
                    raise EmbeddedServiceError(f"creating database failed: {res.stderr.decode(errors='replace')}")
                time.sleep(0.1)
        finally:
            self.stop()

    def stop(self, timeout: float = 20.0) -> None:
        stop_child(self.proc, signal.SIGINT, timeout)  # SIGINT = postgres "fast" shutdown
        self.proc = None
