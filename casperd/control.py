"""The daemon side of caspectl: control operations, looked up by name in a registry.

A REQUEST ``{req_id, op, args}`` on the control socket runs the operation of that name and is
answered with a REPLY carrying ``data``, or ``ok=false`` and an error naming cause and fix.
Each operation says which roles serve it; the policeman serves them all.
"""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

import psutil

from casperd import procstats
from casperd.agents.effective import api_key_configured, llm_settings_view
from casperd.cache import ResultCache
from casperd.errors import CasperError, CommandError, TaskNotFoundError, UnsupportedError
from casperd.lifecycle import Status
from casperd.meshcache import sum_counters
from casperd.messages import ErrorBody, Reply, Request
from casperd.metrics import Metrics
from casperd.settings import Settings
from casperd.telemetry import api_check

if TYPE_CHECKING:  # the policeman's modules (and the Postgres driver) load only on the policeman, a worker's on workers
    from casperd.broker import Broker
    from casperd.store import Store
    from casperd.worker import Worker


class Node(Protocol):
    """What the control operations use of a node (casperd.node.Node): this module does not import
    the node, so the two have no import cycle."""

    s: Settings
    broker: Broker | None
    worker: Worker | None
    store: Store | None
    cache: ResultCache | None
    police: Any
    elastic: Any  # casperd.elastic.Elastic on the policeman
    telemetry: Any  # casperd.telemetry.Telemetry on the policeman
    metrics: Metrics
    enrollment: Any  # casperd.enrollment.Enrollment with Curve on
    zap: Any  # casperd.zap.ZapHandler with Curve on


Op = Callable[[Node, dict[str, Any]], Awaitable[Any]]
OPS: dict[str, tuple[Op, bool]] = {}
"""op name -> (implementation, served by workers too)"""


def op(name: str, *, workers: bool = False) -> Callable[[Op], Op]:
    def deco(fn: Op) -> Op:
        OPS[name] = (fn, workers)
        return fn

    return deco


class Control:
    def __init__(self, node: Node) -> None:
        self.node = node

    async def handle(self, req: Request | Any) -> Reply:
        if not isinstance(req, Request):
            raise UnsupportedError(
                f"{req.COMMAND.name} is not accepted on the control socket", hint="send REQUEST or SUBMIT"
            )
        entry = OPS.get(req.op)
        try:
            if entry is None:
                raise CommandError(f"unknown operation {req.op!r}", hint=f"known: {', '.join(sorted(OPS))}")
            fn, workers = entry
            if not workers and self.node.broker is None:
                raise CommandError(
                    f"{req.op} is served by the policeman, not by {self.node.s.node_id}",
                    hint="point caspectl at the policeman's control socket",
                )
            data = await fn(self.node, req.args)
            return Reply(req_id=req.req_id, ok=True, data=data)
        except CasperError as exc:
            return Reply(req_id=req.req_id, ok=False, error=ErrorBody.of(exc))


def _task_id(args: dict[str, Any]) -> uuid.UUID:
    try:
        return uuid.UUID(str(args.get("id", "")))
    except ValueError:
        raise CommandError(
            f"{args.get('id')!r} is not a task id", hint="task ids are UUIDs, see caspectl tasks"
        ) from None


def _row_view(row: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in row.items():
        out[k] = v.isoformat() if hasattr(v, "isoformat") else str(v) if isinstance(v, uuid.UUID) else v
    return out


def _trust(node: Node) -> dict[str, Any]:
    """Enrollment and authorization counters (casperd/zap.py, casperd/authz.py)."""
    m = node.metrics
    forbidden = {
        s.labels["what"]: int(s.value)
        for metric in m.forbidden.collect()
        for s in metric.samples
        if s.name.endswith("_total")
    }
    return {
        "enrollment": node.enrollment is not None,
        "enrolled_keys": len(node.enrollment.entries) if node.enrollment is not None else 0,
        "handshakes_refused": node.zap.refused_count if node.zap is not None else 0,
        "forbidden": forbidden,
    }


@op("status", workers=True)
async def _status(node: Node, args: dict[str, Any]) -> Any:
    if node.broker is not None:
        view = node.broker.status_view()
        view["trust"] = _trust(node)
        if node.cache is not None:
            view["cache"] = node.cache.stats()
        view["mesh_cache"] = sum_counters(p.cache for p in node.broker.core.peers.values())
        if node.police is not None:
            view["llm"] = {
                "rate_limit": node.police.rate.snapshot(time.monotonic()),
                "jobs_running": node.police.jobs_running,
                "settings": llm_settings_view(node.s),
            }
        if node.elastic is not None:
            view["autoscale"] = node.elastic.status_view()
        return view
    assert node.worker is not None
    view = node.worker.status_view()
    view["llm"] = {"settings": llm_settings_view(node.s)}
    view["trust"] = _trust(node)
    return view


@op("peers")
async def _peers(node: Node, args: dict[str, Any]) -> Any:
    assert node.broker is not None
    peers = node.broker.peers_view()
    if node.elastic is not None:
        peers = [p | node.elastic.peer_note(p["node_id"]) for p in peers]
        return {"peers": peers, "autoscale": node.elastic.outlook()}
    return {"peers": peers}


@op("spawner-orders")
async def _spawner_orders(node: Node, args: dict[str, Any]) -> Any:
    """casperd up's supervisor: the local spawner's orders (see casperd.spawners.local)."""
    spawner = node.elastic.spawner if node.elastic is not None else None
    if spawner is None or not hasattr(spawner, "exchange"):
        raise CommandError(
            "this policeman does not use the local spawner",
            hint="casperd up runs the policeman with spawner = local; see caspectl status (autoscale)",
        )
    return spawner.exchange(args)


@op("get")
async def _get(node: Node, args: dict[str, Any]) -> Any:
    assert node.broker is not None and node.store is not None
    tid = _task_id(args)
    rec = node.broker.tasks.get(tid)
    row = await node.store.get(tid)
    if row is None and rec is None:
        raise TaskNotFoundError(f"no task {tid}", hint="caspectl tasks lists recent tasks")
    view = rec.summary() if rec is not None else _row_view(row or {})
    if rec is not None and not rec.input_loaded and row is not None:
        view["input"] = row["input"]  # a large input waits in Postgres while the task is queued
    view["events"] = [_row_view(e) for e in await node.store.events(tid)]
    return view


@op("tasks")
async def _tasks(node: Node, args: dict[str, Any]) -> Any:
    assert node.store is not None
    status = args.get("status")
    if status is not None and (not isinstance(status, str) or status not in {s.value for s in Status}):
        raise CommandError(f"unknown status {status!r}", hint="one of: " + ", ".join(s.value for s in Status))
    limit = args.get("limit", 50)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 10_000:
        raise CommandError("limit must be between 1 and 10000")
    rows = await node.store.list(status, limit)
    keep = ("id", "type", "status", "priority", "attempts", "assigned_to", "requires", "created_at", "finished_at")
    return {"tasks": [_row_view({k: r[k] for k in keep}) for r in rows], "counts": await node.store.counts()}


@op("cancel")
async def _cancel(node: Node, args: dict[str, Any]) -> Any:
    assert node.broker is not None and node.store is not None
    result = node.broker.cancel(_task_id(args))
    await node.store.committed()  # answer only once the cancellation is durable
    return result


def _set_draining(node: Node, args: dict[str, Any], draining: bool) -> Any:
    """On the policeman: a named peer; on a worker: the worker itself."""
    if node.broker is None:
        assert node.worker is not None
        return node.worker.set_draining(draining)
    return node.broker.set_draining(str(args.get("peer", "")), draining)


@op("retry")
async def _retry(node: Node, args: dict[str, Any]) -> Any:
    assert node.broker is not None and node.store is not None
    tid = _task_id(args)
    row = None if tid in node.broker.tasks else await node.store.get(tid)
    if row is None:
        if tid in node.broker.tasks:
            raise CommandError(
                f"task {tid} is still open ({node.broker.tasks[tid].status.value})",
                hint="only dead or cancelled tasks are retried",
            )
        raise TaskNotFoundError(f"no task {tid}", hint="caspectl tasks --status dead lists retry candidates")
    result = node.broker.retry(row)
    await node.store.committed()
    return result


@op("drain", workers=True)
async def _drain(node: Node, args: dict[str, Any]) -> Any:
    return _set_draining(node, args, True)


@op("resume", workers=True)
async def _resume(node: Node, args: dict[str, Any]) -> Any:
    return _set_draining(node, args, False)


@op("health", workers=True)
async def _health(node: Node, args: dict[str, Any]) -> Any:
    checks: dict[str, dict[str, Any]] = {}
    if node.store is not None:
        try:
            rtt = await node.store.ping()
            checks["database"] = {
                "ok": node.store.healthy,
                "detail": f"ping {rtt * 1000:.1f} ms"
                + ("" if node.store.healthy else f"; last commit failed: {node.store.last_error}"),
            }
        except CasperError as exc:
            checks["database"] = {"ok": False, "detail": exc.message}
    if node.cache is not None:
        up = await node.cache.ping()
        # Redis is a cache: down means degraded (bypassed), never unhealthy
        checks["redis"] = {"ok": True, "degraded": not up, "detail": "reachable" if up else "unreachable; bypassed"}
    if node.worker is not None:
        silent = time.monotonic() - node.worker.clock.last_seen
        ok = node.worker.registered and silent < node.s.heartbeat_s * node.s.heartbeat_misses
        checks["broker"] = {
            "ok": ok,
            "detail": f"last heard {silent:.1f}s ago" + ("" if node.worker.registered else "; not registered yet"),
        }
    disk = shutil.disk_usage(node.s.state_dir)
    free_pct = disk.free / disk.total * 100
    checks["disk"] = {"ok": free_pct > 2.0, "detail": f"{free_pct:.1f}% free in {node.s.state_dir}"}
    mem = psutil.virtual_memory()
    cpu, rss = procstats.shared().sample(time.monotonic())
    checks["memory"] = {
        "ok": mem.percent < 98.0,
        "detail": f"{mem.percent:.0f}% used on the host; this process {rss / 2**20:.0f} MiB, CPU {cpu:.0f}%",
        "process_rss_bytes": rss,
        "process_cpu_pct": cpu,
    }
    if node.police is not None:  # its client is built with the first job, not by a health check
        built = node.police.built_claude
        checks["api"] = api_check(built, built.has_key if built else api_key_configured(node.s))
    elif node.worker is not None and node.worker.services is not None:
        client = node.worker.services.claude
        checks["api"] = api_check(client, client.has_key)
    return {
        "node_id": node.s.node_id,
        "role": node.s.role.value,
        "healthy": all(c["ok"] for c in checks.values()),
        "checks": checks,
    }


@op("job-submit")
async def _job_submit(node: Node, args: dict[str, Any]) -> Any:
    """Start a job (caspectl run): goal, repo, test_cmd, budget_usd, max_parallel, allowed."""
    return await node.police.jobs.submit(args)


@op("job")
async def _job(node: Node, args: dict[str, Any]) -> Any:
    """A job's report: plan, subtasks, tokens, cost, branch (caspectl job ID)."""
    return await node.police.jobs.report(_task_id(args))


# --- enrollment (caspectl keys) ---------------------------------------------------------------------
def _book(node: Node) -> Any:
    if node.enrollment is None:
        raise CommandError(
            "enrollment is off on this mesh (CurveZMQ is off)", hint="start the mesh with Curve on (casperd --curve)"
        )
    node.enrollment.refresh(force=True)
    return node.enrollment


@op("keys-list")
async def _keys_list(node: Node, args: dict[str, Any]) -> Any:
    """The enrolled keys, with the node each one has registered (public keys only)."""
    book = _book(node)
    online = {p.key: p.node_id for p in node.broker.peers.values() if p.key} if node.broker else {}
    return {
        "file": str(book.path),
        "keys": [
            {"key": e.key, "pattern": e.pattern, "role": e.role, "online": online.get(e.key)}
            for e in book.entries.values()
        ],
    }


@op("keys-add")
async def _keys_add(node: Node, args: dict[str, Any]) -> Any:
    """Enroll a public key for a node id (or pattern) and a role."""
    from casperd.errors import ConfigError

    try:
        entry = _book(node).add(str(args.get("key") or ""), str(args.get("pattern") or ""), str(args.get("role") or ""))
    except ConfigError as exc:
        raise CommandError(exc.message, hint=exc.hint) from None
    return {"key": entry.key, "pattern": entry.pattern, "role": entry.role}


@op("keys-revoke")
async def _keys_revoke(node: Node, args: dict[str, Any]) -> Any:
    """Revoke a key (or every key enrolled with exactly this pattern): its peers are dropped at
    once and their tasks go back to pending; its next handshake is refused."""
    target = str(args.get("target") or "")
    gone = _book(node).revoke(target)
    if not gone:
        raise TaskNotFoundError(f"no enrolled key or pattern {target[:80]!r}", hint="see caspectl keys list")
    dropped = node.broker.revoke({e.key for e in gone}) if node.broker else []
    return {"revoked": [e.key for e in gone], "dropped": dropped}


# operations that live with their caspectl command (request and execution in one module), imported
# when first asked for: caspectl's modules load rich, which a daemon does not need otherwise
@op("top")
async def _top(node: Node, args: dict[str, Any]) -> Any:
    from casperd.ctl.top import top_op

    return await top_op(node, args)
