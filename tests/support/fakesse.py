"""The server-sent events of one streamed Messages API answer, as the API documents them.

``message_start`` (the message with empty content and the input usage) → ``ping`` → per content
block ``content_block_start``, one or more ``content_block_delta`` (``text_delta`` or
``input_json_delta``), ``content_block_stop`` → ``message_delta`` (stop reason, cumulative usage)
→ ``message_stop``. An ``error`` event may come at any point instead of the rest.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any


def event(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _chunks(s: str, n: int = 3) -> list[str]:
    size = max(1, -(-len(s) // n))
    return [s[i : i + size] for i in range(0, len(s), size)] or [""]


def events(
    message: dict[str, Any], *, truncate_tool_input: bool = False, error: dict[str, Any] | None = None
) -> Iterator[bytes]:
    """The events of ``message`` (a complete Messages API answer)."""
    usage = dict(message["usage"])
    start_usage = {**usage, "output_tokens": 1}
    yield event(
        "message_start",
        {
            "type": "message_start",
            "message": {**message, "content": [], "stop_reason": None, "stop_sequence": None, "usage": start_usage},
        },
    )
    yield event("ping", {"type": "ping"})
    content = list(message["content"])
    last_tool = max((i for i, b in enumerate(content) if b.get("type") == "tool_use"), default=-1)
    for i, block in enumerate(content):
        if block.get("type") == "text":
            yield event(
                "content_block_start",
                {"type": "content_block_start", "index": i, "content_block": {"type": "text", "text": ""}},
            )
            for part in _chunks(str(block.get("text", ""))):
                yield event(
                    "content_block_delta",
                    {"type": "content_block_delta", "index": i, "delta": {"type": "text_delta", "text": part}},
                )
        elif block.get("type") == "tool_use":
            start = {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}
            yield event("content_block_start", {"type": "content_block_start", "index": i, "content_block": start})
            raw = json.dumps(block.get("input") or {}, separators=(",", ":"))
            if truncate_tool_input and i == last_tool:
                raw = raw[: max(1, len(raw) // 2)]
            for part in _chunks(raw):
                yield event(
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": i,
                        "delta": {"type": "input_json_delta", "partial_json": part},
                    },
                )
        else:
            yield event("content_block_start", {"type": "content_block_start", "index": i, "content_block": block})
        if error is not None:
            yield event("error", error)
            return
        yield event("content_block_stop", {"type": "content_block_stop", "index": i})
    if error is not None:
        yield event("error", error)
        return
    yield event(
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": message["stop_reason"], "stop_sequence": message.get("stop_sequence")},
            "usage": usage,
        },
    )
    yield event("message_stop", {"type": "message_stop"})


def paced(events: Iterator[bytes], gap_s: float, ping_s: float) -> Iterator[bytes]:
    """The events with ``gap_s`` between them, and pings every ``ping_s`` while waiting."""
    first = True
    for ev in events:
        if not first and gap_s > 0:
            left = gap_s
            while left > 0:
                step = min(left, ping_s) if ping_s > 0 else left
                time.sleep(step)
                left -= step
                if ping_s > 0 and left > 0:
                    yield event("ping", {"type": "ping"})
        first = False
        yield ev
