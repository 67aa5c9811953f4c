"""Pure state machines: retry backoff, the circuit breaker, peer liveness (injected clocks)."""

from __future__ import annotations

import itertools
import math

import pytest

from casperd.breaker import BreakerState, CircuitBreaker
from casperd.liveness import Liveness, PeerClock
from casperd.retry import RetryPolicy


# --- retry --------------------------------------------------------------------------------------
def test_default_backoff_schedule_doubles_to_the_cap() -> None:
    p = RetryPolicy()
    assert [p.backoff(n) for n in range(1, 10)] == [1, 2, 4, 8, 16, 32, 60, 60, 60]


def test_backoff_below_one_failure_is_the_base() -> None:
    p = RetryPolicy()
    assert p.backoff(0) == 1.0
    assert p.backoff(-5) == 1.0


@pytest.mark.parametrize(
    ("base", "factor", "cap", "expected"),
    [
        (0.5, 3.0, 100.0, [0.5, 1.5, 4.5, 13.5, 40.5, 100.0, 100.0]),
        (2.0, 1.0, 60.0, [2.0] * 7),
        (10.0, 2.0, 5.0, [5.0] * 7),  # cap below base: always the cap
        (0.0, 2.0, 60.0, [0.0] * 7),
        (1.0, 1.5, 4.0, [1.0, 1.5, 2.25, 3.375, 4.0, 4.0, 4.0]),
    ],
)
def test_custom_backoff(base: float, factor: float, cap: float, expected: list[float]) -> None:
    p = RetryPolicy(base_s=base, factor=factor, cap_s=cap)
    got = [p.backoff(n) for n in range(1, 8)]
    assert got == pytest.approx(expected)


def test_backoff_is_monotonic_and_capped() -> None:
    p = RetryPolicy(base_s=0.25, factor=1.7, cap_s=33.0)
    values = [p.backoff(n) for n in range(1, 200)]
    assert all(a <= b for a, b in itertools.pairwise(values))
    assert max(values) == 33.0


@pytest.mark.parametrize("n", [63, 64, 65, 100, 1_000, 10**6, 10**18, 2**63, 10**100])
def test_huge_attempt_counts_do_not_overflow(n: int) -> None:
    assert RetryPolicy().backoff(n) == 60.0
    v = RetryPolicy(factor=10.0, cap_s=7.0).backoff(n)
    assert v == 7.0 and math.isfinite(v)


@pytest.mark.parametrize(("base", "factor"), [(1.0, 1.0), (0.0, 2.0)])
def test_non_growing_backoff_stays_flat_after_64_failures(base: float, factor: float) -> None:
    p = RetryPolicy(base_s=base, factor=factor, cap_s=60.0)
    assert p.backoff(65) == p.backoff(1) == base


def test_large_factor_does_not_overflow() -> None:
    p = RetryPolicy(factor=1e6, cap_s=60.0)
    assert [p.backoff(n) for n in (1, 2, 3, 60, 64)] == [1.0, 60.0, 60.0, 60.0, 60.0]


def test_exhausted() -> None:
    p = RetryPolicy(max_attempts=3)
    assert [p.exhausted(a) for a in range(5)] == [False, False, False, True, True]
    assert not p.exhausted(3, max_attempts=4)
    assert p.exhausted(4, max_attempts=4)
    assert p.exhausted(1, max_attempts=1)
    assert not p.exhausted(0, max_attempts=None)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_attempts": 0},
        {"max_attempts": -1},
        {"base_s": -0.1},
        {"cap_s": -1.0},
        {"factor": 0.99},
        {"factor": 0.0},
    ],
)
def test_invalid_policies_raise(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_policy_is_frozen() -> None:
    p = RetryPolicy()
    with pytest.raises(AttributeError):
        p.max_attempts = 9  # type: ignore[misc]


# --- circuit breaker ----------------------------------------------------------------------------
def _tripped(threshold: int = 3, recovery: float = 10.0, probes: int = 1, at: float = 100.0) -> CircuitBreaker:
    b = CircuitBreaker(failure_threshold=threshold, recovery_s=recovery, probes=probes)
    for _ in range(threshold):
        b.record_failure(at)
    assert b.state is BreakerState.OPEN
    return b


def test_breaker_starts_closed_and_allows() -> None:
    b = CircuitBreaker()
    assert b.state is BreakerState.CLOSED
    for t in range(100):
        assert b.allow(float(t)) and b.would_allow(float(t))


def test_breaker_opens_after_threshold_consecutive_failures() -> None:
    b = CircuitBreaker(failure_threshold=3, recovery_s=10.0)
    b.record_failure(1.0)
    b.record_failure(2.0)
    assert b.state is BreakerState.CLOSED and b.allow(2.0)
    b.record_failure(3.0)
    assert b.state is BreakerState.OPEN
    assert b.trips == 1 and b.opened_at == 3.0
    assert not b.allow(3.0)


def test_success_resets_the_consecutive_count() -> None:
    b = CircuitBreaker(failure_threshold=3, recovery_s=10.0)
    for _ in range(5):
        b.record_failure(0.0)
        b.record_failure(0.0)
        b.record_success()
    assert b.state is BreakerState.CLOSED and b.failures == 0 and b.trips == 0


def test_open_refuses_until_recovery_then_half_open_admits_one_probe() -> None:
    b = _tripped(recovery=10.0, at=100.0)
    for t in (100.0, 105.0, 109.999):
        assert not b.would_allow(t)
        assert not b.allow(t)
        assert b.state is BreakerState.OPEN
    assert b.allow(110.0)
    assert b.state is BreakerState.HALF_OPEN
    assert not b.allow(110.0)
    assert not b.allow(10_000.0)  # no more probes however long it waits


def test_half_open_admits_the_configured_number_of_probes() -> None:
    b = _tripped(probes=3, recovery=5.0, at=0.0)
    assert [b.allow(5.0) for _ in range(5)] == [True, True, True, False, False]
    assert b.state is BreakerState.HALF_OPEN


def test_half_open_success_closes() -> None:
    b = _tripped(recovery=10.0, at=0.0)
    assert b.allow(10.0)
    b.record_success()
    assert b.state is BreakerState.CLOSED and b.failures == 0
    assert all(b.allow(10.0) for _ in range(10))
    # and it takes a full threshold of failures to open again
    b.record_failure(11.0)
    b.record_failure(11.0)
    assert b.state is BreakerState.CLOSED


def test_half_open_failure_reopens_and_restarts_the_timer() -> None:
    b = _tripped(recovery=10.0, at=0.0)
    assert b.allow(10.0)
    b.record_failure(15.0)
    assert b.state is BreakerState.OPEN
    assert b.opened_at == 15.0 and b.trips == 2
    assert not b.allow(20.0)  # 10 s after the first opening, but only 5 after the re-opening
    assert not b.allow(24.9)
    assert b.allow(25.0)
    assert b.state is BreakerState.HALF_OPEN


def test_half_open_failure_reopens_even_with_a_high_threshold() -> None:
    b = _tripped(threshold=5, recovery=1.0, at=0.0)
    assert b.allow(1.0)
    b.record_failure(1.5)  # a single failing probe is enough
    assert b.state is BreakerState.OPEN


def test_would_allow_does_not_consume_a_probe() -> None:
    b = _tripped(recovery=10.0, at=0.0)
    assert not b.would_allow(9.0)
    for _ in range(10):
        assert b.would_allow(10.0)
    assert b.state is BreakerState.OPEN  # would_allow does not even move it to half-open
    assert b.allow(10.0)
    assert b.in_flight_probes == 1
    for _ in range(10):
        assert not b.would_allow(10.0)
    assert b.in_flight_probes == 1


def test_would_allow_matches_allow_in_half_open() -> None:
    b = _tripped(probes=2, recovery=1.0, at=0.0)
    assert b.allow(1.0)
    assert b.would_allow(1.0) and b.in_flight_probes == 1
    assert b.allow(1.0)
    assert not b.would_allow(1.0) and not b.allow(1.0)


def test_breaker_trips_counted_once_per_opening() -> None:
    b = _tripped(threshold=2, recovery=1.0, at=0.0)
    b.record_failure(0.5)  # already open: no new trip
    assert b.trips == 1
    assert b.allow(2.0)
    b.record_failure(2.0)
    assert b.trips == 2


# --- liveness -----------------------------------------------------------------------------------
def test_liveness_thresholds() -> None:
    c = PeerClock(interval_s=1.0, misses=3)
    c.seen(100.0)
    assert c.state(100.0) is Liveness.ALIVE
    assert c.state(101.0) is Liveness.ALIVE
    assert c.state(101.5) is Liveness.ALIVE  # exactly 1.5 intervals: still alive
    assert c.state(101.51) is Liveness.SUSPECT
    assert c.state(103.0) is Liveness.SUSPECT  # exactly misses intervals: still suspect
    assert c.state(103.01) is Liveness.DEAD
    assert c.state(1e9) is Liveness.DEAD


def test_liveness_scales_with_interval_and_misses() -> None:
    c = PeerClock(interval_s=0.2, misses=5)
    c.seen(10.0)
    assert c.state(10.29) is Liveness.ALIVE
    assert c.state(10.31) is Liveness.SUSPECT
    assert c.state(10.99) is Liveness.SUSPECT
    assert c.state(11.01) is Liveness.DEAD


def test_any_traffic_revives_a_peer() -> None:
    c = PeerClock(interval_s=1.0, misses=3)
    c.seen(0.0)
    assert c.state(10.0) is Liveness.DEAD
    c.seen(10.0)
    assert c.state(10.5) is Liveness.ALIVE


def test_heartbeat_due() -> None:
    c = PeerClock(interval_s=2.0)
    c.sent(50.0)
    assert not c.heartbeat_due(50.0)
    assert not c.heartbeat_due(51.99)
    assert c.heartbeat_due(52.0)
    assert c.heartbeat_due(80.0)
    c.sent(80.0)
    assert not c.heartbeat_due(81.0)


def test_heartbeat_due_is_independent_of_receiving() -> None:
    c = PeerClock(interval_s=1.0)
    c.sent(0.0)
    c.seen(5.0)
    assert c.heartbeat_due(5.0)
    assert c.state(5.0) is Liveness.ALIVE


def test_release_probe_lets_another_probe_through() -> None:
    from casperd.breaker import BreakerState, CircuitBreaker

    b = CircuitBreaker(failure_threshold=1, recovery_s=1.0)
    b.record_failure(0.0)
    assert b.allow(2.0) and b.state is BreakerState.HALF_OPEN
    assert not b.allow(2.0)  # the one probe is out
    b.release_probe()  # it was handed back: no verdict
    assert b.allow(2.0)
    b.release_probe()
    b.release_probe()  # never below zero
    assert b.in_flight_probes == 0
