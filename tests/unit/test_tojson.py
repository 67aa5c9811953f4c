"""taskrecord.to_json: the JSON text every input and output is stored as (Postgres jsonb)."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from casperd import taskrecord
from casperd.taskrecord import to_json


@pytest.fixture(params=["c-encoder", "json-encoder"], autouse=True)
def encoder(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test with the prebuilt C encoder and without it (a CPython without ``_json``)."""
    if request.param == "json-encoder":
        monkeypatch.setattr(taskrecord, "_fast", None)
    else:
        assert taskrecord._fast is not None


@pytest.mark.parametrize(
    "value",
    [
        {},
        {"a": 1, "b": [1.5, None, True]},
        {"é": "ü\u2028", "n": -0.0, "big": 2**70, "f": 1e300, "t": 0.1},
        [],
        'x\u00e9"',
        None,
        (1, 2),
        1.5,
        {"deep": [[{"x": [1, {"y": None}]}]], "k\n": "\t"},
    ],
)
def test_compact_json_as_json_dumps_makes_it(value: Any) -> None:
    assert to_json(value) == json.dumps(value, separators=(",", ":"), allow_nan=False)


def test_the_encoder_is_shared_and_keeps_no_state_between_calls() -> None:
    loop: dict[str, Any] = {}
    loop["self"] = loop
    with pytest.raises(ValueError, match=r"^not JSON-compatible: ValueError$"):
        to_json(loop)
    assert to_json({"a": [1]}) == '{"a":[1]}'  # a failed call leaves nothing behind


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"b": b"x"}, "not JSON-compatible (binary values, NaN or Infinity)"),
        ({"f": math.nan}, "not JSON-compatible (binary values, NaN or Infinity)"),
        ({"f": -math.inf}, "not JSON-compatible (binary values, NaN or Infinity)"),
        ({"s": {1, 2}}, "not JSON-compatible (binary values, NaN or Infinity)"),
        ({"s": "a\x00b"}, "contains a NUL character, which Postgres cannot store"),
    ],
)
def test_unstorable_values_are_refused_saying_why(value: Any, message: str) -> None:
    with pytest.raises(ValueError) as info:
        to_json(value)
    assert str(info.value) == message


def test_an_escaped_backslash_before_u0000_is_not_a_nul() -> None:
    assert to_json({"s": "\\u0000"}) == '{"s":"\\\\u0000"}'


def test_deep_nesting_is_refused() -> None:
    deep: Any = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(ValueError, match=r"^nested too deeply$"):
        to_json(deep)
