"""ZeroMQ sockets driven straight by the asyncio loop, for the mesh's hot sockets.

``zmq.asyncio`` makes a Future for every send and receive and re-reads the socket's EVENTS through
Python enum flags after each (about a third of the policeman's Python time per message at low
load). The daemon's hot sockets never wait to send (every send is non-blocking: a full peer is an
event, SPEC section 9) and receive in batches, so they need much less: plain ``Sock``\\ s and
one reader per socket on its ``FD``.

The ``FD`` of a ZeroMQ socket is *edge-like*: it turns readable when the socket's internal
mailbox has commands, and any call on the socket (a send, a receive, reading ``EVENTS``) may
consume that signal while leaving a message queued. So: the reader callback always reads
``EVENTS`` (which clears the signal) and wakes the receiver only if a message waits; a receiver
looks at ``EVENTS`` before it sleeps; and every send, and every other read of ``EVENTS``
(:func:`pending_input`), re-checks on behalf of a sleeping receiver. A socket is used from one
event loop; close it with :func:`close` so its reader goes with it.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Sequence
from typing import Any, TypeAlias, cast

import zmq

Sock: TypeAlias = "zmq.Socket[Any]"
"""A plain (synchronous) ZeroMQ socket, driven by this module."""

# plain ints: pyzmq's multipart helpers combine enum flags per frame, which costs more than the send
_POLLIN = int(zmq.POLLIN)
_EVENTS = int(zmq.EVENTS)
_RCVMORE = int(zmq.RCVMORE)
_AGAIN = zmq.Again
_DONTWAIT = int(zmq.DONTWAIT)
_DONTWAIT_MORE = int(zmq.DONTWAIT) | int(zmq.SNDMORE)


class _Driver:
    __slots__ = ("__weakref__", "fd", "loop", "sock", "waiter")

    def __init__(self, sock: Sock) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.fd = cast(int, sock.getsockopt(zmq.FD))
        self.waiter: asyncio.Future[None] | None = None
        self.loop.add_reader(self.fd, self.check)

    def check(self) -> None:
        """The fd turned readable, or a call may have eaten its signal: wake a waiting receiver
        if a message is queued (reading EVENTS also re-arms the fd)."""
        events = cast(int, self.sock.getsockopt(_EVENTS))
        waiter = self.waiter
        if waiter is not None and events & _POLLIN and not waiter.done():
            waiter.set_result(None)

    async def readable(self) -> None:
        if cast(int, self.sock.getsockopt(_EVENTS)) & _POLLIN:
            return
        waiter = self.waiter = self.loop.create_future()
        try:
            await waiter
        finally:
            self.waiter = None

    def release(self) -> None:
        if not self.loop.is_closed():
            self.loop.remove_reader(self.fd)


_drivers: weakref.WeakKeyDictionary[Sock, _Driver] = weakref.WeakKeyDictionary()


def _driver(sock: Sock) -> _Driver:
    d = _drivers.get(sock)
    if d is None:
        d = _drivers[sock] = _Driver(sock)
    return d


def _after_io(sock: Sock) -> None:
    d = _drivers.get(sock)
    if d is not None and d.waiter is not None:
        d.check()


def send(sock: Sock, frames: Sequence[bytes]) -> str | None:
    """Send without ever blocking; None, or why not (``"full"``: high-water mark reached;
    ``"unroutable"``: no such peer on a ROUTER_MANDATORY socket; ``"error: ..."``)."""
    why: str | None = None
    try:
        send_frame = sock.send
        last = len(frames) - 1
        for i, frame in enumerate(frames):
            # a multipart message is queued whole or not at all: only its first frame can be refused
            send_frame(frame, _DONTWAIT_MORE if i < last else _DONTWAIT)
    except _AGAIN:
        why = "full"
    except zmq.ZMQError as exc:
        why = "unroutable" if exc.errno == zmq.EHOSTUNREACH else f"error: {exc}"
    _after_io(sock)
    return why


async def recv_batch(sock: Sock, limit: int = 512, *, copy: bool = True) -> list[list[bytes]] | list[list[zmq.Frame]]:
    """Wait for one message, then take every message already queued (up to ``limit``)."""
    d = _driver(sock)
    while True:
        try:
            batch: list[Any] = [_recv_message(sock, copy)]
        except _AGAIN:
            await d.readable()
            continue
        # then ask EVENTS rather than trying until EAGAIN: an exception per batch costs more
        while len(batch) < limit and cast(int, sock.getsockopt(_EVENTS)) & _POLLIN:
            batch.append(_recv_message(sock, copy))
        return batch


def _recv_message(sock: Sock, copy: bool) -> list[Any]:
    """One whole message (its later frames are already there once the first one is)."""
    recv, more = sock.recv, sock.getsockopt
    parts = [recv(_DONTWAIT, copy=copy)]
    while more(_RCVMORE):
        parts.append(recv(_DONTWAIT, copy=copy))
    return parts


def pending_input(sock: Sock) -> bool:
    """Whether a message waits to be read (a read of EVENTS that keeps a sleeping receiver awake)."""
    waiting = bool(cast(int, sock.getsockopt(_EVENTS)) & _POLLIN)
    _after_io(sock)
    return waiting


def close(sock: Sock, linger: int | None = None) -> None:
    """Close ``sock`` and drop its reader from the loop (a receiver waiting on it is cancelled by
    its own task, never left polling a closed fd)."""
    d = _drivers.pop(sock, None)
    if d is not None:
        d.release()
        if d.waiter is not None and not d.waiter.done():
            d.waiter.cancel()
    sock.close(linger=linger)
