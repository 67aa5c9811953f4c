#!/usr/bin/env python3
"""Generate the golden test vectors of the CASPER Mesh Protocol (see protocol/SPEC.md).

Run from anywhere::

    python protocol/generate_vectors.py          # (re)write protocol/vectors/
    python protocol/generate_vectors.py --check  # exit 1 if the files on disk differ

Every value is fixed (no clocks, no randomness), so the output is the same bytes on every run.
Three kinds of vector are written:

``vectors/NN_command[_variant].json``
    A canonical message. ``NN`` is the command code in decimal. ``body`` is the message body as
    JSON, with UUIDs written ``{"$uuid": "..."}`` and byte strings ``{"$hex": "..."}``;
    ``frames_hex`` is every frame of the encoded message (envelope removed); ``attachments_hex``
    repeats the attachment frames (frames 4 and later). An encoder MUST produce ``frames_hex``
    byte for byte from ``body``; a decoder MUST turn ``frames_hex`` into ``body``. ``max_bytes``
    is the receive limit the vector is checked with.

``vectors/lenient/*.json``
    Non-canonical frames a receiver MUST accept (keys in another order, defaulted keys left out).
    ``body`` is what they decode to and ``canonical_frames_hex`` is how that body is encoded.

``vectors/invalid/*.json``
    Frames a receiver MUST reject, with the error code (``expected_code``) it reports.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from pathlib import Path
from typing import Any

import msgpack

ROOT = Path(__file__).resolve().parent
VECTORS = ROOT / "vectors"
sys.path.insert(0, str(ROOT.parent))

from casperd import codec  # noqa: E402
from casperd.messages import (  # noqa: E402
    MODELS,
    RENEW,
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
    Message,
    Outcome,
    Progress,
    Ready,
    Reply,
    Request,
    ResultBatch,
    Submit,
    TaskBatch,
    TaskSpec,
)

DEFAULT_MAX = codec.DEFAULT_MAX_MESSAGE_BYTES

# --- fixed values -----------------------------------------------------------------------------
T1 = uuid.UUID("01890a5d-ac96-774b-bcce-b302099a8057")
T2 = uuid.UUID("01890a5d-ac97-7c3e-8a41-5f0e2d9b61a4")
T3 = uuid.UUID("01890a5d-ac98-7f10-9d2c-0b7a4e3c1f82")
PARENT = uuid.UUID("01890a5d-ac90-7000-8000-000000000001")
EPOCH_DEV = "18b2f4c3a10.5e9a7c"
EPOCH_TESTER = "18b2f4c3b22.0c41d9"


# --- JSON representation of bodies ------------------------------------------------------------
def to_json(value: Any) -> Any:
    """A decoded/dumped body as plain JSON: UUID -> {"$uuid"}, bytes -> {"$hex"}, tuples -> lists."""
    if isinstance(value, uuid.UUID):
        return {"$uuid": str(value)}
    if isinstance(value, bytes | bytearray):
        return {"$hex": bytes(value).hex()}
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    if isinstance(value, str):
        return str(value)  # StrEnum members become plain strings
    if value is None or isinstance(value, bool | int | float):
        return value
    raise TypeError(f"no JSON form for {type(value).__name__}")


def from_json(value: Any) -> Any:
    """The inverse of :func:`to_json`."""
    if isinstance(value, dict):
        if set(value) == {"$uuid"}:
            return uuid.UUID(value["$uuid"])
        if set(value) == {"$hex"}:
            return bytes.fromhex(value["$hex"])
        return {k: from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json(v) for v in value]
    return value


def model_from_vector(vector: dict[str, Any]) -> Message:
    """Rebuild the message model a vector describes (used by the tests)."""
    return MODELS[Command[vector["command"]]].model_validate(from_json(vector["body"]))


# --- canonical vectors ------------------------------------------------------------------------
def _canonical() -> list[tuple[str, str, Message, tuple[bytes, ...], int]]:
    """(file stem, description, message, attachments, max_bytes)."""
    full_spec = TaskSpec(
        type="shell",
        input={"cmd": "pytest -q tests/unit", "expect_exit": 0, "env": {"CI": "1"}},
        priority=9,
        requires=("shell", "test"),
        affinity="repo:casper",
        idempotency_key="build-2024-001",
        max_attempts=5,
        timeout_s=120.0,
        parent_id=PARENT,
        cache=True,
    )
    shell_output = {
        "exit_code": 0,
        "stdout": "42 passed\n",
        "stderr": "",
        "stdout_truncated": False,
        "stderr_truncated": False,
        "duration_s": 1.2345,
    }
    v: list[tuple[str, str, Message, tuple[bytes, ...], int]] = [
        (
            "01_ready",
            "A developer registers with the policeman (routing id developer-1/" + EPOCH_DEV + "), "
            "with the Curve public key of its own mesh ROUTER (the CurveZMQ RFC's example client key).",
            Ready(
                node_id="developer-1",
                epoch=EPOCH_DEV,
                role="developer",
                endpoint="tcp://172.20.0.11:5555",
                pid=4242,
                host="developer-1",
                capabilities=("code", "llm", "shell"),
                capacity=4,
                tasks=(),
                heartbeat_ms=1000,
                version="0.1.0",
                public_key="Yne@$w-vo<fVvi]a<NY6T1ed:M$fCG*[IaLV{hID",
            ),
            (),
            DEFAULT_MAX,
        ),
        (
            "01_ready_holding",
            "A tester registers again (after ERROR unknown-peer) while holding two tasks; "
            "draining, so it advertises capacity 0.",
            Ready(
                node_id="tester-1",
                epoch=EPOCH_TESTER,
                role="tester",
                endpoint="tcp://172.20.0.13:5555",
                pid=77,
                host="tester",
                capabilities=("test", "shell", "gpu"),
                capacity=0,
                tasks=(T1, T2),
                heartbeat_ms=250,
                version="0.1.0.dev3",
            ),
            (),
            DEFAULT_MAX,
        ),
        ("02_heartbeat", "The broker's heartbeat (every field at its default).", Heartbeat(), (), DEFAULT_MAX),
        (
            "02_heartbeat_draining",
            "A worker's heartbeat: 3 tasks running, draining.",
            Heartbeat(load=3, draining=True),
            (),
            DEFAULT_MAX,
        ),
        (
            "02_heartbeat_stats",
            "A worker's heartbeat with its process CPU (percent of one core) and resident memory.",
            Heartbeat(load=1, draining=False, cpu_pct=12.5, rss_bytes=73400320),
            (),
            DEFAULT_MAX,
        ),
        (
            "03_submit",
            "caspectl submits one task; defaults written out in full.",
            Submit(req_id=1, tasks=(TaskSpec(type="echo", input={"text": "hello"}),)),
            (),
            DEFAULT_MAX,
        ),
        (
            "03_submit_full",
            "A SUBMIT with every TaskSpec field set, plus a second task, waiting for DONE.",
            Submit(req_id=7, tasks=(full_spec, TaskSpec(type="noop", priority=0)), wait=True),
            (),
            DEFAULT_MAX,
        ),
        (
            "04_accepted",
            "The answer to 03_submit_full: the first task is new, the second already existed (idempotency).",
            Accepted(req_id=7, task_ids=(T1, T2), existing=(False, True)),
            (),
            DEFAULT_MAX,
        ),
        (
            "05_task",
            "Two assignments in one TASK message.",
            TaskBatch(
                tasks=(
                    Assignment(
                        task_id=T1,
                        type="shell",
                        input={"cmd": "pytest -q tests/unit", "expect_exit": 0},
                        attempt=1,
                        lease_ms=30000,
                        timeout_s=120.0,
                        cache=True,
                    ),
                    Assignment(
                        task_id=T3,
                        type="echo",
                        input={"n": -17, "ratio": 0.5, "tags": ["a", "b"], "none": None},
                        attempt=2,
                        lease_ms=30000,
                    ),
                )
            ),
            (),
            DEFAULT_MAX,
        ),
        (
            "06_progress",
            "A worker reports that two tasks started running (took an execution slot).",
            Progress(task_ids=(T1, T3)),
            (),
            DEFAULT_MAX,
        ),
        (
            "06_progress_note",
            "PROGRESS with a note (UTF-8 text).",
            Progress(task_ids=(T1,), note="compiling \u2026 \u2713 na\u00efve"),
            (),
            DEFAULT_MAX,
        ),
        (
            "06_progress_renew",
            "A lease renewal: PROGRESS whose note is 'renew' lists every task the worker "
            "holds; it extends their leases and changes no task's status.",
            Progress(task_ids=(T1, T2, T3), note=RENEW),
            (),
            DEFAULT_MAX,
        ),
        (
            "07_result",
            "One finished task with a shell handler's output.",
            ResultBatch(results=(Outcome(task_id=T1, attempt=1, output=shell_output, duration_ms=1234.5),)),
            (),
            DEFAULT_MAX,
        ),
        (
            "07_result_attachments",
            "RESULT followed by two binary attachment frames (carried, not interpreted).",
            ResultBatch(results=(Outcome(task_id=T3, attempt=2, output={"files": 2}, duration_ms=0.25),)),
            (bytes([0x00, 0x01, 0x02, 0xFF]), b"log line\n"),
            DEFAULT_MAX,
        ),
        (
            "07_result_max_attachments",
            "RESULT with the largest number of attachments a receiver accepts (16).",
            ResultBatch(results=(Outcome(task_id=T1, attempt=1),)),
            tuple(bytes([i]) for i in range(16)),
            DEFAULT_MAX,
        ),
        (
            "07_result_binary_output",
            "An output holding a msgpack bin value: valid on the wire, but the "
            "policeman stores outputs as JSON and fails such a task with 'invalid-output'.",
            ResultBatch(results=(Outcome(task_id=T2, attempt=1, output={"digest": bytes.fromhex("deadbeef")}),)),
            (),
            DEFAULT_MAX,
        ),
        (
            "08_failed",
            "Two failures: a retryable timeout and a non-retryable unknown task type.",
            FailedBatch(
                failures=(
                    Failure(
                        task_id=T2,
                        attempt=2,
                        error=ErrorBody(code="timeout", message="task timed out after 120s", hint="raise timeout_s"),
                    ),
                    Failure(
                        task_id=T3,
                        attempt=1,
                        retryable=False,
                        error=ErrorBody(code="unknown-task-type", message="unknown task type 'paint'"),
                    ),
                )
            ),
            (),
            DEFAULT_MAX,
        ),
        (
            "09_cancel",
            "The broker cancels a task an operator cancelled.",
            Cancel(task_ids=(T1,), reason="cancelled by operator"),
            (),
            DEFAULT_MAX,
        ),
        ("10_disconnect", "A worker leaves after draining.", Disconnect(reason="shutdown"), (), DEFAULT_MAX),
        (
            "10_disconnect_at_limit",
            "A message of exactly max_bytes (1024) bytes: accepted (the limit is inclusive; compare invalid/oversize).",
            Disconnect(reason="x" * 1007),
            (),
            1024,
        ),
        (
            "11_error",
            "The broker's answer to a frame from a peer it does not know; the peer sends READY again.",
            Error(code="unknown-peer", message="unknown peer: send READY first", hint="re-register"),
            (),
            DEFAULT_MAX,
        ),
        (
            "11_error_identity",
            "READY whose routing id is not NODE_ID/EPOCH (ref = READY's code).",
            Error(
                code="identity",
                message="READY claims node 'developer-1' but arrives from routing id b'intruder'",
                hint="a node's routing id must be NODE_ID/EPOCH",
                ref=1,
            ),
            (),
            DEFAULT_MAX,
        ),
        (
            "11_error_unknown_command",
            "The answer to a message with command code 0xFF.",
            Error(code="unknown-command", message="unknown command ff", ref=255),
            (),
            DEFAULT_MAX,
        ),
        ("12_request", "caspectl asks for the node's status.", Request(req_id=1, op="status"), (), DEFAULT_MAX),
        (
            "12_request_tasks",
            "REQUEST tasks with a status filter and a limit.",
            Request(req_id=2, op="tasks", args={"status": "dead", "limit": 20}),
            (),
            DEFAULT_MAX,
        ),
        (
            "12_request_cancel",
            "REQUEST cancel: the task id travels as text in args.",
            Request(req_id=3, op="cancel", args={"id": str(T1)}),
            (),
            DEFAULT_MAX,
        ),
        (
            "12_request_drain",
            "REQUEST drain of a peer (on the policeman).",
            Request(req_id=4, op="drain", args={"peer": "developer-1"}),
            (),
            DEFAULT_MAX,
        ),
        (
            "13_reply",
            "The REPLY to 12_request_drain.",
            Reply(req_id=4, ok=True, data={"peer": "developer-1", "draining": True, "inflight": 2}),
            (),
            DEFAULT_MAX,
        ),
        (
            "13_reply_error",
            "A failed REPLY (REQUEST cancel of a task that is not open).",
            Reply(
                req_id=3,
                ok=False,
                error=ErrorBody(
                    code="not-found",
                    message=f"task {T1} is not open (already finished, or no such task)",
                    hint="caspectl get ID shows its state",
                ),
            ),
            (),
            DEFAULT_MAX,
        ),
        (
            "14_done",
            "A waited-on task completed (one DONE carries every waited-on task a commit ended).",
            DoneBatch(done=(Done(task_id=T1, status="complete", output=shell_output),)),
            (),
            DEFAULT_MAX,
        ),
        (
            "14_done_dead",
            "A waited-on task is dead: its last error travels with it.",
            DoneBatch(
                done=(
                    Done(
                        task_id=T2, status="dead", error=ErrorBody(code="timeout", message="task timed out after 120s")
                    ),
                    Done(task_id=T3, status="cancelled"),
                )
            ),
            (),
            DEFAULT_MAX,
        ),
    ]
    return v


def _canonical_vector(
    stem: str, description: str, msg: Message, attachments: tuple[bytes, ...], max_bytes: int
) -> dict[str, Any]:
    frames = codec.encode(msg, attachments)
    # the vector must hold: decoding gives the same message back
    decoded = codec.decode(frames, max_bytes=max_bytes)
    assert decoded.message == msg and decoded.attachments == attachments, stem
    return {
        "command": msg.COMMAND.name,
        "code": int(msg.COMMAND),
        "description": description,
        "max_bytes": max_bytes,
        "body": to_json(msg.model_dump(mode="python")),
        "attachments_hex": [a.hex() for a in attachments],
        "frames_hex": [f.hex() for f in frames],
    }


# --- lenient vectors: non-canonical input a receiver MUST accept ------------------------------
def _pack(body: Any) -> bytes:
    return msgpack.packb(body, use_bin_type=True)


def _lenient() -> list[tuple[str, str, Command, list[bytes]]]:
    h = codec.HEADER
    return [
        (
            "heartbeat_empty_map",
            "HEARTBEAT with an empty map: every field takes its default.",
            Command.HEARTBEAT,
            [h, b"\x02", _pack({})],
        ),
        (
            "ready_defaults_omitted",
            "READY without capabilities, tasks, heartbeat_ms and version.",
            Command.READY,
            [
                h,
                b"\x01",
                _pack(
                    {
                        "node_id": "developer-2",
                        "epoch": EPOCH_DEV,
                        "role": "developer",
                        "endpoint": "tcp://172.20.0.12:5555",
                        "pid": 1,
                        "host": "developer-2",
                        "capacity": 2,
                    }
                ),
            ],
        ),
        (
            "cancel_keys_reordered",
            "CANCEL with its keys in the other order.",
            Command.CANCEL,
            [h, b"\x09", _pack({"reason": "not assigned to you", "task_ids": [T2.bytes]})],
        ),
        (
            "result_int_for_float",
            "duration_ms sent as an integer; it decodes to a float (encoded as float 64).",
            Command.RESULT,
            [h, b"\x07", _pack({"results": [{"task_id": T1.bytes, "attempt": 1, "output": None, "duration_ms": 7}]})],
        ),
    ]


def _lenient_vector(name: str, description: str, command: Command, frames: list[bytes]) -> dict[str, Any]:
    msg = codec.decode(frames).message
    assert msg.COMMAND is command, name
    canonical = codec.encode(msg)
    assert canonical != frames, name
    return {
        "command": command.name,
        "code": int(command),
        "description": description,
        "max_bytes": DEFAULT_MAX,
        "body": to_json(msg.model_dump(mode="python")),
        "frames_hex": [f.hex() for f in frames],
        "canonical_frames_hex": [f.hex() for f in canonical],
    }


# --- invalid vectors --------------------------------------------------------------------------
def _invalid() -> list[tuple[str, str, str, list[bytes], int]]:
    """(name, description, expected code, frames, max_bytes)."""
    h = codec.HEADER
    hb = _pack({"load": 1, "draining": False})
    ready = {
        "node_id": "developer-1",
        "epoch": EPOCH_DEV,
        "role": "developer",
        "endpoint": "tcp://172.20.0.11:5555",
        "pid": 4242,
        "host": "developer-1",
        "capacity": 4,
    }
    submit = {"req_id": 1, "tasks": [{"type": "echo", "input": {}}], "wait": False}
    big = codec.encode(Disconnect(reason="x" * 1008))  # 1025 bytes
    assert sum(map(len, big)) == 1025
    return [
        (
            "garbage_first_frame",
            "The first frame is not a CASPER signature (an HTTP request line).",
            "decode",
            [b"GET / HTTP/1.1\r\n", b"\x02", hb],
            DEFAULT_MAX,
        ),
        ("bad_signature", "Five bytes, but not 'CASP'.", "decode", [b"CASQ\x01", b"\x02", hb], DEFAULT_MAX),
        ("short_signature", "The signature without its version byte.", "decode", [b"CASP", b"\x02", hb], DEFAULT_MAX),
        (
            "empty_delimiter",
            "A REQ-style empty delimiter frame before the message.",
            "decode",
            [b"", h, b"\x02", hb],
            DEFAULT_MAX,
        ),
        ("version_2", "Protocol version 2.", "version", [b"CASP\x02", b"\x02", hb], DEFAULT_MAX),
        ("version_0", "Protocol version 0.", "version", [b"CASP\x00", b"\x02", hb], DEFAULT_MAX),
        (
            "version_before_command",
            "Version is checked before the command: version 2 with command 0xFF.",
            "version",
            [b"CASP\x02", b"\xff", hb],
            DEFAULT_MAX,
        ),
        ("command_ff", "Command 0xFF.", "unknown-command", [h, b"\xff", hb], DEFAULT_MAX),
        ("command_00", "Command 0x00 (reserved, never assigned).", "unknown-command", [h, b"\x00", hb], DEFAULT_MAX),
        (
            "command_0f",
            "Command 0x0F, one past the last assigned code.",
            "unknown-command",
            [h, b"\x0f", hb],
            DEFAULT_MAX,
        ),
        ("command_empty", "An empty command frame.", "unknown-command", [h, b"", hb], DEFAULT_MAX),
        ("command_two_bytes", "A command frame of two bytes.", "unknown-command", [h, b"\x02\x00", hb], DEFAULT_MAX),
        (
            "command_before_body",
            "The command is checked before the body: 0xFF with a body that is not msgpack.",
            "unknown-command",
            [h, b"\xff", b"\xc1"],
            DEFAULT_MAX,
        ),
        ("truncated_msgpack", "A HEARTBEAT body cut short.", "decode", [h, b"\x02", hb[:-3]], DEFAULT_MAX),
        ("invalid_msgpack_byte", "The never-used msgpack byte 0xC1.", "decode", [h, b"\x02", b"\xc1"], DEFAULT_MAX),
        ("trailing_bytes", "A valid map followed by an extra byte.", "decode", [h, b"\x02", hb + b"\x00"], DEFAULT_MAX),
        ("empty_body", "An empty body frame.", "decode", [h, b"\x02", b""], DEFAULT_MAX),
        ("body_not_a_map", "The body is an array.", "decode", [h, b"\x02", _pack([1, False])], DEFAULT_MAX),
        ("body_nil", "The body is nil.", "decode", [h, b"\x02", _pack(None)], DEFAULT_MAX),
        (
            "integer_map_key",
            "A map key that is an integer (inside a task's input).",
            "decode",
            [h, b"\x03", _pack({**submit, "tasks": [{"type": "echo", "input": {1: 2}}]})],
            DEFAULT_MAX,
        ),
        (
            "invalid_utf8",
            "A str whose bytes are not UTF-8.",
            "decode",
            [h, b"\x0a", b"\x81\xa6reason\xa2\xff\xfe"],
            DEFAULT_MAX,
        ),
        (
            "nesting_too_deep",
            "Arrays nested 2000 deep inside a task's input.",
            "decode",
            [
                h,
                b"\x03",
                b"\x83\xa6req_id\x01\xa5tasks\x91\x82\xa4type\xa4echo\xa5input\x81\xa1x"
                + b"\x91" * 2000
                + b"\xc0\xa4wait\xc2",
            ],
            DEFAULT_MAX,
        ),
        ("too_few_frames", "Signature and command, no body.", "decode", [h, b"\x02"], DEFAULT_MAX),
        ("no_frames", "Nothing after the envelope.", "decode", [], DEFAULT_MAX),
        (
            "too_many_attachments",
            "17 attachment frames (16 is the most).",
            "decode",
            [
                h,
                b"\x07",
                codec.encode(ResultBatch(results=(Outcome(task_id=T1, attempt=1),)))[2],
                *(bytes([i]) for i in range(17)),
            ],
            DEFAULT_MAX,
        ),
        (
            "wrong_field_type",
            "HEARTBEAT load is a string that is not a number.",
            "invalid-body",
            [h, b"\x02", _pack({"load": "many", "draining": False})],
            DEFAULT_MAX,
        ),
        (
            "wrong_field_type_list",
            "READY capacity is an array.",
            "invalid-body",
            [h, b"\x01", _pack({**ready, "capacity": [4]})],
            DEFAULT_MAX,
        ),
        (
            "missing_field",
            "READY without node_id.",
            "invalid-body",
            [h, b"\x01", _pack({k: v for k, v in ready.items() if k != "node_id"})],
            DEFAULT_MAX,
        ),
        (
            "unknown_field",
            "HEARTBEAT with a key the spec does not define.",
            "invalid-body",
            [h, b"\x02", _pack({"load": 1, "draining": False, "mood": "calm"})],
            DEFAULT_MAX,
        ),
        (
            "bad_name_pattern",
            "READY node_id containing '/'.",
            "invalid-body",
            [h, b"\x01", _pack({**ready, "node_id": "developer/1"})],
            DEFAULT_MAX,
        ),
        (
            "unknown_role",
            "READY with a role that does not exist.",
            "invalid-body",
            [h, b"\x01", _pack({**ready, "role": "admin"})],
            DEFAULT_MAX,
        ),
        (
            "priority_out_of_range",
            "A TaskSpec priority of 10 (0..9).",
            "invalid-body",
            [h, b"\x03", _pack({**submit, "tasks": [{"type": "echo", "priority": 10}]})],
            DEFAULT_MAX,
        ),
        (
            "text_with_nul",
            "A TaskSpec affinity holding a NUL character: text fields refuse what Postgres cannot store.",
            "invalid-body",
            [h, b"\x03", _pack({**submit, "tasks": [{"type": "echo", "affinity": "a\x00b"}]})],
            DEFAULT_MAX,
        ),
        (
            "reason_with_nul",
            "A DISCONNECT reason holding a NUL character.",
            "invalid-body",
            [h, b"\x0a", _pack({"reason": "bye\x00"})],
            DEFAULT_MAX,
        ),
        (
            "submit_no_tasks",
            "SUBMIT with an empty task list.",
            "invalid-body",
            [h, b"\x03", _pack({**submit, "tasks": []})],
            DEFAULT_MAX,
        ),
        (
            "uuid_wrong_length",
            "A task id of 15 bytes.",
            "invalid-body",
            [h, b"\x09", _pack({"task_ids": [T1.bytes[:15]], "reason": "x"})],
            DEFAULT_MAX,
        ),
        (
            "negative_req_id",
            "REQUEST with req_id -1.",
            "invalid-body",
            [h, b"\x0c", _pack({"req_id": -1, "op": "status", "args": {}})],
            DEFAULT_MAX,
        ),
        (
            "error_ref_out_of_range",
            "ERROR with ref 256 (a command code is one byte).",
            "invalid-body",
            [h, b"\x0b", _pack({"code": "decode", "message": "x", "hint": None, "ref": 256})],
            DEFAULT_MAX,
        ),
        ("oversize", "A well-formed DISCONNECT of 1025 bytes against a limit of 1024.", "oversize", big, 1024),
        (
            "oversize_before_everything",
            "Size is checked first: 1025 bytes of garbage against a limit of 1024.",
            "oversize",
            [b"\x00" * 1025],
            1024,
        ),
    ]


def build() -> dict[str, str]:
    """Every vector file: path relative to protocol/vectors/ -> exact file text."""
    out: dict[str, str] = {}

    def put(rel: str, obj: dict[str, Any]) -> None:
        assert rel not in out, rel
        out[rel] = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"

    for stem, description, msg, attachments, max_bytes in _canonical():
        assert stem.startswith(f"{int(msg.COMMAND):02d}_{msg.COMMAND.name.lower()}"), stem
        put(f"{stem}.json", _canonical_vector(stem, description, msg, attachments, max_bytes))
    for name, description, command, frames in _lenient():
        put(f"lenient/{name}.json", _lenient_vector(name, description, command, frames))
    for name, description, code, frames, max_bytes in _invalid():
        put(
            f"invalid/{name}.json",
            {
                "name": name,
                "description": description,
                "expected_code": code,
                "max_bytes": max_bytes,
                "frames_hex": [f.hex() for f in frames],
            },
        )
    return out


def existing() -> dict[str, str]:
    """The vector files on disk, in the same shape as :func:`build`."""
    return {p.relative_to(VECTORS).as_posix(): p.read_text(encoding="utf-8") for p in sorted(VECTORS.rglob("*.json"))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare with the files on disk; write nothing")
    args = parser.parse_args(argv)
    files = build()
    if args.check:
        on_disk = existing()
        if on_disk != files:
            stale = sorted(set(on_disk) ^ set(files) | {k for k in files if on_disk.get(k) != files[k]})
            print("vectors out of date: " + ", ".join(stale), file=sys.stderr)
            return 1
        print(f"{len(files)} vectors up to date")
        return 0
    for rel in set(existing()) - set(files):  # a vector that is no longer generated
        (VECTORS / rel).unlink()
    for rel, text in files.items():
        path = VECTORS / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
    print(f"wrote {len(files)} vectors to {VECTORS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
