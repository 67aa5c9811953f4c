"""The error tree: every code that goes on the wire is a class with that code."""

from __future__ import annotations

import re
from pathlib import Path

from casperd import errors

ROOT = Path(__file__).resolve().parents[2]


def _classes(cls: type[errors.CasperError]) -> list[type[errors.CasperError]]:
    out = [cls]
    for sub in cls.__subclasses__():
        out += _classes(sub)
    return out


def test_no_bare_code_literals_in_the_daemon() -> None:
    """ErrorBody(code="...") and _fail(..., "code", ...) name their code through a class."""
    bare = re.compile(r'code="[a-z-]+"|_fail\([^)]*?"(validation|invalid-output|holder-lost|too-large|crash)"')
    for path in (ROOT / "casperd").rglob("*.py"):
        if path.name == "errors.py":
            continue
        assert not bare.search(path.read_text()), path


def test_every_task_failure_code_is_a_class() -> None:
    codes = {c.code for c in _classes(errors.CasperError)}
    for code in ("draining", "handed-back", "too-large", "crash", "invalid-output", "validation", "holder-lost"):
        assert code in codes, code
    assert not errors.HolderLostError("x").retryable and errors.DrainingError("x").retryable


def test_an_unknown_peer_is_not_a_missing_task() -> None:
    err = errors.PeerNotFoundError("no peer named 'x'")
    assert isinstance(err, errors.NotFoundError) and not isinstance(err, errors.TaskNotFoundError)
    assert err.code == errors.TaskNotFoundError.code == "not-found"
    assert isinstance(errors.TaskNotFoundError("t"), errors.TaskError)
    back = errors.from_wire(err.to_wire())  # the wire has one code: clients see a NotFoundError
    assert isinstance(back, errors.NotFoundError) and back.message == "no peer named 'x'"
    assert type(errors.from_wire(errors.TaskNotFoundError("t").to_wire())) is errors.TaskNotFoundError
