"""ZeroMQ sockets configured the way CASPER needs them (the thin I/O edge of the protocol).

Lessons applied (see ARCHITECTURE.md, "ZeroMQ lessons from the field"): ROUTER_MANDATORY with
non-blocking sends so an unroutable peer is an event, not a silent drop; stable routing ids with
ROUTER_HANDOVER so a reconnecting peer takes over its identity; explicit HWMs, MAXMSGSIZE and a
finite LINGER; ZMTP heartbeats for dead TCP links; jittered reconnect backoff; CurveZMQ when keys
are configured.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import zmq

from casperd import loopsock
from casperd.errors import ConfigError
from casperd.loopsock import Sock

log = logging.getLogger("casperd.secrets")

_S = TypeVar("_S", bound=zmq.Socket)


@dataclass(frozen=True, slots=True)
class SocketOptions:
    hwm: int = 10_000
    linger_ms: int = 1000
    max_message_bytes: int = 4 * 1024 * 1024
    heartbeat_ms: int = 1000
    curve_secret: bytes | None = None
    curve_public: bytes | None = None
    curve_server_key: bytes | None = None


def _common(sock: zmq.Socket, opts: SocketOptions) -> None:
    sock.setsockopt(zmq.SNDHWM, opts.hwm)
    sock.setsockopt(zmq.RCVHWM, opts.hwm)
    sock.setsockopt(zmq.LINGER, opts.linger_ms)
    sock.setsockopt(zmq.MAXMSGSIZE, opts.max_message_bytes + 64 * 1024)
    sock.setsockopt(zmq.HEARTBEAT_IVL, opts.heartbeat_ms)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, opts.heartbeat_ms * 3)
    sock.setsockopt(zmq.HEARTBEAT_TTL, opts.heartbeat_ms * 3)


def router(ctx: zmq.Context[_S], endpoint: str, opts: SocketOptions, *, curve: bool) -> _S:
    """A bound ROUTER; an ipc endpoint's file is made private to this user (0600)."""
    sock = ctx.socket(zmq.ROUTER)
    _common(sock, opts)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
    if curve:
        if not opts.curve_secret:
            raise ConfigError(
                "CurveZMQ is on but this node has no secret key",
                hint="set --curve-secret-key-file (caspectl keygen makes one)",
            )
        sock.curve_server = True
        sock.curve_secretkey = opts.curve_secret
    try:
        if endpoint.startswith("ipc://"):
            path = Path(endpoint[len("ipc://") :])
            path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # a stale socket file from a crashed run
            old = os.umask(0o177)
            try:
                sock.bind(endpoint)
            finally:
                os.umask(old)
            path.chmod(0o600)
        else:
            sock.bind(endpoint)
    except zmq.ZMQError as exc:
        sock.close(0)
        raise ConfigError(
            f"cannot bind {endpoint}: {exc.strerror}",
            hint="is another casperd using it? choose another address or port",
        ) from None
    return sock


def dealer(ctx: zmq.Context[_S], endpoint: str, identity: bytes, opts: SocketOptions, *, curve: bool) -> _S:
    """A DEALER with a stable routing id, connected to ``endpoint``."""
    sock = ctx.socket(zmq.DEALER)
    _common(sock, opts)
    sock.setsockopt(zmq.ROUTING_ID, identity)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)
    if curve:
        if not (opts.curve_secret and opts.curve_public and opts.curve_server_key):
            raise ConfigError(
                "CurveZMQ is on but a key is missing",
                hint="set --curve-secret-key-file, --curve-public-key-file and --broker-public-key-file",
            )
        sock.curve_secretkey = opts.curve_secret
        sock.curve_publickey = opts.curve_public
        sock.curve_serverkey = opts.curve_server_key
    sock.connect(endpoint)
    return sock


_WILDCARDS = ("0.0.0.0", "*", "[::]", "::")


def advertised(bind: str, advertise: str, broker: str) -> str:
    """The endpoint peers should use to reach this node.

    An explicit ``advertise`` wins. A bind on a wildcard address (``tcp://0.0.0.0:5555``, as in
    containers and swarm replicas) is not reachable as such: it becomes the local address this
    host uses towards the broker (a UDP socket's connect() picks the route and sends nothing),
    or the host name's address for the broker itself."""
    if advertise and advertise != bind:
        return advertise
    if not bind.startswith("tcp://"):
        return bind
    host, _, port = bind[len("tcp://") :].rpartition(":")
    if host not in _WILDCARDS:
        return bind
    ip = ""
    b_host, _, b_port = broker[len("tcp://") :].rpartition(":") if broker.startswith("tcp://") else ("", "", "")
    if b_host and b_host not in _WILDCARDS:
        with contextlib.suppress(OSError, ValueError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((b_host.strip("[]"), int(b_port or 5555)))
            ip = s.getsockname()[0]
    if not ip or (ip.startswith("127.") and b_host != ip):
        with contextlib.suppress(OSError):
            ip = socket.gethostbyname(socket.gethostname())
    return f"tcp://{ip}:{port}" if ip else bind


def send_now(sock: Sock, frames: Sequence[bytes]) -> str | None:
    """Send without ever blocking the loop; returns None, or why the frames were not sent
    (``"unroutable"``: no such peer connected; ``"full"``: high-water mark reached)."""
    return loopsock.send(sock, frames)


async def recv_batch(sock: Sock, limit: int = 512) -> list[list[bytes]]:
    """Wait for one message, then take every message already queued (up to ``limit``)."""
    return cast("list[list[bytes]]", await loopsock.recv_batch(sock, limit))


def _with_user(frames: list[zmq.Frame]) -> tuple[list[bytes], str | None]:
    user: str | None = None
    if len(frames) > 1:
        with contextlib.suppress(zmq.ZMQError):
            value = frames[1].get("User-Id")
            user = value if isinstance(value, str) else None
    return [f.bytes for f in frames], user or None


async def recv_batch_users(sock: Sock, limit: int = 512) -> list[tuple[list[bytes], str | None]]:
    """Like :func:`recv_batch`, each message with the ZAP User-Id of its connection (the enrolled
    public key on a Curve socket; None without ZAP)."""
    batch = cast("list[list[zmq.Frame]]", await loopsock.recv_batch(sock, limit, copy=False))
    return [_with_user(frames) for frames in batch]


def plain_context(ctx: zmq.Context[Any]) -> zmq.Context[Sock]:
    """A synchronous handle on ``ctx`` (the same ZeroMQ context: inproc endpoints and the ZAP
    handler are shared; terminating ``ctx`` still ends it) for sockets that :mod:`casperd.loopsock`
    drives."""
    return zmq.Context.shadow(ctx.underlying)


def read_secret_file(path: Path | None, what: str, *, secret: bool = True) -> str | None:
    """A value kept in a file (e.g. /run/secrets/NAME). A secret is registered for redaction from
    logs and its read is audited (which secret, from where — never its value)."""
    if path is None:
        return None
    try:
        value = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(
            f"cannot read the {what} from {path}: {exc.strerror}", hint="check the path and that this user may read it"
        ) from None
    if secret:
        from casperd.logsetup import register_secret

        register_secret(value)
        log.info("read the %s from %s", what, path)
    return value


def load_key(path: Path | None, what: str) -> bytes | None:
    """A z85 Curve key from a file (``caspectl keygen`` makes them)."""
    text = read_secret_file(path, what, secret="secret" in what)
    if text is None:
        return None
    if len(text.encode()) != 40:
        raise ConfigError(
            f"{what} in {path} is not a 40-character z85 Curve key", hint="make keys with caspectl keygen"
        )
    return text.encode()


def write_keypair(directory: Path, name: str) -> tuple[Path, Path]:
    """Make a Curve key pair: NAME.key (secret, 0600) and NAME.pub (public)."""
    public, secret = zmq.curve_keypair()
    directory.mkdir(parents=True, exist_ok=True)
    sec, pub = directory / f"{name}.key", directory / f"{name}.pub"
    fd = os.open(sec, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its old mode otherwise
    with os.fdopen(fd, "w") as fh:
        fh.write(secret.decode() + "\n")
    pub.write_text(public.decode() + "\n")
    return sec, pub
