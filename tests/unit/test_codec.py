"""The wire codec: round trips, hostile input (seeded fuzzing), size limits, no secret echo, UUIDv7."""

from __future__ import annotations

import copy
import itertools
import os
import pickle
import random
import time
import uuid
from typing import Any

import msgpack
import pytest
from pydantic import ValidationError

from casperd import codec
from casperd.codec import HEADER, MAX_ATTACHMENTS, decode, describe_validation, encode, pack_body
from casperd.errors import (
    CasperError,
    DecodeError,
    InvalidBodyError,
    OversizeError,
    ProtocolError,
    UnknownCommandError,
    VersionError,
    from_wire,
)
from casperd.messages import (
    MODELS,
    PROTOCOL_VERSION,
    SIGNATURE,
    Accepted,
    Assignment,
    Cancel,
    Command,
    Disconnect,
    Done,
    DoneBatch,
    Error,
    ErrorBody,
    FailedBatch,
    Failure,
    Heartbeat,
    Outcome,
    Progress,
    Ready,
    Reply,
    Request,
    ResultBatch,
    Role,
    Submit,
    TaskBatch,
    TaskSpec,
    new_task_id,
    task_created_at,
)

U1 = uuid.UUID("01890a5d-ac96-774b-bcce-b302099a8057")
U2 = uuid.UUID("01890a5d-ac97-7000-8000-000000000001")
U3 = uuid.UUID("0191f000-0000-7abc-9def-0123456789ab")
SECRET = "sk-ant-api03-Zq8XvN3mT9pL2wK7hJ4dR6fS1gB5cY0u"


def samples() -> list[Any]:
    """Representative values for every command, optional fields both set and unset."""
    return [
        Ready(
            node_id="developer-1",
            epoch="e.2024-01",
            role=Role.DEVELOPER,
            endpoint="tcp://10.0.0.2:5555",
            pid=4242,
            host="host-a",
            capabilities=("code", "shell"),
            capacity=4,
            tasks=(U1, U2),
            heartbeat_ms=500,
            version="0.1.0",
        ),
        Ready(node_id="p", epoch="1", role=Role.POLICEMAN, endpoint="ipc:///tmp/x", pid=0, host="h", capacity=0),
        Heartbeat(),
        Heartbeat(load=17, draining=True),
        Submit(
            req_id=7,
            tasks=(
                TaskSpec(
                    type="shell",
                    input={"cmd": "pytest -q", "expect_exit": 0, "nested": {"a": [1, 2.5, None]}},
                    priority=9,
                    requires=("shell", "test"),
                    affinity="repo-1",
                    idempotency_key="idem-1",
                    max_attempts=5,
                    timeout_s=30.5,
                    parent_id=U3,
                    cache=True,
                ),
                TaskSpec(type="noop"),
            ),
            wait=True,
        ),
        Accepted(req_id=7, task_ids=(U1, U2), existing=(False, True)),
        Accepted(req_id=0, task_ids=(), existing=()),
        TaskBatch(
            tasks=(
                Assignment(
                    task_id=U1,
                    type="echo",
                    input={"hello": "mesh", "bin": b"\x00\xff"},
                    attempt=1,
                    lease_ms=30_000,
                    timeout_s=2.5,
                    cache=True,
                ),
                Assignment(task_id=U2, type="noop", attempt=3, lease_ms=1),
            )
        ),
        Progress(task_ids=(U1, U2, U3)),
        Progress(task_ids=(U1,), note="half way: 50%"),
        ResultBatch(
            results=(
                Outcome(
                    task_id=U1,
                    attempt=1,
                    output={"exit_code": 0, "stdout": "ok\n", "list": [1, "two", 3.0]},
                    duration_ms=12.25,
                ),
                Outcome(task_id=U2, attempt=2),
                Outcome(task_id=U3, attempt=1, output="just a string"),
            )
        ),
        FailedBatch(
            failures=(
                Failure(
                    task_id=U1,
                    attempt=2,
                    error=ErrorBody(code="timeout", message="took too long", hint="raise it"),
                    retryable=False,
                ),
                Failure(task_id=U2, attempt=1, error=ErrorBody(code="crash", message="")),
            )
        ),
        Cancel(task_ids=(U1,)),
        Cancel(task_ids=(U1, U2), reason="user asked"),
        Disconnect(reason="shutting down"),
        Error(code="invalid-body", message="bad", hint="fix it", ref=3),
        Error(code="x", message=""),
        Request(req_id=1, op="status"),
        Request(req_id=2**63, op="get", args={"id": str(U1), "n": 5, "flag": True, "l": [1, {"x": None}]}),
        Reply(req_id=1, ok=True, data={"peers": [{"id": "a"}], "count": 1}),
        Reply(req_id=2, ok=False, error=ErrorBody(code="not-found", message="no such task", hint="check the id")),
        DoneBatch(done=(Done(task_id=U1, status="complete", output={"k": "v"}),)),
        DoneBatch(
            done=(
                Done(task_id=U2, status="dead", error=ErrorBody(code="timeout", message="m")),
                Done(task_id=U3, status="cancelled"),
            )
        ),
    ]


def _id(m: Any) -> str:
    return type(m).__name__


# --- round trips --------------------------------------------------------------------------------
def test_samples_cover_every_command() -> None:
    assert {m.COMMAND for m in samples()} == set(Command) == set(MODELS)


@pytest.mark.parametrize("message", samples(), ids=_id)
def test_round_trip(message: Any) -> None:
    frames = encode(message)
    assert len(frames) == 3
    assert frames[0] == SIGNATURE + bytes([PROTOCOL_VERSION]) == HEADER
    assert frames[1] == bytes([message.COMMAND])
    assert all(isinstance(f, bytes) for f in frames)
    decoded = decode(frames)
    assert type(decoded.message) is type(message)
    assert decoded.message == message
    assert decoded.command is message.COMMAND
    assert decoded.attachments == ()
    assert encode(decoded.message) == frames  # stable: re-encoding gives the same bytes


@pytest.mark.parametrize("message", samples(), ids=_id)
def test_round_trip_with_attachments(message: Any) -> None:
    atts = [b"", b"\x00" * 10, bytes(range(256))]
    frames = encode(message, atts)
    assert frames[3:] == atts
    decoded = decode(frames)
    assert decoded.message == message
    assert decoded.attachments == tuple(atts)


def test_encoding_is_deterministic() -> None:
    for m in samples():
        assert encode(m) == encode(m)


def test_uuids_travel_as_16_byte_bin() -> None:
    body = msgpack.unpackb(encode(Cancel(task_ids=(U1,)))[2], raw=False)
    assert body["task_ids"] == [U1.bytes]
    assert body == {"task_ids": [U1.bytes], "reason": "cancelled"}


def test_body_keys_in_field_order() -> None:
    body = msgpack.unpackb(encode(samples()[0])[2], raw=False)
    assert list(body) == list(Ready.model_fields)


def test_pack_body_refuses_unknown_types() -> None:
    with pytest.raises(TypeError):
        pack_body({"x": object()})
    assert msgpack.unpackb(pack_body({"s": {1, 2}, "t": (1, 2)}), raw=False) in (
        {"s": [1, 2], "t": [1, 2]},
        {"s": [2, 1], "t": [1, 2]},
    )


def test_decode_accepts_memoryview_and_bytearray_frames() -> None:
    frames = encode(Heartbeat(load=1))
    decoded = decode([memoryview(frames[0]), bytearray(frames[1]), frames[2]])
    assert decoded.message == Heartbeat(load=1)


# --- bad input, case by case --------------------------------------------------------------------
def _frames(cmd: Command, body: Any, *, header: bytes = HEADER) -> list[bytes]:
    return [header, bytes([cmd]), msgpack.packb(body, use_bin_type=True)]


@pytest.mark.parametrize("n", [0, 1, 2])
def test_too_few_frames(n: int) -> None:
    frames = encode(Heartbeat())[:n]
    with pytest.raises(DecodeError, match="at least 3 frames"):
        decode(frames)


@pytest.mark.parametrize("header", [b"XASP\x01", b"casp\x01", b"CASP", b"CASP\x01\x00", b"", b"\x00" * 5])
def test_wrong_signature(header: bytes) -> None:
    with pytest.raises(DecodeError, match="signature") as info:
        decode([header, *encode(Heartbeat())[1:]])
    assert info.value.code == "decode"
    assert info.value.hint


@pytest.mark.parametrize("version", [0, 2, 255])
def test_wrong_version(version: int) -> None:
    with pytest.raises(VersionError) as info:
        decode([SIGNATURE + bytes([version]), *encode(Heartbeat())[1:]])
    assert str(version) in info.value.message
    assert info.value.code == "version"


@pytest.mark.parametrize("cmd", [b"\x00", b"\x0f", b"\x10", b"\xff", b"\x02\x02", b"\x01\x00"])
def test_unknown_command(cmd: bytes) -> None:
    frames = encode(Heartbeat())
    with pytest.raises(UnknownCommandError) as info:
        decode([frames[0], cmd, frames[2]])
    assert cmd[:4].hex() in info.value.message


def test_empty_command_frame() -> None:
    frames = encode(Heartbeat())
    with pytest.raises(UnknownCommandError, match=r"\(empty\)"):
        decode([frames[0], b"", frames[2]])


@pytest.mark.parametrize("message", samples()[:6], ids=_id)
def test_truncated_msgpack(message: Any) -> None:
    frames = encode(message)
    body = frames[2]
    for cut in range(len(body)):
        with pytest.raises(ProtocolError):
            decode([frames[0], frames[1], body[:cut]])
    with pytest.raises(DecodeError, match="not valid msgpack"):
        decode([frames[0], frames[1], body[: len(body) // 2]])


def test_trailing_bytes_after_the_body() -> None:
    frames = encode(Heartbeat())
    with pytest.raises(DecodeError, match="not valid msgpack"):
        decode([frames[0], frames[1], frames[2] + b"\x01"])


@pytest.mark.parametrize("body", [[], [1, 2], 5, "a string", None, True, 1.5, b"bytes"])
def test_body_not_a_map(body: Any) -> None:
    with pytest.raises(DecodeError, match="must be a map"):
        decode(_frames(Command.HEARTBEAT, body))


@pytest.mark.parametrize("body", [{1: 2}, {None: 1}, {1.5: "x"}, {"input": {1: "x"}, "type": "echo"}])
def test_non_string_map_keys(body: dict[Any, Any]) -> None:
    with pytest.raises(DecodeError):
        decode(_frames(Command.HEARTBEAT, body))


def test_bytes_map_keys_are_refused() -> None:
    with pytest.raises(ProtocolError):
        decode(_frames(Command.HEARTBEAT, {b"load": 1}))


@pytest.mark.parametrize(
    ("cmd", "body", "field"),
    [
        (Command.HEARTBEAT, {"load": "lots"}, "load"),
        (Command.HEARTBEAT, {"load": [1]}, "load"),
        (Command.HEARTBEAT, {"load": 1.5}, "load"),
        (Command.HEARTBEAT, {"draining": [True]}, "draining"),
        (Command.DISCONNECT, {"reason": 5}, "reason"),
        (Command.DISCONNECT, {"reason": {"a": 1}}, "reason"),
        (Command.CANCEL, {"task_ids": "not-a-list"}, "task_ids"),
        (Command.CANCEL, {"task_ids": [b"\x01\x02"]}, "task_ids.0"),
        (Command.CANCEL, {"task_ids": [12345]}, "task_ids.0"),
        (Command.REQUEST, {"req_id": 1, "op": "x", "args": [1, 2]}, "args"),
        (Command.SUBMIT, {"req_id": 1, "tasks": [{"type": "echo", "input": "str"}]}, "tasks.0.input"),
        (
            Command.READY,
            {"node_id": "n", "epoch": "e", "role": "king", "endpoint": "x", "pid": 1, "host": "h", "capacity": 1},
            "role",
        ),
        (Command.REPLY, {"req_id": 1, "ok": True, "error": "boom"}, "error"),
    ],
)
def test_wrong_field_types(cmd: Command, body: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidBodyError) as info:
        decode(_frames(cmd, body))
    assert field in info.value.message
    assert cmd.name in info.value.message
    assert info.value.code == "invalid-body"


def test_missing_required_fields() -> None:
    with pytest.raises(InvalidBodyError, match="reason"):
        decode(_frames(Command.DISCONNECT, {}))
    with pytest.raises(InvalidBodyError, match="node_id"):
        decode(_frames(Command.READY, {}))


@pytest.mark.parametrize(
    ("cmd", "body", "field"),
    [
        (Command.HEARTBEAT, {"load": 0, "surprise": 1}, "surprise"),
        (Command.DISCONNECT, {"reason": "x", "COMMAND": 1}, "COMMAND"),
        (Command.SUBMIT, {"req_id": 1, "tasks": [{"type": "echo", "extra": True}]}, "tasks.0.extra"),
        (
            Command.FAILED,
            {"failures": [{"task_id": U1.bytes, "attempt": 1, "error": {"code": "c", "message": "m", "stack": "..."}}]},
            "stack",
        ),
    ],
)
def test_extra_unknown_fields_are_refused(cmd: Command, body: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidBodyError) as info:
        decode(_frames(cmd, body))
    assert field in info.value.message
    assert "xtra" in info.value.message


def _spec(**over: Any) -> dict[str, Any]:
    return {"req_id": 1, "tasks": [{"type": "echo", **over}]}


@pytest.mark.parametrize(
    ("cmd", "body", "field"),
    [
        (Command.SUBMIT, _spec(priority=10), "priority"),
        (Command.SUBMIT, _spec(priority=-1), "priority"),
        (Command.SUBMIT, _spec(max_attempts=0), "max_attempts"),
        (Command.SUBMIT, _spec(max_attempts=101), "max_attempts"),
        (Command.SUBMIT, _spec(timeout_s=0), "timeout_s"),
        (Command.SUBMIT, _spec(timeout_s=86401), "timeout_s"),
        (Command.SUBMIT, _spec(timeout_s=float("nan")), "timeout_s"),
        (Command.SUBMIT, _spec(requires=["c"] * 33), "requires"),
        (Command.SUBMIT, _spec(type=""), "type"),
        (Command.SUBMIT, _spec(type="x" * 65), "type"),
        (Command.SUBMIT, _spec(type="has space"), "type"),
        (Command.SUBMIT, _spec(type="-leading-dash"), "type"),
        (Command.SUBMIT, _spec(affinity=""), "affinity"),
        (Command.SUBMIT, _spec(affinity="k" * 257), "affinity"),
        (Command.SUBMIT, {"req_id": 1, "tasks": []}, "tasks"),
        (Command.SUBMIT, {"req_id": -1, "tasks": [{"type": "echo"}]}, "req_id"),
        (Command.HEARTBEAT, {"load": -1}, "load"),
        (Command.ERROR, {"code": "c", "message": "m", "ref": 256}, "ref"),
        (Command.ERROR, {"code": "c", "message": "m" * 4097}, "message"),
        (
            Command.READY,
            {
                "node_id": "n",
                "epoch": "e",
                "role": "tester",
                "endpoint": "x",
                "pid": 1,
                "host": "h",
                "capacity": 100_001,
            },
            "capacity",
        ),
        (
            Command.READY,
            {
                "node_id": "n",
                "epoch": "e",
                "role": "tester",
                "endpoint": "x",
                "pid": 1,
                "host": "h",
                "capacity": 1,
                "heartbeat_ms": 9,
            },
            "heartbeat_ms",
        ),
        (
            Command.READY,
            {"node_id": "n", "epoch": "e", "role": "tester", "endpoint": "", "pid": 1, "host": "h", "capacity": 1},
            "endpoint",
        ),
        (Command.TASK, {"tasks": [{"task_id": U1.bytes, "type": "t", "attempt": 0, "lease_ms": 1}]}, "attempt"),
        (Command.TASK, {"tasks": [{"task_id": U1.bytes, "type": "t", "attempt": 1, "lease_ms": 0}]}, "lease_ms"),
        (Command.RESULT, {"results": [{"task_id": U1.bytes, "attempt": 1, "duration_ms": -0.1}]}, "duration_ms"),
        (Command.PROGRESS, {"task_ids": []}, "task_ids"),
    ],
)
def test_out_of_range_values(cmd: Command, body: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidBodyError) as info:
        decode(_frames(cmd, body))
    assert field in info.value.message


def test_oversize_is_refused_before_parsing() -> None:
    limit = 1024
    # garbage that would otherwise be a DecodeError: size is checked first
    with pytest.raises(OversizeError) as info:
        decode([b"junk", b"x" * limit], max_bytes=limit)
    assert str(limit) in info.value.message and info.value.hint
    with pytest.raises(OversizeError):
        decode([], max_bytes=-1)  # even zero frames are over a negative limit
    frames = encode(Heartbeat(), [b"a" * (limit - 20)])
    size = sum(len(f) for f in frames)
    assert size > limit
    with pytest.raises(OversizeError):
        decode(frames, max_bytes=limit)
    assert decode(frames, max_bytes=size).message == Heartbeat()  # exactly at the limit is fine
    with pytest.raises(OversizeError):
        decode(frames, max_bytes=size - 1)


def test_oversize_default_limit() -> None:
    frames = encode(Heartbeat(), [b"\x00" * codec.DEFAULT_MAX_MESSAGE_BYTES])
    with pytest.raises(OversizeError):
        decode(frames)


def test_attachment_limit() -> None:
    ok = encode(Heartbeat(), [b"x"] * MAX_ATTACHMENTS)
    assert len(decode(ok).attachments) == MAX_ATTACHMENTS == 16
    with pytest.raises(DecodeError, match="too many attachments"):
        decode(encode(Heartbeat(), [b"x"] * (MAX_ATTACHMENTS + 1)))


def test_protocol_errors_survive_the_wire() -> None:
    for exc in (
        DecodeError("d"),
        VersionError("v", hint="h"),
        UnknownCommandError("u"),
        InvalidBodyError("i"),
        OversizeError("o"),
    ):
        back = from_wire(exc.to_wire())
        assert type(back) is type(exc)
        assert back.message == exc.message and back.hint == exc.hint


# --- secrets are never echoed -------------------------------------------------------------------
SECRET_BODIES = [
    (Command.HEARTBEAT, {"load": SECRET}),
    (Command.HEARTBEAT, {"load": 0, "draining": SECRET}),
    (Command.REQUEST, {"req_id": 1, "op": SECRET + " /bad", "args": {}}),
    (Command.REQUEST, {"req_id": SECRET, "op": "x"}),
    (Command.CANCEL, {"task_ids": [SECRET]}),
    (Command.CANCEL, {"task_ids": [SECRET.encode()]}),
    (Command.ERROR, {"code": "c", "message": SECRET * 200}),
    (
        Command.READY,
        {
            "node_id": SECRET + "!",
            "epoch": SECRET + "?",
            "role": SECRET,
            "endpoint": "",
            "pid": SECRET,
            "host": SECRET + " ",
            "capacity": SECRET,
        },
    ),
    (Command.SUBMIT, {"req_id": 1, "tasks": [{"type": "echo", "priority": SECRET, "affinity": SECRET * 20}]}),
    (Command.DONE, {"done": [{"task_id": SECRET, "status": "complete"}]}),
]


@pytest.mark.parametrize(("cmd", "body"), SECRET_BODIES, ids=lambda v: getattr(v, "name", "body"))
def test_decode_errors_never_echo_values(cmd: Command, body: dict[str, Any]) -> None:
    with pytest.raises(InvalidBodyError) as info:
        decode(_frames(cmd, body))
    err = info.value
    for text in (str(err), err.message, err.hint or "", repr(err), repr(err.to_wire())):
        assert SECRET not in text
        assert SECRET[:12] not in text
        assert "Zq8XvN3m" not in text


def test_describe_validation_names_fields_not_values() -> None:
    with pytest.raises(ValidationError) as info:
        Heartbeat.model_validate({"load": SECRET, "draining": [SECRET], "x": SECRET, "y": SECRET, "z": SECRET})
    text = describe_validation(info.value)
    assert SECRET not in text
    assert "load" in text
    assert text.endswith("and 2 more")
    assert text.count(";") == 3
    assert describe_validation(info.value, limit=10).count(";") == 4


def test_describe_validation_body_level_error() -> None:
    with pytest.raises(ValidationError) as info:
        Heartbeat.model_validate(SECRET)
    text = describe_validation(info.value)
    assert text.startswith("(body):")
    assert SECRET not in text


# --- fuzzing ------------------------------------------------------------------------------------
def _random_value(rng: random.Random, depth: int = 0) -> Any:
    kinds = ["int", "bigint", "neg", "float", "str", "bytes", "bool", "none", "uuid"]
    if depth < 3:
        kinds += ["list", "map"]
    kind = rng.choice(kinds)
    if kind == "int":
        return rng.randint(0, 300)
    if kind == "bigint":
        return rng.choice([2**63 - 1, 2**64 - 1, 2**32, 100_001])
    if kind == "neg":
        return -rng.randint(1, 2**40)
    if kind == "float":
        return rng.choice([0.0, -1.5, 1e308, float("inf"), float("nan"), rng.random() * 1000])
    if kind == "str":
        return "".join(rng.choice("ab-_.:/ Zé\x00\U0001f600") for _ in range(rng.randint(0, 80)))
    if kind == "bytes":
        return rng.randbytes(rng.choice([0, 1, 15, 16, 17, 36]))
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "none":
        return None
    if kind == "uuid":
        return uuid.UUID(int=rng.getrandbits(128)).bytes
    if kind == "list":
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {
        rng.choice(["type", "input", "task_id", "x", "error", "code"]): _random_value(rng, depth + 1)
        for _ in range(rng.randint(0, 4))
    }


def _random_body(rng: random.Random, model: Any) -> dict[str, Any]:
    """A map over the model's own field names (and sometimes an extra one) with random values."""
    names = list(model.model_fields)
    body = {n: _random_value(rng) for n in rng.sample(names, rng.randint(0, len(names)))}
    if rng.random() < 0.1:
        body["unexpected"] = 1
    return body


def _mutate(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    frames = list(frames)
    op = rng.randrange(7)
    if op == 0 and frames:  # truncate a frame
        i = rng.randrange(len(frames))
        frames[i] = frames[i][: rng.randint(0, max(0, len(frames[i]) - 1))]
    elif op == 1 and frames:  # flip bits
        i = rng.randrange(len(frames))
        if frames[i]:
            b = bytearray(frames[i])
            for _ in range(rng.randint(1, 4)):
                j = rng.randrange(len(b))
                b[j] ^= 1 << rng.randrange(8)
            frames[i] = bytes(b)
    elif op == 2:  # extra frames
        frames.extend(rng.randbytes(rng.randint(0, 8)) for _ in range(rng.randint(1, 20)))
    elif op == 3 and frames:  # drop a frame
        frames.pop(rng.randrange(len(frames)))
    elif op == 4 and len(frames) >= 3:  # overwrite bytes of the body
        b = bytearray(frames[2])
        if b:
            for _ in range(rng.randint(1, 6)):
                b[rng.randrange(len(b))] = rng.randrange(256)
        frames[2] = bytes(b)
    elif op == 5 and len(frames) >= 3:  # a random msgpack body for some command
        cmd = rng.choice(list(Command))
        frames[1] = bytes([cmd])
        frames[2] = msgpack.packb(_random_body(rng, MODELS[cmd]), use_bin_type=True)
    elif op == 6 and frames:  # shuffle
        rng.shuffle(frames)
    return frames


def _random_frames(rng: random.Random) -> list[bytes]:
    r = rng.random()
    if r < 0.15:
        return [rng.randbytes(rng.randint(0, 40)) for _ in range(rng.randint(0, 22))]
    if r < 0.3:
        return [HEADER, bytes([rng.randrange(256)]), rng.randbytes(rng.randint(0, 64))]
    if r < 0.5:
        cmd = rng.choice(list(Command))
        return [HEADER, bytes([cmd]), msgpack.packb(_random_body(rng, MODELS[cmd]), use_bin_type=True)]
    base = encode(rng.choice(SAMPLES), [rng.randbytes(3)] * rng.randint(0, 3))
    for _ in range(rng.randint(1, 3)):
        base = _mutate(rng, base)
    return base


SAMPLES = samples()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fuzz_only_protocol_errors(seed: int) -> None:
    rng = random.Random(seed)
    outcomes = {"ok": 0, "error": 0}
    kinds: set[type] = set()
    for i in range(1500):
        frames = _random_frames(rng)
        max_bytes = rng.choice([codec.DEFAULT_MAX_MESSAGE_BYTES] * 9 + [64])
        try:
            result = decode(frames, max_bytes=max_bytes)
        except ProtocolError as exc:
            outcomes["error"] += 1
            kinds.add(type(exc))
            assert exc.message
        except Exception as exc:  # anything else is a bug in the codec
            pytest.fail(f"iteration {i}: {type(exc).__name__}: {exc!r} for frames {frames!r}")
        else:
            outcomes["ok"] += 1
            assert result.message.COMMAND is result.command
            assert len(result.attachments) <= MAX_ATTACHMENTS
    assert outcomes["ok"] > 20 and outcomes["error"] > 1000
    assert {DecodeError, InvalidBodyError, UnknownCommandError, OversizeError} <= kinds


def test_deeply_nested_body_is_a_protocol_error_not_a_crash() -> None:
    # build the msgpack by hand (msgpack.packb would itself refuse this depth)
    body = b"\x81" + msgpack.packb("args") + b"\x91" * 5000 + msgpack.packb("x")
    frames = [HEADER, bytes([Command.REQUEST]), body]
    with pytest.raises(ProtocolError):
        decode(frames)


def test_decode_errors_are_casper_errors_with_codes() -> None:
    for frames in ([], [b"x", b"y", b"z"], [SIGNATURE + b"\x09", b"\x01", b""], [HEADER, b"", b""]):
        with pytest.raises(ProtocolError) as info:
            decode(frames)
        assert isinstance(info.value, CasperError)
        assert info.value.code in {"decode", "version", "unknown-command", "invalid-body", "oversize"}


# --- UUIDv7 -------------------------------------------------------------------------------------
def test_new_task_id_is_a_uuid7() -> None:
    for _ in range(200):
        u = new_task_id()
        assert u.version == 7
        assert u.variant == uuid.RFC_4122
        assert (u.int >> 76) & 0xF == 7
        assert (u.int >> 62) & 0x3 == 0b10
        assert str(u)[14] == "7"


def test_new_task_id_is_an_ordinary_uuid() -> None:
    """Made without uuid.UUID's constructor: equal to what it makes, in every respect."""
    for _ in range(1000):  # more than one batch of buffered randomness
        u = new_task_id()
        v = uuid.UUID(int=u.int)
        assert type(u) is uuid.UUID and u == v and hash(u) == hash(v) and str(u) == str(v)
        assert u.is_safe is v.is_safe and u.version == 7 and u.variant == uuid.RFC_4122
        assert pickle.loads(pickle.dumps(u)) == u and copy.copy(u) == u
        assert abs(task_created_at(u) - time.time()) < 5


def test_a_forked_child_draws_its_own_task_id_randomness() -> None:
    new_task_id()  # the parent has buffered randomness left
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next id's random bits, to the parent
        os.write(write, new_task_id().bytes)
        os._exit(0)
    os.close(write)
    child = uuid.UUID(bytes=os.read(read, 16))
    os.close(read)
    os.waitpid(pid, 0)
    mine = new_task_id()
    assert child.int & ((1 << 74) - 1) != mine.int & ((1 << 74) - 1)


def test_new_task_ids_are_unique_and_random() -> None:
    ids = [new_task_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    # the random part differs even within one millisecond
    assert len({u.int & ((1 << 62) - 1) for u in ids}) == len(ids)


def test_new_task_ids_sort_by_time() -> None:
    batches = []
    for _ in range(4):
        batches.append([new_task_id() for _ in range(20)])
        time.sleep(0.003)
    for earlier, later in itertools.pairwise(batches):
        assert max(earlier) < min(later)
        assert max(task_created_at(u) for u in earlier) < min(task_created_at(u) for u in later)
    flat = [u for b in batches for u in b]
    stamps = [task_created_at(u) for u in flat]
    assert stamps == sorted(stamps)


def test_task_created_at_is_now() -> None:
    before = time.time_ns() // 1_000_000
    u = new_task_id()
    after = time.time_ns() // 1_000_000
    created = task_created_at(u)
    assert before <= round(created * 1000) <= after
    assert abs(created - time.time()) < 1.0


def test_task_created_at_of_a_known_id() -> None:
    # 0x01890a5dac96 ms = 1688140000406 ms
    assert task_created_at(U1) == pytest.approx(0x01890A5DAC96 / 1000.0)


# --- trusted fast paths give the same bytes as the models -----------------------------------------
def test_fast_path_bodies_encode_like_their_models() -> None:
    import uuid as _uuid

    from casperd import codec as _codec
    from casperd import messages as m

    tid = _uuid.UUID("01890a5d-ac96-774b-bcce-b302099a8057")
    a = dict(task_id=tid, type="echo", input={"k": [1, "x"]}, attempt=2, lease_ms=30000, timeout_s=None, cache=True)
    assert _codec.encode_raw(m.Command.TASK, {"tasks": [m.assignment_body(**a)]}) == _codec.encode(
        m.TaskBatch(tasks=(m.Assignment(**a),))
    )
    o = dict(task_id=tid, attempt=1, output={"ok": True}, duration_ms=1.5)
    assert _codec.encode_raw(m.Command.RESULT, {"results": [m.outcome_body(**o)]}) == _codec.encode(
        m.ResultBatch(results=(m.Outcome(**o),))
    )
    err = {"code": "validation", "message": "exit code 1, expected 0", "hint": None}
    assert _codec.encode_raw(m.Command.DONE, {"done": [m.done_item(tid, "dead", None, err)]}) == _codec.encode(
        m.DoneBatch(done=(m.Done(task_id=tid, status="dead", output=None, error=m.ErrorBody(**err)),))
    )
    # and they decode back to the validated models
    assert _codec.decode(
        _codec.encode_raw(m.Command.RESULT, {"results": [m.outcome_body(**o)]})
    ).message == m.ResultBatch(results=(m.Outcome(**o),))


def test_encode_batches_splits_by_count_and_size() -> None:
    from casperd import codec as _codec
    from casperd.messages import Command

    items = [{"task_id": i, "blob": "x" * 1000} for i in range(50)]
    msgs, too_big = _codec.encode_batches(Command.RESULT, "results", items, max_bytes=8_000, max_items=20)
    assert not too_big
    assert sorted(i["task_id"] for _, chunk in msgs for i in chunk) == list(range(50))
    assert all(sum(map(len, frames)) <= 8_000 and len(chunk) <= 20 for frames, chunk in msgs)
    msgs, too_big = _codec.encode_batches(Command.RESULT, "results", [{"blob": "y" * 9000}], max_bytes=8_000)
    assert msgs == [] and len(too_big) == 1
