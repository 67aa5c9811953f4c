"""The Claude-backed task types, added to a node's :class:`~casperd.handlers.Catalog` by ``install``.

* ``ask``  — one model call (a prompt in, text out); ``deterministic`` calls go through the result cache.
* ``code`` — a developer's tool-use loop in a git worktree; returns a patch (attachment 0) and a summary.
  Validated by the policeman (``validating`` state) before it is complete.
* ``test`` — a tester applies a patch (attachment 0) to a clean worktree and runs the test command.
* ``job``  — a whole job (plan, code, test, integrate), run by the policeman itself.

The runners are imported when first used, so a node that never runs them pays nothing.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from casperd.errors import TaskError
from casperd.handlers import Catalog, RunContext, TaskType

NonBlank = Annotated[str, StringConstraints(pattern=r"\S")]


class _AgentInput(BaseModel):
    # extra fields are allowed: the job coordinator adds its own bookkeeping (job_id, limits, ...)
    model_config = ConfigDict(extra="allow", strict=True)


class AskInput(_AgentInput):
    EXAMPLE: ClassVar[str] = '{"prompt": "Name three primes"}'
    prompt: NonBlank
    system: str | None = None
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=128_000)
    deterministic: bool = False


class CodeInput(_AgentInput):
    EXAMPLE: ClassVar[str] = '{"repo": "/path/to/repo", "base": "COMMIT", "instructions": "..."}'
    repo: NonBlank
    base: NonBlank
    instructions: str | None = None
    goal: str | None = None


class TestInput(_AgentInput):
    __test__ = False  # not a pytest class
    EXAMPLE: ClassVar[str] = '{"repo": "/path/to/repo", "base": "COMMIT", "test_cmd": "pytest -q"}'
    repo: NonBlank
    base: NonBlank
    test_cmd: NonBlank
    timeout_s: float | None = Field(default=None, gt=0, le=86400)


class JobInput(_AgentInput):
    EXAMPLE: ClassVar[str] = "caspectl run GOAL --repo PATH (jobs are best started with caspectl run)"
    goal: NonBlank
    repo: NonBlank
    base: NonBlank


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
            input_model=AskInput,
            requires=("llm",),
            description="one Claude call: input.prompt (+system, model, max_tokens, deterministic)",
        )
    )
    catalog.add_type(
        TaskType(
            "code",
            _code,
            input_model=CodeInput,
            requires=("code",),
            description="a developer agent's tool loop in a git worktree; returns a patch",
        )
    )
    catalog.add_type(
        TaskType(
            "test",
            _test,
            input_model=TestInput,
            requires=("test",),
            input_attachments=True,
            description="applies a patch to a clean worktree and runs the test command",
        )
    )
    catalog.add_type(
        TaskType(
            "job",
            _job,
            input_model=JobInput,
            local=True,
            description="a whole job: plan, code in parallel, validate, test, integrate (caspectl run)",
        )
    )
    return catalog
