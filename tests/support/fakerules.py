"""The rules FakeClaude keeps: request validation as the Messages API does it, and its prompt cache.

Validation (:func:`validate`) rejects with 400 ``invalid_request_error`` what the real API rejects
(messages and the tool-use contract, per the API reference):

* the first message must be a user message; consecutive messages of the same role are accepted
  (the API merges them into one turn), which is why every check below works on merged turns;
* every message has non-empty content, except an optional final assistant message; text blocks
  are non-empty; a final assistant message may not end in whitespace;
* a user turn's ``tool_result`` blocks come before any other block and each answers a ``tool_use``
  of the assistant turn right before; every ``tool_use`` of a non-final assistant turn is answered
  in the next turn;
* at most 4 ``cache_control`` breakpoints in tools, system and messages together.

The prompt cache (:class:`PromptCache`) works like the API's: the request is a sequence of
blocks (tools, then system, then messages); a breakpoint caches the prefix ending at its block
(if that prefix is at least ``min_tokens`` long); a later request reads the longest cached prefix
that ends at one of its breakpoints or up to 20 blocks before one. Token counts are additive:
each block counts ceil(len(compact JSON) / 4).
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from typing import Any

MAX_BREAKPOINTS = 4
LOOKBACK_BLOCKS = 20


class InvalidRequest(Exception):
    def __init__(self, status: int, type: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.type = type
        self.message = message


def tokens_of(obj: Any) -> int:
    """The fake's deterministic token count: ceil(len(compact JSON) / 4)."""
    if not obj:
        return 0
    return math.ceil(len(json.dumps(obj, separators=(",", ":"), sort_keys=True, default=str)) / 4)


def blocks(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list):
        return [b for b in content if isinstance(b, dict)]
    return []


def _bad(message: str) -> InvalidRequest:
    return InvalidRequest(400, "invalid_request_error", message)


def _turns(messages: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]], int]]:
    """Consecutive same-role messages merged: (role, blocks, index of the turn's first message)."""
    out: list[tuple[str, list[dict[str, Any]], int]] = []
    for i, msg in enumerate(messages):
        if out and out[-1][0] == msg["role"]:
            out[-1][1].extend(blocks(msg["content"]))
        else:
            out.append((msg["role"], list(blocks(msg["content"])), i))
    return out


def _check_shape(body: Any) -> list[dict[str, Any]]:
    if not isinstance(body, dict):
        raise _bad("request body must be a JSON object")
    for name in ("model", "max_tokens", "messages"):
        if name not in body:
            raise _bad(f"{name}: Field required")
    if not isinstance(body["model"], str) or not body["model"]:
        raise _bad("model: Input should be a non-empty string")
    if not isinstance(body["max_tokens"], int) or isinstance(body["max_tokens"], bool) or body["max_tokens"] < 1:
        raise _bad("max_tokens: Input should be an integer greater than or equal to 1")
    messages = body["messages"]
    if not isinstance(messages, list) or not messages:
        raise _bad("messages: at least one message is required")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or msg.get("role") not in ("user", "assistant"):
            raise _bad(f"messages.{i}.role: Input should be 'user' or 'assistant'")
        content = msg.get("content")
        if not isinstance(content, (str, list)):
            raise _bad(f"messages.{i}.content: Input should be a string or a list of content blocks")
        if isinstance(content, list) and any(not isinstance(b, dict) or "type" not in b for b in content):
            raise _bad(f"messages.{i}.content: every content block needs a type")
        final_assistant = i == len(messages) - 1 and msg["role"] == "assistant"
        if not content and not final_assistant:
            raise _bad(
                f"messages.{i}: all messages must have non-empty content except for the optional final "
                "assistant message"
            )
        for b in blocks(content):
            if b.get("type") == "text" and not str(b.get("text") or ""):
                raise _bad(f"messages.{i}: text content blocks must be non-empty")
        if final_assistant and content:
            last = blocks(content)[-1]
            if last.get("type") == "text" and str(last.get("text")) != str(last.get("text")).rstrip():
                raise _bad("final assistant content cannot end with trailing whitespace")
    if messages[0]["role"] != "user":
        raise _bad('messages: first message must use the "user" role')
    system = body.get("system")
    if system is not None and not isinstance(system, (str, list)):
        raise _bad("system: Input should be a string or a list of text blocks")
    tools = body.get("tools")
    if tools is not None and (
        not isinstance(tools, list) or any(not isinstance(t, dict) or "name" not in t for t in tools)
    ):
        raise _bad("tools: every tool needs a name")
    return messages


def validate(body: Any) -> None:
    """Raise :class:`InvalidRequest` for what the real API refuses (see the module docstring)."""
    messages = _check_shape(body)
    turns = _turns(messages)
    for t, (role, content, first) in enumerate(turns):
        if role == "user":
            kinds = [b.get("type") for b in content]
            if "tool_result" in kinds:
                n = kinds.count("tool_result")
                if kinds[:n] != ["tool_result"] * n:
                    raise _bad(
                        f"messages.{first}: `tool_result` blocks must come first in the user message content, "
                        "before any other block"
                    )
            prev_ids = {b.get("id") for b in turns[t - 1][1] if b.get("type") == "tool_use"} if t > 0 else set()
            for b in content:
                if b.get("type") == "tool_result" and b.get("tool_use_id") not in prev_ids:
                    raise _bad(
                        f"messages.{first}.content: unexpected `tool_use_id` found in `tool_result` blocks: "
                        f"{b.get('tool_use_id')}. Each `tool_result` block must have a corresponding "
                        "`tool_use` block in the previous message."
                    )
    for t, (role, content, first) in enumerate(turns):
        if role == "assistant" and t + 1 < len(turns):
            uses = [b.get("id") for b in content if b.get("type") == "tool_use"]
            answered = {b.get("tool_use_id") for b in turns[t + 1][1] if b.get("type") == "tool_result"}
            missing = [u for u in uses if u not in answered]
            if missing:
                raise _bad(
                    f"messages.{first}: `tool_use` ids were found without `tool_result` blocks immediately "
                    f"after: {', '.join(str(m) for m in missing)}. Each `tool_use` block must have a "
                    "corresponding `tool_result` block in the next message."
                )
    marks = sum(1 for item in sequence(body) if isinstance(item, dict) and "cache_control" in item)
    if marks > MAX_BREAKPOINTS:
        raise _bad(f"A maximum of {MAX_BREAKPOINTS} blocks with cache_control may be provided. Found {marks}.")


def sequence(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The request as the cache sees it: tools, system blocks, then every message's blocks."""
    out: list[dict[str, Any]] = [t for t in body.get("tools") or [] if isinstance(t, dict)]
    system = body.get("system")
    if system is not None:
        out.extend(blocks(system))
    for msg in body.get("messages") or []:
        for b in blocks(msg.get("content")):
            out.append({**b, "_role": msg.get("role")})
    return out


def _strip(item: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in item.items() if k != "cache_control"}


class PromptCache:
    """The API's prompt cache, simulated (see the module docstring)."""

    def __init__(self, min_tokens: int = 1024) -> None:
        self.min_tokens = min_tokens
        self._lock = threading.Lock()
        self._prefixes: set[str] = set()

    def usage(self, body: dict[str, Any]) -> dict[str, int]:
        """input_tokens, cache_creation_input_tokens and cache_read_input_tokens of one request."""
        items = sequence(body)
        sizes = [tokens_of(_strip(it)) for it in items]
        digests: list[str] = []
        h = hashlib.sha256(str(body.get("model")).encode())
        for it in items:
            h.update(json.dumps(_strip(it), sort_keys=True, default=str).encode())
            digests.append(h.copy().hexdigest())
        marks = [i for i, it in enumerate(items) if "cache_control" in it]
        total = sum(sizes)
        if not marks:
            return {"input_tokens": total, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
        with self._lock:
            hit = -1
            for m in marks:
                for j in range(m, max(-1, m - LOOKBACK_BLOCKS - 1), -1):
                    if digests[j] in self._prefixes:
                        hit = max(hit, j)
                        break
            read = sum(sizes[: hit + 1])
            written_to = hit
            for m in marks:
                if sum(sizes[: m + 1]) >= self.min_tokens:
                    self._prefixes.add(digests[m])
                    written_to = max(written_to, m)
        write = sum(sizes[hit + 1 : written_to + 1])
        return {
            "input_tokens": total - read - write,
            "cache_creation_input_tokens": write,
            "cache_read_input_tokens": read,
        }
