"""What `casperd up` passes to its nodes: the user's file and variables, minus what up decides."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from casperd.errors import ConfigError
from casperd.meshconfig import node_settings_env
from casperd.settings import load_settings


def test_file_then_variables_and_up_decided_ones_dropped(tmp_path: Path) -> None:
    cfg = tmp_path / "mesh.toml"
    cfg.write_text(
        'llm_rpm = 100\ncapabilities = ["gpu", "big"]\ncurve = false\nbind = "tcp://0.0.0.0:1"\n'
        '[models]\ndeveloper = "claude-x"\n'
    )
    env, dropped = node_settings_env(
        cfg, {"CASPER_LLM_RPM": "7", "CASPER_NODE_ID": "me", "CASPER_NOT_A_SETTING": "1", "HOME": "/root"}
    )
    assert env["CASPER_LLM_RPM"] == "7"  # the variable beats the file
    assert env["CASPER_CAPABILITIES"] == "gpu,big"
    assert json.loads(env["CASPER_MODELS"])["developer"] == "claude-x"
    assert "CASPER_NOT_A_SETTING" not in env and "HOME" not in env
    assert dropped == ["CASPER_BIND", "CASPER_CURVE", "CASPER_NODE_ID"]
    assert not set(dropped) & set(env)


def test_the_values_read_back_as_the_same_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "mesh.toml"
    cfg.write_text(
        "llm_tpm = 5000\ncapacity = 9\n"
        "[model_prices.m]\ninput = 1.0\noutput = 2.0\ncache_write = 1.25\ncache_read = 0.1\n"
    )
    env, _ = node_settings_env(cfg, {})
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("CASPER_CONFIG", raising=False)
    s = load_settings()
    assert (s.llm_tpm, s.capacity, s.model_prices["m"].output) == (5000, 9, 2.0)


def test_a_bad_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        node_settings_env(tmp_path / "missing.toml", {})
    assert "does not exist" in str(info.value)
    bad = tmp_path / "bad.toml"
    bad.write_text("llm_rpm = 0\n")
    with pytest.raises(ConfigError) as info:
        node_settings_env(bad, {})
    assert "llm_rpm" in str(info.value)
