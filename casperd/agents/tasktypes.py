"""The Claude-backed task types, added to a node's :class:`~casperd.handlers.Catalog` by ``install``.

* ``ask``  — one model call (a prompt in, text out); ``deterministic`` calls go through the result cache.
* ``code`` — a developer's tool-use loop in a git worktree; returns a patch (attachment 0) and a summary.
  Validated by the policeman (``validating`` state) before it is complete.
* ``test`` — a tester applies a patch (attachment 0) to a clean worktree and runs the test command.
* ``job``  — a whole job (plan, code, test, integrate), run by the policeman itself.

The runners are imported when first used, so a node that never runs them pays nothing.
"""

from __future__ import annotations

from typing import Any

from casperd.errors import TaskError
from casperd.handlers import Catalog, RunContext, TaskType


async def _ask(ctx: RunContext, data: dict[str, Any]) -> Any:
    from casperd.agents.developer import run_ask

    return await run_ask(ctx, data)


async def _code(ctx: RunContext, data: dict[str, Any]) -> Any:
    from casperd.agents.developer import run_code

    return await run_code(ctx, data)


async def _test(ctx: RunContext, data: dict[str, Any]) -> Any:
    from casperd.agents.tester import run_test

    return await run_test(ctx, data)


async def _job(ctx: RunContext, data: dict[str, Any]) -> Any:
    """Never called: a ``local`` type is run by the policeman's job coordinator, not dispatched."""
    raise TaskError("job tasks are run by the policeman, not by a worker", hint="submit jobs with caspectl run")


def install(catalog: Catalog) -> Catalog:
    """Add the Claude-backed task types to a node's catalog (the policeman adds its validator and
    mesh services in :mod:`casperd.agents.police`)."""
    catalog.add_type(
        TaskType(
            "ask",
            _ask,
            requires=("llm",),
            description="one Claude call: input.prompt (+system, model, max_tokens, deterministic)",
        )
    )
    catalog.add_type(
        TaskType(
            "code",
            _code,
            requires=("code",),
            description="a developer agent's tool loop in a git worktree; returns a patch",
        )
    )
    catalog.add_type(
        TaskType(
            "test",
            _test,
            requires=("test",),
            input_attachments=True,
            description="applies a patch to a clean worktree and runs the test command",
        )
    )
    catalog.add_type(
        TaskType(
            "job",
            _job,
            local=True,
            description="a whole job: plan, code in parallel, validate, test, integrate (caspectl run)",
        )
    )
    return catalog
