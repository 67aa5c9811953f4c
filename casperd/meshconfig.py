"""The settings ``casperd up`` passes to every node of its local mesh (pure but for reading the file).

``up`` decides a few settings itself — which node is which, where it listens, its keys and state
paths, the embedded services' URLs — and writes them into each node's generated TOML file. Every
other setting comes from the user, with the precedence the README documents (variable > file >
default): ``--config FILE`` (or ``CASPER_CONFIG``) is read once, the ``CASPER_*`` variables of
up's environment override it, and the result reaches every node as ``CASPER_*`` variables.
A user value for a setting ``up`` decides is dropped, and reported.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from casperd.errors import ConfigError
from casperd.settings import Settings, load_settings

UP_DECIDES = frozenset(
    {
        "role",
        "node_id",
        "state_dir",
        "bind",
        "advertise",
        "broker",
        "control",
        "curve",
        "curve_secret_key_file",
        "curve_public_key_file",
        "broker_public_key_file",
        "database_url",
        "redis_url",
        "log_format",
        "log_level",
    }
)
"""Settings ``casperd up`` sets on each node itself (its flags cover the ones a user may choose)."""


def _env_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ",".join(value)  # capabilities: a comma list
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


def node_settings_env(config_file: Path | None, environ: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """The ``CASPER_*`` variables every node gets, and the names of user settings dropped because
    ``up`` decides them.

    Raises:
        ConfigError: the file is missing, not TOML, or names an unknown or invalid setting.
    """
    from_file: dict[str, Any] = {}
    if config_file is not None:
        load_settings(config_file=config_file)  # the same checks and messages as a node's
        try:
            from_file = tomllib.loads(Path(config_file).read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config file {config_file}: {exc}", hint="check --config") from None
    known = {f"CASPER_{name.upper()}" for name in Settings.model_fields}
    merged = {f"CASPER_{k.upper()}": _env_value(v) for k, v in from_file.items()}
    merged.update({k: v for k, v in environ.items() if k in known})  # a node ignores other CASPER_* names too
    decided = {f"CASPER_{name.upper()}" for name in UP_DECIDES}
    dropped = sorted(k for k in merged if k in decided and k != "CASPER_STATE_DIR")  # that one is --state-dir's default
    return {k: v for k, v in merged.items() if k not in decided}, dropped
