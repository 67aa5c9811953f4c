"""Token usage and cost accounting of model calls.

Prices come from the ``model_prices`` setting (USD per million tokens, see
:class:`casperd.settingtables.ModelPrice`). Model ids may carry a date suffix
(``claude-sonnet-4-5-20250929``): the longest configured price key that is a prefix of the id
applies. An unknown model costs 0.0 and is warned about once per process.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from casperd.settingtables import ModelPrice

log = logging.getLogger("casperd.agents.usage")
_warned: set[str] = set()
_warned_lock = threading.Lock()


@dataclass
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    calls: int = 0
    cost_usd: float = 0.0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens + self.cache_read_tokens + self.cache_write_tokens

    def add(self, other: Usage) -> None:
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.cache_read_tokens += other.cache_read_tokens
        self.cache_write_tokens += other.cache_write_tokens
        self.calls += other.calls
        self.cost_usd += other.cost_usd

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cache_read_tokens": self.cache_read_tokens,
            "cache_write_tokens": self.cache_write_tokens,
            "calls": self.calls,
            "cost_usd": round(self.cost_usd, 6),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> Usage:
        d = d or {}

        def num(name: str) -> int:
            try:
                return int(d.get(name) or 0)
            except (TypeError, ValueError):
                return 0

        try:
            cost = float(d.get("cost_usd") or 0.0)
        except (TypeError, ValueError):
            cost = 0.0
        return cls(
            input_tokens=num("input_tokens"),
            output_tokens=num("output_tokens"),
            cache_read_tokens=num("cache_read_tokens"),
            cache_write_tokens=num("cache_write_tokens"),
            calls=num("calls"),
            cost_usd=cost,
        )


def price_for(model: str, prices: Mapping[str, ModelPrice]) -> ModelPrice | None:
    """The price of ``model``: an exact key, else the longest key that is a prefix of the id."""
    if model in prices:
        return prices[model]
    best = max((k for k in prices if model.startswith(k)), key=len, default=None)
    return prices[best] if best is not None else None


def cost_of(
    model: str,
    input_tokens: int,
    output_tokens: int,
    cache_read_tokens: int,
    cache_write_tokens: int,
    prices: Mapping[str, ModelPrice],
) -> float:
    """US dollars of one call (0.0 for a model without a configured price)."""
    price = price_for(model, prices)
    if price is None:
        with _warned_lock:
            first = model not in _warned
            _warned.add(model)
        if first:
            log.warning(
                "no price configured for model %r: its cost counts as 0; add it to the model_prices "
                "setting (CASPER_MODEL_PRICES, USD per million tokens: input, output, cache_write, "
                "cache_read)",
                model,
            )
        return 0.0
    return (
        input_tokens * price.input
        + output_tokens * price.output
        + cache_read_tokens * price.cache_read
        + cache_write_tokens * price.cache_write
    ) / 1_000_000
