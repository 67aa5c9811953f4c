"""Pure pieces of the Claude client: usage/cost accounting, rate-limit headers, MeshRateLimit."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from email.utils import formatdate

import pytest

from casperd.agents.ratelimit import (
    LocalLimiter,
    MeshRateLimit,
    NoLimiter,
    RateObservation,
    estimate_tokens,
    parse_rate_headers,
)
from casperd.agents.usage import Usage, cost_of, price_for
from casperd.settingtables import DEFAULT_PRICES, ModelPrice

pytestmark = pytest.mark.unit

NOW_WALL = 1_750_000_000.0  # a whole second: HTTP dates have one-second resolution


# --- usage ----------------------------------------------------------------------------------------
def test_usage_add_and_total() -> None:
    a = Usage(input_tokens=10, output_tokens=5, cache_read_tokens=100, cache_write_tokens=7, calls=1, cost_usd=0.25)
    b = Usage(input_tokens=1, output_tokens=2, cache_read_tokens=3, cache_write_tokens=4, calls=2, cost_usd=0.5)
    a.add(b)
    assert (a.input_tokens, a.output_tokens, a.cache_read_tokens, a.cache_write_tokens, a.calls) == (11, 7, 103, 11, 3)
    assert a.cost_usd == pytest.approx(0.75)
    assert a.total_tokens == 11 + 7 + 103 + 11
    assert b.total_tokens == 10  # the added one is untouched


def test_usage_dict_round_trip_and_tolerance() -> None:
    u = Usage(input_tokens=3, output_tokens=4, cache_read_tokens=5, cache_write_tokens=6, calls=2, cost_usd=0.123456789)
    d = u.to_dict()
    assert d["cost_usd"] == 0.123457
    back = Usage.from_dict(d)
    assert back.total_tokens == u.total_tokens and back.calls == 2
    assert Usage.from_dict(None) == Usage()
    assert Usage.from_dict({"input_tokens": 9}) == Usage(input_tokens=9)
    assert Usage.from_dict({"input_tokens": "garbage", "cost_usd": None, "calls": 1}) == Usage(calls=1)


def test_cost_of_known_model() -> None:
    # sonnet 4.5: $3 in, $15 out, $0.30 cache read, $3.75 cache write per million
    cost = cost_of("claude-sonnet-4-5", 1_000_000, 100_000, 2_000_000, 400_000, DEFAULT_PRICES)
    assert cost == pytest.approx(3.0 + 1.5 + 0.6 + 1.5)


def test_cost_of_date_suffixed_model_uses_the_longest_prefix() -> None:
    prices = {"claude-sonnet": ModelPrice(input=100, output=100, cache_write=100, cache_read=100), **DEFAULT_PRICES}
    dated = cost_of("claude-sonnet-4-5-20250929", 1_000_000, 0, 0, 0, prices)
    assert dated == pytest.approx(3.0)
    assert price_for("claude-sonnet-4-5-20250929", prices) is prices["claude-sonnet-4-5"]
    assert price_for("claude-sonnet-3", prices) is prices["claude-sonnet"]


def test_cost_of_unknown_model_is_zero_and_warned_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="casperd.agents.usage")
    model = "claude-mystery-9-unit-test"
    assert cost_of(model, 1000, 1000, 0, 0, DEFAULT_PRICES) == 0.0
    assert cost_of(model, 5, 5, 5, 5, DEFAULT_PRICES) == 0.0
    warnings = [r.getMessage() for r in caplog.records if model in r.getMessage()]
    assert len(warnings) == 1
    assert "model_prices" in warnings[0]


# --- headers ---------------------------------------------------------------------------------------
def test_parse_retry_after_seconds() -> None:
    assert parse_rate_headers({"retry-after": "3"}, 429, NOW_WALL).retry_after_s == 3.0
    assert parse_rate_headers({"Retry-After": "1.5"}, 429, NOW_WALL).retry_after_s == 1.5
    assert parse_rate_headers({"retry-after-ms": "250"}, 429, NOW_WALL).retry_after_s == pytest.approx(0.25)
    obs = parse_rate_headers({}, 200, NOW_WALL)
    assert obs.status == 200 and obs.retry_after_s is None and obs.requests_limit is None


def test_parse_retry_after_http_date() -> None:
    date = formatdate(NOW_WALL + 30, usegmt=True)
    assert parse_rate_headers({"retry-after": date}, 429, NOW_WALL).retry_after_s == pytest.approx(30.0)
    past = formatdate(NOW_WALL - 30, usegmt=True)
    assert parse_rate_headers({"retry-after": past}, 429, NOW_WALL).retry_after_s == 0.0


def test_parse_ratelimit_headers_rfc3339() -> None:
    from datetime import UTC, datetime

    reset = datetime.fromtimestamp(NOW_WALL + 42, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    reset_frac = datetime.fromtimestamp(NOW_WALL + 7.5, tz=UTC).isoformat()
    obs = parse_rate_headers(
        {
            "anthropic-ratelimit-requests-limit": "50",
            "anthropic-ratelimit-requests-remaining": "49",
            "anthropic-ratelimit-requests-reset": reset,
            "Anthropic-RateLimit-Tokens-Limit": "100000",
            "anthropic-ratelimit-tokens-remaining": "0",
            "anthropic-ratelimit-tokens-reset": reset_frac,
        },
        200,
        NOW_WALL,
    )
    assert (obs.requests_limit, obs.requests_remaining, obs.tokens_limit, obs.tokens_remaining) == (50, 49, 100000, 0)
    assert obs.requests_reset_s == pytest.approx(42.0)
    assert obs.tokens_reset_s == pytest.approx(7.5)


@pytest.mark.parametrize("garbage", ["soon", "", "2025-13-45T99:00:00Z", "Mon, 99 Foo 2025", "nan", "-5", "inf"])
def test_parse_garbage_is_none(garbage: str) -> None:
    obs = parse_rate_headers(
        {
            "retry-after": garbage,
            "anthropic-ratelimit-requests-limit": garbage,
            "anthropic-ratelimit-requests-reset": garbage if garbage != "-5" else "later",
            "anthropic-ratelimit-tokens-remaining": garbage if garbage not in ("-5",) else "x",
        },
        429,
        NOW_WALL,
    )
    assert obs.retry_after_s is None
    assert obs.requests_reset_s is None
    assert obs.tokens_remaining is None
    if garbage != "-5":
        assert obs.requests_limit is None


def test_estimate_tokens_counts_input_only() -> None:
    small = estimate_tokens("sys", [{"role": "user", "content": "hi"}], None)
    big = estimate_tokens("sys", [{"role": "user", "content": "x" * 4000}], None)
    assert 0 < small < 20  # max_tokens is not charged up front
    assert big - small >= 999
    assert estimate_tokens("", [], [{"name": "t"}]) > 0


def test_parse_input_and_output_token_headers() -> None:
    p = "anthropic-ratelimit-"
    obs = parse_rate_headers(
        {
            p + "input-tokens-limit": "2000000",
            p + "input-tokens-remaining": "1999000",
            p + "input-tokens-reset": "2026-01-01T00:00:30Z",
            p + "output-tokens-limit": "400000",
            p + "output-tokens-remaining": "0",
            p + "output-tokens-reset": "2026-01-01T00:00:05Z",
        },
        200,
        datetime(2026, 1, 1, tzinfo=UTC).timestamp(),
    )
    assert (obs.input_limit, obs.input_remaining, obs.input_reset_s) == (2_000_000, 1_999_000, 30.0)
    assert (obs.output_limit, obs.output_remaining, obs.output_reset_s) == (400_000, 0, 5.0)
    assert obs.has_limits and not RateObservation(status=429).has_limits


# --- MeshRateLimit -----------------------------------------------------------------------------------
def run_greedy(lim: MeshRateLimit, tokens: int, until: float, start: float = 0.0) -> list[float]:
    """Ask as soon as allowed (event driven) until ``until``; return the grant times."""
    t, grants = start, []
    while t < until:
        wait = lim.reserve(tokens, t)
        if wait == 0.0:
            grants.append(t)
        else:
            assert wait > 0
            t += wait
    return grants


def max_in_window(times: list[float], width: float) -> int:
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - width:
            j += 1
        best = max(best, i - j + 1)
    return best


def test_rpm_holds_over_simulated_minutes() -> None:
    lim = MeshRateLimit(rpm=60, tpm=10**9, burst=5)
    grants = run_greedy(lim, 1, until=180.0)
    for width in (1.0, 5.0, 10.0, 30.0, 60.0):
        assert max_in_window(grants, width) <= 5 + 60 * width / 60 + 1e-9
    assert len(grants) >= 175  # and it does not starve: about burst + 1 per second
    assert lim.snapshot()["grants"] == len(grants)


def test_default_burst_is_the_whole_minute_as_the_api_bucket() -> None:
    lim = MeshRateLimit(rpm=50, tpm=10**9)
    assert lim.burst == 50
    assert len(run_greedy(lim, 1, until=0.001)) == 50
    assert MeshRateLimit(rpm=3, tpm=100, burst=10).burst == 3  # never above the limit


def test_the_request_bucket_is_the_apis_full_minute_refilled_continuously() -> None:
    lim = MeshRateLimit(rpm=10, tpm=10**9)
    grants = run_greedy(lim, 1, until=300.0)
    assert len(run_greedy(MeshRateLimit(rpm=10, tpm=10**9), 1, until=0.001)) == 10  # a full bucket at once
    for width in (1.0, 30.0, 60.0, 120.0):
        assert max_in_window(grants, width) <= 10 + 10 * width / 60 + 1e-9
    assert len(grants) >= 10 + 10 * 300 / 60 - 1  # and never less: one every 6 s after the first ten


def test_tpm_holds() -> None:
    lim = MeshRateLimit(rpm=10**6, tpm=1000, burst=10**6)
    grants = run_greedy(lim, 100, until=120.0)
    # token bucket of capacity tpm refilled at tpm/60 per second: tpm + tpm * t / 60 in t seconds
    assert len(grants) * 100 <= 1000 + 1000 * 120 / 60
    assert len(grants) * 100 >= 2800
    for width in (10.0, 60.0):
        assert max_in_window(grants, width) * 100 <= 1000 + 1000 * width / 60 + 1e-6


def test_settle_returns_unused_tokens() -> None:
    lim = MeshRateLimit(rpm=10**6, tpm=1000, burst=10**6)
    assert lim.reserve(1000, 0.0) == 0.0
    assert lim.reserve(500, 0.0) > 0
    lim.settle(1000, 200, 0.0)  # the call used far fewer tokens than estimated
    assert lim.reserve(500, 0.0) == 0.0
    lim.settle(500, 2000, 0.0)  # and one used more: the bucket goes into debt
    wait = lim.reserve(10, 0.0)
    assert wait > 60.0


def test_output_tokens_are_charged_when_known_not_up_front() -> None:
    lim = MeshRateLimit(rpm=10**6, tpm=10**6, otpm=600)
    for _ in range(5):  # max_tokens plays no part: five calls start at once
        assert lim.reserve(10, 0.0) == 0.0
    for _ in range(5):
        lim.settle(10, 10, 0.0, output=200)  # 1000 output tokens: 400 over the 600/min bucket
    wait = lim.reserve(10, 0.0)
    assert wait == pytest.approx(400 / (600 / 60))  # until the debt is refilled
    assert lim.reserve(10, wait) == 0.0
    assert lim.snapshot()["output_tokens"] == 1000


def test_oversize_request_is_granted_when_the_bucket_is_full() -> None:
    lim = MeshRateLimit(rpm=1000, tpm=1000, burst=100)
    assert lim.reserve(100, 0.0) == 0.0
    wait = lim.reserve(5000, 0.0)
    assert wait > 0  # not full yet: wait for it to fill
    assert wait == pytest.approx(100 / (1000 / 60), rel=1e-6)
    assert lim.reserve(5000, wait) == 0.0  # full: granted, never deadlocked
    after = lim.reserve(10, wait)
    assert after > 200  # the debt of 4000 tokens is paid back first


def test_429_pauses_everyone_until_retry_after_and_never_halves() -> None:
    lim = MeshRateLimit(rpm=60, tpm=100_000)
    assert lim.reserve(1, 0.0) == 0.0
    # the 429's headers say the requests are spent, tokens are not
    lim.observe(RateObservation(status=429, retry_after_s=10.0, requests_limit=60, requests_remaining=0), 1.0)
    lim.observe(RateObservation(status=429, retry_after_s=9.0), 1.5)  # an in-flight call's 429, no headers
    assert lim.reserve(1, 5.0) == pytest.approx(6.0)
    assert lim.reserve(1, 10.9) > 0
    assert lim.reserve(1, 11.0) == 0.0
    snap = lim.snapshot(11.0)
    assert snap["rpm"] == 60 and snap["input_tpm"] == 100_000  # the limits stand
    # the buckets refill at the full rate: a minute later the mesh has a whole minute's requests again
    assert len(run_greedy(lim, 1, until=71.001, start=71.0)) >= 59


def test_a_429_without_headers_empties_the_buckets_which_refill_at_the_full_rate() -> None:
    lim = MeshRateLimit(rpm=60, tpm=100_000)
    lim.observe(RateObservation(status=429), 0.0)
    grants = run_greedy(lim, 1, until=30.0)
    assert 28 <= len(grants) <= 31  # one per second: 60/min, not halved


def test_529_with_retry_after_pauses_without_halving() -> None:
    lim = MeshRateLimit(rpm=60, tpm=100_000)
    lim.observe(RateObservation(status=529, retry_after_s=3.0), 0.0)
    assert lim.reserve(1, 1.0) == pytest.approx(2.0)
    assert lim.snapshot(1.0)["rpm"] == 60


def test_remaining_zero_waits_for_the_refill_not_for_the_reset() -> None:
    lim = MeshRateLimit(rpm=60, tpm=100_000)
    lim.observe(RateObservation(status=200, requests_remaining=0, requests_reset_s=60.0), 0.0)
    assert lim.reserve(1, 0.0) == pytest.approx(1.0)  # one request's share of 60/min, not 60 s
    assert lim.reserve(1, 1.0) == 0.0
    lim.observe(RateObservation(status=200, input_remaining=0, input_reset_s=60.0), 10.0)
    assert lim.reserve(1000, 10.0) == pytest.approx(1000 / (100_000 / 60))
    lim.observe(RateObservation(status=200, output_remaining=-600), 20.0)  # output in debt
    assert lim.reserve(1, 20.0) == pytest.approx(600 / (100_000 / 60))


def test_header_limits_replace_the_configured_ones_down_and_up() -> None:
    lim = MeshRateLimit(rpm=100, tpm=100_000, burst=5)
    lim.observe(RateObservation(status=200, requests_limit=10, tokens_limit=500), 0.0)
    snap = lim.snapshot(0.0)
    assert (snap["rpm"], snap["input_tpm"]) == (10, 500) and snap["learned_from_api"]
    grants = run_greedy(lim, 1, until=240.0)
    assert max_in_window(grants, 60.0) <= 5 + 10
    assert lim.snapshot(600.0)["rpm"] == 10  # no recovery above the API's word
    lim.observe(RateObservation(status=200, requests_limit=4000, input_limit=2_000_000, output_limit=400_000), 600.0)
    snap = lim.snapshot(600.0)
    assert (snap["rpm"], snap["input_tpm"], snap["output_tpm"]) == (4000, 2_000_000, 400_000)


def test_a_15_developer_mesh_runs_at_the_accounts_limits_not_the_defaults() -> None:
    lim = MeshRateLimit(rpm=50, tpm=100_000)  # the settings' defaults
    lim.observe(RateObservation(status=200, requests_limit=4000, requests_remaining=3999, input_limit=2_000_000), 0.0)
    grants = run_greedy(lim, 5_000, until=60.0)
    assert len(grants) > 390  # 2M input tokens/min at 5k a call: ~400 + the bucket; 50 rpm would be 50


def test_snapshot_is_json_able() -> None:
    import json

    lim = MeshRateLimit(rpm=5, tpm=100)
    lim.reserve(1, 0.0)
    lim.reserve(1000, 0.0)
    snap = lim.snapshot(0.0)
    json.dumps(snap)
    assert snap["grants"] >= 1 and snap["waits"] >= 1
    with pytest.raises(ValueError):
        MeshRateLimit(rpm=0, tpm=10)


async def test_local_limiter_with_an_injected_clock() -> None:
    now = [0.0]
    lim = LocalLimiter(rpm=60, tpm=10**6, burst=1, clock=lambda: now[0])
    await asyncio.wait_for(lim.acquire(10), 1.0)
    waiter = asyncio.ensure_future(lim.acquire(10))
    await asyncio.sleep(0.02)
    assert not waiter.done()  # the bucket is empty until the (fake) clock moves
    now[0] = 1.0
    await asyncio.wait_for(waiter, 2.0)
    lim.settle(10, 5, 3)
    lim.observe(RateObservation(status=429, retry_after_s=0.05))
    assert lim.snapshot()["paused_for_s"] > 0
    await asyncio.wait_for(NoLimiter().acquire(10**9), 1.0)
