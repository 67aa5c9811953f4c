"""The structured values inside :class:`~casperd.settings.Settings`: a task type's retry and
timeout policy, a role's bounds under the autoscaler, a model's prices, and the default models and
prices. Each is a pydantic model that refuses unknown keys, so a typo in a config table is an error
naming the key, not a silently ignored setting."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class TaskPolicy(BaseModel):
    """Retry and timeout policy of one task type; unset fields fall back to the mesh defaults."""

    model_config = ConfigDict(extra="forbid")
    max_attempts: int | None = Field(default=None, ge=1, le=100)
    backoff_base_s: float | None = Field(default=None, ge=0)
    backoff_factor: float | None = Field(default=None, ge=1)
    backoff_cap_s: float | None = Field(default=None, ge=0)
    timeout_s: float | None = Field(default=None, gt=0, le=86400)


class AutoscaleRole(BaseModel):
    """Bounds of one role under the autoscaler, and extra capabilities a spawned peer gets."""

    model_config = ConfigDict(extra="forbid")
    min: int = Field(default=0, ge=0, le=1000)
    max: int = Field(default=0, ge=0, le=1000)
    capabilities: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _ordered(self) -> AutoscaleRole:
        if self.max < self.min:
            raise ValueError(f"max ({self.max}) is below min ({self.min})")
        return self


class ModelPrice(BaseModel):
    """US dollars per million tokens of one model (see anthropic.com/pricing)."""

    model_config = ConfigDict(extra="forbid")
    input: float = Field(ge=0)
    output: float = Field(ge=0)
    cache_write: float = Field(ge=0)
    cache_read: float = Field(ge=0)


DEFAULT_MODELS = {"policeman": "claude-sonnet-4-6", "developer": "claude-sonnet-4-6", "tester": "claude-haiku-4-5"}
DEFAULT_PRICES = {
    "claude-opus-4-1": ModelPrice(input=15.0, output=75.0, cache_write=18.75, cache_read=1.5),
    "claude-opus-4-5": ModelPrice(input=5.0, output=25.0, cache_write=6.25, cache_read=0.5),
    "claude-sonnet-4-6": ModelPrice(input=3.0, output=15.0, cache_write=3.75, cache_read=0.3),
    "claude-sonnet-4-5": ModelPrice(input=3.0, output=15.0, cache_write=3.75, cache_read=0.3),
    "claude-haiku-4-5": ModelPrice(input=1.0, output=5.0, cache_write=1.25, cache_read=0.1),
}
