"""Prometheus metrics of one node (counters, gauges, histograms with real buckets).

Each node has its own registry, served on ``--metrics-port`` (0: off) at ``/metrics``.
Label values are bounded sets (commands, statuses, error codes): never ids, never secrets.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.messages = Counter("casper_messages_total", "Protocol messages", ["command", "direction"], registry=r)
        self.rejected = Counter(
            "casper_rejected_frames_total", "Frames answered with ERROR or dropped", ["code"], registry=r
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
        self.cache = Counter("casper_cache_total", "Result cache lookups", ["result"], registry=r)
        self.task_seconds = Histogram(
            "casper_task_seconds",
            "Handler run time",
            ["type"],
            registry=r,
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800),
        )
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

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        if port:
            start_http_server(port, addr=addr, registry=self.registry)
