"""The codec against the golden vectors in protocol/vectors/ (see protocol/SPEC.md).

Canonical vectors: the body rebuilds to a model that encodes to the vector's frames byte for byte,
and the frames decode back to that model. Lenient vectors: non-canonical frames decode to the
body. Invalid vectors: decoding raises the ProtocolError subclass with the expected code.
The generator must reproduce the committed files exactly, and every command needs a vector.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from casperd import codec
from casperd.errors import ProtocolError
from casperd.messages import MODELS, Command

pytestmark = pytest.mark.unit

PROTOCOL = Path(__file__).resolve().parents[2] / "protocol"
VECTORS = PROTOCOL / "vectors"
CANONICAL = sorted(VECTORS.glob("*.json"))
LENIENT = sorted((VECTORS / "lenient").glob("*.json"))
INVALID = sorted((VECTORS / "invalid").glob("*.json"))
PROTOCOL_ERRORS = {cls.code: cls for cls in ProtocolError.__subclasses__()}


def _load_generator() -> Any:
    name = "casper_generate_vectors"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, PROTOCOL / "generate_vectors.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


gen = _load_generator()


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _frames(hexes: list[str]) -> list[bytes]:
    return [bytes.fromhex(h) for h in hexes]


def _ids(paths: list[Path]) -> list[str]:
    return [p.stem for p in paths]


def test_vectors_exist() -> None:
    assert CANONICAL and LENIENT and INVALID


@pytest.mark.parametrize("path", CANONICAL, ids=_ids(CANONICAL))
def test_encode_matches_vector(path: Path) -> None:
    vec = _read(path)
    command = Command[vec["command"]]
    assert vec["code"] == command.value
    assert path.stem.startswith(f"{command.value:02d}_{command.name.lower()}")
    model = gen.model_from_vector(vec)
    assert type(model) is MODELS[command]
    attachments = _frames(vec["attachments_hex"])
    frames = codec.encode(model, attachments)
    assert [f.hex() for f in frames] == vec["frames_hex"]
    assert frames[0] == b"CASP\x01" and frames[1] == bytes([command.value])
    assert frames[3:] == attachments


@pytest.mark.parametrize("path", CANONICAL, ids=_ids(CANONICAL))
def test_decode_matches_vector(path: Path) -> None:
    vec = _read(path)
    decoded = codec.decode(_frames(vec["frames_hex"]), max_bytes=vec["max_bytes"])
    assert decoded.command is Command[vec["command"]]
    assert decoded.message == gen.model_from_vector(vec)
    assert list(decoded.attachments) == _frames(vec["attachments_hex"])
    # the JSON form of what was decoded is the vector's body, key order included
    assert gen.to_json(decoded.message.model_dump(mode="python")) == vec["body"]
    assert list(gen.to_json(decoded.message.model_dump(mode="python"))) == list(vec["body"])


@pytest.mark.parametrize("path", LENIENT, ids=_ids(LENIENT))
def test_lenient_vector_decodes(path: Path) -> None:
    vec = _read(path)
    frames = _frames(vec["frames_hex"])
    decoded = codec.decode(frames, max_bytes=vec["max_bytes"])
    assert decoded.command is Command[vec["command"]]
    assert decoded.message == gen.model_from_vector(vec)
    canonical = codec.encode(decoded.message)
    assert [f.hex() for f in canonical] == vec["canonical_frames_hex"]
    assert canonical != frames


@pytest.mark.parametrize("path", INVALID, ids=_ids(INVALID))
def test_invalid_vector_is_rejected(path: Path) -> None:
    vec = _read(path)
    expected = vec["expected_code"]
    cls = PROTOCOL_ERRORS[expected]
    with pytest.raises(ProtocolError) as info:
        codec.decode(_frames(vec["frames_hex"]), max_bytes=vec["max_bytes"])
    assert info.value.code == expected
    assert type(info.value) is cls


def test_every_command_has_a_vector() -> None:
    covered = {Command[_read(p)["command"]] for p in CANONICAL}
    missing = set(Command) - covered
    assert not missing, f"commands without a golden vector: {sorted(c.name for c in missing)}"


def test_every_decode_error_code_has_an_invalid_vector() -> None:
    codes = {_read(p)["expected_code"] for p in INVALID}
    assert codes >= {"decode", "version", "unknown-command", "invalid-body", "oversize"}


def test_generator_reproduces_committed_files() -> None:
    built = gen.build()
    on_disk = gen.existing()
    assert sorted(built) == sorted(on_disk), "vector files added or removed: run protocol/generate_vectors.py"
    changed = [name for name in built if built[name] != on_disk[name]]
    assert not changed, f"vectors out of date (run protocol/generate_vectors.py): {changed}"


def test_generator_is_deterministic() -> None:
    assert gen.build() == gen.build()
