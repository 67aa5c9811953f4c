"""Context-window budgeting of the developer's conversation."""

from __future__ import annotations

import copy

import pytest

from casperd.agents.context import KEEP_RECENT, estimate, fit

pytestmark = pytest.mark.unit


def _conversation(turns: int, size: int) -> list[dict]:
    msgs: list[dict] = [{"role": "user", "content": "fix the bug"}]
    for i in range(turns):
        msgs.append(
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": f"t{i}", "name": "read_file", "input": {"path": f"f{i}.py"}}],
            }
        )
        msgs.append(
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": f"t{i}", "content": f"{i}" * size}]}
        )
    return msgs


def test_small_conversations_are_sent_as_they_are() -> None:
    msgs = _conversation(3, 100)
    out, elided = fit(msgs, 10_000)
    assert out is msgs and elided == 0


def test_oldest_tool_output_is_elided_first_until_it_fits() -> None:
    msgs = _conversation(10, 4000)
    before = copy.deepcopy(msgs)
    budget = estimate(msgs) // 2
    out, elided = fit(msgs, budget)
    assert msgs == before  # the saved conversation is untouched
    assert 0 < elided < 10 and estimate(out) <= budget
    results = [m["content"][0] for m in out if m["role"] == "user" and isinstance(m["content"], list)]
    assert "elided" in results[0]["content"] and results[-1]["content"] == "9" * 4000
    # the API shape holds: ids kept, no bookkeeping fields left
    assert [r["tool_use_id"] for r in results] == [f"t{i}" for i in range(10)]
    assert all(set(r) == {"type", "tool_use_id", "content"} for r in results)


def test_recent_messages_are_never_elided() -> None:
    msgs = _conversation(4, 4000)
    out, _ = fit(msgs, 10)  # an impossible budget: everything old goes, the recent stays
    assert out[-KEEP_RECENT:] == msgs[-KEEP_RECENT:]
