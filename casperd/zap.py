"""A ZAP handler (ZeroMQ RFC 27) that admits enrolled Curve keys only.

libzmq asks the handler bound at ``inproc://zeromq.zap.01`` of a context about every CURVE
handshake on that context's server sockets (every mesh ROUTER of a node). An enrolled key is
admitted with its z85 public key as the ZAP User-Id, which libzmq then attaches to every frame
received over that connection (``frame.get("User-Id")``); the node looks the key up in the
enrollment for each message, so a revoked key is refused from its next frame on. An unknown key
is refused in the handshake (no frame of it ever reaches the node), counted, and logged once per
key per minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import zmq.asyncio
from prometheus_client import Counter
from zmq.utils import z85

from casperd.enrollment import Enrollment

log = logging.getLogger("casperd.trust")
ENDPOINT = "inproc://zeromq.zap.01"


class ZapHandler:
    def __init__(self, ctx: zmq.asyncio.Context, enrollment: Enrollment, refused: Counter) -> None:
        self.enrollment = enrollment
        self.refused = refused
        self._logged: dict[str, float] = {}
        self.refused_count = 0
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(ENDPOINT)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._serve(), name="zap")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.sock.close(0)

    def decide(self, mechanism: bytes, credentials: list[bytes], address: str) -> tuple[bytes, bytes, bytes]:
        """(status code, status text, user id) for one request. Pure apart from the counter and log."""
        if mechanism != b"CURVE" or len(credentials) != 1 or len(credentials[0]) != 32:
            self._refuse("?", address, "not a CURVE handshake")
            return b"400", b"CURVE required", b""
        key = z85.encode(credentials[0]).decode()
        self.enrollment.refresh()
        if self.enrollment.lookup(key) is None:
            self.enrollment.refresh(force=True)  # enrolled a moment ago?
        if self.enrollment.lookup(key) is None:
            self._refuse(key, address, "key not enrolled")
            return b"400", b"key not enrolled", b""
        return b"200", b"OK", key.encode()

    def _refuse(self, key: str, address: str, why: str) -> None:
        self.refused.inc()
        self.refused_count += 1
        now = time.monotonic()
        if now - self._logged.get(key, -120.0) >= 60.0:
            if len(self._logged) > 10_000:
                self._logged.clear()
            self._logged[key] = now
            log.warning(
                "refused a Curve handshake from %s: %s (key %s); enroll it with `caspectl keys add` if it is ours",
                address or "?",
                why,
                key,
            )

    async def _serve(self) -> None:
        while True:
            frames = await self.sock.recv_multipart()
            # [route, b"", version, request id, domain, address, identity, mechanism, credentials...]
            if len(frames) < 8 or frames[2] != b"1.0":
                continue
            route, req_id = frames[0], frames[3]
            address = frames[5].decode("ascii", "replace")[:64]
            code, text, user = self.decide(frames[7], frames[8:], address)
            await self.sock.send_multipart([route, b"", b"1.0", req_id, code, text, user, b""])
