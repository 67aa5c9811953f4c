"""Mesh-wide rate limiting of model calls, learned from the API.

:class:`MeshRateLimit` is a pure state machine (no I/O; the monotonic time is passed in) that the
policeman keeps for the whole mesh. It accounts as the API does (token buckets refilled
continuously up to the limit; separate limits for requests, input tokens and output tokens):

* **requests** — a bucket of capacity ``burst`` (default: the whole per-minute limit, as the API's
  own bucket, which is refilled continuously rather than reset each minute) refilled at
  ``rpm / 60`` per second; a smaller ``burst`` smooths bursts;
* **input tokens** — a bucket of capacity ``itpm`` refilled at ``itpm / 60`` per second, charged
  the call's estimated input when granted and settled with the real input (uncached input plus
  cache writes: cache reads do not count toward the API's input limit) after it. A request larger
  than the bucket is granted when the bucket is full (it then goes negative): nothing deadlocks;
* **output tokens** — a bucket of capacity ``otpm``, charged the real output tokens when a call
  ends (never ``max_tokens`` up front); a call waits while the bucket is in debt;
* **learned limits** (:meth:`MeshRateLimit.observe`): the limits in ``anthropic-ratelimit-*``
  headers replace the configured ones, up or down — the settings are only the starting point —
  and a reported remaining count lower than a bucket's level lowers it (another client of the same
  key, or calls the mesh has not settled yet); an empty bucket refills at the limit's rate
  (``*-reset`` is when it is full again, not when the next call may go);
* **permits ahead** (:meth:`MeshRateLimit.lease`): a worker may hold a few permits for its next
  calls (one round trip fewer per call); they are granted only while the request and input-token
  buckets stay above :data:`LEASE_FLOOR` of their capacity and no pause is on, each charged like a
  call, and an unused one is given back (:meth:`MeshRateLimit.release`);
* **429/529**: every grant pauses until ``retry-after``; a 429 empties the buckets its headers
  report exhausted (all of them if it carries none), which then refill at the full rate. The limits
  are never halved: the mesh goes on at the account's pace as soon as the buckets refill.

:class:`LocalLimiter` serves one process with ``asyncio.sleep`` loops; a remote variant asks the
policeman over the mesh. Both satisfy :class:`Limiter`.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any, Protocol

WINDOW_S = 60.0
_EPS = 1e-9
LEASE_FLOOR = 0.5
"""Permits granted ahead (:meth:`MeshRateLimit.lease`) come only from above this share of the
request and input-token buckets: near the limit every call asks for its own permit."""


@dataclass
class RateObservation:
    """What one API response said about the rate limits (None: not reported)."""

    status: int
    retry_after_s: float | None = None
    requests_limit: int | None = None
    requests_remaining: int | None = None
    requests_reset_s: float | None = None
    tokens_limit: int | None = None
    tokens_remaining: int | None = None
    tokens_reset_s: float | None = None
    input_limit: int | None = None
    input_remaining: int | None = None
    input_reset_s: float | None = None
    output_limit: int | None = None
    output_remaining: int | None = None
    output_reset_s: float | None = None

    @property
    def has_limits(self) -> bool:
        return any(
            v is not None
            for v in (self.requests_remaining, self.input_remaining, self.output_remaining, self.tokens_remaining)
        )


def _int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(float(value.strip()))
    except (ValueError, OverflowError):
        return None


def _seconds_until(value: str | None, now_wall: float) -> float | None:
    """An RFC 3339 timestamp (or a plain number of seconds) as seconds from ``now_wall``."""
    if value is None:
        return None
    value = value.strip()
    try:
        secs = float(value)
        return max(0.0, secs) if math.isfinite(secs) else None
    except ValueError:
        pass
    try:
        ts = datetime.fromisoformat(value.replace("z", "Z"))
    except ValueError:
        return None
    if ts.tzinfo is None:
        return None
    return max(0.0, ts.timestamp() - now_wall)


def _retry_after(headers: Mapping[str, str], now_wall: float) -> float | None:
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            val = float(ms) / 1000.0
            if math.isfinite(val) and val >= 0:
                return val
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if raw is None:
        return None
    raw = raw.strip()
    try:
        val = float(raw)
        return val if math.isfinite(val) and val >= 0 else None
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now_wall)


def parse_rate_headers(headers: Mapping[str, str], status: int, now_wall: float) -> RateObservation:
    """Read ``retry-after`` (seconds or HTTP date) and ``anthropic-ratelimit-*`` headers; garbage is None."""
    h = {str(k).lower(): str(v) for k, v in headers.items()}
    p = "anthropic-ratelimit-"
    return RateObservation(
        status=status,
        retry_after_s=_retry_after(h, now_wall),
        requests_limit=_int(h.get(p + "requests-limit")),
        requests_remaining=_int(h.get(p + "requests-remaining")),
        requests_reset_s=_seconds_until(h.get(p + "requests-reset"), now_wall),
        tokens_limit=_int(h.get(p + "tokens-limit")),
        tokens_remaining=_int(h.get(p + "tokens-remaining")),
        tokens_reset_s=_seconds_until(h.get(p + "tokens-reset"), now_wall),
        input_limit=_int(h.get(p + "input-tokens-limit")),
        input_remaining=_int(h.get(p + "input-tokens-remaining")),
        input_reset_s=_seconds_until(h.get(p + "input-tokens-reset"), now_wall),
        output_limit=_int(h.get(p + "output-tokens-limit")),
        output_remaining=_int(h.get(p + "output-tokens-remaining")),
        output_reset_s=_seconds_until(h.get(p + "output-tokens-reset"), now_wall),
    )


def estimate_tokens(system: Any, messages: Any, tools: Any) -> int:
    """A guess of a call's input tokens before it is made: ~len(JSON)/4."""
    blob = json.dumps([system, messages, tools or []], separators=(",", ":"), default=str)
    return math.ceil(len(blob) / 4)


class MeshRateLimit:
    """Pure rate-limit accounting for the whole mesh (see the module docstring)."""

    def __init__(self, rpm: int, tpm: int, *, otpm: int | None = None, burst: int | None = None) -> None:
        if rpm < 1 or tpm < 1:
            raise ValueError("rpm and tpm must be at least 1")
        self.rpm = int(rpm)
        self.tpm = int(tpm)
        self.burst_setting = int(burst) if burst is not None else None
        self.rpm_limit = float(self.rpm)
        self.itpm_limit = float(self.tpm)
        self.otpm_limit = float(otpm if otpm is not None else self.tpm)
        self.learned = False
        self.req_level: float = float(self.burst)
        self.in_level: float = self.itpm_limit
        self.out_level: float = self.otpm_limit
        self.window: deque[float] = deque()
        self.paused_until = 0.0
        self.inflight = 0
        self.grants = 0
        self.waits = 0
        self.tokens_granted = 0
        self.output_tokens = 0
        self.leased = 0
        self.released = 0
        self._last: float | None = None

    @property
    def burst(self) -> int:
        cap = self.burst_setting if self.burst_setting is not None else int(self.rpm_limit)
        return max(1, min(cap, int(self.rpm_limit + _EPS)))

    # --- internals
    def _advance(self, now: float) -> None:
        last = self._last if self._last is not None else now
        dt = max(0.0, now - last)
        self._last = max(now, last)
        if dt > 0:
            self.req_level = min(float(self.burst), self.req_level + dt * self.rpm_limit / WINDOW_S)
            self.in_level = min(self.itpm_limit, self.in_level + dt * self.itpm_limit / WINDOW_S)
            self.out_level = min(self.otpm_limit, self.out_level + dt * self.otpm_limit / WINDOW_S)
        while self.window and self.window[0] <= now - WINDOW_S:
            self.window.popleft()

    def _clamp(self) -> None:
        self.req_level = min(self.req_level, float(self.burst))
        self.in_level = min(self.in_level, self.itpm_limit)
        self.out_level = min(self.out_level, self.otpm_limit)

    # --- the API
    def reserve(self, tokens: int, now: float) -> float:
        """0.0: granted and charged ``tokens`` input tokens. > 0: nothing charged; ask again after
        that many seconds."""
        self._advance(now)
        tokens = max(0, int(tokens))
        wait = 0.0
        if now < self.paused_until:
            wait = self.paused_until - now
        if self.req_level < 1.0 - _EPS:
            wait = max(wait, (1.0 - self.req_level) / (self.rpm_limit / WINDOW_S))
        need = min(float(tokens), self.itpm_limit)  # oversize: granted once the bucket is full
        if self.in_level < need - _EPS:
            wait = max(wait, (need - self.in_level) / (self.itpm_limit / WINDOW_S))
        if self.out_level < 0:
            wait = max(wait, -self.out_level / (self.otpm_limit / WINDOW_S))
        if wait > 0:
            self.waits += 1
            return max(wait, 0.001)
        self._charge(tokens, now)
        return 0.0

    def _charge(self, tokens: int, now: float) -> None:
        """One permit out of the buckets: a call now, or one leased ahead."""
        self.req_level -= 1.0
        self.in_level -= tokens
        self.window.append(now)
        self.grants += 1
        self.inflight += 1
        self.tokens_granted += tokens

    def lease(self, n: int, tokens: int, now: float) -> int:
        """Grant up to ``n`` permits ahead, each charged like a call of ``tokens`` estimated input
        tokens, only while both buckets stay above :data:`LEASE_FLOOR` of their capacity, the
        output bucket is not in debt and no pause is on; the number granted. A leased permit is
        settled like any grant once its call ends, or given back with :meth:`release`."""
        self._advance(now)
        tokens = max(0, int(tokens))
        granted = 0
        while (
            granted < n
            and now >= self.paused_until
            and self.out_level >= 0
            and self.req_level - 1.0 >= self.burst * LEASE_FLOOR - _EPS
            and self.in_level - tokens >= self.itpm_limit * LEASE_FLOOR - _EPS
        ):
            self._charge(tokens, now)
            granted += 1
        self.leased += granted
        return granted

    def release(self, tokens: int, now: float) -> None:
        """A leased permit of ``tokens`` input tokens was not used: its request and its input
        charge go back to the buckets."""
        self._advance(now)
        tokens = max(0, int(tokens))
        self.req_level = min(float(self.burst), self.req_level + 1.0)
        self.in_level = min(self.itpm_limit, self.in_level + tokens)
        if self.window:
            self.window.pop()
        self.inflight = max(0, self.inflight - 1)
        self.grants = max(0, self.grants - 1)
        self.tokens_granted -= tokens
        self.released += 1

    def settle(self, estimated: int, actual: int, now: float, output: int = 0) -> None:
        """A granted call ended: correct its input charge of ``estimated`` to ``actual`` tokens and
        charge its ``output`` tokens."""
        self._advance(now)
        self.inflight = max(0, self.inflight - 1)
        self.in_level = min(self.itpm_limit, self.in_level + (int(estimated) - int(actual)))
        self.out_level -= max(0, int(output))
        self.tokens_granted += int(actual) - int(estimated)
        self.output_tokens += max(0, int(output))

    def observe(self, obs: RateObservation, now: float) -> None:
        """Follow what the API reported (status and rate-limit headers of one response)."""
        self._advance(now)
        if obs.status in (429, 529) and obs.retry_after_s is not None:
            self.paused_until = max(self.paused_until, now + obs.retry_after_s)
        in_limit = obs.input_limit if obs.input_limit is not None else obs.tokens_limit
        in_left = obs.input_remaining if obs.input_remaining is not None else obs.tokens_remaining
        if obs.requests_limit is not None and obs.requests_limit > 0:
            self.rpm_limit, self.learned = float(obs.requests_limit), True
        if in_limit is not None and in_limit > 0:
            self.itpm_limit, self.learned = float(in_limit), True
        if obs.output_limit is not None and obs.output_limit > 0:
            self.otpm_limit, self.learned = float(obs.output_limit), True
        # Remaining counts only ever lower a bucket: an observation reaches the policeman with a
        # worker's next permit request, so it may be seconds old and the mesh has granted more since.
        # An empty bucket refills continuously: the next call waits for its share, not for the
        # ``*-reset`` time (when the bucket is full again).
        if obs.requests_remaining is not None:
            self.req_level = min(self.req_level, float(obs.requests_remaining))
        if in_left is not None:
            self.in_level = min(self.in_level, float(in_left))
        if obs.output_remaining is not None:
            self.out_level = min(self.out_level, float(obs.output_remaining))
        if obs.status == 429 and not obs.has_limits:  # no word on which limit: assume all are spent
            self.req_level = min(self.req_level, 0.0)
            self.in_level = min(self.in_level, 0.0)
        self._clamp()

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        """The state for status views (JSON-able)."""
        if now is not None:
            self._advance(now)
        out: dict[str, Any] = {
            "rpm": round(self.rpm_limit, 2),
            "input_tpm": round(self.itpm_limit, 1),
            "output_tpm": round(self.otpm_limit, 1),
            "configured_rpm": self.rpm,
            "configured_tpm": self.tpm,
            "learned_from_api": self.learned,
            "burst": self.burst,
            "paused_until": self.paused_until,
            "grants": self.grants,
            "waits": self.waits,
            "in_flight": self.inflight,
            "leased": self.leased,
            "released": self.released,
            "tokens_granted": self.tokens_granted,
            "output_tokens": self.output_tokens,
            "requests_in_window": len(self.window),
            "input_tokens_available": round(self.in_level, 1),
            "output_tokens_available": round(self.out_level, 1),
        }
        if now is not None:
            out["paused_for_s"] = round(max(0.0, self.paused_until - now), 3)
        return out


class Limiter(Protocol):
    """What the Claude client needs from a rate limiter (in-process or mesh-wide)."""

    async def acquire(self, tokens: int) -> None: ...

    def settle(self, estimated: int, actual: int, output: int = 0) -> None: ...

    def observe(self, obs: RateObservation) -> None: ...


class LocalLimiter:
    """A :class:`Limiter` over a local :class:`MeshRateLimit` (the policeman's own, or a test's)."""

    def __init__(
        self,
        rpm: int = 50,
        tpm: int = 100_000,
        *,
        burst: int | None = None,
        state: MeshRateLimit | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_sleep_s: float = 5.0,
    ) -> None:
        self.state = state if state is not None else MeshRateLimit(rpm, tpm, burst=burst)
        self.clock = clock
        self.max_sleep_s = max_sleep_s

    async def acquire(self, tokens: int) -> None:
        while True:
            wait = self.state.reserve(tokens, self.clock())
            if wait <= 0:
                return
            # bounded naps: a pause learned meanwhile or a settle() freeing tokens is seen soon
            await asyncio.sleep(min(wait, self.max_sleep_s))

    def settle(self, estimated: int, actual: int, output: int = 0) -> None:
        self.state.settle(estimated, actual, self.clock(), output)

    def observe(self, obs: RateObservation) -> None:
        self.state.observe(obs, self.clock())

    def snapshot(self) -> dict[str, Any]:
        return self.state.snapshot(self.clock())


class NoLimiter:
    """A :class:`Limiter` that never waits (tools and tests that need no limiting)."""

    async def acquire(self, tokens: int) -> None:
        return None

    def settle(self, estimated: int, actual: int, output: int = 0) -> None:
        return None

    def observe(self, obs: RateObservation) -> None:
        return None
