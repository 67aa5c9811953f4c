"""Mesh-wide rate limiting of model calls.

:class:`MeshRateLimit` is a pure state machine (no I/O; the monotonic time is passed in) that the
policeman keeps for the whole mesh:

* **requests** — a token bucket refilled at ``rpm / 60`` per second holding at most ``burst``
  requests (default ``max(1, rpm // 10)``), plus a sliding 60 s log of grants that never holds
  more than ``rpm``: in any window of ``w`` seconds at most ``burst + rpm * w / 60`` and in any
  minute at most ``rpm`` requests are granted;
* **tokens** — a token bucket of capacity ``tpm`` refilled at ``tpm / 60`` per second (the API's
  own algorithm). A request larger than ``tpm`` is granted when the bucket is full (the bucket
  then goes negative), so nothing ever deadlocks. :meth:`MeshRateLimit.settle` corrects the
  charge with the real usage after the call;
* **feedback** from the API (:meth:`MeshRateLimit.observe`): a 429/529 with ``retry-after``
  pauses every grant until then; a 429 also halves the effective rpm/tpm (floor: 1 request per
  minute), which grow back additively to the configured values over ``recovery_s``; a reported
  ``remaining: 0`` pauses until its reset; limits in the headers lower than the configured ones
  become the ceiling.

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
RECOVERY_S = 180.0
"""Time for an effective limit to grow back from 0 to the configured limit (additive increase)."""
HALVE_COOLDOWN_S = 2.0
"""429s closer together than this halve the limits once (a burst of in-flight calls fails together)."""
_EPS = 1e-9


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
    )


def estimate_tokens(system: Any, messages: Any, tools: Any, max_tokens: int) -> int:
    """A conservative guess of a call's tokens before it is made: ~len(JSON)/4 in, plus max_tokens out."""
    blob = json.dumps([system, messages, tools or []], separators=(",", ":"), default=str)
    return math.ceil(len(blob) / 4) + max(0, int(max_tokens))


class MeshRateLimit:
    """Pure rate-limit accounting for the whole mesh (see the module docstring)."""

    def __init__(self, rpm: int, tpm: int, *, burst: int | None = None, recovery_s: float = RECOVERY_S) -> None:
        if rpm < 1 or tpm < 1:
            raise ValueError("rpm and tpm must be at least 1")
        self.rpm = int(rpm)
        self.tpm = int(tpm)
        self.burst = max(1, int(burst) if burst is not None else self.rpm // 10)
        self.recovery_s = recovery_s
        self.rpm_ceiling = float(self.rpm)
        self.tpm_ceiling = float(self.tpm)
        self.rpm_eff = float(self.rpm)
        self.tpm_eff = float(self.tpm)
        self.req_level: float = float(min(self.burst, self.rpm))
        self.tok_level: float = float(self.tpm)
        self.window: deque[float] = deque()
        self.paused_until = 0.0
        self.last_halved = -math.inf
        self.grants = 0
        self.waits = 0
        self.tokens_granted = 0
        self._last: float | None = None

    # --- internals
    def _req_capacity(self) -> float:
        return float(max(1, min(self.burst, int(self.rpm_eff))))

    def _advance(self, now: float) -> None:
        last = self._last if self._last is not None else now
        dt = max(0.0, now - last)
        self._last = max(now, last)
        if dt > 0:
            # additive recovery of the effective limits toward their ceilings
            self.rpm_eff = min(self.rpm_ceiling, self.rpm_eff + self.rpm * dt / self.recovery_s)
            self.tpm_eff = min(self.tpm_ceiling, self.tpm_eff + self.tpm * dt / self.recovery_s)
            self.req_level = min(self._req_capacity(), self.req_level + dt * self.rpm_eff / WINDOW_S)
            self.tok_level = min(self.tpm_eff, self.tok_level + dt * self.tpm_eff / WINDOW_S)
        while self.window and self.window[0] <= now - WINDOW_S:
            self.window.popleft()

    def _clamp(self) -> None:
        self.req_level = min(self.req_level, self._req_capacity())
        self.tok_level = min(self.tok_level, self.tpm_eff)

    # --- the API
    def reserve(self, tokens: int, now: float) -> float:
        """0.0: granted and charged. > 0: nothing charged; ask again after that many seconds."""
        self._advance(now)
        tokens = max(0, int(tokens))
        wait = 0.0
        if now < self.paused_until:
            wait = self.paused_until - now
        if self.req_level < 1.0 - _EPS:
            wait = max(wait, (1.0 - self.req_level) / (self.rpm_eff / WINDOW_S))
        if len(self.window) >= max(1, math.floor(self.rpm_eff + _EPS)):
            wait = max(wait, self.window[0] + WINDOW_S - now)
        need = min(float(tokens), self.tpm_eff)  # oversize: granted once the bucket is full
        if self.tok_level < need - _EPS:
            wait = max(wait, (need - self.tok_level) / (self.tpm_eff / WINDOW_S))
        if wait > 0:
            self.waits += 1
            return max(wait, 0.001)
        self.req_level -= 1.0
        self.tok_level -= tokens
        self.window.append(now)
        self.grants += 1
        self.tokens_granted += tokens
        return 0.0

    def settle(self, estimated: int, actual: int, now: float) -> None:
        """Correct a grant's charge of ``estimated`` tokens once the call's ``actual`` usage is known."""
        self._advance(now)
        self.tok_level = min(self.tpm_eff, self.tok_level + (int(estimated) - int(actual)))
        self.tokens_granted += int(actual) - int(estimated)

    def observe(self, obs: RateObservation, now: float) -> None:
        """Adapt to what the API reported (status and rate-limit headers of one response)."""
        self._advance(now)
        if obs.status in (429, 529) and obs.retry_after_s is not None:
            self.paused_until = max(self.paused_until, now + obs.retry_after_s)
        if obs.status == 429 and now - self.last_halved >= HALVE_COOLDOWN_S:
            self.last_halved = now
            self.rpm_eff = max(1.0, self.rpm_eff / 2)
            self.tpm_eff = max(1.0, self.tpm_eff / 2)
        if obs.requests_limit is not None and obs.requests_limit > 0:
            self.rpm_ceiling = float(min(self.rpm, obs.requests_limit))
            self.rpm_eff = min(self.rpm_eff, self.rpm_ceiling)
        if obs.tokens_limit is not None and obs.tokens_limit > 0:
            self.tpm_ceiling = float(min(self.tpm, obs.tokens_limit))
            self.tpm_eff = min(self.tpm_eff, self.tpm_ceiling)
        if obs.requests_remaining is not None:
            self.req_level = min(self.req_level, float(obs.requests_remaining))
            if obs.requests_remaining <= 0 and obs.requests_reset_s is not None:
                self.paused_until = max(self.paused_until, now + obs.requests_reset_s)
        if obs.tokens_remaining is not None:
            self.tok_level = min(self.tok_level, float(obs.tokens_remaining))
            if obs.tokens_remaining <= 0 and obs.tokens_reset_s is not None:
                self.paused_until = max(self.paused_until, now + obs.tokens_reset_s)
        self._clamp()

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        """The state for status views (JSON-able)."""
        if now is not None:
            self._advance(now)
        out: dict[str, Any] = {
            "rpm": round(self.rpm_eff, 2),
            "tpm": round(self.tpm_eff, 1),
            "configured_rpm": self.rpm,
            "configured_tpm": self.tpm,
            "burst": self.burst,
            "paused_until": self.paused_until,
            "grants": self.grants,
            "waits": self.waits,
            "tokens_granted": self.tokens_granted,
            "requests_in_window": len(self.window),
            "tokens_available": round(self.tok_level, 1),
        }
        if now is not None:
            out["paused_for_s"] = round(max(0.0, self.paused_until - now), 3)
        return out


class Limiter(Protocol):
    """What the Claude client needs from a rate limiter (in-process or mesh-wide)."""

    async def acquire(self, tokens: int) -> None: ...

    def settle(self, estimated: int, actual: int) -> None: ...

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

    def settle(self, estimated: int, actual: int) -> None:
        self.state.settle(estimated, actual, self.clock())

    def observe(self, obs: RateObservation) -> None:
        self.state.observe(obs, self.clock())

    def snapshot(self) -> dict[str, Any]:
        return self.state.snapshot(self.clock())


class NoLimiter:
    """A :class:`Limiter` that never waits (tools and tests that need no limiting)."""

    async def acquire(self, tokens: int) -> None:
        return None

    def settle(self, estimated: int, actual: int) -> None:
        return None

    def observe(self, obs: RateObservation) -> None:
        return None
