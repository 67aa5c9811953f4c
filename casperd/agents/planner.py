"""Planning: the policeman asks Claude to turn a goal into a tree of subtasks.

The model must answer through the ``submit_plan`` tool, whose JSON schema is the :class:`Plan`
model; the answer is validated by pydantic (unique ids, known dependencies, no cycles). An invalid
plan goes back to the model as a tool error, twice at most, before the job fails.

Prompt caching is off for the planner, by decision: a job plans once, so a cache write (1.25x the
input price) would only pay back if the plan were retried within the cache's five minutes, which
is the exception; and the fixed prefix (system prompt and plan schema) is below the API's
1,024-token minimum anyway, so only the whole first prompt could ever be cached.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from casperd.agents.usage import Usage
from casperd.errors import AgentError

SubtaskId = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,47}$")]


class Subtask(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: SubtaskId = Field(description="short unique id, lowercase, e.g. fix-parser")
    title: str = Field(min_length=1, max_length=200)
    instructions: str = Field(
        min_length=1, max_length=8000, description="everything a developer needs to do this subtask alone"
    )
    paths: list[str] = Field(
        default_factory=list, max_length=50, description="glob patterns of the files this subtask may change"
    )
    depends_on: list[SubtaskId] = Field(default_factory=list, description="ids of subtasks that must land first")
    tests: list[str] = Field(
        default_factory=list,
        max_length=50,
        description="tests that must pass once this subtask is done (test files or test ids such as "
        "tests/test_x.py::test_y). The job's whole test command always runs; these name the failing tests "
        "this subtask owns. Empty: nothing that passes on the base commit may fail",
    )


class Plan(BaseModel):
    model_config = ConfigDict(extra="ignore")
    summary: str = Field(default="", max_length=4000)
    subtasks: list[Subtask] = Field(min_length=1, max_length=30)

    @model_validator(mode="after")
    def _tree(self) -> Plan:
        ids = [s.id for s in self.subtasks]
        if len(set(ids)) != len(ids):
            raise ValueError("subtask ids must be unique")
        known = set(ids)
        for s in self.subtasks:
            for d in s.depends_on:
                if d not in known:
                    raise ValueError(f"subtask {s.id} depends on unknown subtask {d}")
                if d == s.id:
                    raise ValueError(f"subtask {s.id} depends on itself")
        waves(self)  # raises on a cycle
        return self


def waves(plan: Plan) -> list[list[str]]:
    """The subtasks in dependency waves: each wave depends only on earlier ones."""
    deps = {s.id: set(s.depends_on) for s in plan.subtasks}
    done: set[str] = set()
    out: list[list[str]] = []
    while len(done) < len(deps):
        wave = [i for i, d in deps.items() if i not in done and d <= done]
        if not wave:
            raise ValueError("the subtasks' dependencies form a cycle")
        out.append(wave)
        done.update(wave)
    return out


PLAN_TOOL: dict[str, Any] = {
    "name": "submit_plan",
    "description": "Submit the plan: the subtasks developers will do in parallel, with their dependencies.",
    "input_schema": Plan.model_json_schema(),
}

SYSTEM = """You are the policeman of CASPER, a team of AI developer agents working in parallel.
Split the goal into subtasks that developers can do independently and at the same time, each
touching as few files as possible; say which subtasks depend on others. Answer only by calling
the submit_plan tool."""


async def make_plan(
    client: Any, model: str, goal: str, files: list[str], test_cmd: str | None, max_parallel: int, max_tokens: int
) -> tuple[Plan, Usage, list[dict[str, Any]]]:
    """Ask for a plan until it validates (3 tries). Returns the plan, the usage and one record per call."""
    listing = "\n".join(files[:500]) + ("\n..." if len(files) > 500 else "")
    prompt = (
        f"Goal:\n{goal}\n\nFiles in the repository:\n{listing}\n\n"
        f"Test command: {test_cmd or '(none)'}\nAt most {max_parallel} developers work at once."
    )
    messages: list[dict[str, Any]] = [{"role": "user", "content": prompt}]
    usage = Usage()
    calls: list[dict[str, Any]] = []
    problem = "no answer"
    for _ in range(3):
        reply = await client.create(
            model=model,
            system=SYSTEM,
            messages=messages,
            tools=[PLAN_TOOL],
            tool_choice={"type": "tool", "name": "submit_plan"},
            max_tokens=max_tokens,
            cache=False,
        )
        usage.add(reply.usage)
        calls.append({"model": reply.model, **reply.usage.to_dict(), "cached": reply.cached})
        use = next((b for b in reply.content if b.get("type") == "tool_use" and b.get("name") == "submit_plan"), None)
        messages.append({"role": "assistant", "content": reply.content})
        if use is None:
            problem = "the answer did not call submit_plan"
            messages.append({"role": "user", "content": "Call the submit_plan tool with the plan."})
            continue
        try:
            return Plan.model_validate(use.get("input") or {}), usage, calls
        except ValidationError as exc:
            problem = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])
            messages.append(
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": use["id"],
                            "content": f"invalid plan: {problem}",
                            "is_error": True,
                        }
                    ],
                }
            )
    raise AgentError(
        f"the planner gave no valid plan after 3 tries: {problem}",
        hint="rephrase the goal, or check the policeman's model in the models setting",
    )
