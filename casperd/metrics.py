"""Prometheus metrics of one node (counters, gauges, histograms with real buckets).

Each node has its own registry, served on ``--metrics-port`` (0: off) at ``/metrics``.
Label values are bounded sets (commands, statuses, error codes): never ids, never secrets.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from casperd import procstats

if TYPE_CHECKING:
    from casperd.errors import CasperError

M = TypeVar("M", Counter, Gauge, Histogram)
log = logging.getLogger("casperd.rejects")


class Labelled(Generic[M]):
    """The ``labels(...)`` children of one metric, each made once: ``labels()`` takes a lock and
    builds a key on every call, which the hot paths (one per message, one per task) paid each
    time. Only for label values from small fixed sets (commands, statuses, outcomes, task types)."""

    __slots__ = ("children", "metric")

    def __init__(self, metric: M) -> None:
        self.metric: M = metric
        self.children: dict[tuple[str, ...], M] = {}

    def __call__(self, *values: str) -> M:
        child = self.children.get(values)
        if child is None:
            child = self.children[values] = self.metric.labels(*values)
        return child


class Rejections:
    """Frames refused with an error: each one counted (``casper_rejected_frames_total``), each
    socket, sender and cause logged once, not once per frame (a flood of garbage is one line)."""

    __slots__ = ("counter", "logged")

    def __init__(self, counter: Counter) -> None:
        self.counter = counter
        self.logged: set[tuple[str, bytes, str]] = set()

    def record(self, socket_name: str, route: bytes, exc: CasperError) -> None:
        self.counter.labels(exc.code).inc()
        key = (socket_name, route[:64], exc.code)
        if key not in self.logged:
            if len(self.logged) > 10_000:
                self.logged.clear()
            self.logged.add(key)
            log.warning(
                "rejected a frame from %r on the %s socket: [%s] %s", route[:64], socket_name, exc.code, exc.message
            )


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.messages = Counter("casper_messages_total", "Protocol messages", ["command", "direction"], registry=r)
        self.messages_by = Labelled(self.messages)
        self.rejected = Counter(
            "casper_rejected_frames_total", "Frames answered with ERROR or dropped", ["code"], registry=r
        )
        self.rejections = Rejections(self.rejected)
        self.handshakes_refused = Counter(
            "casper_handshakes_refused_total",
            "Curve handshakes refused by the ZAP handler (key not enrolled)",
            registry=r,
        )
        self.forbidden = Counter(
            "casper_forbidden_total", "Messages or service calls refused by authorization", ["what"], registry=r
        )
        self.send_failures = Counter("casper_send_failures_total", "Frames not sent", ["reason"], registry=r)
        self.housekeeping_failures = Counter(
            "casper_housekeeping_failures_total",
            "Housekeeping steps that failed (each one logged)",
            ["step"],
            registry=r,
        )
        self.transitions = Counter("casper_task_transitions_total", "Task state changes", ["to"], registry=r)
        self.submitted = Counter("casper_tasks_submitted_total", "New tasks accepted", registry=r)
        self.dispatched = Counter("casper_tasks_dispatched_total", "Task assignments", registry=r)
        self.duplicates = Counter(
            "casper_stale_reports_total", "Results from peers no longer holding the task", registry=r
        )
        self.executed = Counter("casper_tasks_executed_total", "Tasks run on this node", ["outcome"], registry=r)
        self.executed_by = Labelled(self.executed)
        self.cache = Counter("casper_cache_total", "Result cache lookups", ["result"], registry=r)
        self.task_seconds = Histogram(
            "casper_task_seconds",
            "Handler run time",
            ["type"],
            registry=r,
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800),
        )
        self.task_seconds_by = Labelled(self.task_seconds)
        self.commit_seconds = Histogram(
            "casper_commit_seconds",
            "Group commit latency",
            registry=r,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1, 5),
        )
        self.peers = Gauge("casper_peers", "Registered peers", registry=r)
        self.pending = Gauge("casper_tasks_queued", "Tasks waiting for a peer", registry=r)
        self.open_tasks = Gauge("casper_tasks_open", "Tasks not in a terminal state", registry=r)
        self.inflight = Gauge("casper_tasks_inflight", "Tasks running on this node", registry=r)
        # the seed's PerformanceMonitor: queue_depth, cpu_usage, memory_usage, task_completion_time,
        # api_response_time
        self.queue_depth = Gauge("casper_queue_depth", "Tasks queued for a peer (policeman)", registry=r)
        self.queue_oldest = Gauge(
            "casper_queue_oldest_seconds", "How long the oldest queued task has waited (policeman)", registry=r
        )
        self.cpu_usage = Gauge("casper_cpu_usage_percent", "This process's CPU use, percent of one core", registry=r)
        self.memory_usage = Gauge("casper_memory_usage_bytes", "This process's resident memory", registry=r)
        self.cpu_usage.set_function(lambda: procstats.shared().sample(time.monotonic())[0])
        self.memory_usage.set_function(lambda: procstats.shared().rss_bytes)
        self.task_completion = Histogram(
            "casper_task_completion_seconds",
            "Submit to terminal state, per final status (policeman)",
            ["status"],
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 7200),
        )
        self.task_completion_by = Labelled(self.task_completion)
        self.api_response = Histogram(
            "casper_api_response_seconds",
            "Model API calls (one HTTP request each), per outcome",
            ["outcome"],
            registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120),
        )
        self.api_breaker_open = Gauge(
            "casper_api_breaker_open", "1 while this node's model API circuit breaker is open", registry=r
        )
        self.peers_by_state = Gauge("casper_peers_by_liveness", "Registered peers by liveness", ["state"], registry=r)
        self.breakers_open = Gauge("casper_peer_breakers_open", "Peers whose circuit breaker is open", registry=r)
        self.autoscale = Counter(
            "casper_autoscale_decisions_total", "Autoscaler decisions, by kind and reason", ["kind", "why"], registry=r
        )

    async def serve(self, port: int, addr: str = "127.0.0.1") -> asyncio.Server | None:
        """Serve ``/metrics`` on the running loop (``casperd.metricsweb``); None when ``port`` is 0."""
        if not port:
            return None
        from casperd.metricsweb import serve

        return await serve(self.registry, addr, port)
