"""Scripted "brains" for FakeClaude: a planner and developers that follow a script.

A developer's script is chosen by the tag ``[subtask-id]`` at the start of its instructions. It is
a list of phases; each phase a list of tool calls (name, input). The phase is the number of
feedback messages in the conversation so far (validation, failing tests, a conflict), and the step
within the phase is the number of model turns since the last feedback. Everything is a function of
the request alone, so a conversation resumed on another developer continues where it was.
"""

from __future__ import annotations

import re
import threading
from collections import defaultdict
from typing import Any

from tests.support.fakeclaude import Response, reply, tool_use

Step = tuple[str, dict[str, Any]]
FEEDBACK = "Feedback on your work"


def _texts(content: Any) -> str:
    if isinstance(content, str):
        return content
    out = []
    for b in content or []:
        if b.get("type") == "text":
            out.append(b.get("text", ""))
        elif b.get("type") == "tool_result":
            c = b.get("content")
            out.append(c if isinstance(c, str) else _texts(c))
    return "\n".join(out)


class ScriptedTeam:
    def __init__(
        self,
        plan: list[dict[str, Any]],
        devs: dict[str, list[list[Step]]],
        delays: dict[tuple[str, int, int], float] | None = None,
    ) -> None:
        self.plan = plan
        self.devs = devs
        self.delays = delays or {}
        """(tag, phase, step) → extra latency of that answer (to kill a developer mid-loop)."""
        self.lock = threading.Lock()
        self.seen: dict[str, list[int]] = defaultdict(list)
        """tag → the number of messages of every developer request, in arrival order."""
        self.planned = 0

    def __call__(self, body: dict[str, Any]) -> Response:
        tools = {t.get("name") for t in body.get("tools") or []}
        msgs = body["messages"]
        if "submit_plan" in tools:
            with self.lock:
                self.planned += 1
            return reply(tool_use("submit_plan", {"summary": "scripted plan", "subtasks": self.plan}))
        first = _texts(msgs[0]["content"])
        m = re.search(r"\[([a-z0-9_-]+)\]", first)
        if m is None or m.group(1) not in self.devs:
            return reply(tool_use("finish", {"summary": "nothing to do"}))
        tag = m.group(1)
        with self.lock:
            self.seen[tag].append(len(msgs))
        feedback_at = [i for i, msg in enumerate(msgs) if msg["role"] == "user" and FEEDBACK in _texts(msg["content"])]
        phase = len(feedback_at)
        start = feedback_at[-1] if feedback_at else 0
        step = sum(1 for msg in msgs[start:] if msg["role"] == "assistant")
        phases = self.devs[tag]
        steps = phases[min(phase, len(phases) - 1)]
        name, inp = steps[min(step, len(steps) - 1)]
        return reply(tool_use(name, inp), delay_s=self.delays.get((tag, phase, step), 0.0))


def fix(path: str, old: str, new: str, summary: str = "fixed") -> list[Step]:
    """The usual three turns: read, replace, finish."""
    return [
        ("read_file", {"path": path}),
        ("replace_in_file", {"path": path, "old": old, "new": new}),
        ("finish", {"summary": summary}),
    ]
