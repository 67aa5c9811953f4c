"""FakeClaude's scripted answers (what a test pushes) and its record of each request."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from tests.support.fakerules import blocks as _blocks


# --- response builders ------------------------------------------------------------------------
@dataclass
class Response:
    """One scripted answer: a message (status 200, ``content``) or an error (``error`` body)."""

    status: int = 200
    content: list[dict[str, Any]] = field(default_factory=list)
    stop_reason: str | None = None
    usage: dict[str, int] | None = None
    """Overrides of the computed usage fields (e.g. ``{"output_tokens": 7}``)."""
    error: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    """Extra latency of this answer (on top of the server's ``latency_s``)."""
    gap_s: float = 0.0
    """Streaming: the pause between two events (pings keep flowing every ``ping_s`` meanwhile)."""
    ping_s: float = 0.0
    """Streaming: send a ping event this often during pauses (0: no pings)."""
    stream_error: dict[str, Any] | None = None
    """Streaming: after message_start and the first block, send this ``error`` event and stop."""
    truncate_tool_input: bool = False
    """Streaming: the last tool_use block's JSON is cut in half (``max_tokens`` mid tool use)."""


def text(s: str) -> dict[str, Any]:
    return {"type": "text", "text": s}


def tool_use(name: str, input: dict[str, Any], id: str | None = None) -> dict[str, Any]:
    return {"type": "tool_use", "id": id or f"toolu_{secrets.token_hex(12)}", "name": name, "input": input}


def reply(
    *blocks: dict[str, Any],
    stop_reason: str | None = None,
    usage: dict[str, int] | None = None,
    delay_s: float = 0.0,
    **stream: Any,
) -> Response:
    """A 200 answer; ``stream`` takes the streaming fields of :class:`Response` (gap_s, ping_s, ...)."""
    if stop_reason is None:
        stop_reason = "tool_use" if any(b.get("type") == "tool_use" for b in blocks) else "end_turn"
    return Response(status=200, content=list(blocks), stop_reason=stop_reason, usage=usage, delay_s=delay_s, **stream)


def http_error(
    status: int,
    type: str,
    message: str,
    retry_after: float | None = None,
    headers: dict[str, str] | None = None,
    delay_s: float = 0.0,
) -> Response:
    hdrs = dict(headers or {})
    if retry_after is not None:
        hdrs["retry-after"] = _fmt_seconds(retry_after)
    return Response(
        status=status,
        error={"type": "error", "error": {"type": type, "message": message}},
        headers=hdrs,
        delay_s=delay_s,
    )


def overloaded(message: str = "Overloaded") -> Response:
    return http_error(529, "overloaded_error", message)


def rate_limited(retry_after_s: float, message: str = "Number of requests has exceeded your rate limit") -> Response:
    return http_error(429, "rate_limit_error", message, retry_after=retry_after_s)


def _fmt_seconds(s: float) -> str:
    return str(int(s)) if float(s).is_integer() else f"{s:g}"


# --- request helpers --------------------------------------------------------------------------
def last_user_text(body: dict[str, Any]) -> str:
    """The text of the last user message of a request body (string content, or text blocks joined)."""
    for msg in reversed(body.get("messages") or []):
        if isinstance(msg, dict) and msg.get("role") == "user":
            content = msg.get("content")
            if isinstance(content, str):
                return content
            return "\n".join(str(b.get("text", "")) for b in _blocks(content) if b.get("type") == "text")
    return ""


@dataclass
class Recorded:
    t: float
    """time.monotonic() when the request arrived."""
    body: dict[str, Any]
    headers: dict[str, str]
    status: int = 0
    """What was answered (0 while the request is still being served)."""
    path: str = "/v1/messages"
    usage: dict[str, int] | None = None
    """The usage billed for this request (a complete answer only)."""


def _rfc3339(wall: float) -> str:
    return datetime.fromtimestamp(wall, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
