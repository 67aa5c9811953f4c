"""PolicemanCore: every rule of the policeman, sans-io (SPEC sections 8-12).

Events in — a mesh message with its sender (:meth:`PolicemanCore.on_mesh`), a submission, a tick
with the time, a finished validation, an undelivered TASK — and actions out
(:mod:`casperd.policeman.actions`), taken with :meth:`take`. No sockets, no clock, no asyncio:
the shell (:mod:`casperd.broker`) passes the time in and carries the actions out.

Every message is authorized (one hook, :mod:`casperd.policeman.gate`) before its handler runs; the
handler is chosen by a table from message type to method.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from casperd import authz, codec
from casperd.errors import CasperError, InvalidBodyError, ProtocolError, UnknownPeerError, UnsupportedError
from casperd.handlers import Catalog
from casperd.messages import (
    Command,
    Disconnect,
    ErrorBody,
    FailedBatch,
    Heartbeat,
    Message,
    Progress,
    Ready,
    Reply,
    Request,
    ResultBatch,
    Submit,
    new_task_id,
)
from casperd.metrics import Metrics
from casperd.policeman.actions import Now, Replay, SaveAttachments, Sender, SenderKind, Serve
from casperd.policeman.gate import Authorizer
from casperd.policeman.recovery import RecoveryRules
from casperd.policeman.state import Peer, log
from casperd.settings import Settings

Handler = Callable[["PolicemanCore", Peer, Sender, Any, tuple[bytes, ...], Now], None]


class PolicemanCore(RecoveryRules):
    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        metrics: Metrics,
        started: float,
        authorize: Authorizer = authz.authorize,
        new_id: Callable[[], uuid.UUID] = new_task_id,
    ) -> None:
        super().__init__(settings, catalog, metrics, started, new_id)
        self.authorize = authorize

    # --- the mesh entry point ---------------------------------------------------------------------
    def on_mesh(self, route: bytes, frames: list[bytes], now: Now, key: str | None = None) -> None:
        """One frame set from the mesh ROUTER (routing id ``route``; ``key``: the sender's Curve key)."""
        self.clock = now.mono
        peer = self.by_route.get(route)
        try:
            decoded = codec.decode(frames, max_bytes=self.s.max_message_bytes)
        except ProtocolError as exc:
            self.reject(route, exc, frames[1][0] if len(frames) > 1 and len(frames[1]) == 1 else None)
            return
        msg = decoded.message
        self.metrics.messages_by(msg.COMMAND.name, "in").inc()
        try:
            self.check_key(msg, peer, key)
        except CasperError as exc:
            self.refuse(route, peer, msg, exc)
            return
        if peer is not None:
            peer.clock.seen(now.mono)  # traffic from the peer itself (not from a taken-over routing id)
        if isinstance(msg, Ready):
            sender = Sender(msg.node_id, msg.role.value, SenderKind.PEER, key)
        elif peer is None:
            self.reject(route, UnknownPeerError("unknown peer: send READY first", hint="re-register"), None)
            return
        else:
            sender = Sender(peer.node_id, peer.role, SenderKind.PEER, key or peer.public_key)
        try:
            self.authorize(sender.role, msg.COMMAND, service=msg.op if isinstance(msg, Request) else None)
        except CasperError as exc:
            self.refuse(route, peer, msg, exc)
            return
        try:
            if isinstance(msg, Ready):
                self.on_ready(route, msg, now)
                if self.enrollment is not None:  # the authenticated key, not the one READY carries
                    self.by_route[route].key = self.by_route[route].public_key = key
                return
            assert peer is not None
            handler = HANDLERS.get(type(msg))
            if handler is None:
                raise UnsupportedError(
                    f"{msg.COMMAND.name} is not accepted on the mesh socket",
                    hint="see protocol/SPEC.md for who sends what",
                )
            handler(self, peer, sender, msg, decoded.attachments, now)
        except CasperError as exc:
            self.reject(route, exc, msg.COMMAND.value)

    # --- trust (protocol/SPEC.md section 14.1) ----------------------------------------------------
    def check_key(self, msg: Message, peer: Peer | None, key: str | None) -> None:
        """First, with enrollment on: the frame's key must be enrolled, a READY must claim an id and
        role that key is enrolled for, and a frame on a registered routing id must come from the key
        that registered it. (Then, for a known sender, the role table: ``authorize``.)"""
        book = self.enrollment
        if book is not None:
            authz.bind(
                msg,
                entry=book.lookup(key),
                key=key,
                peer_key=peer.key if peer is not None else None,
                reserved=book.reserved,
            )

    def refuse(self, route: bytes, peer: Peer | None, msg: Message, exc: CasperError) -> None:
        """A message that failed the trust check: counted; a registered peer's service call is
        answered as one (REPLY ``ok: false``), anything else with ERROR."""
        what = msg.op[:64] if isinstance(msg, Request) else msg.COMMAND.name
        self.metrics.forbidden.labels(what).inc()
        if isinstance(msg, Request) and peer is not None:
            self.metrics.rejected.labels(exc.code).inc()
            self.send_mesh(route, codec.encode(Reply(req_id=msg.req_id, ok=False, error=ErrorBody.of(exc))))
        else:
            self.reject(route, exc, msg.COMMAND.value)

    def revoke(self, keys: set[str], now: Now) -> list[str]:
        """Keys were revoked: their peers are dropped at once (tasks back to pending) and told so;
        every later frame of those keys fails :meth:`check_key`."""
        self.clock = now.mono
        gone = [p for p in list(self.peers.values()) if p.key is not None and p.key in keys]
        for peer in gone:
            log.warning("peer %s: its key was revoked; dropped", peer.node_id)
            self.send_mesh(peer, codec.encode(Disconnect(reason="key revoked")))
            self.drop_peer(peer, "revoked", now)
        return [p.node_id for p in gone]

    def _heartbeat(self, peer: Peer, sender: Sender, msg: Heartbeat, att: tuple[bytes, ...], now: Now) -> None:
        self.on_heartbeat(peer, msg, now)

    def _progress(self, peer: Peer, sender: Sender, msg: Progress, att: tuple[bytes, ...], now: Now) -> None:
        self.on_progress(peer, msg, now)

    # --- reports of runs whose TASK left before the commit (SPEC 11) -----------------------------
    def unsettled(self, peer: Peer, msg: ResultBatch | FailedBatch, att: tuple[bytes, ...]) -> Any:
        """The part of a report that applies now. An outcome for a task whose row is not committed
        yet (a new task whose TASK left before its commit) waits: it is replayed once everything
        staged so far is committed (:class:`Replay`), so a task's creation and its outcome never
        share a commit, and a task Postgres refuses never reports DONE (its outcome is dropped).
        None: nothing applies now."""
        field = "results" if isinstance(msg, ResultBatch) else "failures"
        items: tuple[Any, ...] = getattr(msg, field)
        tasks = self.tasks
        if all((r := tasks.get(o.task_id)) is None or r.persisted for o in items):
            return msg  # the common case: every row is committed
        now_part: list[Any] = []
        later: list[Any] = []
        for o in items:
            r = tasks.get(o.task_id)
            if r is None or r.persisted:
                now_part.append(o)
            elif r.rejected:  # its rows were refused: the task is being dropped (casperd.rejects)
                self.metrics.duplicates.inc()
            else:
                later.append(o)
        if later:
            self.out.append(Replay(peer.node_id, peer.epoch, msg.model_copy(update={field: tuple(later)}), att))
        return msg.model_copy(update={field: tuple(now_part)}) if now_part else None

    def replay(
        self, node_id: str, epoch: str, report: ResultBatch | FailedBatch, att: tuple[bytes, ...], now: Now
    ) -> None:
        """A report that waited for the commit of its tasks' rows (:meth:`unsettled`), applied now
        unless its sender is gone or restarted (then its runs are stale)."""
        self.clock = now.mono
        peer = self.peers.get(node_id)
        if peer is None or peer.epoch != epoch:
            self.metrics.duplicates.inc()
            return
        self._report(peer, report, att, now)

    def _report(self, peer: Peer, msg: ResultBatch | FailedBatch, att: tuple[bytes, ...], now: Now) -> None:
        settled = self.unsettled(peer, msg, att)
        if settled is None:
            return
        if isinstance(settled, ResultBatch):
            self._apply_results(peer, settled, att, now)
        else:
            self.on_failures(peer, settled, now)

    def _results(self, peer: Peer, sender: Sender, msg: ResultBatch, att: tuple[bytes, ...], now: Now) -> None:
        self._report(peer, msg, att, now)

    def _apply_results(self, peer: Peer, msg: ResultBatch, att: tuple[bytes, ...], now: Now) -> None:
        if not att:
            self.on_results(peer, msg, now)
            return
        # a RESULT carrying attachments (a patch): the shell stores them first, then reports back
        if len(msg.results) != 1:
            raise InvalidBodyError(
                "a RESULT with attachments must carry exactly one outcome", hint="send attached results alone"
            )
        out = msg.results[0]
        rec = self.held(peer, out.task_id, out.attempt)
        if rec is not None and any(len(a) > self.quotas.limits.attachment_bytes for a in att):
            self.release(peer, rec)
            self.fail(rec, now.wall, peer.node_id, "too-large", "an attachment exceeds max_attachment_bytes", False)
            return
        if rec is not None:
            self.out.append(SaveAttachments(peer.node_id, msg, att))

    def attachments_saved(
        self, node_id: str, msg: ResultBatch, att: tuple[bytes, ...], error: str | None, now: Now
    ) -> None:
        """The shell stored (``error`` None) or failed to store the attachments of an attached result."""
        self.clock = now.mono
        out = msg.results[0]
        peer = self.peers.get(node_id)
        if peer is None:
            return
        if error is not None:
            self.attachments_lost(peer, out.task_id, out.attempt, error, now)
        else:
            self.on_results(peer, msg, now, att)  # still ours unless the lease was lost meanwhile

    def _failures(self, peer: Peer, sender: Sender, msg: FailedBatch, att: tuple[bytes, ...], now: Now) -> None:
        self._report(peer, msg, att, now)

    def _disconnect(self, peer: Peer, sender: Sender, msg: Disconnect, att: tuple[bytes, ...], now: Now) -> None:
        self.on_disconnect(peer, msg, now)

    def _request(self, peer: Peer, sender: Sender, msg: Request, att: tuple[bytes, ...], now: Now) -> None:
        self.out.append(Serve(peer.route, sender, msg, att))

    def _submit(self, peer: Peer, sender: Sender, msg: Submit, att: tuple[bytes, ...], now: Now) -> None:
        raise UnsupportedError(
            "SUBMIT is not accepted on the mesh socket in this version",
            hint="submit through the policeman's control socket",
        )

    # --- submissions from the control socket or the policeman itself ----------------------------
    def submit_from(
        self, sender: Sender, route: bytes, msg: Submit, found: dict[str, uuid.UUID], now: Now
    ) -> list[uuid.UUID]:
        """SUBMIT on the control socket: authorized per task type, then created."""
        for spec in msg.tasks:
            self.authorize(sender.role, Command.SUBMIT, task_type=spec.type)
        return self.submit(route, msg, sender.node_id, found, now)

    def status_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for rec in self.tasks.values():
            counts[rec.status.value] = counts.get(rec.status.value, 0) + 1
        return counts


HANDLERS: dict[type[Message], Handler] = {
    Heartbeat: PolicemanCore._heartbeat,
    Progress: PolicemanCore._progress,
    ResultBatch: PolicemanCore._results,
    FailedBatch: PolicemanCore._failures,
    Disconnect: PolicemanCore._disconnect,
    Request: PolicemanCore._request,
    Submit: PolicemanCore._submit,
}
"""Message type -> the core's handler (READY is handled before: it creates the peer)."""
