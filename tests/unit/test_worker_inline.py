"""The worker shell runs a synchronous handler (``TaskType.run_inline``: noop, echo) in place when a
slot is free and no cache is asked for: no asyncio task, the same reports (a RESULT or FAILED in the
next flush) and metrics. Busy slots and cached tasks still go through an asyncio task, in order."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq.asyncio

from casperd import codec
from casperd.errors import TaskError
from casperd.handlers import REGISTRY, Catalog, RunContext, TaskType
from casperd.messages import Assignment, FailedBatch, ResultBatch, TaskBatch
from casperd.metrics import Metrics
from casperd.settings import load_settings
from casperd.transport import SocketOptions
from casperd.worker import Worker

pytestmark = pytest.mark.unit


class FakeSock:
    """Stands for the DEALER: keeps what the worker sends."""

    def __init__(self) -> None:
        self.sent: list[list[bytes]] = []
        self._parts: list[bytes] = []

    def send(self, frame: bytes, flags: int = 0) -> None:
        self._parts.append(frame)
        if not flags & zmq.SNDMORE:
            self.sent.append(self._parts)
            self._parts = []

    def messages(self) -> list[Any]:
        return [codec.decode(frames).message for frames in self.sent]


class FakeCache:
    enabled = True

    def __init__(self) -> None:
        self.keys: list[str] = []

    async def get_or_compute(self, key: str, compute: Callable[[], Awaitable[Any]]) -> Any:
        self.keys.append(key)
        return await compute()

    def stats(self) -> dict[str, int]:
        return {}


@pytest.fixture
def zctx() -> Iterator[zmq.asyncio.Context]:
    ctx = zmq.asyncio.Context()
    yield ctx
    ctx.term()


def make_worker(
    zctx: zmq.asyncio.Context, tmp_path: Path, capacity: int = 2, catalog: Catalog | None = None, cache: Any = None
) -> tuple[Worker, FakeSock]:
    s = load_settings(
        {"role": "developer", "state_dir": str(tmp_path), "curve": False, "capacity": capacity, "prefetch": 8}
    )
    w = Worker(s, Metrics(), zctx, SocketOptions(), cache, catalog)
    sock = FakeSock()
    w.sock = sock  # type: ignore[assignment]  # the worker only sends through it here
    return w, sock


def assignment(ttype: str, data: dict[str, Any] | None = None, cache: bool = False) -> Assignment:
    return Assignment(task_id=uuid.uuid4(), type=ttype, input=data or {}, attempt=1, lease_ms=30_000, cache=cache)


def tasks(*items: Assignment) -> list[bytes]:
    return codec.encode(TaskBatch(tasks=items))


async def test_noop_and_echo_run_in_place_and_report_in_one_result(zctx: zmq.asyncio.Context, tmp_path: Path) -> None:
    w, sock = make_worker(zctx, tmp_path)
    a, b = assignment("noop"), assignment("echo", {"x": [1, 2]})
    w.on_broker(tasks(a, b))
    # done before the loop turns: no asyncio task, nothing left running
    assert w.tasks == {}
    assert w.running == {}
    assert w.core.completed == 2
    (msg,) = sock.messages()  # sent at the batch's end, not a loop turn later
    assert isinstance(msg, ResultBatch)
    assert [(r.task_id, r.attempt, r.output) for r in msg.results] == [
        (a.task_id, 1, None),
        (b.task_id, 1, {"x": [1, 2]}),
    ]
    assert w.metrics.registry.get_sample_value("casper_tasks_executed_total", {"outcome": "ok"}) == 2


async def test_an_inline_handler_that_raises_is_reported_failed(zctx: zmq.asyncio.Context, tmp_path: Path) -> None:
    def refuse(ctx: RunContext, data: dict[str, Any]) -> None:
        raise TaskError("no")

    def crash(ctx: RunContext, data: dict[str, Any]) -> None:
        raise ValueError("bug")

    async def never(ctx: RunContext, data: dict[str, Any]) -> None:
        raise AssertionError("the inline handler runs, not this one")

    catalog = Catalog()
    catalog.add_type(TaskType("refuse", never, run_inline=refuse))
    catalog.add_type(TaskType("crash", never, run_inline=crash))
    w, sock = make_worker(zctx, tmp_path, catalog=catalog)
    a, b = assignment("refuse"), assignment("crash")
    w.on_broker(tasks(a, b))
    assert w.tasks == {} and w.running == {}
    (msg,) = sock.messages()
    assert isinstance(msg, FailedBatch)
    assert [(f.task_id, f.error.code, f.retryable) for f in msg.failures] == [
        (a.task_id, "task", True),
        (b.task_id, "crash", True),
    ]
    assert w.core.failed == 2


async def test_one_receive_is_reported_in_one_flush(zctx: zmq.asyncio.Context, tmp_path: Path) -> None:
    w, sock = make_worker(zctx, tmp_path)
    batch = [tasks(assignment("noop")) for _ in range(5)]
    w.on_batch(batch)
    (msg,) = sock.messages()
    assert isinstance(msg, ResultBatch) and len(msg.results) == 5
    await asyncio.sleep(0)
    assert len(sock.sent) == 1  # nothing left for a later flush


async def test_runs_in_place_are_counted_after_their_report_is_sent(zctx: zmq.asyncio.Context, tmp_path: Path) -> None:
    w, sock = make_worker(zctx, tmp_path)
    counted_at_send: list[float | None] = []
    send = sock.send

    def watching(frame: bytes, flags: int = 0) -> None:
        counted_at_send.append(w.metrics.registry.get_sample_value("casper_tasks_executed_total", {"outcome": "ok"}))
        send(frame, flags)

    sock.send = watching  # type: ignore[method-assign]
    w.on_batch([tasks(assignment("noop"), assignment("echo"))])
    assert counted_at_send and counted_at_send[0] is None  # the RESULT went out first
    assert w.metrics.registry.get_sample_value("casper_tasks_executed_total", {"outcome": "ok"}) == 2
    assert w.metrics.registry.get_sample_value("casper_task_seconds_count", {"type": "noop"}) == 1


async def test_busy_slots_make_a_noop_wait_its_turn(zctx: zmq.asyncio.Context, tmp_path: Path) -> None:
    w, sock = make_worker(zctx, tmp_path, capacity=1)
    slow, quick = assignment("sleep", {"seconds": 0.05}), assignment("noop")
    w.on_broker(tasks(slow, quick))
    assert set(w.tasks) == {slow.task_id, quick.task_id}  # the noop queues for the slot
    for _ in range(100):
        await asyncio.sleep(0.01)
        if not w.running:
            break
    assert w.running == {} and w.tasks == {}
    results = [r.task_id for m in sock.messages() if isinstance(m, ResultBatch) for r in m.results]
    assert results == [slow.task_id, quick.task_id]


async def test_a_cached_noop_goes_through_the_cache(zctx: zmq.asyncio.Context, tmp_path: Path) -> None:
    cache = FakeCache()
    w, sock = make_worker(zctx, tmp_path, cache=cache)
    a = assignment("echo", {"v": 1}, cache=True)
    w.on_broker(tasks(a))
    assert set(w.tasks) == {a.task_id}
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert len(cache.keys) == 1
    assert w.running == {}
    (msg,) = [m for m in sock.messages() if isinstance(m, ResultBatch)]
    assert msg.results[0].output == {"v": 1}


async def test_the_inflight_gauge_counts_running_tasks_when_scraped(zctx: zmq.asyncio.Context, tmp_path: Path) -> None:
    w, _ = make_worker(zctx, tmp_path)
    w.on_broker(tasks(assignment("sleep", {"seconds": 0.02})))
    assert w.metrics.registry.get_sample_value("casper_tasks_inflight") == 1
    for _ in range(100):
        await asyncio.sleep(0.01)
        if not w.running:
            break
    assert w.metrics.registry.get_sample_value("casper_tasks_inflight") == 0


def test_the_builtin_noop_and_echo_have_inline_handlers() -> None:
    assert REGISTRY["noop"].run_inline is not None
    assert REGISTRY["echo"].run_inline is not None
    assert REGISTRY["sleep"].run_inline is None
