"""The effective agent settings of a node, as ``caspectl status`` shows them (pure).

What matters when a mesh spends money: the models per role, the starting rate limits, output
caps, timeouts and retries, the agents' budgets and the prices used for the cost report. Never a
secret: whether a key is configured is a yes/no.
"""

from __future__ import annotations

import os
from typing import Any

from casperd.agents.turns import ROLE_MAX_TOKENS
from casperd.settings import Settings


def llm_settings_view(s: Settings) -> dict[str, Any]:
    """The node's effective model-related settings (JSON-able)."""
    return {
        "models": dict(s.models),
        "llm_rpm": s.llm_rpm,
        "llm_tpm": s.llm_tpm,
        "llm_max_tokens": s.llm_max_tokens or {"per_role": dict(ROLE_MAX_TOKENS)},
        "llm_timeout_s": s.llm_timeout_s,
        "llm_retries": s.llm_retries,
        "agent_max_turns": s.agent_max_turns,
        "agent_max_tokens": s.agent_max_tokens,
        "agent_context_tokens": s.agent_context_tokens,
        "agent_wall_s": s.agent_wall_s,
        "job_rounds": s.job_rounds,
        "anthropic_base_url": s.anthropic_base_url or "(ANTHROPIC_BASE_URL or Anthropic's)",
        "model_prices": {name: p.model_dump() for name, p in s.model_prices.items()},
    }


def api_key_configured(settings: Settings) -> bool:
    """Whether an API key is configured (its value is never looked at beyond being non-empty)."""
    path = settings.anthropic_api_key_file
    if path is not None:
        try:
            return bool(path.read_text().strip())
        except OSError:
            return False
    return bool(os.environ.get("ANTHROPIC_API_KEY", "").strip())
