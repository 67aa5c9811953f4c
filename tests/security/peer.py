"""A hand-driven mesh peer for the security tier: speaks CMP with whatever key and claims it is given."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

import zmq
import zmq.utils.monitor

from casperd import codec
from casperd.messages import Error, Message, Ready, Reply, Request, Role


class Peer:
    """A DEALER with a Curve key pair of its own (enrolled or not) and a routing id of its choice."""

    def __init__(
        self,
        endpoint: str,
        server_key: bytes,
        *,
        routing_id: bytes,
        keypair: tuple[bytes, bytes] | None = None,
    ) -> None:
        self.public, self.secret = keypair or zmq.curve_keypair()
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTING_ID, routing_id)
        self.sock.curve_secretkey = self.secret
        self.sock.curve_publickey = self.public
        self.sock.curve_serverkey = server_key
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        self.sock.connect(endpoint)
        self._req = 0

    def close(self) -> None:
        self.sock.disable_monitor()
        self.monitor.close(0)
        self.sock.close(0)
        self.ctx.term()

    def handshake(self, timeout_s: float = 20.0) -> str:
        """'ok' or 'refused': the first handshake outcome the socket reports."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.monitor.poll(200):
                event = zmq.utils.monitor.recv_monitor_message(self.monitor)["event"]
                if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    return "ok"
                if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                    return "refused"
        raise AssertionError(f"no handshake outcome within {timeout_s:.0f}s")

    def send(self, msg: Message, attachments: tuple[bytes, ...] = ()) -> None:
        self.sock.send_multipart(codec.encode(msg, attachments))

    def send_raw(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def recv(self, timeout_s: float = 20.0) -> tuple[Message, tuple[bytes, ...]]:
        if not self.sock.poll(int(timeout_s * 1000)):
            raise AssertionError(f"no message within {timeout_s:.0f}s")
        d = codec.decode(self.sock.recv_multipart(), max_bytes=64 * 1024 * 1024)
        return d.message, d.attachments

    def recv_until(self, kind: type, timeout_s: float = 20.0) -> Any:
        """The first message of ``kind`` (others, e.g. HEARTBEAT, are skipped)."""
        deadline = time.monotonic() + timeout_s
        while True:
            msg, att = self.recv(max(0.1, deadline - time.monotonic()))
            if isinstance(msg, kind):
                return msg, att

    def ready(
        self,
        node_id: str,
        role: str = "developer",
        *,
        epoch: str,
        capacity: int = 4,
        caps: tuple[str, ...] = ("echo", "shell", "sleep", "test", "code"),
    ) -> Message:
        self.send(
            Ready(
                node_id=node_id,
                epoch=epoch,
                role=Role(role),
                endpoint="tcp://127.0.0.1:1",
                pid=os.getpid(),
                host="attacker",
                capabilities=caps,
                capacity=capacity,
            )
        )
        msg, _ = self.recv()
        return msg

    def request(self, op: str, args: dict[str, Any], attachments: tuple[bytes, ...] = ()) -> Reply | Error:
        self._req += 1
        self.send(Request(req_id=self._req, op=op, args=args), attachments)
        deadline = time.monotonic() + 20.0
        while True:
            msg, _ = self.recv(max(0.1, deadline - time.monotonic()))
            if isinstance(msg, Reply) and msg.req_id == self._req:
                return msg
            if isinstance(msg, Error):
                return msg


def key_of(path: Path) -> bytes:
    return path.read_text().strip().encode()


def fresh_epoch() -> str:
    return uuid.uuid4().hex[:12]
