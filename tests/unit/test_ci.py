"""CI runs exactly the README's test command, and that command runs the static checks first."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _readme_command() -> str:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)\n```", readme, re.S)
    commands = [b for b in blocks if "pytest" in b]
    assert len(commands) == 1, "one test command in the README"
    return commands[0].strip()


def test_ci_runs_exactly_the_readme_test_command() -> None:
    command = _readme_command()
    lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert command in lines


def test_the_test_command_runs_ruff_and_mypy_before_the_tests() -> None:
    steps = [s.strip() for s in _readme_command().split("&&")]
    assert steps[-1] == ".venv/bin/python -m pytest"
    for check in (".venv/bin/ruff check .", ".venv/bin/ruff format --check .", ".venv/bin/mypy"):
        assert check in steps[:-1], check


def test_hypothesis_and_mypy_are_test_dependencies() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    test_extra = text.split("test = [", 1)[1].split("]", 1)[0]
    assert '"hypothesis>=' in test_extra and '"mypy>=' in test_extra
