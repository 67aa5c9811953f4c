"""The developer agent: Claude in a tool-use loop inside a git worktree made for the task.

Input of a ``code`` task::

    repo, base            the repository (a path every node can read) and the commit to start from
    instructions, goal    what to do (the subtask) and why (the job's goal)
    allowed               glob patterns of the paths it may change (empty: anything but .git)
    test_cmd              the job's test command (the agent may run it)
    resume_from           a finished code task whose conversation and changes this one continues
    feedback              what the policeman or the tester said about that work
    restore               apply the resumed changes to the worktree (false for a rebase onto new code)
    limits                max_turns, max_tokens, max_cost_usd, wall_s (defaults from settings)

Every turn (the model's answer and the tool results) is saved through the policeman together with
the worktree's changes so far. A retried task (its developer died, or validation sent it back)
resumes from that conversation on whichever developer gets it, instead of starting over.

The output: a summary, the usage, the number of turns, and the patch as attachment 0.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

from casperd.agents import context, gitwork, turns
from casperd.agents.gitwork import changed_paths
from casperd.agents.sandbox import Sandbox
from casperd.agents.tools import TOOLS, execute
from casperd.agents.usage import Usage
from casperd.errors import (
    AgentError,
    BudgetExceededError,
    CasperError,
    GitError,
    LlmError,
    LlmRequestError,
    MissingApiKeyError,
    ModelRefusalError,
    TaskError,
)
from casperd.handlers import Attached, RunContext

log = logging.getLogger("casperd.agents.developer")

SYSTEM = """You are a developer agent in CASPER, a team of AI agents working in parallel on one codebase.
You work alone in a private git worktree of the repository; your changes become a patch that the
policeman validates and a tester tests before it is integrated with the other agents' work.
Use the tools to read the code, make the change, and run the tests if a test command is given.
Keep to the paths you are allowed to change. Do not add secrets or credentials to files.
When the change is complete, call the finish tool with a short summary of what you changed."""


def _initial_prompt(data: dict[str, Any]) -> str:
    parts = [f"Your task:\n{data.get('instructions') or data.get('goal') or 'no instructions given'}"]
    if data.get("goal"):
        parts.append(f"The overall goal of the team:\n{data['goal']}")
    allowed = data.get("allowed") or []
    parts.append("You may change: " + (", ".join(allowed) if allowed else "any file in the repository"))
    if data.get("test_cmd"):
        parts.append(f"The project's test command: {data['test_cmd']}")
    return "\n\n".join(parts)


def _limits(ctx: RunContext, data: dict[str, Any]) -> tuple[int, int, float, float]:
    s = ctx.services.settings
    lim = data.get("limits") or {}
    return (
        int(lim.get("max_turns") or s.agent_max_turns),
        int(lim.get("max_tokens") or s.agent_max_tokens),
        float(lim.get("max_cost_usd") or 0.0),
        float(lim.get("wall_s") or s.agent_wall_s),
    )


def _need_services(ctx: RunContext) -> Any:
    if ctx.services is None:
        raise TaskError("this node offers no agent services", hint="run code tasks on a developer node")
    if not ctx.services.has_api_key:
        raise MissingApiKeyError(
            f"no Anthropic API key on {ctx.node_id}: ANTHROPIC_API_KEY is not set in the environment casperd was "
            "started with, and no anthropic_api_key_file is configured",
            hint="the key must reach the developer nodes, not caspectl: export ANTHROPIC_API_KEY before starting "
            "casperd (or 'casperd up') and restart it, or point their anthropic_api_key_file setting at a file "
            "holding the key",
        )
    return ctx.services


async def run_code(ctx: RunContext, data: dict[str, Any]) -> Attached:
    svc = _need_services(ctx)
    repo, base = data.get("repo"), data.get("base")
    if not isinstance(repo, str) or not isinstance(base, str):
        raise TaskError("a code task needs 'repo' (a path) and 'base' (a commit)", hint="see caspectl run --help")
    assert ctx.task_id is not None
    job_id = data.get("job_id")
    max_turns, max_tokens, max_cost, wall_s = _limits(ctx, data)
    model = svc.model_for("developer", data.get("model"))
    t0 = time.monotonic()
    wt = svc.worktree_path(ctx.task_id, ctx.attempt)
    await gitwork.make_worktree(repo, base, wt, svc.mirrors)
    try:
        saved = await svc.load_turns(ctx.task_id)
        feedback = None
        if saved is not None:  # this task ran before (a developer died, or validation sent it back)
            messages, usage, wip = saved["messages"], Usage.from_dict(saved.get("usage")), saved.get("wip")
            feedback = saved.get("feedback")
            log.info("task %s resumes from %d saved messages", ctx.task_id, len(messages))
        elif data.get("resume_from"):
            prior = await svc.load_turns(uuid.UUID(str(data["resume_from"])))
            messages = prior["messages"] if prior else [{"role": "user", "content": _initial_prompt(data)}]
            wip = prior.get("wip") if prior and data.get("restore", True) else None
            usage = Usage()
            feedback = data.get("feedback")
        else:
            messages, usage, wip = [{"role": "user", "content": _initial_prompt(data)}], Usage(), None
        if turns.repair(messages):
            log.info("task %s: empty assistant turns of an older version dropped from its conversation", ctx.task_id)
        resumed_at = len(messages)
        if wip:
            await gitwork.apply(wt, wip)
        if feedback:
            turns.add_feedback(messages, feedback)
        sandbox = Sandbox(
            wt, command_timeout_s=svc.settings.agent_command_timeout_s, output_cap=svc.settings.agent_output_cap
        )
        done = _finished_summary(messages) if saved is not None and not feedback else None
        if done is not None:  # it had finished; only its result was lost (e.g. the policeman restarted)
            summary = done
        else:
            try:
                summary = await _loop(
                    ctx,
                    svc,
                    sandbox,
                    messages,
                    usage,
                    model,
                    job_id,
                    base,
                    (max_turns, max_tokens, max_cost, t0 + wall_s),
                )
            except (LlmError, LlmRequestError, AgentError) as exc:
                log.warning("task %s stopped on a model API answer: %s", ctx.task_id, exc)
                raise
        patch = await gitwork.diff(wt, base)
    finally:
        try:
            await gitwork.remove_worktree(wt)
        except (GitError, OSError) as exc:  # the work is kept; only a directory is left behind
            log.warning("could not remove the worktree %s: %s", wt, exc)
    n_turns = sum(1 for m in messages if m["role"] == "assistant")
    out: dict[str, Any] = {
        "summary": summary,
        "usage": usage.to_dict(),
        "turns": n_turns,
        "resumed_at_message": resumed_at,
        "patch": {"attachment": 0, "bytes": len(patch), "files": changed_paths(patch)},
        "duration_s": round(time.monotonic() - t0, 3),
        "node": ctx.node_id,
    }
    follow = data.get("handoff")
    if patch and isinstance(follow, dict):  # the test task goes straight to a tester
        spec = {
            "type": "test",
            "input": follow.get("input") or {},
            "parent_id": job_id,
            "idempotency_key": f"{follow.get('key')}:a{ctx.attempt}",
        }
        try:
            out["handoff"] = await svc.hand_off(spec, (patch,), "test")
        except CasperError as exc:  # the policeman creates it when it sees the result
            log.warning("could not hand the test of task %s off: %s", ctx.task_id, exc)
    return Attached(out, (patch,))


def _finished_summary(messages: list[dict[str, Any]]) -> str | None:
    """The summary of a conversation whose last model turn called finish, else None."""
    last = next((m for m in reversed(messages) if m["role"] == "assistant"), None)
    if last is None or messages[-1]["role"] != "user" or not isinstance(last["content"], list):
        return None
    for block in last["content"]:
        if block.get("type") == "tool_use" and block.get("name") == "finish":
            return str((block.get("input") or {}).get("summary") or "done")[:4000]
    return None


def _check_budget(messages: list[dict[str, Any]], usage: Usage, limits: tuple[int, int, float, float]) -> None:
    max_turns, max_tokens, max_cost, deadline = limits
    used = sum(1 for m in messages if m["role"] == "assistant")
    if used >= max_turns:
        raise BudgetExceededError(
            f"the agent used its {max_turns} turns without finishing", hint="raise agent_max_turns or split the task"
        )
    if usage.total_tokens >= max_tokens:
        raise BudgetExceededError(
            f"the agent used {usage.total_tokens} tokens (limit {max_tokens})",
            hint="raise agent_max_tokens or split the task",
        )
    if max_cost and usage.cost_usd >= max_cost:
        raise BudgetExceededError(
            f"the agent spent ${usage.cost_usd:.4f} (limit ${max_cost:.4f})", hint="raise the job's budget"
        )
    if time.monotonic() >= deadline:
        raise BudgetExceededError("the agent ran out of wall time", hint="raise agent_wall_s")


async def _loop(
    ctx: RunContext,
    svc: Any,
    sandbox: Sandbox,
    messages: list[dict[str, Any]],
    usage: Usage,
    model: str,
    job_id: str | None,
    base: str,
    limits: tuple[int, int, float, float],
) -> str:
    """Model turns until ``finish``; every stop reason handled as :mod:`casperd.agents.turns` says.
    Calls not yet saved with a turn are recorded when the loop fails, so the bill stays whole."""
    calls: list[dict[str, Any]] = []
    try:
        return await _turns(ctx, svc, sandbox, messages, usage, model, job_id, base, limits, calls)
    except CasperError:
        if calls and ctx.task_id is not None:
            try:
                await svc.record_calls(ctx.task_id, calls, job_id)
            except CasperError as exc:  # the task's own error is the one to raise; the bill is logged short
                log.warning("task %s: %d model call(s) could not be recorded: %s", ctx.task_id, len(calls), exc)
        raise


async def _turns(
    ctx: RunContext,
    svc: Any,
    sandbox: Sandbox,
    messages: list[dict[str, Any]],
    usage: Usage,
    model: str,
    job_id: str | None,
    base: str,
    limits: tuple[int, int, float, float],
    calls: list[dict[str, Any]],
) -> str:
    assert ctx.task_id is not None
    s = svc.settings
    call_max = turns.role_max_tokens(s.llm_max_tokens, "developer")
    budget = s.agent_context_tokens
    empties = 0
    while True:
        _check_budget(messages, usage, limits)
        window, elided = context.fit(messages, budget)
        if elided:
            log.info("task %s: %d old tool results elided to fit the context budget", ctx.task_id, elided)
        reply = await svc.claude.create(model=model, system=SYSTEM, messages=window, tools=TOOLS, max_tokens=call_max)
        usage.add(reply.usage)
        calls.append({"model": reply.model, **reply.usage.to_dict(), "cached": reply.cached})
        kind = turns.classify(reply.stop_reason, reply.content)
        log.debug("task %s: %s answer (stop_reason %s)", ctx.task_id, kind, reply.stop_reason)
        if kind == "refusal":
            raise ModelRefusalError(
                "the model refused the task (stop_reason: refusal)",
                hint="rephrase the goal or the subtask's instructions; the refused turn was not kept",
            )
        if kind == "truncated_tool":  # the tool call is incomplete: ask again with more room
            grown = turns.grown_max_tokens(call_max)
            if grown is None:
                raise BudgetExceededError(
                    f"the model's tool call did not fit in {call_max} output tokens (stop_reason: max_tokens)",
                    hint="split the task so no single file write is that large",
                )
            log.info("task %s: a tool call was cut at %d tokens; asking again with %d", ctx.task_id, call_max, grown)
            call_max = grown
            continue
        if kind == "context_full":
            if budget <= 8_000:
                raise BudgetExceededError(
                    "the conversation no longer fits the model's context window "
                    "(stop_reason: model_context_window_exceeded)",
                    hint="split the task, or lower agent_context_tokens so old tool output is elided sooner",
                )
            budget = max(8_000, budget // 2)
            log.info("task %s: the context window filled up; eliding to %d tokens", ctx.task_id, budget)
            continue
        if kind == "empty":  # never appended: the API refuses empty non-final messages
            empties += 1
            if empties > 3:
                raise AgentError(
                    "the model answered with empty content four times in a row",
                    hint="the task will be retried; check the model setting if it persists",
                )
            messages.append({"role": "user", "content": turns.EMPTY_NUDGE})
            wip = await gitwork.diff(sandbox.root, base)
            await svc.save_turns(ctx.task_id, ctx.attempt, messages, usage.to_dict(), wip, calls, job_id)
            calls.clear()
            continue
        empties = 0
        messages.append({"role": "assistant", "content": turns.for_resend(reply.content)})
        if kind == "pause":  # sent back as the final assistant message: the model continues it
            continue
        finished = await _answer(sandbox, messages, reply.content)
        wip = await gitwork.diff(sandbox.root, base)
        await svc.save_turns(ctx.task_id, ctx.attempt, messages, usage.to_dict(), wip, calls, job_id)
        calls.clear()
        if finished is not None:
            return finished
        await asyncio.sleep(0)


async def _answer(sandbox: Sandbox, messages: list[dict[str, Any]], content: list[dict[str, Any]]) -> str | None:
    """Run the answer's tool calls and append the user turn; the finish summary, if it finished."""
    uses = [b for b in content if b.get("type") == "tool_use"]
    results: list[dict[str, Any]] = []
    finished: str | None = None
    for tu in uses:
        if tu["name"] == "finish":
            inp = tu.get("input") or {}
            finished = str(inp.get("summary") or "done")[:4000]
            results.append({"type": "tool_result", "tool_use_id": tu["id"], "content": "finished"})
            continue
        text, is_error = await execute(sandbox, tu["name"], tu.get("input") or {})
        results.append({"type": "tool_result", "tool_use_id": tu["id"], "content": text, "is_error": is_error})
    if not uses:  # a text answer (end_turn, stop_sequence, or cut text): ask it to go on
        results.append({"type": "text", "text": turns.CONTINUE})
    messages.append({"role": "user", "content": results})
    return finished


async def run_ask(ctx: RunContext, data: dict[str, Any]) -> dict[str, Any]:
    """One model call. ``deterministic: true`` (temperature 0) goes through the shared result cache."""
    svc = _need_services(ctx)
    prompt = data.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise TaskError("ask needs 'prompt': a non-empty string", hint='e.g. {"prompt": "Name three primes"}')
    max_tokens = data.get("max_tokens") or turns.role_max_tokens(svc.settings.llm_max_tokens, "ask")
    if not isinstance(max_tokens, int) or not 0 < max_tokens <= 128_000:
        raise TaskError("ask 'max_tokens' must be an integer between 1 and 128000", hint="e.g. 512")
    reply = await svc.claude.create(
        model=svc.model_for("developer", data.get("model")),
        system=str(data.get("system") or ""),
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        deterministic=bool(data.get("deterministic")),
    )
    # no calls-save round trip: the output carries model and usage, committed with the result, and
    # the policeman writes the llm_calls row from it after that commit (casperd.agents.police)
    text = "".join(b.get("text", "") for b in reply.content if b.get("type") == "text")
    return {
        "text": text,
        "model": reply.model,
        "usage": reply.usage.to_dict(),
        "cached": reply.cached,
        "stop_reason": reply.stop_reason,
        "task_id": str(ctx.task_id),  # who made the call: another task's id on a result-cache hit
        **({"job_id": str(data["job_id"])} if data.get("job_id") else {}),  # for the llm_calls row
    }
