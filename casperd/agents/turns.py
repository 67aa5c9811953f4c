"""What the developer loop does with each model answer, per the Messages API's stop reasons (pure).

The API documents (handling stop reasons):

* ``tool_use`` — run the tools, answer every ``tool_use`` with a ``tool_result`` in the next user turn;
* ``end_turn`` / ``stop_sequence`` — a finished answer. It may be *empty* (no content), typically
  right after tool results: an empty assistant message is never appended (the API refuses
  non-final messages with empty content), the conversation continues with a new user message;
* ``max_tokens`` — the answer was cut. Cut inside a tool call (the last block a ``tool_use``) the
  call is incomplete: the answer is dropped and the request retried with a larger ``max_tokens``;
  cut text is kept and the model asked to go on;
* ``pause_turn`` — a long turn was paused: its content is sent back as the last (assistant)
  message, so the model continues it;
* ``refusal`` — the model declined: the task fails with that reason (retrying the same
  conversation would be refused again; it is not saved);
* ``model_context_window_exceeded`` — the answer filled the context window: treated as truncated,
  and older tool output is elided harder before the retry.

Feedback (validation, failing tests, conflicts) is placed where it does not teach the model to
end its turn: inside the last ``tool_result`` (the ``finish`` call's), not as a text block after it.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

Kind = Literal["tools", "text", "empty", "truncated_tool", "pause", "refusal", "context_full"]

CONTINUE = "Continue with the tools; call finish when the change is done."
EMPTY_NUDGE = "Please continue: use the tools to make the change, then call finish with a summary."
ROLE_MAX_TOKENS = {"developer": 16_000, "planner": 8_000, "ask": 4_096}
"""Default ``max_tokens`` per role (``llm_max_tokens`` = 0): a developer's tool call may carry a whole
file; a plan is a few thousand tokens. Calls are streamed, so a large cap costs nothing unused."""
MAX_TOKENS_CEILING = 64_000
"""How far a call cut inside a tool call may grow its ``max_tokens`` (doubling)."""


def _has_content(block: dict[str, Any]) -> bool:
    return not (block.get("type") == "text" and not str(block.get("text") or "").strip())


def clean(content: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The content without empty text blocks (the API refuses them in a request)."""
    return [b for b in content if _has_content(b)]


def classify(stop_reason: str | None, content: list[dict[str, Any]]) -> Kind:
    """What kind of answer this is (see the module docstring)."""
    blocks = clean(content)
    if stop_reason == "refusal":
        return "refusal"
    cut = stop_reason in ("max_tokens", "model_context_window_exceeded")
    if cut and blocks and blocks[-1].get("type") == "tool_use":
        return "truncated_tool" if stop_reason == "max_tokens" else "context_full"
    if not blocks:
        return "context_full" if stop_reason == "model_context_window_exceeded" else "empty"
    if stop_reason == "pause_turn":
        return "pause"
    if any(b.get("type") == "tool_use" for b in blocks):
        return "tools"
    return "text"


def for_resend(content: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """An answer's content as it may be sent back: no empty text; a final text block without
    trailing whitespace (the API refuses it in a final assistant message)."""
    blocks = copy.deepcopy(clean(content))
    if blocks and blocks[-1].get("type") == "text":
        blocks[-1]["text"] = str(blocks[-1]["text"]).rstrip()
    return blocks


def grown_max_tokens(current: int) -> int | None:
    """The next ``max_tokens`` after a cut tool call, or None when at the ceiling."""
    if current >= MAX_TOKENS_CEILING:
        return None
    return min(MAX_TOKENS_CEILING, current * 2)


def role_max_tokens(setting: int, role: str) -> int:
    """``llm_max_tokens`` if set (> 0), else the role's default."""
    return setting if setting > 0 else ROLE_MAX_TOKENS.get(role, ROLE_MAX_TOKENS["ask"])


def add_feedback(messages: list[dict[str, Any]], feedback: str) -> None:
    """Put feedback into the conversation: inside the last tool_result if the conversation ends
    with tool results, else as the user's next words."""
    note = f"Feedback on your work:\n{feedback}\n\nFix it, then call finish again."
    last = messages[-1] if messages else None
    if last is not None and last["role"] == "user" and isinstance(last["content"], list):
        results = [b for b in last["content"] if b.get("type") == "tool_result"]
        if results:
            target = results[-1]
            inner = target.get("content")
            if isinstance(inner, list):
                target["content"] = [*inner, {"type": "text", "text": note}]
            else:
                target["content"] = f"{inner}\n\n{note}" if inner else note
            target.pop("is_error", None)
            return
        last["content"] = [*last["content"], {"type": "text", "text": note}]
        return
    if last is not None and last["role"] == "user" and isinstance(last["content"], str):
        last["content"] = [{"type": "text", "text": last["content"]}, {"type": "text", "text": note}]
        return
    messages.append({"role": "user", "content": [{"type": "text", "text": note}]})


def repair(messages: list[dict[str, Any]]) -> int:
    """Drop empty assistant messages that an older version saved (the API refuses them). Returns
    how many were dropped."""

    def empty(m: dict[str, Any]) -> bool:
        content = m.get("content")
        if isinstance(content, str):
            return not content.strip()
        return not clean([b for b in content or [] if isinstance(b, dict)])

    keep = [m for m in messages if not (m.get("role") == "assistant" and empty(m))]
    dropped = len(messages) - len(keep)
    messages[:] = keep
    return dropped
