"""The developer loop's handling of each stop reason, feedback placement and repair (pure)."""

from __future__ import annotations

import pytest

from casperd.agents import turns
from tests.support.fakerules import InvalidRequest, validate

USE = {"type": "tool_use", "id": "toolu_1", "name": "read_file", "input": {"path": "a.py"}}
RESULT = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "x = 1"}
TEXT = {"type": "text", "text": "Looking."}


@pytest.mark.parametrize(
    ("stop", "content", "kind"),
    [
        ("tool_use", [TEXT, USE], "tools"),
        ("end_turn", [TEXT], "text"),
        ("end_turn", [], "empty"),
        ("end_turn", [{"type": "text", "text": "  "}], "empty"),
        ("stop_sequence", [TEXT], "text"),
        ("max_tokens", [TEXT, USE], "truncated_tool"),
        ("max_tokens", [TEXT], "text"),
        ("pause_turn", [TEXT], "pause"),
        ("pause_turn", [], "empty"),
        ("refusal", [TEXT], "refusal"),
        ("refusal", [], "refusal"),
        ("model_context_window_exceeded", [USE], "context_full"),
        ("model_context_window_exceeded", [], "context_full"),
        ("model_context_window_exceeded", [TEXT], "text"),
    ],
)
def test_classify_every_stop_reason(stop: str, content: list[dict[str, object]], kind: str) -> None:
    assert turns.classify(stop, content) == kind


def test_for_resend_drops_empty_text_and_trailing_whitespace() -> None:
    out = turns.for_resend([{"type": "text", "text": ""}, USE, {"type": "text", "text": "next \n"}])
    assert out == [USE, {"type": "text", "text": "next"}]
    validate(
        {
            "model": "m",
            "max_tokens": 1,
            "messages": [{"role": "user", "content": "go"}, {"role": "assistant", "content": out}],
        }
    )


def test_max_tokens_grows_to_a_ceiling() -> None:
    assert turns.grown_max_tokens(16_000) == 32_000
    assert turns.grown_max_tokens(48_000) == turns.MAX_TOKENS_CEILING
    assert turns.grown_max_tokens(turns.MAX_TOKENS_CEILING) is None
    assert turns.role_max_tokens(0, "developer") == 16_000
    assert turns.role_max_tokens(0, "unknown") == 4_096
    assert turns.role_max_tokens(1234, "planner") == 1234


def test_feedback_goes_inside_the_last_tool_result() -> None:
    messages = [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": [USE]},
        {"role": "user", "content": [dict(RESULT, is_error=True)]},
    ]
    turns.add_feedback(messages, "tests fail")
    last = messages[-1]["content"]
    assert [b["type"] for b in last] == ["tool_result"] and "is_error" not in last[0]
    assert last[0]["content"].startswith("x = 1\n\nFeedback on your work:\ntests fail")
    validate({"model": "m", "max_tokens": 1, "messages": messages})


def test_feedback_without_tool_results_is_the_users_next_words() -> None:
    plain = [{"role": "user", "content": "go"}]
    turns.add_feedback(plain, "again")
    assert [b["type"] for b in plain[0]["content"]] == ["text", "text"]
    ended = [{"role": "user", "content": "go"}, {"role": "assistant", "content": [TEXT]}]
    turns.add_feedback(ended, "again")
    assert ended[-1]["role"] == "user" and "again" in ended[-1]["content"][0]["text"]
    nested = [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": [USE]},
        {"role": "user", "content": [dict(RESULT, content=[{"type": "text", "text": "x"}])]},
    ]
    turns.add_feedback(nested, "again")
    assert nested[-1]["content"][0]["content"][-1]["text"].startswith("Feedback on your work")


def test_repair_drops_empty_assistant_turns_so_the_api_accepts_the_conversation() -> None:
    messages = [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": [USE]},
        {"role": "user", "content": [RESULT]},
        {"role": "assistant", "content": []},
        {"role": "user", "content": "continue"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "more"},
    ]
    with pytest.raises(InvalidRequest):
        validate({"model": "m", "max_tokens": 1, "messages": messages})
    assert turns.repair(messages) == 2
    validate({"model": "m", "max_tokens": 1, "messages": messages})
