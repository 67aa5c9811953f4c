"""A mesh of casperd processes on 127.0.0.1, with embedded Postgres and Redis.

Used by ``casperd up`` and by the integration tests: each node is a real ``python -m casperd``
subprocess with its own settings in the environment, logs in ``STATE_DIR/logs``, Curve keys in
``STATE_DIR/keys``. Port plan from ``port_base`` (default 5555): policeman +0, developers +1..,
tester after them; Postgres +100, Redis +101.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from casperd.ctl.client import MESH_FILE, ControlClient
from casperd.embedded import EmbeddedPostgres
from casperd.embedded_redis import EmbeddedRedis
from casperd.enrollment import enroll, write_private
from casperd.errors import CasperError, EmbeddedServiceError
from casperd.logsetup import redact
from casperd.transport import write_keypair


@dataclass
class NodeProc:
    node_id: str
    role: str
    bind: str
    control: str
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    prefix: list[str] = field(default_factory=list)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class LocalMesh:
    state_dir: Path
    developers: int = 2
    testers: int = 1
    port_base: int = 5555
    database_url: str = ""
    redis_url: str | None = ""  # "" = embedded, None = no cache
    curve: bool = True
    extra_env: dict[str, str] = field(default_factory=dict)
    settings_env: dict[str, str] = field(default_factory=dict)
    """The user's settings for every node (``casperd up``: its --config file and CASPER_* variables);
    a node's generated file keeps what the mesh decides, and those win over these."""
    policeman_env: dict[str, str] = field(default_factory=dict)
    """Settings for the policeman only (e.g. the autoscaler's: CASPER_SPAWNER, CASPER_AUTOSCALE_ROLES)."""
    log_level: str = "INFO"
    broker_endpoint: str = ""  # default: tcp://127.0.0.1:PORT_BASE
    postgres: EmbeddedPostgres | None = None
    redis: EmbeddedRedis | None = None
    nodes: dict[str, NodeProc] = field(default_factory=dict)

    # --- services -------------------------------------------------------------------------------
    def start_services(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if not self.database_url:
            self.postgres = EmbeddedPostgres(self.state_dir / "postgres", self.port_base + 100)
            self.postgres.start()
            self.database_url = self.postgres.url
        if self.redis_url == "":
            self.redis = EmbeddedRedis(self.state_dir / "redis", self.port_base + 101)
            self.redis.start()
            self.redis_url = self.redis.url

    def stop_services(self) -> None:
        if self.redis is not None:
            self.redis.stop()
        if self.postgres is not None:
            self.postgres.stop()

    # --- nodes ----------------------------------------------------------------------------------
    @property
    def policeman(self) -> NodeProc:
        return self.nodes["policeman"]

    def _cache_key(self) -> Path:
        """The mesh key that signs result-cache entries (made once, 0600)."""
        path = self.state_dir / "keys" / "cache.key"
        if not path.exists():
            write_private(path, secrets.token_urlsafe(32) + "\n")
        return path

    def _keys(self, name: str, role: str) -> dict[str, str]:
        """The node's key pair (made once), enrolled for its node id and role."""
        if not self.curve:
            return {}
        keys = self.state_dir / "keys"
        sec, pub = keys / f"{name}.key", keys / f"{name}.pub"
        if not sec.exists():
            write_keypair(keys, name)
        enroll(self.state_dir / "authorized_keys", pub, name, role)
        return {
            "CASPER_CURVE": "true",
            "CASPER_CURVE_SECRET_KEY_FILE": str(sec),
            "CASPER_CURVE_PUBLIC_KEY_FILE": str(pub),
            "CASPER_BROKER_PUBLIC_KEY_FILE": str(keys / "policeman.pub"),
        }

    def add_node(
        self,
        node_id: str,
        role: str,
        port: int,
        *,
        capabilities: str = "",
        capacity: int | None = None,
        start: bool = True,
        host: str = "127.0.0.1",
        prefix: list[str] | None = None,
    ) -> NodeProc:
        """Add (and start) a node bound at ``host:port``; ``prefix`` wraps its command line
        (e.g. ``["ip", "netns", "exec", "ns1"]`` to run it in a network namespace)."""
        bind = f"tcp://{host}:{port}"
        control = f"ipc://{self.state_dir / 'run' / (node_id + '.ctl')}"
        env = {
            "CASPER_ROLE": role,
            "CASPER_NODE_ID": node_id,
            "CASPER_STATE_DIR": str(self.state_dir),
            "CASPER_BIND": bind,
            "CASPER_BROKER": self.broker_endpoint or f"tcp://127.0.0.1:{self.port_base}",
            "CASPER_CONTROL": control,
            "CASPER_LOG_FORMAT": "text",
            "CASPER_LOG_LEVEL": self.log_level,
            **self._keys("policeman" if role == "policeman" else node_id, role),
        }
        if role == "policeman":
            env["CASPER_DATABASE_URL"] = self.database_url
            env.update(self.policeman_env)
        if self.redis_url:
            env["CASPER_REDIS_URL"] = self.redis_url
            env["CASPER_CACHE_KEY_FILE"] = str(self._cache_key())
            if self.redis is not None:
                env["CASPER_REDIS_PASSWORD_FILE"] = str(self.redis.password_file)
        if capabilities:
            env["CASPER_CAPABILITIES"] = capabilities
        if capacity is not None:
            env["CASPER_CAPACITY"] = str(capacity)
        if self.postgres is not None:
            env.update(self.postgres.env())
        env.update(self.extra_env)
        node = NodeProc(
            node_id, role, bind, control, env, self.state_dir / "logs" / f"{node_id}.log", prefix=list(prefix or [])
        )
        self.nodes[node_id] = node
        if start:
            self.start_node(node_id)
        return node

    def start_node(self, node_id: str) -> NodeProc:
        node = self.nodes[node_id]
        node.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("CASPER_")}
        env.update({k: v for k, v in node.env.items() if not k.startswith("CASPER_")})
        env.update({k: v for k, v in self.settings_env.items() if k not in node.env})
        env["CASPER_CONFIG"] = str(self.write_config(node))
        with open(node.log_path, "ab") as logf:
            node.proc = subprocess.Popen(
                [*node.prefix, sys.executable, "-m", "casperd"],
                env=env,
                stdout=logf,
                stderr=logf,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        return node

    def write_config(self, node: NodeProc) -> Path:
        """The node's settings as a TOML file in STATE_DIR/config (what the node reads at start)."""
        path = self.state_dir / "config" / f"{node.node_id}.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [f"# casperd settings of {node.node_id}, written by casperd up / LocalMesh", ""]
        for key, value in sorted(node.env.items()):
            if key.startswith("CASPER_"):
                lines.append(f"{key[len('CASPER_') :].lower()} = {json.dumps(value)}")
        write_private(path, "\n".join(lines) + "\n")  # it may hold a database URL with its password
        return path

    def start(self) -> None:
        """Services, then the policeman (ready when it answers health), then the workers."""
        self.start_services()
        self.add_node("policeman", "policeman", self.port_base)
        self.wait_healthy("policeman", timeout=60)
        port = self.port_base + 1
        for i in range(1, self.developers + 1):
            self.add_node(f"developer-{i}", "developer", port)
            port += 1
        for i in range(1, self.testers + 1):
            self.add_node(f"tester-{i}" if self.testers > 1 else "tester", "tester", port)
            port += 1
        self.wait_peers(self.developers + self.testers, timeout=60)

    def client(self, timeout_s: float = 10.0) -> ControlClient:
        return ControlClient(self.policeman.control, timeout_s)

    def wait_healthy(self, node_id: str, timeout: float) -> None:
        node = self.nodes[node_id]
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if not node.alive:
                raise EmbeddedServiceError(
                    f"{node_id} exited with code {node.proc.poll() if node.proc else '?'}", hint=f"see {node.log_path}"
                )
            try:
                with ControlClient(node.control, 1.0) as c:
                    if c.request("health")["healthy"]:
                        return
            except CasperError as exc:
                last = exc
            time.sleep(0.1)
        raise EmbeddedServiceError(f"{node_id} not healthy within {timeout:.0f}s ({last})", hint=f"see {node.log_path}")

    def wait_peers(self, count: int, timeout: float) -> list[dict[str, object]]:
        deadline = time.monotonic() + timeout
        peers: list[dict[str, object]] = []
        while time.monotonic() < deadline:
            for node in self.nodes.values():
                if node.role != "policeman" and node.proc is not None and not node.alive:
                    raise EmbeddedServiceError(
                        f"{node.node_id} exited with code {node.proc.poll()}", hint=f"see {node.log_path}"
                    )
            with contextlib.suppress(CasperError), self.client(2.0) as c:
                peers = c.request("peers")["peers"]
                if len([p for p in peers if p["liveness"] == "alive"]) >= count:
                    return peers
            time.sleep(0.1)
        raise EmbeddedServiceError(
            f"only {len(peers)} of {count} peers registered within {timeout:.0f}s",
            hint=f"see the logs in {self.state_dir / 'logs'}",
        )

    def signal_node(self, node_id: str, sig: int) -> None:
        node = self.nodes[node_id]
        if node.proc is not None and node.proc.poll() is None:
            os.kill(node.proc.pid, sig)

    def stop_node(self, node_id: str, timeout: float = 20.0, sig: int = signal.SIGTERM) -> int | None:
        node = self.nodes[node_id]
        if node.proc is None:
            return None
        if node.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                node.proc.send_signal(sig)
            try:
                node.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait(5)
        return node.proc.returncode

    def stop(self, say: Callable[[str], None] | None = None) -> None:
        """Workers first (they drain and hand back), then the policeman, then the services; the
        nodes' control sockets and the mesh description are removed. ``say`` hears each step."""
        tell = say or (lambda _text: None)
        workers = [n for n in self.nodes.values() if n.role != "policeman"]
        alive = [n for n in workers if n.alive and n.proc is not None]
        for n in alive:
            assert n.proc is not None
            n.proc.send_signal(signal.SIGTERM)
        if alive:
            tell(
                f"stopping {', '.join(n.node_id for n in alive)}: running tasks finish or are handed back (up to 20 s)"
            )
        for n in workers:
            self.stop_node(n.node_id)
        if "policeman" in self.nodes:
            if self.policeman.alive:
                tell("stopping the policeman: it commits what is staged")
            self.stop_node("policeman")
        if self.redis is not None or self.postgres is not None:
            tell("stopping " + " and ".join(n for n, s in (("Redis", self.redis), ("Postgres", self.postgres)) if s))
        self.stop_services()
        self.remove_sockets()
        (self.state_dir / MESH_FILE).unlink(missing_ok=True)

    def kill(self) -> None:
        """Force: SIGKILL every node process now (a second Ctrl-C); their tasks are recovered at the next start."""
        for n in self.nodes.values():
            if n.alive and n.proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    n.proc.kill()

    def remove_sockets(self) -> None:
        """Remove the control socket files of stopped nodes (a stale one looks like a live node)."""
        for n in self.nodes.values():
            if n.control.startswith("ipc://") and not n.alive:
                Path(n.control[len("ipc://") :]).unlink(missing_ok=True)

    def describe(self) -> dict[str, object]:
        return {
            "supervisor_pid": os.getpid(),
            "state_dir": str(self.state_dir),
            "policeman": {"control": self.policeman.control, "mesh": self.policeman.bind},
            "nodes": [
                {
                    "node_id": n.node_id,
                    "role": n.role,
                    "mesh": n.bind,
                    "control": n.control,
                    "pid": n.proc.pid if n.proc else None,
                    "log": str(n.log_path),
                }
                for n in self.nodes.values()
            ],
            "postgres": redact(self.database_url),  # mesh.json is readable: never a password
            "redis": redact(self.redis_url) if self.redis_url else None,
        }

    def write_description(self) -> Path:
        path = self.state_dir / MESH_FILE
        write_private(path, json.dumps(self.describe(), indent=2))
        return path


def free_port_base(nodes: int = 12) -> int:
    """A base port such that the nodes' ports (base .. base+nodes-1) and the embedded Postgres and
    Redis ports (base+100, base+101) are all free on 127.0.0.1 (for benchmarks and tests)."""
    for _ in range(200):
        base = int.from_bytes(os.urandom(2), "big") % 30000 + 20000
        try:
            for port in [*range(base, base + nodes), base + 100, base + 101]:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no free port range on 127.0.0.1")
