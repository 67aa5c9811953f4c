"""Context-window budgeting for the developer's conversation (pure, no I/O).

A long tool-use loop piles up tool results (file contents, command output) that the model has
already read. Before each call, if the conversation's estimated size passes the budget, the oldest
tool results are replaced by a short note saying what was elided and how to get it back (read the
file again), newest kept whole, until it fits. The structure stays valid for the Messages API:
every ``tool_result`` keeps its ``tool_use_id``; only its content shrinks. The saved conversation
is not changed, so a resumed task still has everything.
"""

from __future__ import annotations

import copy
import json
import math
from typing import Any

KEEP_RECENT = 6
"""The last messages are never elided: the model is working with them."""


def estimate(messages: list[dict[str, Any]]) -> int:
    """~tokens of a conversation: len(compact JSON) / 4 (the same rule as the rate limiter's)."""
    return math.ceil(len(json.dumps(messages, separators=(",", ":"), default=str)) / 4)


def _text_len(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    return len(json.dumps(content, separators=(",", ":"), default=str))


def fit(messages: list[dict[str, Any]], budget_tokens: int) -> tuple[list[dict[str, Any]], int]:
    """The conversation within ``budget_tokens`` (as far as eliding old tool results can get it),
    and how many tool results were elided. The input is never modified."""
    if estimate(messages) <= budget_tokens:
        return messages, 0
    out = copy.deepcopy(messages)
    elided = 0
    for msg in out[: max(0, len(out) - KEEP_RECENT)]:
        if msg.get("role") != "user" or not isinstance(msg.get("content"), list):
            continue
        for block in msg["content"]:
            if block.get("type") != "tool_result" or block.get("elided"):
                continue
            size = _text_len(block.get("content"))
            if size <= 200:
                continue
            block["content"] = (
                f"[elided to fit the context window: {size} characters of earlier tool output; "
                "run the tool again if you still need it]"
            )
            block["elided"] = True
            elided += 1
            if estimate(out) <= budget_tokens:
                return _strip(out), elided
    return _strip(out), elided


def _strip(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Remove the bookkeeping mark (the API accepts only its own fields)."""
    for msg in messages:
        if isinstance(msg.get("content"), list):
            for block in msg["content"]:
                block.pop("elided", None)
    return messages
