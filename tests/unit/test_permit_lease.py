"""Model-call permits granted ahead (``llm_permit_lease_s``): the mesh-wide buckets' ``lease`` and
``release``, and a worker's :class:`MeshLimiter` against the policeman's real ``llm-permit`` service
(in-process: the REQUEST/REPLY hop is a direct call)."""

from __future__ import annotations

import asyncio
import copy
from types import SimpleNamespace
from typing import Any

import pytest

from casperd.agents.police import PoliceService
from casperd.agents.ratelimit import MeshRateLimit, RateObservation
from casperd.agents.services import MeshLimiter
from casperd.settings import load_settings

pytestmark = pytest.mark.unit


# --- the buckets ------------------------------------------------------------------------------------
def test_leases_come_only_from_the_top_half_of_the_request_bucket() -> None:
    lim = MeshRateLimit(rpm=10, tpm=10**9)
    assert lim.lease(10, 0, 0.0) == 5  # 10 -> 5: never below half the bucket
    assert lim.lease(1, 0, 0.0) == 0
    granted = sum(lim.reserve(0, 0.0) == 0.0 for _ in range(10))
    assert granted == 5  # the other half is still there for calls that ask
    snap = lim.snapshot(0.0)
    assert (snap["leased"], snap["in_flight"], snap["grants"]) == (5, 10, 10)


def test_leases_come_only_from_the_top_half_of_the_input_bucket() -> None:
    lim = MeshRateLimit(rpm=1000, tpm=1000)
    assert lim.lease(5, 300, 0.0) == 1  # 1000 -> 700; another would leave 400 < 500


def test_no_lease_while_a_pause_is_on_or_the_output_bucket_is_in_debt() -> None:
    lim = MeshRateLimit(rpm=100, tpm=10**6)
    lim.observe(RateObservation(status=529, retry_after_s=10.0), 0.0)
    assert lim.lease(1, 0, 5.0) == 0
    assert lim.lease(1, 0, 10.0) == 1
    debt = MeshRateLimit(rpm=100, tpm=1000)
    debt.settle(0, 0, 0.0, output=5000)
    assert debt.lease(1, 0, 0.0) == 0


def test_release_gives_back_the_request_and_the_input_charge() -> None:
    lim = MeshRateLimit(rpm=2, tpm=1000)
    assert lim.lease(1, 200, 0.0) == 1
    lim.release(200, 0.0)
    assert lim.reserve(400, 0.0) == 0.0 and lim.reserve(400, 0.0) == 0.0  # the full buckets again
    snap = lim.snapshot(0.0)
    assert (snap["released"], snap["in_flight"], snap["grants"], snap["tokens_granted"]) == (1, 2, 2, 800)


# --- a worker's limiter against the policeman's service ------------------------------------------------
class Mesh:
    """The policeman's ``llm-permit`` (the real handler) behind a worker's ``request``."""

    def __init__(self, rpm: int = 1000, tpm: int = 10**6, lease_s: float = 1.0) -> None:
        self.police: Any = SimpleNamespace(
            rate=MeshRateLimit(rpm, tpm), leases={}, s=SimpleNamespace(llm_permit_lease_s=lease_s)
        )
        self.requests: list[dict[str, Any]] = []

    async def request(
        self, op: str, args: dict[str, Any], attachments: tuple[bytes, ...] = (), timeout_s: float = 15.0
    ) -> tuple[Any, tuple[bytes, ...]]:
        assert op == "llm-permit"
        self.requests.append(copy.deepcopy(args))
        return await PoliceService._permit(self.police, "developer-1", args, ())

    @property
    def rate(self) -> MeshRateLimit:
        return self.police.rate


def limiter(mesh: Mesh, lease_s: float = 1.0, capacity: int = 1) -> MeshLimiter:
    s = load_settings(
        {"role": "developer", "node_id": "developer-1", "capacity": capacity, "llm_permit_lease_s": lease_s}
    )
    return MeshLimiter(mesh, s)


async def settled() -> None:
    for _ in range(5):  # the background report and top-up
        await asyncio.sleep(0)


async def test_the_next_call_takes_the_permit_granted_when_the_last_one_ended() -> None:
    mesh = Mesh()
    lim = limiter(mesh)
    await lim.acquire(100)
    assert len(mesh.requests) == 1 and "lease" not in mesh.requests[0]  # a call that asks holds nothing ahead
    lim.settle(100, 90, 10)
    await settled()
    assert len(mesh.requests) == 2  # the settle went at once, asking for the next call's permit
    assert mesh.requests[1]["settle"] == [[100, 90, 10]] and mesh.requests[1]["lease"] == [1, 100]
    assert len(lim.spares) == 1 and mesh.police.leases == {"developer-1": [100]}
    await lim.acquire(120)
    assert len(mesh.requests) == 2  # no round trip before this call
    lim.settle(120, 110, 5)
    await settled()
    assert mesh.requests[2]["used"] == 1 and mesh.requests[2]["settle"] == [[100, 110, 5]]  # charged 100, not 120
    assert mesh.police.leases == {"developer-1": [120]}  # the used one gone, the next one ahead
    # the one held ahead is charged like the last call (120)
    assert mesh.rate.inflight == 1 and mesh.rate.tokens_granted == 90 + 110 + 120


async def test_lease_off_is_one_permit_round_trip_per_call_as_before() -> None:
    mesh = Mesh()
    lim = limiter(mesh, lease_s=0.0)
    for _ in range(3):
        await lim.acquire(100)
        lim.settle(100, 50, 1)
        await settled()
    assert len(mesh.requests) == 3 and not any("lease" in r for r in mesh.requests)
    assert mesh.requests[1]["settle"] == [[100, 50, 1]]  # settles ride along with the next permit
    assert mesh.rate.leased == 0 and not lim.spares


async def test_the_policeman_grants_none_ahead_when_its_own_lease_is_off() -> None:
    mesh = Mesh(lease_s=0.0)
    lim = limiter(mesh)
    await lim.acquire(100)
    lim.settle(100, 50, 1)
    await settled()
    assert "lease" in mesh.requests[1] and not lim.spares and mesh.rate.leased == 0


async def test_an_unused_permit_ahead_is_given_back_when_its_lease_runs_out() -> None:
    mesh = Mesh(rpm=10)
    lim = limiter(mesh, lease_s=0.3)  # usable for 0.05 s (the margin is 0.25 s)
    await lim.acquire(100)
    lim.settle(100, 100, 0)
    await settled()
    assert len(lim.spares) == 1 and mesh.rate.inflight == 1
    for _ in range(100):
        await asyncio.sleep(0.01)
        if mesh.requests[-1].get("release"):
            break
    assert mesh.requests[-1]["release"] == [100] and not lim.spares
    assert mesh.rate.inflight == 0 and mesh.police.leases == {} and mesh.rate.released == 1


async def test_a_429_gives_back_the_permits_ahead_and_the_pause_grants_none() -> None:
    mesh = Mesh()
    lim = limiter(mesh)
    await lim.acquire(100)
    lim.settle(100, 100, 0)
    await settled()
    assert len(lim.spares) == 1
    lim.observe(RateObservation(status=429, retry_after_s=30.0))
    lim.settle(100, 0, 0)  # the failed call
    await settled()
    assert not lim.spares and mesh.rate.released == 1 and mesh.police.leases == {}
    assert mesh.rate.leased == 1  # none since: the pause is on
    n = len(mesh.requests)
    task = asyncio.ensure_future(lim.acquire(100))
    await settled()
    assert len(mesh.requests) == n + 1 and not task.done()  # it asked, and waits out the pause
    task.cancel()


async def test_no_permit_ahead_near_the_limit() -> None:
    mesh = Mesh(rpm=2)
    lim = limiter(mesh)
    for _ in range(2):
        await lim.acquire(10)
        lim.settle(10, 10, 0)
        await settled()
    assert any("lease" in r for r in mesh.requests)
    assert not lim.spares and mesh.rate.leased == 0  # one of two left: half the bucket, none ahead


async def test_a_call_much_bigger_than_the_permit_ahead_asks_for_its_own() -> None:
    mesh = Mesh()
    lim = limiter(mesh)
    await lim.acquire(100)
    lim.settle(100, 100, 0)
    await settled()
    n = len(mesh.requests)
    await lim.acquire(50_000)
    assert len(mesh.requests) == n + 1 and mesh.requests[-1]["tokens"] == 50_000 and len(lim.spares) == 1


async def test_a_release_the_node_was_never_granted_is_ignored() -> None:
    mesh = Mesh(rpm=10)
    for _ in range(10):
        await mesh.request("llm-permit", {"tokens": 1})
    await mesh.request("llm-permit", {"tokens": 0, "release": [1, 1, 1], "used": 5})
    assert mesh.rate.released == 0 and mesh.rate.reserve(1, mesh.rate._last or 0.0) > 0


async def test_a_node_gets_back_only_what_its_permits_ahead_were_charged() -> None:
    mesh = Mesh(rpm=1000, tpm=10_000)
    await mesh.request("llm-permit", {"tokens": 0, "lease": [1, 100]})
    assert mesh.police.leases == {"developer-1": [100]}
    await mesh.request("llm-permit", {"tokens": 0, "release": [10**9, 5]})
    snap = mesh.rate.snapshot(mesh.rate._last)
    assert mesh.police.leases == {} and snap["released"] == 1 and snap["tokens_granted"] == 0


# --- the benchmark's trace ------------------------------------------------------------------------------
def test_call_trace_marks_only_when_enabled(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import json
    import uuid

    from casperd import calltrace

    monkeypatch.setattr(calltrace, "_path", None)
    monkeypatch.setattr(calltrace, "_file", None)
    calltrace.mark("nothing")
    assert not calltrace.enabled()
    path = tmp_path / "trace.jsonl"
    monkeypatch.setattr(calltrace, "_path", str(path))
    tid = uuid.uuid4()
    opened: list[str] = []
    real_open = open

    def counting_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", counting_open)

    async def run() -> None:
        calltrace.running(tid)
        calltrace.mark("handler start")

    asyncio.run(run())
    calltrace.mark("result sent", tid)
    calltrace.mark("permit served")
    assert opened == [str(path)]  # opened once, not once per mark (the marks time sub-millisecond steps)
    trace_file = calltrace._file
    assert trace_file is not None
    monkeypatch.undo()  # the module's file back to what it was (None outside the benchmark)
    trace_file.close()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r[1], r[2]) for r in rows] == [
        ("handler start", str(tid)),
        ("result sent", str(tid)),
        ("permit served", None),
    ]
