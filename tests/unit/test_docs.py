"""Documentation stays true: the README and the spec name what the code has."""

from __future__ import annotations

from pathlib import Path

from casperd.ctl.main import build_parser
from casperd.errors import CasperError
from casperd.messages import Command
from casperd.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
SPEC = (ROOT / "protocol" / "SPEC.md").read_text()


def test_readme_configuration_table_lists_every_setting() -> None:
    for name in Settings.model_fields:
        assert f"`--{name.replace('_', '-')}` | `CASPER_{name.upper()}`" in README, name


def test_readme_lists_every_caspectl_command() -> None:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for command in sub.choices:  # type: ignore[union-attr]
        assert f"`{command}" in README, command


def test_spec_names_every_command_and_error_code() -> None:
    for cmd in Command:
        assert cmd.name in SPEC, cmd.name

    def codes(cls: type[CasperError]) -> set[str]:
        out = {cls.code}
        for sub in cls.__subclasses__():
            out |= codes(sub)
        return out

    for code in codes(CasperError):
        assert f"`{code}`" in SPEC, code
