"""A tiny packet delayer on NFQUEUE, for kernels built without ``sch_netem``.

Run inside a lab namespace (``NetnsLab.netem`` starts it): it binds queue ``--queue`` of that
namespace's netfilter, holds every packet handed to it for ``delay +- jitter`` ms and then
accepts it. An nftables rule of the harness (``queue num N bypass``) hands it the packets of the
namespace's ``eth0`` egress, so it acts like ``tc qdisc ... netem delay``. Pure standard library:
raw netlink (NETLINK_NETFILTER, nfnetlink_queue), packet metadata only (no payload copied).

It prints ``ready`` once bound; on SIGTERM/SIGINT, or after ``--max-s`` seconds, it releases
every held packet (accept) and exits, so it never outlives its test.
"""

from __future__ import annotations

import argparse
import errno
import heapq
import os
import random
import select
import signal
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NFQNL_MSG_CONFIG = 0, 1, 2
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN, NFQA_CFG_MASK, NFQA_CFG_FLAGS = 1, 2, 3, 4, 5
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NFQA_CFG_F_FAIL_OPEN = 1
NF_DROP, NF_ACCEPT = 0, 1
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NLMSG_ERROR = 2
NLMSG_HDR = struct.Struct("=IHHII")


def _attr(kind: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


class Queue:
    def __init__(self, num: int) -> None:
        self.num = num
        self.seq = 0
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE (we are root)
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.bind((0, 0))

    def _send(self, msg_type: int, attrs: bytes, flags: int = NLM_F_REQUEST) -> None:
        self.seq += 1
        body = struct.pack("=BB", socket.AF_UNSPEC, 0) + struct.pack("!H", self.num) + attrs
        self.sock.send(
            NLMSG_HDR.pack(NLMSG_HDR.size + len(body), (NFNL_SUBSYS_QUEUE << 8) | msg_type, flags, self.seq, 0) + body
        )

    def _config(self, attrs: bytes) -> None:
        self._send(NFQNL_MSG_CONFIG, attrs, NLM_F_REQUEST | NLM_F_ACK)
        data = self.sock.recv(65536)
        _, mtype, _, _, _ = NLMSG_HDR.unpack_from(data)
        if mtype == NLMSG_ERROR:
            (code,) = struct.unpack_from("=i", data, NLMSG_HDR.size)
            if code:
                raise OSError(-code, f"nfqueue config failed: {os.strerror(-code)}")

    def bind(self) -> None:
        self._config(_attr(NFQA_CFG_CMD, struct.pack("!BBH", NFQNL_CFG_CMD_BIND, 0, socket.AF_INET)))
        self._config(
            _attr(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META))
            + _attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", 20000))
            + _attr(NFQA_CFG_MASK, struct.pack("!I", NFQA_CFG_F_FAIL_OPEN))
            + _attr(NFQA_CFG_FLAGS, struct.pack("!I", NFQA_CFG_F_FAIL_OPEN))
        )

    def packets(self) -> list[int]:
        """Packet ids of every queued-packet message waiting on the socket (non-blocking)."""
        ids: list[int] = []
        while True:
            try:
                data = self.sock.recv(1 << 18, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return ids
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:  # overrun: those packets fail open on the next verdicts
                    continue
                raise
            off = 0
            while off + NLMSG_HDR.size <= len(data):
                length, mtype, _, _, _ = NLMSG_HDR.unpack_from(data, off)
                if length < NLMSG_HDR.size:
                    break
                if mtype == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                    pos, end = off + NLMSG_HDR.size + 4, off + length
                    while pos + 4 <= end:
                        alen, akind = struct.unpack_from("=HH", data, pos)
                        if alen < 4:
                            break
                        if akind & 0x7FFF == NFQA_PACKET_HDR:
                            ids.append(struct.unpack_from("!I", data, pos + 4)[0])
                        pos += (alen + 3) & ~3
                off += (length + 3) & ~3

    def verdict(self, packet_id: int, verdict: int = NF_ACCEPT) -> None:
        self._send(NFQNL_MSG_VERDICT, _attr(NFQA_VERDICT_HDR, struct.pack("!II", verdict, packet_id)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queue", type=int, default=0)
    ap.add_argument("--delay-ms", type=float, default=0.0)
    ap.add_argument("--jitter-ms", type=float, default=0.0)
    ap.add_argument("--max-s", type=float, default=600.0, help="exit (releasing all packets) after this long")
    args = ap.parse_args(argv)

    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    q = Queue(args.queue)
    q.bind()
    print("ready", flush=True)
    deadline = time.monotonic() + args.max_s
    held: list[tuple[float, int]] = []
    while not stop and time.monotonic() < deadline:
        timeout = 0.2
        if held:
            timeout = max(0.0, min(timeout, held[0][0] - time.monotonic()))
        try:
            ready, _, _ = select.select([q.sock], [], [], timeout)
        except InterruptedError:
            continue
        now = time.monotonic()
        if ready:
            for pid in q.packets():
                hold = max(0.0, args.delay_ms + random.uniform(-args.jitter_ms, args.jitter_ms)) / 1000.0
                heapq.heappush(held, (now + hold, pid))
        now = time.monotonic()
        while held and held[0][0] <= now:
            q.verdict(heapq.heappop(held)[1])
    for _, pid in held:  # never strand a packet: closing the socket would drop them
        q.verdict(pid)
    q.sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
