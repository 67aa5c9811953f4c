"""One model answer as plain JSON-able data (:class:`Reply`): what the Claude client returns,
what the result cache keeps for a deterministic call, and what the developer's tool loop reads."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from casperd.agents.usage import Usage


@dataclass
class Reply:
    """One model answer, as plain JSON-able data."""

    content: list[dict[str, Any]]
    stop_reason: str | None
    model: str
    usage: Usage
    cached: bool = False
    request_id: str | None = None
    saved: Usage | None = field(default=None)
    """On a cache hit: the usage of the original call that this one did not pay for (never summed
    into budgets; ``usage`` is zero)."""

    @property
    def text(self) -> str:
        return "".join(str(b.get("text", "")) for b in self.content if b.get("type") == "text")

    @property
    def tool_uses(self) -> list[dict[str, Any]]:
        return [b for b in self.content if b.get("type") == "tool_use"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "content": self.content,
            "stop_reason": self.stop_reason,
            "model": self.model,
            "usage": self.usage.to_dict(),
            "request_id": self.request_id,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Reply:
        return cls(
            content=list(d.get("content") or []),
            stop_reason=d.get("stop_reason"),
            model=str(d.get("model") or ""),
            usage=Usage.from_dict(d.get("usage")),
            request_id=d.get("request_id"),
        )


def block_dict(block: Any) -> dict[str, Any]:
    """A content block of the SDK's answer as plain JSON-able data."""
    kind = getattr(block, "type", None)
    if kind == "text":
        return {"type": "text", "text": block.text}
    if kind == "tool_use":
        return {"type": "tool_use", "id": block.id, "name": block.name, "input": block.input}
    if hasattr(block, "model_dump"):
        return dict(block.model_dump(mode="json", exclude_none=True))
    return dict(block) if isinstance(block, Mapping) else {"type": str(kind)}
