"""The policeman's durable records for agent work (sql/002_agents.sql): attachments, turns, calls, jobs.

All writes commit before they return, so whatever the broker acknowledges afterwards (a RESULT
carrying a patch, a saved turn) survives a policeman crash.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from casperd.store import Store


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class AgentRecords:
    def __init__(self, store: Store) -> None:
        self.store = store

    # --- attachments ------------------------------------------------------------------------------
    async def put_attachments(self, task_id: uuid.UUID, kind: str, blobs: Iterable[bytes]) -> None:
        rows = [(task_id, kind, i, b, sha256(b)) for i, b in enumerate(blobs)]
        if rows:
            await self.store.execute(
                "INSERT INTO task_attachments (task_id, kind, idx, data, sha256) VALUES (%s, %s, %s, %s, %s)"
                " ON CONFLICT (task_id, kind, idx) DO UPDATE SET data = excluded.data, sha256 = excluded.sha256,"
                " created_at = now()",
                rows,
                many=True,
            )

    async def attachments(self, task_ids: list[uuid.UUID], kind: str) -> dict[uuid.UUID, list[bytes]]:
        if not task_ids:
            return {}
        rows = await self.store.fetch(
            "SELECT task_id, idx, data FROM task_attachments WHERE task_id = ANY(%s) AND kind = %s"
            " ORDER BY task_id, idx",
            (task_ids, kind),
        )
        out: dict[uuid.UUID, list[bytes]] = {}
        for r in rows:
            out.setdefault(r["task_id"], []).append(bytes(r["data"]))
        return out

    # --- turns ------------------------------------------------------------------------------------
    async def save_turns(
        self,
        task_id: uuid.UUID,
        attempt: int,
        node: str,
        messages: list[Any],
        usage: Mapping[str, Any],
        wip: bytes | None,
    ) -> None:
        await self.store.execute(
            "INSERT INTO task_turns (task_id, attempt, node, messages, usage, wip) VALUES (%s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (task_id) DO UPDATE SET attempt = excluded.attempt, node = excluded.node,"
            " messages = excluded.messages, usage = excluded.usage, wip = excluded.wip, updated_at = now()",
            (task_id, attempt, node, json.dumps(messages), json.dumps(dict(usage)), wip),
        )

    async def load_turns(self, task_id: uuid.UUID) -> dict[str, Any] | None:
        rows = await self.store.fetch(
            "SELECT attempt, node, messages, usage, wip FROM task_turns WHERE task_id = %s", (task_id,)
        )
        if not rows:
            return None
        r = rows[0]
        return {
            "attempt": r["attempt"],
            "node": r["node"],
            "messages": r["messages"],
            "usage": r["usage"],
            "wip": bytes(r["wip"]) if r["wip"] is not None else None,
        }

    # --- model calls --------------------------------------------------------------------------------
    async def add_calls(
        self,
        calls: list[Mapping[str, Any]],
        *,
        task_id: uuid.UUID | None,
        job_id: uuid.UUID | None,
        node: str,
        role: str,
    ) -> None:
        rows = [
            (
                task_id,
                job_id,
                node,
                role,
                str(c.get("model", "?"))[:128],
                int(c.get("input_tokens", 0)),
                int(c.get("output_tokens", 0)),
                int(c.get("cache_read_tokens", 0)),
                int(c.get("cache_write_tokens", 0)),
                float(c.get("cost_usd", 0.0)),
                bool(c.get("cached", False)),
            )
            for c in calls
        ]
        if rows:
            await self.store.execute(
                "INSERT INTO llm_calls (task_id, job_id, node, role, model, input_tokens, output_tokens,"
                " cache_read_tokens, cache_write_tokens, cost_usd, cached)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                rows,
                many=True,
            )

    async def usage_by_task(self, task_ids: list[uuid.UUID]) -> dict[uuid.UUID, dict[str, Any]]:
        if not task_ids:
            return {}
        rows = await self.store.fetch(
            "SELECT task_id, count(*) FILTER (WHERE NOT cached) AS calls, sum(input_tokens) AS input_tokens,"
            " sum(output_tokens) AS output_tokens, sum(cache_read_tokens) AS cache_read_tokens,"
            " sum(cache_write_tokens) AS cache_write_tokens, sum(cost_usd) AS cost_usd"
            " FROM llm_calls WHERE task_id = ANY(%s) GROUP BY task_id",
            (task_ids,),
        )
        return {r["task_id"]: _usage_row(r) for r in rows}

    async def usage_by_job(self, job_id: uuid.UUID) -> dict[str, Any]:
        rows = await self.store.fetch(
            "SELECT count(*) FILTER (WHERE NOT cached) AS calls, coalesce(sum(input_tokens), 0) AS input_tokens,"
            " coalesce(sum(output_tokens), 0) AS output_tokens,"
            " coalesce(sum(cache_read_tokens), 0) AS cache_read_tokens,"
            " coalesce(sum(cache_write_tokens), 0) AS cache_write_tokens, coalesce(sum(cost_usd), 0) AS cost_usd"
            " FROM llm_calls WHERE job_id = %s",
            (job_id,),
        )
        return _usage_row(rows[0]) if rows else _usage_row({})

    # --- jobs -------------------------------------------------------------------------------------
    async def save_job(
        self, job_id: uuid.UUID, state: str, spec: Mapping[str, Any], progress: Mapping[str, Any]
    ) -> None:
        await self.store.execute(
            "INSERT INTO jobs (id, state, spec, progress) VALUES (%s, %s, %s, %s)"
            " ON CONFLICT (id) DO UPDATE SET state = excluded.state, progress = excluded.progress,"
            " updated_at = now()",
            (job_id, state, json.dumps(dict(spec)), json.dumps(dict(progress))),
        )

    async def load_job(self, job_id: uuid.UUID) -> dict[str, Any] | None:
        rows = await self.store.fetch("SELECT id, state, spec, progress, created_at FROM jobs WHERE id = %s", (job_id,))
        return rows[0] if rows else None


def _usage_row(r: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "input_tokens": int(r.get("input_tokens") or 0),
        "output_tokens": int(r.get("output_tokens") or 0),
        "cache_read_tokens": int(r.get("cache_read_tokens") or 0),
        "cache_write_tokens": int(r.get("cache_write_tokens") or 0),
        "calls": int(r.get("calls") or 0),
        "cost_usd": round(float(r.get("cost_usd") or 0.0), 6),
    }
