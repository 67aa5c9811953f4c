"""casperd.loopsock: plain ZeroMQ sockets on the asyncio loop never miss a message, even when
another call on the socket eats the edge-like FD signal; closing wakes and cancels a receiver."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
import zmq

from casperd import loopsock


@pytest.fixture
def pair() -> Iterator[tuple[zmq.Socket[bytes], zmq.Socket[bytes]]]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.ROUTING_ID, b"d1")
    dealer.connect(f"tcp://127.0.0.1:{port}")
    try:
        yield router, dealer
    finally:
        router.close(0)
        dealer.close(0)
        ctx.term()


def _settle() -> None:
    time.sleep(0.05)  # blocking on purpose: the IO thread delivers while the loop cannot look


def test_a_send_that_eats_the_fd_signal_still_wakes_the_receiver(pair: tuple[zmq.Socket[bytes], ...]) -> None:
    router, dealer = pair

    async def go() -> None:
        loopsock.send(dealer, [b"hello"])
        assert (await asyncio.wait_for(loopsock.recv_batch(router), 5)) == [[b"d1", b"hello"]]
        for i in range(20):
            receiver = asyncio.ensure_future(loopsock.recv_batch(router))
            await asyncio.sleep(0)  # the receiver is asleep on the fd
            loopsock.send(dealer, [b"m%d" % i])
            _settle()
            # a send on the same socket processes its mailbox: the fd's signal is gone, a message waits
            assert loopsock.send(router, [b"d1", b"pong"]) is None
            got = await asyncio.wait_for(receiver, 5)
            assert got == [[b"d1", b"m%d" % i]]
        loopsock.close(router, 0)
        loopsock.close(dealer, 0)

    asyncio.run(go())


def test_reading_events_elsewhere_keeps_the_receiver_awake(pair: tuple[zmq.Socket[bytes], ...]) -> None:
    router, dealer = pair

    async def go() -> None:
        receiver = asyncio.ensure_future(loopsock.recv_batch(dealer))
        await asyncio.sleep(0)
        loopsock.send(dealer, [b"hi"])  # the router learns the dealer's routing id
        _settle()
        assert loopsock.pending_input(router)
        await loopsock.recv_batch(router)
        loopsock.send(router, [b"d1", b"x"])
        _settle()
        assert loopsock.pending_input(dealer)  # reads EVENTS: the fd signal is consumed here
        assert (await asyncio.wait_for(receiver, 5)) == [[b"x"]]
        loopsock.close(router, 0)
        loopsock.close(dealer, 0)

    asyncio.run(go())


def test_a_batch_takes_what_is_queued_up_to_the_limit(pair: tuple[zmq.Socket[bytes], ...]) -> None:
    router, dealer = pair

    async def go() -> None:
        for i in range(10):
            loopsock.send(dealer, [b"%d" % i])
        _settle()
        first = await loopsock.recv_batch(router, limit=4)
        rest = await loopsock.recv_batch(router)
        assert [m[1] for m in first + rest] == [b"%d" % i for i in range(10)]
        assert len(first) == 4
        loopsock.close(router, 0)
        loopsock.close(dealer, 0)

    asyncio.run(go())


def test_sends_say_why_they_did_not_go(pair: tuple[zmq.Socket[bytes], ...]) -> None:
    router, dealer = pair
    assert loopsock.send(router, [b"nobody", b"x"]) == "unroutable"
    dealer.setsockopt(zmq.SNDHWM, 1)
    dealer.disconnect(dealer.getsockopt_string(zmq.LAST_ENDPOINT))
    outcomes = {loopsock.send(dealer, [b"x"]) for _ in range(5)}
    assert "full" in outcomes  # no peer: a DEALER cannot queue, never blocks


def test_close_cancels_a_waiting_receiver_and_drops_the_reader(pair: tuple[zmq.Socket[bytes], ...]) -> None:
    router, _dealer = pair

    async def go() -> None:
        receiver = asyncio.ensure_future(loopsock.recv_batch(router))
        await asyncio.sleep(0)
        loopsock.close(router, 0)
        with pytest.raises(asyncio.CancelledError):
            await receiver
        assert router.closed

    asyncio.run(go())
