"""The watch loop of ``caspectl run`` / ``caspectl job --watch``: poll a job until it ends.

A ``rich`` live view on a terminal, one plain line per change otherwise (and at least every
HEARTBEAT_S), nothing in JSON mode; rendering is :mod:`casperd.ctl.jobrender`'s.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol

from rich.console import Console, RenderableType
from rich.live import Live

from casperd.agents.jobstates import is_terminal
from casperd.ctl.jobrender import _progress_key, progress_line, render_live
from casperd.errors import RequestTimeoutError

HEARTBEAT_S = 60.0
"""Without a TTY, a progress line is printed at least this often, even when nothing changed."""
MAX_MISSES = 3
"""Polls in a row that may go unanswered before watching gives up."""


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        at = datetime.fromisoformat(value)
    except ValueError:
        return None
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def job_elapsed(report: dict[str, Any], fallback: float) -> float:
    """Seconds the job has run: from its own timestamps when they make sense, else ``fallback``."""
    started = _parse_time(report.get("started_at"))
    if started is not None:
        end = _parse_time(report.get("finished_at")) or datetime.now(UTC)
        seconds = (end - started).total_seconds()
        if seconds >= 0:
            return seconds
    return fallback


class Requester(Protocol):
    """What the commands need of a control client (``ControlClient`` in life, a fake in tests)."""

    def request(self, op: str, **args: Any) -> Any: ...


def watch(
    client: Requester,
    job_id: str,
    console: Console,
    poll_s: float = 1.0,
    json_mode: bool = False,
    *,
    sleep: Callable[[float], None] | None = None,
    clock: Callable[[], float] | None = None,
    live: bool | None = None,
) -> dict[str, Any]:
    """Poll ``job`` every ``poll_s`` seconds until the job ends, showing progress on ``console``:
    a ``rich`` live view on a terminal (or ``live=True``), one plain line per change otherwise,
    nothing with ``json_mode``. Returns the last report: terminal, unless watching was stopped
    with Ctrl-C (then the last report seen, at least ``{"job_id": job_id}``). A few unanswered
    polls in a row are tolerated; more raise RequestTimeoutError. Errors of the server (not found, ...)
    propagate. ``sleep`` and ``clock`` default to ``time.sleep`` and ``time.monotonic``."""
    sleep = sleep or time.sleep
    clock = clock or time.monotonic
    start = clock()
    last: dict[str, Any] = {"job_id": job_id}
    misses = 0

    def poll() -> dict[str, Any]:
        nonlocal last, misses
        try:
            data = client.request("job", id=job_id)
        except RequestTimeoutError:
            misses += 1
            if misses >= MAX_MISSES:
                raise
            return last
        misses = 0
        if isinstance(data, dict):
            last = data
        return last

    use_live = (console.is_terminal if live is None else live) and not json_mode
    try:
        if use_live:

            def view() -> RenderableType:
                return render_live(last, job_elapsed(last, clock() - start))

            with Live(console=console, get_renderable=view, refresh_per_second=4, transient=True):
                while not is_terminal(poll().get("state")):
                    sleep(poll_s)
            return last
        printed: tuple[Any, ...] | None = None
        printed_at = start
        while True:
            report = poll()
            key = _progress_key(report)
            if not json_mode and "state" in report and (key != printed or clock() - printed_at >= HEARTBEAT_S):
                console.print(progress_line(report), markup=False, highlight=False, soft_wrap=True)
                printed, printed_at = key, clock()
            if is_terminal(report.get("state")):
                return report
            sleep(poll_s)
    except KeyboardInterrupt:
        return last
