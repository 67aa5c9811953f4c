"""Settings precedence and validation, casperd's flags, caspectl's argument parsing."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from casperd import cli
from casperd.ctl import main as ctl_main
from casperd.ctl import submit as ctl_submit
from casperd.errors import ConfigError
from casperd.exitcodes import ExitCode
from casperd.messages import Role
from casperd.settings import ROLE_CAPABILITIES, Settings, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No CASPER_* variable of the developer's shell leaks into these tests."""
    for name in list(os.environ):
        if name.upper().startswith("CASPER_"):
            monkeypatch.delenv(name)


def write_toml(tmp_path: Path, text: str, name: str = "casper.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- defaults and precedence --------------------------------------------------------------------
def test_defaults() -> None:
    s = load_settings()
    assert s.role is Role.DEVELOPER
    assert s.capacity == 4
    assert s.bind == "tcp://127.0.0.1:5555"
    assert s.capabilities == []
    assert s.heartbeat_s == 1.0 and s.heartbeat_misses == 3
    assert s.max_attempts == 3 and s.backoff_cap_s == 60.0
    assert s.curve is False
    assert s.log_format == "auto"
    for name, field in Settings.model_fields.items():
        if name in ("node_id", "advertise", "control", "authorized_keys_file"):
            continue  # derived below
        assert getattr(s, name) == field.get_default(call_default_factory=True), name
    assert s.authorized_keys_file == s.state_dir / "authorized_keys"


def test_precedence_flags_over_env_over_file_over_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write_toml(
        tmp_path,
        """
capacity = 7
bind = "tcp://0.0.0.0:7000"
log_level = "DEBUG"
lease_s = 11.0
""",
    )
    monkeypatch.setenv("CASPER_CAPACITY", "8")
    monkeypatch.setenv("CASPER_BIND", "tcp://0.0.0.0:8000")
    monkeypatch.setenv("CASPER_MAX_ATTEMPTS", "6")
    s = load_settings({"capacity": 9}, cfg)
    assert s.capacity == 9  # flag beats env and file
    assert s.bind == "tcp://0.0.0.0:8000"  # env beats file
    assert s.max_attempts == 6  # env beats default
    assert s.log_level == "DEBUG" and s.lease_s == 11.0  # file beats defaults
    assert s.heartbeat_s == 1.0  # default


def test_env_beats_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write_toml(tmp_path, 'role = "tester"\ncapacity = 2\n')
    monkeypatch.setenv("CASPER_ROLE", "policeman")
    s = load_settings(config_file=cfg)
    assert s.role is Role.POLICEMAN and s.capacity == 2


def test_file_beats_defaults(tmp_path: Path) -> None:
    cfg = write_toml(tmp_path, 'role = "tester"\ncurve = true\nshell_output_cap = 1000\n')
    s = load_settings(config_file=cfg)
    assert s.role is Role.TESTER and s.curve is True and s.shell_output_cap == 1000


def test_config_file_from_casper_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write_toml(tmp_path, "capacity = 13\n")
    monkeypatch.setenv("CASPER_CONFIG", str(cfg))
    assert load_settings().capacity == 13
    other = write_toml(tmp_path, "capacity = 14\n", "other.toml")
    assert load_settings(config_file=other).capacity == 14  # --config beats CASPER_CONFIG


def test_none_overrides_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CASPER_CAPACITY", "5")
    s = load_settings({"capacity": None, "bind": None})
    assert s.capacity == 5 and s.bind == "tcp://127.0.0.1:5555"


def test_bool_and_path_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CASPER_CURVE", "true")
    monkeypatch.setenv("CASPER_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("CASPER_CURVE_SECRET_KEY_FILE", str(tmp_path / "n.key"))
    s = load_settings()
    assert s.curve is True
    assert s.state_dir == tmp_path
    assert s.curve_secret_key_file == tmp_path / "n.key"


def test_unrelated_casper_variables_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CASPER_NOT_A_SETTING", "x")
    assert load_settings().capacity == 4


# --- capabilities -------------------------------------------------------------------------------
def test_comma_separated_capabilities_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CASPER_CAPABILITIES", " gpu, fast,,x86 ,")
    assert load_settings().capabilities == ["gpu", "fast", "x86"]


def test_empty_capabilities_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CASPER_CAPABILITIES", "")
    assert load_settings().capabilities == []


def test_capabilities_from_flag_and_file(tmp_path: Path) -> None:
    assert load_settings({"capabilities": "a,b"}).capabilities == ["a", "b"]
    assert load_settings({"capabilities": ["c"]}).capabilities == ["c"]
    cfg = write_toml(tmp_path, 'capabilities = ["gpu", "big"]\n')
    assert load_settings(config_file=cfg).capabilities == ["gpu", "big"]


@pytest.mark.parametrize("role", [Role.POLICEMAN, Role.DEVELOPER, Role.TESTER])
def test_role_default_capabilities(role: Role) -> None:
    s = load_settings({"role": role.value})
    assert s.all_capabilities == ROLE_CAPABILITIES[role]
    s = load_settings({"role": role.value, "capabilities": "gpu,shell"})
    assert s.all_capabilities[: len(ROLE_CAPABILITIES[role])] == ROLE_CAPABILITIES[role]
    assert "gpu" in s.all_capabilities
    assert len(s.all_capabilities) == len(set(s.all_capabilities))  # no duplicate "shell"


def test_role_capabilities_table() -> None:
    assert ROLE_CAPABILITIES[Role.POLICEMAN] == ("plan", "validate")
    assert ROLE_CAPABILITIES[Role.DEVELOPER] == ("code", "llm", "shell")
    assert ROLE_CAPABILITIES[Role.TESTER] == ("test", "shell")


def test_client_role_is_rejected_or_usable() -> None:
    try:
        s = load_settings({"role": "client"})
    except ConfigError:
        return
    assert isinstance(s.all_capabilities, tuple)


# --- derived values -----------------------------------------------------------------------------
def test_derived_node_id_advertise_control(tmp_path: Path) -> None:
    s = load_settings({"role": "tester", "state_dir": tmp_path, "bind": "tcp://0.0.0.0:6000"})
    assert s.node_id == f"tester-{socket.gethostname()}"
    assert s.advertise == "tcp://0.0.0.0:6000"
    assert s.control == f"ipc://{tmp_path / (s.node_id + '.ctl')}"
    assert s.workspace == tmp_path / "workspaces" / s.node_id


def test_explicit_values_are_not_derived(tmp_path: Path) -> None:
    s = load_settings(
        {"node_id": "dev-7", "advertise": "tcp://10.1.1.1:5555", "control": "ipc:///x.ctl", "state_dir": tmp_path}
    )
    assert s.node_id == "dev-7"
    assert s.advertise == "tcp://10.1.1.1:5555"
    assert s.control == "ipc:///x.ctl"


def test_control_follows_an_explicit_node_id(tmp_path: Path) -> None:
    s = load_settings({"node_id": "n1", "state_dir": tmp_path})
    assert s.control == f"ipc://{tmp_path}/n1.ctl"


# --- invalid values -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "name"),
    [
        ({"capacity": -1}, "capacity"),
        ({"capacity": 10_001}, "capacity"),
        ({"heartbeat_s": 0}, "heartbeat_s"),
        ({"heartbeat_misses": 1}, "heartbeat_misses"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"backoff_factor": 0.5}, "backoff_factor"),
        ({"max_message_bytes": 10}, "max_message_bytes"),
        ({"log_format": "xml"}, "log_format"),
        ({"role": "king"}, "role"),
        ({"metrics_port": 70000}, "metrics_port"),
        ({"db_pool_size": "many"}, "db_pool_size"),
    ],
)
def test_invalid_flag_values_name_the_flag_and_variable(overrides: dict[str, object], name: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(overrides)
    msg = str(info.value)
    assert f"--{name.replace('_', '-')}" in msg
    assert f"CASPER_{name.upper()}" in msg
    assert info.value.code == "config"
    assert info.value.hint


def test_invalid_env_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CASPER_HEARTBEAT_S", "soon")
    with pytest.raises(ConfigError, match=r"--heartbeat-s / CASPER_HEARTBEAT_S"):
        load_settings()


@pytest.mark.parametrize("value", ["{bad", ""])
def test_a_table_variable_that_is_not_json_is_a_config_error(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("CASPER_MODELS", value)
    with pytest.raises(ConfigError, match=r"--models / CASPER_MODELS.*JSON") as info:
        load_settings()
    assert "CASPER_MODELS" in str(info.value.hint)


def test_every_problem_is_reported() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({"capacity": -1, "hwm": 0})
    assert "CASPER_CAPACITY" in info.value.message and "CASPER_HWM" in info.value.message


def test_unknown_key_in_config_file(tmp_path: Path) -> None:
    cfg = write_toml(tmp_path, "capacty = 3\n")
    with pytest.raises(ConfigError, match="capacty"):
        load_settings(config_file=cfg)


def test_missing_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="does not exist") as info:
        load_settings(config_file=missing)
    assert str(missing) in info.value.message
    assert "CASPER_CONFIG" in (info.value.hint or "")
    monkeypatch.setenv("CASPER_CONFIG", str(missing))
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings()


def test_config_path_that_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_settings(config_file=tmp_path)


def test_config_file_with_bad_toml(tmp_path: Path) -> None:
    cfg = write_toml(tmp_path, "role = [\n")
    with pytest.raises(ConfigError):
        load_settings(config_file=cfg)


# --- casperd command line -----------------------------------------------------------------------
def test_casperd_flags_build_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CASPER_CAPACITY", "2")
    monkeypatch.setenv("CASPER_LOG_LEVEL", "WARNING")
    ns = cli.build_parser().parse_args(
        [
            "--role",
            "tester",
            "--capacity",
            "6",
            "--capabilities",
            "gpu,big",
            "--curve",
            "--heartbeat-s",
            "0.5",
            "--state-dir",
            str(tmp_path),
            "--node-id",
            "t-1",
        ]
    )
    s = cli.settings_from_args(ns)
    assert s.role is Role.TESTER
    assert s.capacity == 6  # flag beats env
    assert s.log_level == "WARNING"  # env, no flag
    assert s.capabilities == ["gpu", "big"]
    assert s.curve is True
    assert s.heartbeat_s == 0.5
    assert s.state_dir == tmp_path
    assert s.node_id == "t-1"


def test_casperd_no_curve_and_config_flag(tmp_path: Path) -> None:
    cfg = write_toml(tmp_path, "curve = true\ncapacity = 3\n")
    ns = cli.build_parser().parse_args(["--config", str(cfg), "--no-curve"])
    s = cli.settings_from_args(ns)
    assert s.curve is False and s.capacity == 3


def test_casperd_unset_flags_are_none() -> None:
    ns = cli.build_parser().parse_args([])
    for name in Settings.model_fields:
        assert getattr(ns, name) is None, name


def test_casperd_flag_types() -> None:
    ns = cli.build_parser().parse_args(["--capacity", "3", "--lease-s", "2.5", "--state-dir", "/tmp/x"])
    assert ns.capacity == 3 and isinstance(ns.capacity, int)
    assert ns.lease_s == 2.5
    assert ns.state_dir == Path("/tmp/x")
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--capacity", "three"])


def test_casperd_main_bad_config_exits_with_usage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--config", str(tmp_path / "missing.toml")]) == ExitCode.USAGE
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["--capacity", "-5"]) == ExitCode.USAGE
    err = capsys.readouterr().err
    assert "--capacity" in err and "CASPER_CAPACITY" in err


def test_casperd_help_lists_every_setting() -> None:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("CASPER_")}
    env["COLUMNS"] = "200"
    proc = subprocess.run(
        [sys.executable, "-m", "casperd", "--help"], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for name in Settings.model_fields:
        assert f"--{name.replace('_', '-')}" in out, name
        assert f"CASPER_{name.upper()}" in out, name
    assert "--config" in out and "--no-curve" in out
    assert "precedence" in out


# --- caspectl argument parsing ------------------------------------------------------------------
def parse(*argv: str) -> object:
    return ctl_main.build_parser().parse_args(list(argv))


@pytest.mark.parametrize(
    "argv",
    [
        ("--control", "ipc:///x.ctl", "status"),
        ("status", "--control", "ipc:///x.ctl"),
    ],
)
def test_control_before_or_after_the_command(argv: tuple[str, ...]) -> None:
    a = parse(*argv)
    assert a.control == "ipc:///x.ctl"
    assert a.command == "status"
    assert a.output == "table" and a.timeout == 10.0 and a.state_dir is None


@pytest.mark.parametrize(
    "argv",
    [("-o", "json", "peers"), ("peers", "-o", "json"), ("--output", "json", "peers"), ("peers", "--output", "json")],
)
def test_output_json_before_or_after(argv: tuple[str, ...]) -> None:
    a = parse(*argv)
    assert a.output == "json" and a.command == "peers"


def test_global_defaults_and_override_order() -> None:
    a = parse("status")
    assert (a.output, a.control, a.state_dir, a.timeout) == ("table", None, None, 10.0)
    a = parse("--control", "A", "--timeout", "3", "status", "--control", "B")
    assert a.control == "B"  # the later one wins
    assert a.timeout == 3.0  # kept from before the command
    a = parse("--state-dir", "/s", "tasks", "--timeout", "2", "-o", "json")
    assert a.state_dir == Path("/s") and a.timeout == 2.0 and a.output == "json"


def test_every_subcommand_takes_the_global_options() -> None:
    cases = {
        "status": [],
        "peers": [],
        "submit": ["echo"],
        "submit-bulk": ["f.jsonl"],
        "get": ["x"],
        "tasks": [],
        "cancel": ["x"],
        "drain": ["p"],
        "resume": ["p"],
        "health": [],
        "keygen": ["d", "n"],
    }
    for cmd, rest in cases.items():
        a = parse(cmd, *rest, "--control", "C", "-o", "json", "--timeout", "1.5")
        assert (a.command, a.control, a.output, a.timeout) == (cmd, "C", "json", 1.5), cmd
        assert callable(a.fn)


def test_submit_arguments() -> None:
    a = parse(
        "submit",
        "shell",
        "--input",
        '{"cmd": "ls"}',
        "--priority",
        "8",
        "--requires",
        "gpu",
        "--requires",
        "big",
        "--affinity",
        "k",
        "--idempotency-key",
        "i-1",
        "--max-attempts",
        "4",
        "--timeout-s",
        "2.5",
        "--wait",
        "--wait-timeout",
        "9",
    )
    assert a.type == "shell" and a.input == '{"cmd": "ls"}'
    assert a.priority == 8 and a.requires == ["gpu", "big"]
    assert a.affinity == "k" and a.idempotency_key == "i-1"
    assert a.max_attempts == 4 and a.timeout_s == 2.5
    assert a.wait is True and a.wait_timeout == 9.0
    spec = ctl_submit.spec_from_args(a)
    assert spec.requires == ("gpu", "big") and spec.input == {"cmd": "ls"} and spec.priority == 8


def test_submit_bulk_defaults() -> None:
    a = parse("submit-bulk", "-")
    assert a.file == "-" and a.batch == 500 and a.wait is False


def test_health_quiet_and_tasks_filters() -> None:
    assert parse("health", "-q").quiet is True
    a = parse("tasks", "--status", "dead", "--limit", "5")
    assert a.status == "dead" and a.limit == 5


@pytest.mark.parametrize(
    "argv",
    [
        (),
        ("-o", "xml", "status"),
        ("status", "-o", "yaml"),
        ("bogus",),
        ("submit",),
        ("get",),
        ("tasks", "--limit", "many"),
    ],
)
def test_bad_caspectl_usage_exits_2(argv: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        ctl_main.build_parser().parse_args(list(argv))
    assert info.value.code == 2


def test_bad_submit_input_is_a_command_error() -> None:
    from casperd.errors import CommandError

    with pytest.raises(CommandError, match="not valid JSON"):
        ctl_submit.spec_from_args(parse("submit", "echo", "--input", "{nope"))
    with pytest.raises(CommandError, match="JSON object"):
        ctl_submit.spec_from_args(parse("submit", "echo", "--input", "[1]"))
    with pytest.raises(CommandError, match="priority"):
        ctl_submit.spec_from_args(parse("submit", "echo", "--priority", "12"))


def test_advertised_endpoint_resolves_a_wildcard_bind() -> None:
    from casperd.transport import advertised

    assert advertised("tcp://127.0.0.1:5555", "", "tcp://127.0.0.1:5554") == "tcp://127.0.0.1:5555"
    assert advertised("tcp://0.0.0.0:5555", "tcp://10.1.2.3:5555", "x") == "tcp://10.1.2.3:5555"
    # towards a loopback broker the route is loopback: a concrete, reachable address, never 0.0.0.0
    got = advertised("tcp://0.0.0.0:5555", "tcp://0.0.0.0:5555", "tcp://127.0.0.1:6000")
    assert got.startswith("tcp://") and got.endswith(":5555") and "0.0.0.0" not in got
    assert advertised("ipc:///tmp/x.ctl", "", "tcp://127.0.0.1:1") == "ipc:///tmp/x.ctl"


def test_models_and_prices_merge_over_the_defaults() -> None:
    s = load_settings(
        {
            "models": '{"developer": "claude-opus-4-5"}',
            "model_prices": '{"my-model": {"input": 1, "output": 2, "cache_write": 1.25, "cache_read": 0.1}}',
        }
    )
    assert s.models["developer"] == "claude-opus-4-5" and s.models["policeman"] == "claude-sonnet-4-6"
    assert s.model_prices["my-model"].output == 2 and "claude-haiku-4-5" in s.model_prices
    with pytest.raises(ConfigError, match="models"):
        load_settings({"models": "developer=x"})
