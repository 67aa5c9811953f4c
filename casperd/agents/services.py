"""What a developer or tester node offers its Claude-backed handlers (``RunContext.services``).

* the Claude client, whose rate limiter asks the policeman for permits (``llm-permit``), so one
  limit holds for every agent sharing the API key, and reports what the API said (429s, headers);
* saving and loading a code task's conversation through the policeman (``turns-save`` / ``turns-load``).

Mesh services are REQUESTs on the node's DEALER to the broker (protocol/SPEC.md, section 13.4).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from casperd import calltrace, codec
from casperd.agents import gitwork
from casperd.agents.claude import ClaudeClient
from casperd.agents.effective import api_key_configured
from casperd.agents.ratelimit import LocalLimiter, RateObservation
from casperd.cache import ResultCache
from casperd.errors import CasperError, RequestTimeoutError, from_wire
from casperd.messages import Reply, Request
from casperd.settings import Settings
from casperd.transport import dealer

log = logging.getLogger("casperd.agents")


@dataclass(frozen=True, slots=True)
class Spare:
    """A permit the policeman granted ahead of a call: usable until ``until`` (monotonic)."""

    tokens: int
    until: float


SPARE_MARGIN_S = 0.25
"""A spare permit is used only this long before the policeman's ``lease_s`` runs out (the lease
is counted from when the request was sent, so the two clocks never disagree in our favour)."""


class MeshLimiter:
    """The rate limiter of a worker: the policeman holds the mesh-wide buckets and grants permits.

    Permits ahead (``llm_permit_lease_s`` > 0): when a call ends, its settle report goes to the
    policeman at once, in the background, asking for a permit for this slot's next call
    (``lease``); the next call takes it without a round trip. A permit ahead is used only within
    its lease, only for a call of about its size, and never after this node saw a 429/529; one not
    used in time is given back (``release``). The policeman grants none while a pause is on or its
    buckets are less than half full: near the limit every call asks, as without leases.

    If the policeman cannot be reached, the node falls back to a local limiter at the configured
    rate (logged once), so a policeman outage never hangs a running agent."""

    def __init__(self, worker: Any, settings: Settings) -> None:
        self.worker = worker
        self._settles: list[list[int]] = []
        self._observed: list[dict[str, Any]] = []
        self._fallback = LocalLimiter(settings.llm_rpm, settings.llm_tpm)
        self._warned = False
        self._reports: set[asyncio.Task[None]] = set()
        self.lease_s = settings.llm_permit_lease_s
        self.slots = max(1, settings.capacity) if self.lease_s > 0 else 0
        self.spares: list[Spare] = []
        self._used = 0
        self._releases: list[int] = []
        self._delta = 0  # input charged for permits ahead beyond the estimates of the calls that used them
        self._topup: asyncio.Task[None] | None = None
        self._topup_tokens = 0
        self._expiry: asyncio.TimerHandle | None = None

    # --- permits ahead
    def _take_spare(self, tokens: int) -> bool:
        self._expire(time.monotonic())
        for i, spare in enumerate(self.spares):
            if tokens <= 2 * spare.tokens + 1024:  # about its size: the settle corrects the charge
                del self.spares[i]
                self._used += 1
                self._delta += spare.tokens - tokens
                return True
        return False

    def _expire(self, now: float) -> None:
        if any(sp.until <= now for sp in self.spares):
            self._releases.extend(sp.tokens for sp in self.spares if sp.until <= now)
            self.spares = [sp for sp in self.spares if sp.until > now]

    def _args(self, tokens: int) -> dict[str, Any]:
        args: dict[str, Any] = {"tokens": int(tokens)}
        if self._settles:
            args["settle"], self._settles = self._settles, []
        if self._observed:
            args["observe"], self._observed = self._observed, []
        if self._used:
            args["used"], self._used = self._used, 0
        if self._releases:
            args["release"], self._releases = self._releases, []
        return args

    def _keep(self, data: Any, tokens: int, sent: float) -> None:
        if not isinstance(data, dict):
            return
        n, lease_s = data.get("leased"), data.get("lease_s")
        if isinstance(n, int) and n > 0 and isinstance(lease_s, int | float) and lease_s > SPARE_MARGIN_S:
            until = sent + min(float(lease_s), self.lease_s) - SPARE_MARGIN_S
            self.spares.extend(Spare(tokens, until) for _ in range(n))
            if self._expiry is None:
                self._arm_expiry(until)

    def _arm_expiry(self, until: float) -> None:
        delay = max(0.0, until - time.monotonic()) + 0.01
        self._expiry = asyncio.get_running_loop().call_later(delay, self._expired)

    def _expired(self) -> None:
        self._expiry = None
        self._expire(time.monotonic())
        if self.spares:
            self._arm_expiry(min(sp.until for sp in self.spares))
        if self._releases:
            self._background(self._report())

    def _background(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)
        return task

    async def _top_up(self) -> None:
        """Report the settled calls and ask for this node's permits ahead (one per slot)."""
        try:
            # started from settle(), in the same loop step as the handler's return: yield once so
            # the RESULT (flushed on the next loop turn) leaves before this request
            await asyncio.sleep(0)
            while self._settles or self._releases or self._used:
                args = self._args(0)
                want = self.slots - len(self.spares)
                tokens = self._topup_tokens
                if want > 0:
                    args["lease"] = [want, tokens]
                sent = time.monotonic()
                try:
                    data, _ = await self.worker.request("llm-permit", args, timeout_s=5.0)
                except CasperError:
                    return
                self._keep(data, tokens, sent)
        finally:
            self._topup = None

    # --- the Limiter protocol
    async def acquire(self, tokens: int) -> None:
        topup = self._topup
        if topup is not None:  # its answer may hold this call's permit: no second round trip
            await asyncio.shield(topup)
        if self.slots and self._take_spare(tokens):
            calltrace.mark("permit held")
            return
        while True:
            args = self._args(tokens)
            try:
                calltrace.mark("permit asked")
                data, _ = await self.worker.request("llm-permit", args, timeout_s=5.0)
                calltrace.mark("permit answered")
            except (RequestTimeoutError, CasperError) as exc:
                if not self._warned:
                    self._warned = True
                    log.warning("rate-limit permits unavailable from the policeman (%s); limiting locally", exc)
                self.spares = []  # never use a permit the policeman may have lost track of
                await self._fallback.acquire(tokens)
                return
            wait = float(data.get("wait_s", 0.0)) if isinstance(data, dict) else 0.0
            if wait <= 0:
                return
            await asyncio.sleep(min(wait, 60.0))

    def settle(self, estimated: int, actual: int, output: int = 0) -> None:
        # a call that used a permit ahead was charged the permit's tokens, not its own estimate
        charged, self._delta = int(estimated) + self._delta, 0
        self._settles.append([charged, int(actual), int(output)])
        self._fallback.settle(estimated, actual, output)
        if self.slots and self._topup is None:  # the report goes now, off the next call's path
            self._topup_tokens = max(0, int(estimated))
            self._topup = self._background(self._top_up())

    def observe(self, obs: RateObservation) -> None:
        self._observed.append(dataclasses.asdict(obs))
        self._fallback.observe(obs)
        if obs.status in (429, 529):  # tell the mesh now, not with the next permit; hold nothing ahead
            self._releases.extend(sp.tokens for sp in self.spares)
            self.spares = []
            self._background(self._report())

    async def _report(self) -> None:
        if not (self._observed or self._releases):
            return
        with contextlib.suppress(CasperError):
            await self.worker.request("llm-permit", self._args(0), timeout_s=5.0)


class WorkerServices:
    def __init__(self, settings: Settings, worker: Any, cache: ResultCache | None) -> None:
        self.settings = settings
        self.worker = worker
        self.limiter = MeshLimiter(worker, settings)
        self.claude = ClaudeClient.from_settings(settings, self.limiter, cache)
        self.mirrors = gitwork.mirror_root(settings.workspace)
        self.has_api_key = api_key_configured(settings)

    @property
    def node_id(self) -> str:
        return self.settings.node_id

    def model_for(self, role: str, explicit: str | None = None) -> str:
        return (
            explicit or self.settings.models.get(role) or self.settings.models.get("developer") or "claude-sonnet-4-6"
        )

    def worktree_path(self, task_id: uuid.UUID, attempt: int) -> Path:
        stamp = int(time.time() * 1000) % 100000
        return gitwork.worktree_root(self.settings.workspace) / f"{task_id}-{attempt}-{stamp}"

    async def save_turns(
        self,
        task_id: uuid.UUID,
        attempt: int,
        messages: list[Any],
        usage: dict[str, Any],
        wip: bytes | None,
        calls: list[dict[str, Any]],
        job_id: str | None,
    ) -> None:
        await self.worker.request(
            "turns-save",
            {
                "task_id": str(task_id),
                "attempt": attempt,
                "messages": messages,
                "usage": usage,
                "calls": calls,
                "job_id": job_id,
            },
            (wip,) if wip else (),
            timeout_s=15.0,
        )

    async def record_calls(self, task_id: uuid.UUID, calls: list[dict[str, Any]], job_id: str | None) -> None:
        if calls:
            await self.worker.request(
                "calls-save", {"task_id": str(task_id), "calls": calls, "job_id": job_id}, timeout_s=15.0
            )

    async def load_turns(self, task_id: uuid.UUID) -> dict[str, Any] | None:
        data, attachments = await self.worker.request("turns-load", {"task_id": str(task_id)}, timeout_s=15.0)
        if not data:
            return None
        data = dict(data)
        data["wip"] = attachments[0] if attachments else None
        return data

    async def hand_off(self, spec: dict[str, Any], attachments: tuple[bytes, ...], capability: str) -> dict[str, Any]:
        """Hand a follow-up task straight to a capable peer (developer → tester): it is found in the
        policeman's directory and sent to the peer's own ROUTER, which has the policeman record it
        with itself as holder. If no peer takes it directly, the policeman records and queues it."""
        data, _ = await self.worker.request("directory", {"capability": capability}, timeout_s=10.0)
        for peer in (data or {}).get("peers", [])[:2]:
            if peer.get("node_id") == self.node_id or (self.settings.curve and not peer.get("public_key")):
                continue
            try:
                out = await self._send_direct(peer, spec, attachments)
                return {**out, "direct": True, "to": peer["node_id"]}
            except CasperError as exc:
                log.warning("direct hand-off to %s failed (%s); trying the next way", peer.get("node_id"), exc)
        data, _ = await self.worker.request("handoff-record", {"spec": spec}, attachments, timeout_s=15.0)
        return {"task_id": data["task_id"], "holder": None, "direct": False}

    async def _send_direct(
        self, peer: dict[str, Any], spec: dict[str, Any], attachments: tuple[bytes, ...]
    ) -> dict[str, Any]:
        opts = dataclasses.replace(self.worker.opts, curve_server_key=(peer.get("public_key") or "").encode() or None)
        identity = f"{self.node_id}/handoff.{os.urandom(4).hex()}".encode()
        sock = dealer(self.worker.ctx, str(peer["endpoint"]), identity, opts, curve=self.settings.curve)
        try:
            async with asyncio.timeout(5.0):  # covers a peer that never connects, too
                await sock.send_multipart(
                    codec.encode(Request(req_id=1, op="handoff", args={"spec": spec}), attachments)
                )
                while True:
                    msg = codec.decode(await sock.recv_multipart(), max_bytes=self.settings.max_message_bytes).message
                    if isinstance(msg, Reply) and msg.req_id == 1:
                        break
        except TimeoutError:
            raise RequestTimeoutError(
                f"{peer['node_id']} did not answer the hand-off within 5s",
                hint="the policeman records the task instead",
            ) from None
        finally:
            sock.close(linger=0)
        if not msg.ok:
            raise from_wire(msg.error.model_dump() if msg.error else {})
        return dict(msg.data or {})

    async def close(self) -> None:
        await self.claude.close()
