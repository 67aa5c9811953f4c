"""Every Dockerfile in the repository parses: each logical line is a comment, blank, or starts with
a Dockerfile instruction (a wrapped comment that lost its ``#`` breaks every image build)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
INSTRUCTIONS = {
    "FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER",
    "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL", "MAINTAINER",
}  # fmt: skip
DOCKERFILES = sorted(p for p in REPO.glob("containers/**/Dockerfile*") if p.is_file())


def bad_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every logical line that is no comment, blank or instruction."""
    bad = []
    continued = False
    for n, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if continued:
            continued = stripped.endswith("\\")
            continue
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.split(None, 1)[0].upper() not in INSTRUCTIONS:
            bad.append((n, line))
        continued = stripped.endswith("\\")
    return bad


def test_there_are_dockerfiles() -> None:
    assert any(p.name == "Dockerfile" and p.parent.name == "containers" for p in DOCKERFILES)


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_line_of_a_dockerfile_is_an_instruction_or_a_comment(path: Path) -> None:
    assert bad_lines(path.read_text()) == []


def test_a_comment_that_lost_its_hash_is_found() -> None:
    assert bad_lines("# a comment that wraps\ncode), and more\nFROM x\nRUN a \\\n    b\n") == [(2, "code), and more")]
