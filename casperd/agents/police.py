"""The policeman's agent services: what it offers peers over the mesh, and its own Claude client.

Mesh services (REQUEST ops on the broker's ROUTER, answered with REPLY):

* ``llm-permit`` — the mesh-wide rate limit: ``{tokens, settle?, observe?}`` → ``{wait_s}``. One
  :class:`MeshRateLimit` holds for every agent sharing the API key and follows the limits and
  remaining counts any of them sees in ``anthropic-ratelimit-*`` headers (and 429s). ``settle``
  rows are ``[estimated input, actual input, output tokens]`` of finished calls.
* ``turns-save`` / ``turns-load`` — a code task's conversation and work in progress (attachment 0).
  ``turns-load`` adds ``feedback``: why the policeman sent the task's last result back, if it did.
* ``calls-save`` — per-call usage of calls a worker made outside a saved turn (a code task's calls
  when its loop fails). An ``ask`` task's call is not sent separately: its output carries the
  model and usage, committed with the result, and the policeman writes the ``llm_calls`` row from
  it right after that commit (:meth:`PoliceService.on_finish`): no round trip on the task's path.

It plugs into the broker through typed interfaces only: its services and the ``code`` validator
go into the node's :class:`~casperd.handlers.Catalog` (with the roles that may call each service),
and it is the broker's :class:`~casperd.background.LocalWork` (attachments in ``task_attachments``,
``job`` tasks run in the :class:`JobRunner`, finish notifications).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from casperd import authz, calltrace
from casperd.agents.ratelimit import LocalLimiter, MeshRateLimit, RateObservation
from casperd.agents.records import AgentRecords
from casperd.broker import Broker
from casperd.cache import ResultCache
from casperd.codec import describe_validation
from casperd.errors import CasperError, ForbiddenError, InvalidBodyError, ValidationFailedError
from casperd.lifecycle import ACTIVE, Status
from casperd.messages import TaskSpec
from casperd.settings import Settings
from casperd.taskrecord import TaskRecord

if TYPE_CHECKING:  # loaded where used: a policeman that never plans a job or validates a patch never loads them
    from casperd.agents.claude import ClaudeClient
    from casperd.agents.jobs import JobRunner

log = logging.getLogger("casperd.agents.police")
Attachments = tuple[bytes, ...]
OpResult = tuple[Any, Attachments]


def _uuid(args: dict[str, Any], key: str) -> uuid.UUID:
    try:
        return uuid.UUID(str(args.get(key)))
    except ValueError:
        raise InvalidBodyError(f"{key} must be a task id", hint="send the task's UUID") from None


LEASE_MAX_PER_NODE = 64
"""The most permits one node may hold ahead (a worker asks for one per execution slot)."""


def _count(value: Any) -> int:
    """A non-negative int from a peer's argument (anything else: 0)."""
    return max(0, value) if isinstance(value, int) and not isinstance(value, bool) else 0


def _clamp_observation(obs: dict[str, Any]) -> dict[str, Any]:
    """A peer's report of what the API said, clamped to sane bounds: one peer's word can pause the
    mesh's Claude calls for at most a few minutes (a 429's retry-after above 300 s is 300 s)."""
    out = dict(obs)
    status = out.get("status")
    if not (isinstance(status, int) and not isinstance(status, bool) and 100 <= status <= 599):
        out["status"] = 0  # not a status: nothing to obey
    kinds = ("requests", "tokens", "input", "output")
    for name in ("retry_after_s", *(f"{k}_reset_s" for k in kinds)):
        value = out.get(name)
        if value is not None:
            ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            out[name] = min(max(float(value), 0.0), 300.0) if ok else None
    for name in (f"{k}_{what}" for k in kinds for what in ("limit", "remaining")):
        value = out.get(name)
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            out[name] = None
    return out


class PoliceService:
    def __init__(self, settings: Settings, broker: Broker, cache: ResultCache | None) -> None:
        self.s = settings
        self.broker = broker
        self.records = AgentRecords(broker.store)
        self.rate = MeshRateLimit(settings.llm_rpm, settings.llm_tpm)
        self._cache = cache
        self._claude: ClaudeClient | None = None
        self.on_client: Callable[[ClaudeClient], None] | None = None
        """Called with the model client when it is built (the node's API metrics)."""
        self._jobs: JobRunner | None = None
        self._recording: set[asyncio.Task[None]] = set()
        self.leases: dict[str, list[int]] = {}
        """The input charges of the permits granted ahead and not yet used or given back, per node
        (``llm-permit``): a node can only give back what it was charged."""
        broker.attach(self)
        catalog = broker.catalog
        workers = frozenset({"developer", "tester"})
        catalog.add_service("llm-permit", self._permit, roles=workers)
        catalog.add_service("turns-save", self._turns_save, roles=frozenset({"developer"}))
        catalog.add_service("turns-load", self._turns_load, roles=frozenset({"developer"}))
        catalog.add_service("calls-save", self._calls_save, roles=workers)
        catalog.add_service("directory", self._directory, roles=workers)
        catalog.add_service("handoff-record", self._handoff_record, roles=workers)
        catalog.add_validator("code", self.validate_code)

    @property
    def built_claude(self) -> ClaudeClient | None:
        """The model client if a job has built it, else None (a health check does not build it)."""
        return self._claude

    @property
    def claude(self) -> ClaudeClient:
        """The policeman's own model client (a job's planning and review), built on first use: most
        meshes never run a job, and its module is one fewer at start (issue #13, idle memory)."""
        if self._claude is None:
            from casperd.agents.claude import ClaudeClient

            self._claude = ClaudeClient.from_settings(self.s, LocalLimiter(state=self.rate), self._cache)
            if self.on_client is not None:
                self.on_client(self._claude)
        return self._claude

    @property
    def jobs(self) -> JobRunner:
        """The job coordinator, loaded with the first job (most meshes never run one)."""
        if self._jobs is None:
            from casperd.agents.jobs import JobRunner

            self._jobs = JobRunner(self)
        return self._jobs

    @property
    def jobs_running(self) -> int:
        return len(self._jobs.running) if self._jobs is not None else 0

    # --- the broker's local work (casperd.background.LocalWork) ----------------------------------------
    def run_local(self, rec: TaskRecord) -> None:
        self.jobs.start(rec)

    def on_finish(self, rec: TaskRecord) -> None:
        if self._jobs is not None:
            self._jobs.on_finish(rec)
        if rec.type == "ask" and rec.status is Status.COMPLETE and rec.output_json:
            task = asyncio.get_running_loop().create_task(self._record_ask(rec))
            self._recording.add(task)
            task.add_done_callback(self._recording.discard)

    async def _record_ask(self, rec: TaskRecord) -> None:
        """The ``llm_calls`` row of a finished ``ask`` task, from its committed output (called after
        the result's commit, so the usage is durable in the task row even if this insert is lost)."""
        try:
            out = json.loads(rec.output_json or "{}")
            usage = out.get("usage") if isinstance(out, dict) else None
            if not isinstance(usage, dict) or out.get("task_id") != str(rec.id):
                return  # no call of its own: the output came from the result cache (cache: true)
            job = out.get("job_id")  # from the output: a large input may be in the task store only
            call = {**usage, "model": out.get("model"), "cached": bool(out.get("cached"))}
            await self.records.add_calls(
                [call],
                task_id=rec.id,
                job_id=uuid.UUID(str(job)) if job else None,
                node=rec.assigned_to or "?",
                role="developer",
            )
        except (CasperError, ValueError, TypeError, AttributeError) as exc:
            log.warning("the model call of ask task %s was not recorded in llm_calls: %s", rec.id, exc)

    async def save_attachments(self, task_id: uuid.UUID, kind: str, blobs: tuple[bytes, ...]) -> None:
        await self.records.put_attachments(task_id, kind, blobs)

    async def load_attachments(self, task_ids: list[uuid.UUID]) -> dict[uuid.UUID, list[bytes]]:
        return await self.records.attachments(task_ids, "input")

    async def close(self) -> None:
        if self._recording:
            await asyncio.gather(*self._recording, return_exceptions=True)
        if self._jobs is not None:
            await self._jobs.close()
        if self._claude is not None:
            await self._claude.close()

    # --- who may touch what (the sender's enrolled identity is ``node``) ----------------------------------
    def _require_holder(self, node: str, tid: uuid.UUID, op: str) -> None:
        """The sender must hold the task it names (assigned to it and not finished)."""
        rec = self.broker.tasks.get(tid)
        if rec is None or rec.assigned_to != node or rec.status not in ACTIVE:
            raise ForbiddenError(f"{op}: {node} does not hold task {tid}", hint="a peer may only touch tasks it holds")

    def _may_load(self, node: str, tid: uuid.UUID) -> None:
        """turns-load: a task the sender holds, or the one a task it holds resumes from."""
        for rec in self.broker.tasks.values():
            if (rec.assigned_to == node and rec.status in ACTIVE) and (
                rec.id == tid or (rec.input_loaded and str(rec.input.get("resume_from")) == str(tid))
            ):
                return
        raise ForbiddenError(
            f"turns-load: {node} does not hold task {tid}", hint="a peer may only touch tasks it holds"
        )

    # --- mesh services ------------------------------------------------------------------------------
    async def _permit(self, node: str, args: dict[str, Any], _att: Attachments) -> OpResult:
        calltrace.mark("permit served")
        now = time.monotonic()
        for row in args.get("settle") or []:  # [estimated input, actual input, output tokens]
            if isinstance(row, list | tuple) and len(row) in (2, 3):
                self.rate.settle(int(row[0]), int(row[1]), now, int(row[2]) if len(row) == 3 else 0)
        for obs in args.get("observe") or []:
            if isinstance(obs, dict):
                try:
                    self.rate.observe(RateObservation(**_clamp_observation(obs)), now)
                except TypeError:
                    raise InvalidBodyError(
                        "observe entries must be rate observations", hint="see casperd.agents.ratelimit.RateObservation"
                    ) from None
        held = self.leases.pop(node, [])  # the charges of the permits ahead this node holds
        del held[: _count(args.get("used"))]  # used by its calls (settled as calls)
        for tokens in args.get("release") or []:  # given back unused: refund what was charged
            if held:
                charge = tokens if tokens in held else held[0]
                held.remove(charge)
                self.rate.release(charge, now)
        tokens = int(args.get("tokens") or 0)
        wait = self.rate.reserve(tokens, now) if tokens > 0 else 0.0
        out: dict[str, Any] = {"wait_s": round(wait, 3)}
        lease = args.get("lease")
        if wait <= 0 and self.s.llm_permit_lease_s > 0 and isinstance(lease, list | tuple) and len(lease) == 2:
            want = min(_count(lease[0]), LEASE_MAX_PER_NODE - len(held))
            charge = _count(lease[1])
            granted = self.rate.lease(want, charge, now) if want > 0 else 0
            held.extend([charge] * granted)
            out["leased"] = granted
            out["lease_s"] = self.s.llm_permit_lease_s
        if held:
            self.leases[node] = held
        return out, ()

    async def _turns_save(self, node: str, args: dict[str, Any], att: Attachments) -> OpResult:
        tid = _uuid(args, "task_id")
        self._require_holder(node, tid, "turns-save")
        messages = args.get("messages")
        if not isinstance(messages, list):
            raise InvalidBodyError("turns-save needs messages: a list", hint="send the whole conversation")
        size = len(json.dumps(messages, default=str)) + sum(len(a) for a in att)
        self.broker.quotas.check_bytes("a saved turn", size, self.broker.quotas.limits.turn_bytes)
        await self.records.save_turns(
            tid, int(args.get("attempt") or 1), node, messages, args.get("usage") or {}, att[0] if att else None
        )
        await self._save_calls(node, tid, args)
        return {"saved": len(messages)}, ()

    async def _calls_save(self, node: str, args: dict[str, Any], _att: Attachments) -> OpResult:
        tid = _uuid(args, "task_id")
        self._require_holder(node, tid, "calls-save")
        await self._save_calls(node, tid, args)
        return {}, ()

    async def _save_calls(self, node: str, tid: uuid.UUID, args: dict[str, Any]) -> None:
        calls: list[Mapping[str, Any]] = [c for c in args.get("calls") or [] if isinstance(c, dict)]
        job = args.get("job_id")
        await self.records.add_calls(
            calls, task_id=tid, job_id=uuid.UUID(job) if job else None, node=node, role="developer"
        )

    async def _turns_load(self, node: str, args: dict[str, Any], _att: Attachments) -> OpResult:
        tid = _uuid(args, "task_id")
        self._may_load(node, tid)
        saved = await self.records.load_turns(tid)
        if saved is None:
            return None, ()
        wip = saved.pop("wip")
        rec = self.broker.tasks.get(tid)
        if rec is not None and rec.error_json:
            last = json.loads(rec.error_json)[-1]
            if last.get("code") == ValidationFailedError.code and last.get("attempt") == saved["attempt"]:
                saved["feedback"] = f"The policeman rejected your patch: {last.get('message')}"
        return saved, ((wip,) if wip else ())

    async def _directory(self, node: str, args: dict[str, Any], _att: Attachments) -> OpResult:
        cap = args.get("capability")
        return {"peers": self.broker.directory(str(cap) if cap else None)}, ()

    async def _handoff_record(self, node: str, args: dict[str, Any], att: Attachments) -> OpResult:
        """Record a task one peer hands straight to another. Sent by the receiver (``hold: true``:
        it runs the task itself, so it becomes the holder at once) or, when the direct send failed,
        by the sender (queued and dispatched as usual)."""
        try:
            spec = TaskSpec.model_validate(args.get("spec"))
        except ValidationError as exc:
            raise InvalidBodyError(
                f"handoff-record: bad task: {describe_validation(exc)}", hint="send a TaskSpec as 'spec'"
            ) from None
        hold = bool(args.get("hold"))
        sender = str(args.get("from") or node)[:64]
        me, origin = self.broker.peers.get(node), self.broker.peers.get(sender)
        authz.check_handoff(
            me.role if me is not None else "",
            spec.type,
            hold=hold,
            sender_role=origin.role if origin is not None and sender != node else None,
        )
        quotas = self.broker.quotas
        for blob in att:
            quotas.check_bytes("an attachment", len(blob), quotas.limits.attachment_bytes)
        quotas.take(node, time.monotonic())
        quotas.check_open(sender, 1, len(self.broker.tasks))
        holder = node if hold else None
        submitter = f"{sender} (handed to {node})" if holder and sender != node else sender
        tid, existing = await self.broker.submit_local(spec, att, submitter=submitter, holder=holder)
        rec = self.broker.tasks.get(tid)
        assigned = (
            rec is not None
            and holder is not None
            and rec.assigned_to == holder
            and rec.status in ACTIVE
            and rec.input_loaded  # else its TASK is on the way (a spilled input being read back)
        )
        out: dict[str, Any] = {"task_id": str(tid), "existing": existing, "assigned": assigned}
        if assigned and rec is not None:
            out.update(
                attempt=rec.attempts,
                lease_ms=int(self.s.lease_s * 1000),
                timeout_s=rec.timeout_s,
                type=rec.type,
                input=rec.input,
            )
        return out, ()

    # --- validation of code results -------------------------------------------------------------------
    async def validate_code(
        self, tid: uuid.UUID, task_input: dict[str, Any], output: Any, attachments: tuple[bytes, ...]
    ) -> str | None:
        from casperd.agents import gitwork  # the first code result loads git and patch handling
        from casperd.agents.validation import PatchLimits, validate_patch

        patch = attachments[0] if attachments else b""
        problems = await validate_patch(
            patch,
            repo=str(task_input.get("repo")),
            base=str(task_input.get("base")),
            allowed=list(task_input.get("allowed") or []),
            limits=PatchLimits(),
            scratch=self.s.workspace / "validate",
            mirror_root=gitwork.mirror_root(self.s.workspace),
        )
        if problems:
            log.info("task %s failed validation: %s", tid, "; ".join(problems)[:500])
            return "; ".join(problems)[:3500]
        return None
