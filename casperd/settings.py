"""One typed settings object for every role.

Precedence, highest first: command-line flags > ``CASPER_*`` environment variables > the config
file (TOML, ``--config`` or ``CASPER_CONFIG``) > the defaults below. Secrets (Curve keys, API
keys, the database password) are never kept in here: only the names of the files holding them
(``*_file``), read where they are used (``casperd.transport.read_secret_file``).
"""

from __future__ import annotations

import json
import os
import re
import socket
import tomllib
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, SettingsError, TomlConfigSettingsSource

from casperd.errors import ConfigError
from casperd.messages import Role
from casperd.settingtables import DEFAULT_MODELS, DEFAULT_PRICES, AutoscaleRole, ModelPrice, TaskPolicy

DEFAULT_STATE_DIR = Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state")) / "casper"
ROLE_CAPABILITIES: dict[Role, tuple[str, ...]] = {
    Role.POLICEMAN: ("plan", "validate"),
    Role.DEVELOPER: ("code", "llm", "shell"),
    Role.TESTER: ("test", "shell"),
}


class Settings(BaseSettings):
    """Every option of ``casperd``; each field is also ``--flag`` and ``CASPER_FIELD``."""

    model_config = SettingsConfigDict(env_prefix="CASPER_", extra="forbid", validate_default=True)

    role: Role = Field(default=Role.DEVELOPER, description="policeman, developer or tester")
    node_id: str = Field(default="", description="stable node name; default ROLE-HOSTNAME")
    state_dir: Path = Field(default=DEFAULT_STATE_DIR, description="keys, sockets, logs and workspaces")
    bind: str = Field(default="tcp://127.0.0.1:5555", description="mesh ROUTER endpoint this node binds")
    advertise: str = Field(default="", description="endpoint peers use to reach this node; default: bind")
    broker: str = Field(default="tcp://127.0.0.1:5555", description="the policeman's mesh endpoint")
    control: str = Field(default="", description="control socket; default ipc://STATE_DIR/NODE_ID.ctl")
    database_url: str = Field(default="", description="Postgres URL (policeman only), e.g. postgresql://u@h/db")
    database_password_file: Path | None = Field(
        default=None, description="file holding the Postgres password (e.g. a secret)"
    )
    redis_url: str = Field(default="", description="Redis URL for the result cache; empty: no cache")
    capacity: int = Field(default=4, ge=0, le=10_000, description="tasks this node runs at once (slots)")
    prefetch: int = Field(
        default=0,
        ge=0,
        le=10_000,
        description="extra tasks it may hold queued beyond capacity; credit = capacity + prefetch",
    )
    capabilities: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="extra capabilities (comma list)"
    )
    heartbeat_s: float = Field(default=1.0, gt=0, le=600, description="heartbeat interval, seconds")
    heartbeat_misses: int = Field(default=3, ge=2, le=100, description="missed intervals before dead")
    lease_s: float = Field(
        default=30.0, gt=0, description="lease on an assigned task; the holder renews it every third of it"
    )
    breaker_failures: int = Field(
        default=5, ge=1, le=1000, description="consecutive failures that open a peer's circuit breaker"
    )
    breaker_recovery_s: float = Field(
        default=60.0, gt=0, description="how long an open breaker waits before a half-open probe"
    )
    max_attempts: int = Field(default=3, ge=1, le=100, description="runs per task before it is dead")
    backoff_base_s: float = Field(default=1.0, ge=0, description="first retry delay, seconds")
    backoff_factor: float = Field(default=2.0, ge=1, description="retry delay multiplier")
    backoff_cap_s: float = Field(default=60.0, ge=0, description="longest retry delay, seconds")
    task_policies: dict[str, TaskPolicy] = Field(
        default_factory=dict,
        description="per task type: max_attempts, backoff_base_s, backoff_factor, backoff_cap_s, timeout_s "
        "(TOML table [task_policies.shell] or JSON in the variable)",
    )
    max_message_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, description="largest accepted message")
    hwm: int = Field(default=10_000, ge=1, description="ZeroMQ send/receive high-water marks")
    linger_ms: int = Field(default=1000, ge=0, description="how long close() waits for unsent frames")
    drain_timeout_s: float = Field(default=10.0, ge=0, description="shutdown: wait for in-flight work")
    curve: bool = Field(default=False, description="CurveZMQ on every mesh socket")
    curve_secret_key_file: Path | None = Field(default=None, description="this node's Curve secret key (z85)")
    curve_public_key_file: Path | None = Field(default=None, description="this node's Curve public key (z85)")
    broker_public_key_file: Path | None = Field(default=None, description="the policeman's public key")
    curve_enrollment: bool = Field(
        default=True,
        description="with Curve: admit only enrolled keys and bind node ids to them; off admits any Curve "
        "key (the old behaviour: for measuring and migrating only)",
    )
    authorized_keys_file: Path | None = Field(
        default=None,
        description="with Curve: the enrolled keys (PUBLIC_KEY NODE_PATTERN ROLE a line); "
        "default STATE_DIR/authorized_keys",
    )
    redis_password_file: Path | None = Field(default=None, description="file holding the Redis password (requirepass)")
    cache_key_file: Path | None = Field(
        default=None, description="file holding the mesh key that signs result-cache entries (HMAC)"
    )
    max_open_tasks: int = Field(
        default=1_000_000, ge=1, description="open tasks the mesh holds; past it SUBMIT is overloaded"
    )
    max_open_per_submitter: int = Field(
        default=250_000, ge=1, description="open tasks one submitter may have; past it SUBMIT is overloaded"
    )
    peer_tasks_per_s: float = Field(
        default=50.0, gt=0, description="tasks one mesh peer may create a second (bursts: 4 s worth, at most 200)"
    )
    max_turn_bytes: int = Field(default=8 * 1024 * 1024, ge=1024, description="largest saved conversation turn, bytes")
    max_attachment_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, description="largest attachment, bytes")
    inline_input_bytes: int = Field(
        default=4096,
        ge=0,
        description="a queued task's input larger than this (JSON plus attachments, bytes) waits in Postgres",
    )
    cache_ttl_s: float = Field(default=3600.0, gt=0, description="result cache TTL, seconds")
    commit_batch_max: int = Field(default=2000, ge=1, description="most tasks per group-commit statement")
    dispatch_before_commit: bool = Field(
        default=True,
        description="send a TASK while the commit of its assignment (and of a new task's row) is still in flight, "
        "so the work overlaps the commit; its RESULT counts once that commit is done (SPEC 11). false: a TASK "
        "leaves only after the commit (a broker crash then never leaves a run the store does not know of)",
    )
    db_pool_size: int = Field(default=4, ge=1, le=100, description="Postgres connections")
    shell_timeout_s: float = Field(default=60.0, gt=0, description="default timeout of shell tasks")
    shell_output_cap: int = Field(default=64 * 1024, ge=256, description="bytes of stdout/stderr kept")
    task_user: str = Field(
        default="auto",
        description="user that runs task code (shell tasks, agent commands, tests): auto (casper-task, else "
        "nobody, when casperd may switch users), none (casperd's own user), or a user name",
    )
    task_cpu_s: int = Field(default=3600, ge=1, description="CPU seconds one task process may use (RLIMIT_CPU)")
    task_memory_mb: int = Field(default=8192, ge=16, description="address space of one task process, MiB (RLIMIT_AS)")
    task_processes: int = Field(default=1024, ge=8, description="processes of the task user (RLIMIT_NPROC)")
    task_file_mb: int = Field(default=4096, ge=1, description="largest file task code may write, MiB (RLIMIT_FSIZE)")
    metrics_port: int = Field(default=0, ge=0, le=65535, description="Prometheus /metrics port; 0: off")
    # --- the autoscaler (policeman) ---
    spawner: str = Field(
        default="none",
        pattern="^(none|local|docker|swarm)$",
        description="how the policeman adds and removes peers: none (fixed size), local (casperd up), "
        "docker (containers through the socket proxy), swarm (scales the developer service)",
    )
    autoscale_roles: dict[str, AutoscaleRole] = Field(
        default_factory=dict,
        description='bounds per spawnable role: JSON (or a TOML table), e.g. {"developer": {"min": 1, "max": 4}}; '
        "optional capabilities a spawned peer adds",
    )
    autoscale_wait_s: float = Field(
        default=2.0, ge=0, description="scale up when a task waits this long and no capable peer has a free slot"
    )
    autoscale_idle_s: float = Field(
        default=30.0, ge=0, description="drain, then retire, a spawned peer idle this long (never below min)"
    )
    autoscale_step_s: float = Field(default=2.0, ge=0, description="least time between two spawns of one role")
    autoscale_spawns_per_min: int = Field(default=10, ge=1, description="most spawns per minute, whole mesh")
    autoscale_spawn_timeout_s: float = Field(
        default=60.0, gt=0, description="a spawned peer not registered by then is given up and removed"
    )
    spawner_template: str = Field(
        default="developer-1",
        description="docker: the container whose image, networks, mounts and settings a spawned peer copies",
    )
    swarm_service: str = Field(
        default="", description="swarm: the service to scale; default the stack's developer service"
    )
    swarm_base_replicas: int | None = Field(
        default=None,
        ge=0,
        description="swarm: replicas that are the stack's own (slots above it are the autoscaler's, which it "
        "may retire); default the count the service has when the policeman starts",
    )
    log_level: str = Field(default="INFO", description="DEBUG, INFO, WARNING, ERROR")
    log_format: str = Field(default="auto", pattern="^(auto|text|json)$", description="auto, text or json")
    event_loop: str = Field(
        default="asyncio",
        pattern="^(auto|asyncio|uvloop)$",
        description="asyncio, uvloop (pip install 'casper-mesh[fast]'), or auto: uvloop if installed",
    )
    # --- Claude agents ---
    anthropic_api_key_file: Path | None = Field(
        default=None, description="file holding the Anthropic API key; default: the ANTHROPIC_API_KEY variable"
    )
    anthropic_base_url: str = Field(
        default="", description="Messages API endpoint; default: ANTHROPIC_BASE_URL, else Anthropic's"
    )
    models: dict[str, str] = Field(
        default_factory=lambda: dict(DEFAULT_MODELS),
        description="model per role, merged over the defaults: JSON (or a TOML table), "
        'e.g. {"developer": "claude-opus-4-5"}',
    )
    model_prices: dict[str, ModelPrice] = Field(
        default_factory=lambda: dict(DEFAULT_PRICES),
        description="USD per million tokens per model, merged over the defaults (sonnet 3/15, haiku 1/5, "
        'opus-4-5 5/25, opus-4-1 15/75): JSON, e.g. {"m": {"input": 3, "output": 15, '
        '"cache_write": 3.75, "cache_read": 0.3}}',
    )
    llm_timeout_s: float = Field(
        default=120.0,
        gt=0,
        le=3600,
        description="idle timeout of a model API call: the longest wait for the next event of its stream",
    )
    llm_retries: int = Field(
        default=4, ge=0, le=20, description="CASPER's retries of a failed model call (429, 529, 5xx, network)"
    )
    llm_rpm: int = Field(
        default=50,
        ge=1,
        description="model requests per minute for the whole mesh, until the API's rate-limit headers say otherwise",
    )
    llm_tpm: int = Field(
        default=100_000,
        ge=100,
        description="model input (and output) tokens per minute for the whole mesh, until the API's headers say "
        "otherwise",
    )
    llm_permit_lease_s: float = Field(
        default=0.0,
        ge=0,
        le=10,
        description="permits ahead: how long a worker may hold a model-call permit granted before its call "
        "(asked when one of its calls ends, one per execution slot, only while the mesh's rate-limit buckets are "
        "over half full and no 429 pause is on), e.g. 1; 0 (default): one llm-permit round trip before every call. "
        "It saves that round trip (~1.5 ms on loopback) when the policeman is remote or busy; on a small machine the "
        "report that asks for the next permit reaches the policeman with the result and delays its commit and DONE "
        "by about as much (bench.swarm_speedup measured no gain on 2 cores). Risks: a permit held ahead is not "
        "stopped by a 429 that another node sees (at most one call per slot within the lease may meet the same "
        "429 and be retried), and a node that dies holding permits leaves them charged until the buckets refill",
    )
    llm_max_tokens: int = Field(
        default=0,
        ge=0,
        le=128_000,
        description="max output tokens of one model call; 0: per role (developer 16000, planner 8000, ask 4096; "
        "a developer call cut inside a tool call asks again with twice as many, up to 64000)",
    )
    agent_max_turns: int = Field(default=40, ge=1, le=1000, description="most model turns of one code task")
    agent_max_tokens: int = Field(default=500_000, ge=1000, description="most tokens one code task may use")
    agent_context_tokens: int = Field(
        default=120_000,
        ge=1000,
        description="conversation size (est. tokens) above which old tool output is elided before a model call",
    )
    agent_wall_s: float = Field(default=1800.0, gt=0, description="most wall time of one code task, seconds")
    agent_command_timeout_s: float = Field(
        default=120.0, gt=0, le=86400, description="timeout of a command an agent runs"
    )
    agent_output_cap: int = Field(default=16 * 1024, ge=256, description="bytes of command output an agent sees")
    test_timeout_s: float = Field(default=600.0, gt=0, le=86400, description="timeout of a test run")
    job_rounds: int = Field(
        default=3, ge=1, le=20, description="rounds of test feedback a subtask gets before it is given up"
    )

    @field_validator("models", "model_prices", mode="before")
    @classmethod
    def _table_json(cls, value: Any, info: Any) -> Any:
        """A JSON object (flag, variable) or table (TOML), merged over the defaults."""
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not JSON: {exc.msg}") from None
        if isinstance(value, dict):
            defaults: dict[str, Any] = dict(DEFAULT_MODELS if info.field_name == "models" else DEFAULT_PRICES)
            return {**defaults, **value}
        return value

    @field_validator("capabilities", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [c.strip() for c in value.split(",") if c.strip()]
        return value

    @field_validator("task_policies", "autoscale_roles", mode="before")
    @classmethod
    def _policies_json(cls, value: Any, info: Any) -> Any:
        if isinstance(value, str):
            try:
                return json.loads(value) if value.strip() else {}
            except ValueError:
                example = (
                    '{"developer": {"min": 1, "max": 4}}'
                    if info.field_name == "autoscale_roles"
                    else '{"shell": {"max_attempts": 5}}'
                )
                raise ValueError(f"expected JSON like {example}") from None
        return value

    @field_validator("autoscale_roles")
    @classmethod
    def _spawnable_roles(cls, value: dict[str, AutoscaleRole]) -> dict[str, AutoscaleRole]:
        for role in value:
            if role not in (Role.DEVELOPER.value, Role.TESTER.value):
                raise ValueError(f"{role!r} cannot be spawned; spawnable roles: developer, tester")
        return value

    @field_validator("role")
    @classmethod
    def _node_role(cls, value: Role) -> Role:
        if value not in ROLE_CAPABILITIES:
            raise ValueError("casperd runs as policeman, developer or tester")
        return value

    @model_validator(mode="after")
    def _derive(self) -> Settings:
        if not self.node_id:
            self.node_id = f"{self.role.value}-{socket.gethostname()}"
        if not self.advertise:
            self.advertise = self.bind  # a wildcard bind is resolved at start (transport.advertised)
        if not self.control:
            self.control = f"ipc://{self.state_dir / (self.node_id + '.ctl')}"
        if self.authorized_keys_file is None:
            self.authorized_keys_file = self.state_dir / "authorized_keys"
        return self

    @property
    def all_capabilities(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys([*ROLE_CAPABILITIES[self.role], *self.capabilities]))

    @property
    def workspace(self) -> Path:
        return self.state_dir / "workspaces" / self.node_id


def load_settings(overrides: dict[str, Any] | None = None, config_file: Path | str | None = None) -> Settings:
    """Build settings from flags (``overrides``), environment, config file and defaults.

    Raises:
        ConfigError: a value is invalid; the message names the setting, its flag and variable.
    """
    config_file = config_file or os.environ.get("CASPER_CONFIG") or None
    if config_file is not None and not Path(config_file).is_file():
        raise ConfigError(f"config file {config_file} does not exist", hint="check --config / CASPER_CONFIG")
    toml = Path(config_file) if config_file else None

    class _Sources(Settings):
        @classmethod
        def settings_customise_sources(
            cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
        ):  # type: ignore[override]
            sources = [init_settings, env_settings]
            if toml is not None:
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml))
            return tuple(sources)

    clean = {k: v for k, v in (overrides or {}).items() if v is not None}
    try:
        return _Sources(**clean)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            f"config file {toml} is not valid TOML: {exc}", hint="fix the file or drop --config"
        ) from None
    except SettingsError as exc:  # a table or list variable (CASPER_MODELS, ...) that is not JSON
        field = re.search(r'field "([a-z_]+)"', str(exc))
        name = field.group(1) if field else "?"
        raise ConfigError(
            f"invalid settings: {name} (--{name.replace('_', '-')} / CASPER_{name.upper()}): "
            "the variable must hold JSON (an object or a list)",
            hint=f"fix CASPER_{name.upper()} (for example '{{}}') or unset it",
        ) from None
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_input=False, include_url=False):
            name = str(err["loc"][0]) if err["loc"] else "?"
            problems.append(f"{name} (--{name.replace('_', '-')} / CASPER_{name.upper()}): {err['msg']}")
        raise ConfigError("invalid settings: " + "; ".join(problems), hint="see casperd --help") from None
