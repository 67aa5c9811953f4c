"""Task types that need nothing but the mesh: ``noop``, ``echo`` and ``sleep``.

They exist for health checks, benchmarks and tests: ``noop`` returns nothing, ``echo`` returns its
input, ``sleep`` waits ``seconds`` (cancellable) and returns how long it slept.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from casperd.errors import TaskError
from casperd.handlers.types import RunContext, TaskType


class SleepInput(BaseModel):
    """``sleep``'s input: a number of seconds (not a string), optionally a failure to report."""

    model_config = ConfigDict(extra="forbid", strict=True)
    EXAMPLE: ClassVar[str] = '{"seconds": 2}'
    seconds: float = Field(default=1.0, ge=0, le=86400, allow_inf_nan=False)
    fail: Any = None


def _noop_now(ctx: RunContext, data: dict[str, Any]) -> None:
    return None


def _echo_now(ctx: RunContext, data: dict[str, Any]) -> dict[str, Any]:
    return data


async def _noop(ctx: RunContext, data: dict[str, Any]) -> None:
    return _noop_now(ctx, data)


async def _echo(ctx: RunContext, data: dict[str, Any]) -> dict[str, Any]:
    return _echo_now(ctx, data)


async def _sleep(ctx: RunContext, data: dict[str, Any]) -> dict[str, Any]:
    seconds = data.get("seconds", 1.0)
    if not isinstance(seconds, int | float) or not 0 <= seconds <= 86400:
        raise TaskError("sleep needs 'seconds' between 0 and 86400", hint='e.g. {"seconds": 2}')
    t0 = time.monotonic()
    await asyncio.sleep(float(seconds))
    if data.get("fail"):
        raise TaskError(str(data.get("fail")), hint="this sleep task was asked to fail")
    return {"slept_s": round(time.monotonic() - t0, 4)}


TYPES: tuple[TaskType, ...] = (
    TaskType("noop", _noop, description="does nothing; for health checks and benchmarks", run_inline=_noop_now),
    TaskType("echo", _echo, description="returns its input", run_inline=_echo_now),
    TaskType(
        "sleep",
        _sleep,
        description="sleeps input.seconds; input.fail makes it fail afterwards",
        input_model=SleepInput,
    ),
)
