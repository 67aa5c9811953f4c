"""The developer loop against every documented answer of the Messages API.

A real ``run_code`` (real ClaudeClient over HTTP/SSE, real git worktree and sandbox) against
FakeClaude, which refuses what the API refuses. The node's services are a small double that keeps
the saved conversations; every saved conversation must itself be a request the API accepts.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from casperd.agents import developer
from casperd.agents.claude import ClaudeClient
from casperd.agents.ratelimit import NoLimiter
from casperd.agents.usage import Usage
from casperd.errors import AgentError
from casperd.handlers import RunContext
from casperd.retry import RetryPolicy
from casperd.settings import Settings
from casperd.settingtables import DEFAULT_PRICES
from tests.integration.agentkit import git, make_repo
from tests.support.devnode import Services
from tests.support.fakeclaude import FakeClaude, Response, http_error, reply, text, tool_use

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture
def fake() -> Iterator[FakeClaude]:
    with FakeClaude() as f:
        yield f


@pytest.fixture
async def svc(fake: FakeClaude, tmp_path: Path) -> AsyncIterator[Services]:
    settings = Settings(state_dir=tmp_path / "state", node_id="developer-t", agent_command_timeout_s=30)
    claude = ClaudeClient(
        api_key="sk-test",
        base_url=fake.url,
        timeout_s=10,
        retries=2,
        limiter=NoLimiter(),
        prices=DEFAULT_PRICES,
        backoff=RetryPolicy(max_attempts=3, base_s=0.01, factor=2.0, cap_s=0.05),
    )
    yield Services(settings, claude)
    await claude.close()


async def run(svc: Services, repo: Path, task_id: uuid.UUID | None = None, **extra: Any) -> dict[str, Any]:
    tid = task_id or uuid.uuid4()
    ctx = RunContext(
        node_id="developer-t",
        workspace=svc.settings.workspace,
        shell_timeout_s=30,
        output_cap=4096,
        task_id=tid,
        services=svc,
    )
    base = git(repo, "rev-parse", "HEAD").strip()
    data = {"repo": str(repo), "base": base, "instructions": "[fix-add] fix calc/add.py", **extra}
    result = await developer.run_code(ctx, data)
    return {"task_id": tid, **result.output, "patch_bytes": result.attachments[0]}


READ = tool_use("read_file", {"path": "calc/add.py"})


def fix_add() -> dict[str, Any]:
    return tool_use("replace_in_file", {"path": "calc/add.py", "old": "a - b", "new": "a + b"})


def finish() -> dict[str, Any]:
    return tool_use("finish", {"summary": "fixed add"})


def assert_clean_run(fake: FakeClaude, svc: Services, out: dict[str, Any]) -> None:
    assert all(r.status == 200 for r in fake.recorded()), [r.status for r in fake.recorded()]
    assert b"a + b" in out["patch_bytes"]
    billed = fake.billed()
    assert Usage.from_dict(out["usage"]).to_dict() | {"cost_usd": 0} == {**billed, "cost_usd": 0}
    assert sum(c["calls"] for c in svc.calls) == billed["calls"]  # every call recorded, once


async def test_an_empty_end_turn_after_tool_results_is_never_sent_back(
    fake: FakeClaude, svc: Services, tmp_path: Path
) -> None:
    repo = make_repo(tmp_path)
    fake.push(reply(READ), reply(stop_reason="end_turn"), reply(fix_add()), reply(finish()))
    out = await run(svc, repo)
    assert_clean_run(fake, svc, out)
    bodies = [r.body for r in fake.calls()]
    after_empty = bodies[2]["messages"]
    assert all(m["content"] for m in after_empty)  # no empty assistant message
    assert after_empty[-1] == {
        "role": "user",
        "content": [{"type": "text", "text": developer.turns.EMPTY_NUDGE, "cache_control": {"type": "ephemeral"}}],
    }
    assert out["summary"] == "fixed add"


async def test_max_tokens_mid_tool_use_asks_again_with_more_room(
    fake: FakeClaude, svc: Services, tmp_path: Path
) -> None:
    repo = make_repo(tmp_path)
    cut = Response(content=[text("Fixing."), fix_add()], stop_reason="max_tokens", truncate_tool_input=True)
    fake.push(cut, reply(fix_add()), reply(finish()))
    out = await run(svc, repo)
    assert_clean_run(fake, svc, out)
    first, second = (r.body for r in fake.calls()[:2])
    assert second["max_tokens"] == 2 * first["max_tokens"]
    assert len(second["messages"]) == len(first["messages"])  # the cut answer was not kept
    saved = svc.saved[out["task_id"]]["messages"]
    assert all(b.get("input") != {} for m in saved for b in m["content"] if isinstance(b, dict))


async def test_pause_turn_is_continued_from_its_content(fake: FakeClaude, svc: Services, tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    fake.push(reply(text("Let me think about add.py "), stop_reason="pause_turn"), reply(fix_add()), reply(finish()))
    out = await run(svc, repo)
    assert_clean_run(fake, svc, out)
    resumed = fake.calls()[1].body["messages"]
    assert resumed[-1]["role"] == "assistant"
    assert resumed[-1]["content"][0]["text"] == "Let me think about add.py"  # no trailing whitespace


async def test_a_refusal_fails_the_task_with_its_reason(fake: FakeClaude, svc: Services, tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    fake.push(reply(READ), reply(text("I can't help with that."), stop_reason="refusal"))
    with pytest.raises(AgentError) as info:
        await run(svc, repo)
    assert "refusal" in str(info.value) and not info.value.retryable
    assert sum(c["calls"] for c in svc.calls) == fake.billed()["calls"] == 2  # the refused call is billed too
    saved = next(iter(svc.saved.values()))["messages"]
    assert not any("can't help" in str(m["content"]) for m in saved)  # the refused turn is not kept


async def test_context_window_exceeded_mid_tool_call_elides_and_retries(
    fake: FakeClaude, svc: Services, tmp_path: Path
) -> None:
    repo = make_repo(tmp_path)
    full = Response(content=[fix_add()], stop_reason="model_context_window_exceeded", truncate_tool_input=True)
    fake.push(reply(READ), full, reply(fix_add()), reply(finish()))
    out = await run(svc, repo)
    assert_clean_run(fake, svc, out)


async def test_text_and_stop_sequence_answers_get_a_nudge_not_a_bare_resend(
    fake: FakeClaude, svc: Services, tmp_path: Path
) -> None:
    repo = make_repo(tmp_path)
    fake.push(
        reply(text("I will fix it.")),
        reply(text("Now."), stop_reason="stop_sequence"),
        reply(fix_add()),
        reply(finish()),
    )
    out = await run(svc, repo)
    assert_clean_run(fake, svc, out)


async def test_429_529_and_500_are_waited_out_and_a_400_is_not_retried(
    fake: FakeClaude, svc: Services, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repo = make_repo(tmp_path)
    fake.push(
        http_error(429, "rate_limit_error", "slow down", retry_after=0.1),
        reply(READ),
        http_error(529, "overloaded_error", "Overloaded"),
        http_error(500, "api_error", "boom"),
        reply(fix_add()),
        reply(finish()),
    )
    out = await run(svc, repo)
    assert b"a + b" in out["patch_bytes"]
    assert [r.status for r in fake.recorded()] == [429, 200, 529, 500, 200, 200]

    fake.push(http_error(400, "invalid_request_error", "bad request"))
    with caplog.at_level("WARNING", logger="casperd.agents.developer"), pytest.raises(AgentError):
        await run(svc, make_repo(tmp_path / "second"))
    assert fake.recorded()[-1].status == 400 and len(fake.recorded()) == 7  # one try only
    assert any("stopped on a model API answer" in r.getMessage() for r in caplog.records)


async def test_feedback_goes_inside_the_finish_result_not_after_it(
    fake: FakeClaude, svc: Services, tmp_path: Path
) -> None:
    repo = make_repo(tmp_path)
    fake.push(reply(fix_add()), reply(finish()))
    first = await run(svc, repo)
    fake.push(reply(finish()))
    await run(svc, repo, resume_from=str(first["task_id"]), feedback="tests/test_add.py still fails")
    last_user = fake.calls()[-1].body["messages"][-1]
    assert last_user["role"] == "user"
    assert [b["type"] for b in last_user["content"]] == ["tool_result"]  # no text block after the result
    assert "tests/test_add.py still fails" in str(last_user["content"][0]["content"])


async def test_a_saved_empty_assistant_turn_of_an_older_version_is_repaired(
    fake: FakeClaude, svc: Services, tmp_path: Path
) -> None:
    repo = make_repo(tmp_path)
    tid = uuid.uuid4()
    prompt = "[fix-add] fix calc/add.py"
    svc.saved[tid] = {
        "messages": [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": [READ]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": READ["id"], "content": "x"}]},
            {"role": "assistant", "content": []},
        ],
        "usage": {},
        "wip": None,
    }
    fake.push(reply(fix_add()), reply(finish()))
    out = await run(svc, repo, task_id=tid)
    assert b"a + b" in out["patch_bytes"]
    assert all(r.status == 200 for r in fake.recorded())
