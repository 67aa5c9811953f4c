"""``caspectl top``: a live view of the mesh (both halves: the policeman's ``top`` operation and the
client that draws it).

One request gathers everything the view shows, so a frame is one consistent snapshot: peers
(role, liveness, breaker, in-flight/capacity, CPU and memory from their heartbeats, spawned by
the autoscaler and why); the queue by priority and its oldest wait; tasks/s and p50/p99
submit-to-finish over the last minute; the result cache's hit rate (Redis keyspace hits, so the
whole mesh); LLM tokens and cost in the last minute against the mesh rate limit; running jobs;
the autoscaler's last decisions. ``--once -o json`` prints the snapshot for scripts. The live
view redraws in place (rich Live) and fits an 80-column terminal.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from casperd.errors import CasperError
from casperd.exitcodes import ExitCode

if TYPE_CHECKING:
    from casperd.ctl.client import ControlClient


# --- the policeman's half (registered by casperd.control, so caspectl never imports the daemon) ---
async def top_op(node: Any, args: dict[str, Any]) -> dict[str, Any]:
    """``node``: the policeman's casperd.node.Node (not imported: caspectl must not load the daemon)."""
    broker = node.broker
    assert broker is not None
    now = time.monotonic()
    status = broker.status_view()
    elastic = node.elastic
    peers = [p | (elastic.peer_note(p["node_id"]) if elastic else {}) for p in broker.peers_view()]
    snap: dict[str, Any] = {
        "at": time.time(),
        "policeman": {k: status[k] for k in ("node_id", "uptime_s", "mesh")},
        "peers": peers,
        "open_tasks": status["open_tasks"],
        "queue": elastic.queue_view(now) if elastic else {"depth": status["queued"]},
        "throughput": node.telemetry.window() if node.telemetry else None,
        "cache": await _cache(node),
        "llm": await _llm(node),
        "jobs_running": node.police.jobs_running if node.police else 0,
        "autoscale": elastic.status_view() if elastic else None,
    }
    return snap


async def _cache(node: Any) -> dict[str, Any] | None:
    if node.cache is None or node.cache.redis is None:
        return None
    out: dict[str, Any] = {"hits": None, "misses": None, "hit_rate": None}
    try:
        info = await node.cache.redis.info("stats")
    except Exception as exc:  # a cache outage must not take top down; say so instead
        return out | {"error": f"{type(exc).__name__}: Redis unreachable"}
    hits, misses = int(info.get("keyspace_hits", 0)), int(info.get("keyspace_misses", 0))
    return {"hits": hits, "misses": misses, "hit_rate": round(hits / (hits + misses), 4) if hits + misses else None}


async def _llm(node: Any) -> dict[str, Any] | None:
    if node.police is None or node.store is None:
        return None
    out: dict[str, Any] = {"rate_limit": node.police.rate.snapshot(time.monotonic())}
    try:
        rows = await node.store.fetch(
            "SELECT count(*) FILTER (WHERE NOT cached) AS calls,"
            " coalesce(sum(input_tokens + output_tokens), 0) AS tokens, coalesce(sum(cost_usd), 0) AS cost"
            " FROM llm_calls WHERE at > now() - interval '1 minute'",
            (),
        )
        r = rows[0]
        out["last_minute"] = {"calls": int(r["calls"]), "tokens": int(r["tokens"]), "cost_usd": float(r["cost"])}
    except CasperError as exc:
        out["last_minute"] = None
        out["error"] = exc.message
    return out


# --- the client's half ----------------------------------------------------------------------------
def _fmt_s(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v * 1000:.0f}ms" if v < 1 else f"{v:.1f}s"


def _peer_table(snap: dict[str, Any]) -> Table:
    t = Table(box=None, header_style="bold", pad_edge=False, expand=False)
    for col, just in (
        ("peer", "left"),
        ("role", "left"),
        ("live", "left"),
        ("brk", "left"),
        ("load", "right"),
        ("cpu%", "right"),
        ("mem", "right"),
        ("note", "left"),
    ):
        t.add_column(col, justify=just, no_wrap=True, overflow="ellipsis")  # type: ignore[arg-type]
    for p in snap["peers"]:
        mem = f"{p['rss_bytes'] / 2**20:.0f}M" if p.get("rss_bytes") else "-"
        cpu = f"{p['cpu_pct']:.0f}" if p.get("cpu_pct") is not None else "-"
        note = "retiring" if p.get("retiring") else "draining" if p["draining"] else ""
        if p.get("spawned"):
            note = (note + " " if note else "") + "spawned"
        style = {"alive": "", "suspect": "yellow", "dead": "red"}.get(p["liveness"], "")
        t.add_row(
            p["node_id"][:18],
            p["role"][:9],
            Text(p["liveness"], style=style),
            Text(p["breaker"][:4], style="red" if p["breaker"] == "open" else ""),
            f"{p['inflight']}/{p['capacity']}",
            cpu,
            mem,
            note[:17],
        )
    return t


def summary_lines(snap: dict[str, Any]) -> list[str]:
    """The header of the view, each line at most 80 columns."""
    peers = snap["peers"]
    alive = sum(1 for p in peers if p["liveness"] == "alive")
    q = snap["queue"]
    thr = snap.get("throughput") or {}
    lines = [
        f"{snap['policeman']['node_id']} up {snap['policeman']['uptime_s']:.0f}s | peers {len(peers)} "
        f"({alive} alive) | jobs {snap['jobs_running']} | open {sum(snap['open_tasks'].values())}",
        f"queue {q.get('depth', 0)} (oldest {_fmt_s(q.get('oldest_s'))}) by prio "
        + (
            " ".join(f"{k}:{v}" for k, v in sorted(q.get("by_priority", {}).items(), key=lambda kv: -int(kv[0]))) or "-"
        ),
        f"last min: {thr.get('tasks_per_s', 0)}/s done {thr.get('finished', 0)} | p50 {_fmt_s(thr.get('p50_s'))}"
        f" p99 {_fmt_s(thr.get('p99_s'))}",
    ]
    cache = snap.get("cache")
    rate = "off" if cache is None else "-" if cache.get("hit_rate") is None else f"{cache['hit_rate'] * 100:.0f}%"
    llm = snap.get("llm") or {}
    minute = llm.get("last_minute") or {}
    rl = llm.get("rate_limit") or {}
    lines.append(
        f"cache hit {rate} | LLM {minute.get('tokens', 0):,} tok/min of {rl.get('configured_tpm', 0):,}"
        f" ${minute.get('cost_usd', 0):.4f}/min | rpm {rl.get('requests_in_window', 0)}/{rl.get('configured_rpm', 0)}"
    )
    return [line[:80] for line in lines]


def decision_lines(snap: dict[str, Any], n: int = 5) -> list[str]:
    auto = snap.get("autoscale") or {}
    out = []
    for d in (auto.get("decisions") or [])[-n:]:
        at = datetime.fromtimestamp(d["at"]).strftime("%H:%M:%S")
        target = f" {d['node_id']}" if d.get("node_id") else ""
        out.append(f"{at} {d['kind']}{target}: {d.get('reason', '')}"[:80])
    return out


def render(snap: dict[str, Any]) -> Group:
    auto = snap.get("autoscale") or {}
    spawner = (auto.get("spawner") or {}).get("kind", "none")
    parts: list[Any] = [Text(line) for line in summary_lines(snap)]
    parts.append(_peer_table(snap))
    parts.append(Text(f"autoscaler ({spawner}):", style="bold"))
    parts += [Text(line) for line in decision_lines(snap)] or [Text("no decisions yet", style="dim")]
    return Group(*parts)


def cmd_top(c: ControlClient, a: argparse.Namespace, out: Console) -> int:
    if a.once or a.output == "json":
        snap = c.request("top")
        if a.output == "json":
            print(json.dumps(snap, indent=2, default=str))
        else:
            out.print(render(snap))
        return ExitCode.OK
    with Live(render(c.request("top")), console=out, auto_refresh=False, screen=False) as live:
        try:
            while True:
                time.sleep(a.interval)
                live.update(render(c.request("top")), refresh=True)
        except KeyboardInterrupt:
            pass
    return ExitCode.OK


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0.1 <= value <= 3600:
        raise argparse.ArgumentTypeError("the interval must be between 0.1 and 3600 seconds")
    return value


def add_parsers(add: Callable[[str, Any, str], argparse.ArgumentParser], out: Console) -> None:
    """Register ``top`` through caspectl's ``add(name, fn, help)``."""
    sp = add("top", lambda c, a: cmd_top(c, a, out), "live view: peers, queue, throughput, cache, LLM, autoscaler")
    sp.add_argument("--once", action="store_true", help="print one snapshot and exit (with -o json: for scripts)")
    sp.add_argument(
        "--interval", type=_interval, default=1.0, metavar="S", help="seconds between refreshes (default 1)"
    )
