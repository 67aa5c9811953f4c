"""Direct hand-off on a worker's own ROUTER (SPEC section 15): who may hand a task to this worker
(checked before anything runs), and the answer to the REQUEST ``handoff``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from casperd import authz, codec
from casperd.enrollment import Enrollment
from casperd.errors import CasperError, InvalidBodyError, ProtocolError
from casperd.loopsock import Sock
from casperd.messages import ErrorBody, Reply, Request
from casperd.metrics import Metrics
from casperd.transport import send_now

if TYPE_CHECKING:
    from casperd.worker import Worker


def admit(enrollment: Enrollment | None, metrics: Metrics, route: bytes, msg: Request, user: str | None) -> None:
    """A direct hand-off on this worker's ROUTER: with enrollment on, only from a developer's key,
    whose routing id names the node that key is enrolled for, and only a task type it may create."""
    spec = msg.args.get("spec")
    task_type = str(spec.get("type")) if isinstance(spec, dict) else ""
    if enrollment is None:
        authz.may_create("developer", task_type)
        return
    enrollment.refresh()
    entry = enrollment.lookup(user)
    sender = route.split(b"/", 1)[0].decode("utf-8", "replace")[:64]
    try:
        authz.check_identity(entry, sender, "developer", enrollment.reserved)
        authz.authorize("developer", msg.COMMAND, service="handoff")
        authz.may_create("developer", task_type)
    except ProtocolError:
        metrics.forbidden.labels("handoff").inc()
        raise


async def answer(
    worker: Worker | None, sock: Sock | None, route: bytes, msg: Request, attachments: tuple[bytes, ...]
) -> None:
    """Direct hand-off: a peer's REQUEST ``handoff`` on this worker's own ROUTER."""
    assert worker is not None and sock is not None
    try:
        spec = msg.args.get("spec")
        if not isinstance(spec, dict):
            raise InvalidBodyError("handoff needs 'spec': a task", hint="send a TaskSpec as 'spec'")
        sender = route.split(b"/", 1)[0].decode("utf-8", "replace")[:64]
        reply = Reply(req_id=msg.req_id, ok=True, data=await worker.accept_handoff(spec, attachments, sender))
    except CasperError as exc:
        reply = Reply(req_id=msg.req_id, ok=False, error=ErrorBody.of(exc))
    send_now(sock, [route, *codec.encode(reply)])
