"""caspectl top's rendering (80 columns, what it shows), the telemetry window, the api health
check, and the shipped Prometheus rules naming only metrics CASPER exports."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml
from prometheus_client import generate_latest
from rich.console import Console

from casperd.breaker import CircuitBreaker
from casperd.ctl.top import render, summary_lines
from casperd.lifecycle import Status
from casperd.metrics import Metrics
from casperd.taskrecord import utcnow
from casperd.telemetry import Telemetry, api_check, percentile

ROOT = Path(__file__).resolve().parents[2]


def snapshot(n_peers: int = 3) -> dict[str, Any]:
    peers = [
        {
            "node_id": f"developer-{'very-long-name-' * (i == 2)}{i}",
            "role": "developer",
            "liveness": ["alive", "suspect", "alive"][i % 3],
            "breaker": ["closed", "open", "half-open"][i % 3],
            "inflight": i,
            "capacity": 4,
            "draining": i == 1,
            "cpu_pct": 12.5 * i,
            "rss_bytes": (60 + i) * 2**20,
            "spawned": i == 2,
            "spawn_reason": "12 tasks waiting, oldest 3.1s, no free capacity among 2 capable peers",
            "retiring": False,
        }
        for i in range(n_peers)
    ]
    return {
        "at": 1_700_000_000.0,
        "policeman": {"node_id": "policeman", "uptime_s": 1234.5, "mesh": "tcp://127.0.0.1:5555"},
        "peers": peers,
        "open_tasks": {"pending": 12, "processing": 3},
        "queue": {"depth": 12, "by_priority": {"5": 10, "9": 2}, "oldest_s": 3.1},
        "throughput": {"tasks_per_s": 41.5, "finished": 2490, "p50_s": 0.0123, "p99_s": 1.75, "by_status": {}},
        "cache": {"hits": 90, "misses": 10, "hit_rate": 0.9},
        "llm": {
            "rate_limit": {"configured_tpm": 100000, "configured_rpm": 50, "requests_in_window": 7},
            "last_minute": {"calls": 7, "tokens": 12345, "cost_usd": 0.0421},
        },
        "jobs_running": 1,
        "autoscale": {
            "spawner": {"kind": "local"},
            "decisions": [
                {
                    "at": 1_700_000_000.0,
                    "kind": "spawn",
                    "node_id": "developer-ab1",
                    "role": "developer",
                    "why": "backlog",
                    "reason": "a long reason " * 10,
                }
            ],
        },
    }


def test_top_fits_80_columns_and_shows_the_mesh() -> None:
    console = Console(width=80, record=True, color_system=None)
    console.print(render(snapshot()))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    for needle in ("developer-0", "suspect", "open", "2/4", "spawned", "draining", "62M", "25"):
        assert needle in text, needle
    header = "\n".join(summary_lines(snapshot()))
    assert "queue 12 (oldest 3.1s) by prio 9:2 5:10" in header
    assert "41.5/s" in header and "p50 12ms" in header and "p99 1.8s" in header
    assert "cache hit 90%" in header and "12,345 tok/min of 100,000" in header and "rpm 7/50" in header
    assert "autoscaler (local)" in text and "spawn developer-ab1" in text


def test_top_without_cache_llm_or_decisions() -> None:
    snap = snapshot(0) | {"cache": None, "llm": None, "autoscale": None, "throughput": None}
    console = Console(width=80, record=True, color_system=None)
    console.print(render(snap))
    text = console.export_text()
    assert "cache hit off" in text and "no decisions yet" in text


def test_percentile_nearest_rank() -> None:
    assert percentile([], 50) is None
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile([3.0], 99) == 3.0


def test_telemetry_window_counts_the_last_minute_only() -> None:
    now = [1000.0]
    listeners: list[Any] = []
    metrics = Metrics()
    tel = Telemetry(SimpleNamespace(finish_listeners=listeners), metrics, clock=lambda: now[0])  # type: ignore[arg-type]
    assert listeners == [tel.on_finish]
    for i, status in enumerate(["complete"] * 9 + ["dead"]):
        t = utcnow()
        rec = SimpleNamespace(created_at=t - timedelta(seconds=i + 1), finished_at=t, status=Status(status))
        tel.on_finish(rec)  # type: ignore[arg-type]
    w = tel.window()
    assert w["finished"] == 10 and w["by_status"] == {"complete": 9, "dead": 1}
    assert w["p50_s"] == 5.0 and w["p99_s"] == 10.0
    assert b'casper_task_completion_seconds_count{status="complete"} 9.0' in generate_latest(metrics.registry)
    now[0] += 61
    assert tel.window()["finished"] == 0


def test_telemetry_forgets_a_burst_a_minute_later_even_if_nobody_looks() -> None:
    """Issue #13: the completions of a burst stayed in the policeman until someone asked for top."""
    now = [1000.0]
    metrics = Metrics()
    tel = Telemetry(SimpleNamespace(finish_listeners=[]), metrics, clock=lambda: now[0])  # type: ignore[arg-type]
    t = utcnow()
    rec = SimpleNamespace(created_at=t - timedelta(seconds=1), finished_at=t, status=Status("complete"))
    for i in range(5000):
        now[0] = 1000.0 + i / 100  # 50 seconds of completions
        tel.on_finish(rec)  # type: ignore[arg-type]
    assert sum(len(d) for _, b in tel.buckets for d in b.values()) == 5000
    now[0] = 1200.0
    tel.on_finish(rec)  # type: ignore[arg-type]
    assert len(tel.buckets) == 1 and tel.window()["finished"] == 1


def test_api_check_reports_breaker_and_last_call_without_calling() -> None:
    client = SimpleNamespace(breaker=CircuitBreaker(failure_threshold=1, recovery_s=60), last_call=None)
    check = api_check(client, has_key=False)
    assert check["ok"] and check["degraded"] and "no call yet" in check["detail"] and "no API key" in check["detail"]
    client.last_call = {"outcome": "ok", "status": 200, "ms": 812.0, "at": 0.0}
    check = api_check(client, has_key=True)
    assert check["ok"] and not check["degraded"] and "last call ok HTTP 200 in 812 ms" in check["detail"]
    client.breaker.record_failure(1.0)
    check = api_check(client, has_key=True)
    assert not check["ok"] and check["breaker"] == "open"


def test_seed_metrics_are_exported() -> None:
    text = generate_latest(Metrics().registry).decode()
    for name in (
        "casper_queue_depth",
        "casper_cpu_usage_percent",
        "casper_memory_usage_bytes",
        "casper_task_completion_seconds",
        "casper_api_response_seconds",
    ):
        assert f"# TYPE {name} " in text, name
    rss = re.search(r"^casper_memory_usage_bytes (\S+)$", text, re.M)
    assert rss is not None and float(rss.group(1)) > 1e6


def test_alert_rules_use_only_exported_metrics() -> None:
    exported = set(re.findall(r"^# TYPE (\w+) ", generate_latest(Metrics().registry).decode(), re.M))
    histograms = {n for n in exported if n.endswith("_seconds")}
    exported |= {f"{h}_{s}" for h in histograms for s in ("bucket", "sum", "count")}
    exported |= {n + "_total" for n in exported} | {"up"}
    rules = yaml.safe_load((ROOT / "containers" / "prometheus" / "alerts.yml").read_text())
    names = [r["alert"] for g in rules["groups"] for r in g["rules"]]
    assert {"CasperNodeDown", "CasperPeerBreakerOpen", "CasperQueueStuck", "CasperTaskErrorRate"} <= set(names)
    for group in rules["groups"]:
        for rule in group["rules"]:
            used = set(re.findall(r"\b((?:casper_\w+)|up)\b(?=[{\[\s)]|$)", rule["expr"]))
            assert used and used <= exported, (rule["alert"], used - exported)
    scrape = yaml.safe_load((ROOT / "containers" / "prometheus" / "prometheus.yml").read_text())
    assert scrape["rule_files"] == ["alerts.yml"]
    targets = [t for sc in scrape["scrape_configs"] for s in sc["static_configs"] for t in s["targets"]]
    assert "172.20.0.10:9100" in targets and len(targets) == 4
