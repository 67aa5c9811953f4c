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

from casperd.agents import context, gitwork
from casperd.agents.gitwork import changed_paths
from casperd.agents.sandbox import Sandbox
from casperd.agents.tools import TOOLS, execute
from casperd.agents.usage import Usage
from casperd.errors import BudgetExceededError, CasperError, GitError, MissingApiKeyError, TaskError
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


def _with_feedback(messages: list[dict[str, Any]], feedback: str) -> None:
    """Append the feedback to the conversation as the user's next words."""
    text = {"type": "text", "text": f"Feedback on your work:\n{feedback}\n\nFix it, then call finish again."}
    if messages and messages[-1]["role"] == "user":
        content = messages[-1]["content"]
        if isinstance(content, str):
            messages[-1]["content"] = [{"type": "text", "text": content}, text]
        else:
            messages[-1]["content"] = [*content, text]
    else:
        messages.append({"role": "user", "content": [text]})


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
        resumed_at = len(messages)
        if wip:
            await gitwork.apply(wt, wip)
        if feedback:
            _with_feedback(messages, feedback)
        sandbox = Sandbox(
            wt, command_timeout_s=svc.settings.agent_command_timeout_s, output_cap=svc.settings.agent_output_cap
        )
        done = _finished_summary(messages) if saved is not None and not feedback else None
        if done is not None:  # it had finished; only its result was lost (e.g. the policeman restarted)
            summary = done
        else:
            summary = await _loop(
                ctx, svc, sandbox, messages, usage, model, job_id, base, (max_turns, max_tokens, max_cost, t0 + wall_s)
            )
        patch = await gitwork.diff(wt, base)
    finally:
        try:
            await gitwork.remove_worktree(wt)
        except (GitError, OSError) as exc:  # the work is kept; only a directory is left behind
            log.warning("could not remove the worktree %s: %s", wt, exc)
    turns = sum(1 for m in messages if m["role"] == "assistant")
    out: dict[str, Any] = {
        "summary": summary,
        "usage": usage.to_dict(),
        "turns": turns,
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
    max_turns, max_tokens, max_cost, deadline = limits
    assert ctx.task_id is not None
    while True:
        turns = sum(1 for m in messages if m["role"] == "assistant")
        if turns >= max_turns:
            raise BudgetExceededError(
                f"the agent used its {max_turns} turns without finishing",
                hint="raise agent_max_turns or split the task",
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
        window, elided = context.fit(messages, svc.settings.agent_context_tokens)
        if elided:
            log.info("task %s: %d old tool results elided to fit the context budget", ctx.task_id, elided)
        reply = await svc.claude.create(
            model=model, system=SYSTEM, messages=window, tools=TOOLS, max_tokens=svc.settings.llm_max_tokens
        )
        usage.add(reply.usage)
        call = {"model": reply.model, **reply.usage.to_dict(), "cached": reply.cached}
        messages.append({"role": "assistant", "content": reply.content})
        uses = [b for b in reply.content if b.get("type") == "tool_use"]
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
        if not uses:
            results.append({"type": "text", "text": "Continue with the tools; call finish when the change is done."})
        messages.append({"role": "user", "content": results})
        wip = await gitwork.diff(sandbox.root, base)
        await svc.save_turns(ctx.task_id, ctx.attempt, messages, usage.to_dict(), wip, [call], job_id)
        if finished is not None:
            return finished
        await asyncio.sleep(0)


async def run_ask(ctx: RunContext, data: dict[str, Any]) -> dict[str, Any]:
    """One model call. ``deterministic: true`` (temperature 0) goes through the shared result cache."""
    svc = _need_services(ctx)
    prompt = data.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise TaskError("ask needs 'prompt': a non-empty string", hint='e.g. {"prompt": "Name three primes"}')
    max_tokens = data.get("max_tokens") or svc.settings.llm_max_tokens
    if not isinstance(max_tokens, int) or not 0 < max_tokens <= 128_000:
        raise TaskError("ask 'max_tokens' must be an integer between 1 and 128000", hint="e.g. 512")
    reply = await svc.claude.create(
        model=svc.model_for("developer", data.get("model")),
        system=str(data.get("system") or ""),
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        deterministic=bool(data.get("deterministic")),
    )
    assert ctx.task_id is not None
    await svc.record_calls(
        ctx.task_id, [{"model": reply.model, **reply.usage.to_dict(), "cached": reply.cached}], data.get("job_id")
    )
    text = "".join(b.get("text", "") for b in reply.content if b.get("type") == "text")
    return {
        "text": text,
        "model": reply.model,
        "usage": reply.usage.to_dict(),
        "cached": reply.cached,
        "stop_reason": reply.stop_reason,
    }
