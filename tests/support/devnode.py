"""A developer node's agent services without the mesh, for running ``run_code`` in one process.

The Claude client is the real one (pointed at FakeClaude); the policeman's conversation store is
a dict here. Strict like the real thing where it matters: a conversation the Messages API would
refuse cannot be saved (it is validated by FakeClaude's rules first).
"""

from __future__ import annotations

import copy
import uuid
from pathlib import Path
from typing import Any

from casperd.agents.claude import ClaudeClient
from casperd.settings import Settings
from tests.support.fakerules import validate


class Services:
    """The developer node's services, minus the mesh: turns are kept here, checked against the API's rules."""

    def __init__(self, settings: Settings, claude: ClaudeClient) -> None:
        self.settings = settings
        self.claude = claude
        self.has_api_key = True
        self.mirrors = settings.workspace / "mirrors"
        self.saved: dict[uuid.UUID, dict[str, Any]] = {}
        self.calls: list[dict[str, Any]] = []

    def model_for(self, role: str, explicit: str | None = None) -> str:
        return explicit or "claude-sonnet-4-6"

    def worktree_path(self, task_id: uuid.UUID, attempt: int) -> Path:
        return self.settings.workspace / "worktrees" / f"{task_id}-{attempt}"

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
        validate({"model": "m", "max_tokens": 1, "messages": messages})  # a saved turn the API would refuse fails
        self.saved[task_id] = {"messages": copy.deepcopy(messages), "usage": dict(usage), "wip": wip}
        self.calls.extend(calls)

    async def load_turns(self, task_id: uuid.UUID) -> dict[str, Any] | None:
        return copy.deepcopy(self.saved.get(task_id))

    async def record_calls(self, task_id: uuid.UUID, calls: list[dict[str, Any]], job_id: str | None) -> None:
        self.calls.extend(copy.deepcopy(calls))
