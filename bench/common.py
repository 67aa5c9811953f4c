"""Pieces every mesh benchmark shares."""

from __future__ import annotations

from typing import Any


def drain(c: Any, n: int, timeout_s: float = 120.0) -> None:
    """Wait for ``n`` DONE events on client ``c`` (a :class:`casperd.client.Client`)."""
    got = 0
    for _ in c.done_events(timeout_s=timeout_s):
        got += 1
        if got >= n:
            return
    raise RuntimeError(f"only {got} of {n} results arrived")
