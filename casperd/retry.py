"""Retry policy: exponential backoff with a cap (pure; no clock, no sleeping)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """``max_attempts`` counts every run of a task, the first included.

    The delay before attempt ``n + 1`` (after ``n`` failed attempts) is
    ``min(cap, base * factor ** (n - 1))``: with the defaults 1 s, 2 s, 4 s, ... up to 60 s.
    """

    max_attempts: int = 3
    base_s: float = 1.0
    factor: float = 2.0
    cap_s: float = 60.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.base_s < 0 or self.cap_s < 0 or self.factor < 1.0:
            raise ValueError("backoff needs base_s >= 0, cap_s >= 0 and factor >= 1")

    def backoff(self, failed_attempts: int) -> float:
        """Seconds to wait after ``failed_attempts`` (>= 1) failures."""
        n = max(1, failed_attempts)
        if self.base_s == 0 or self.factor == 1.0:
            return min(self.cap_s, self.base_s)
        try:
            return min(self.cap_s, self.base_s * self.factor ** min(n - 1, 1100))
        except OverflowError:  # the delay outgrew any float long before: it is capped
            return self.cap_s

    def exhausted(self, attempts: int, max_attempts: int | None = None) -> bool:
        return attempts >= (max_attempts or self.max_attempts)
