"""The wire codec: CASPER messages to ZeroMQ frames and back, with no I/O.

A CASPER message is a list of frames (after any ROUTER envelope)::

    [ b"CASP" + version ] [ command (1 byte) ] [ msgpack body (a map) ] [ attachment ]*

``encode`` turns a message model (and optional binary attachments) into frames. ``decode``
validates everything a peer sent — frame count, signature, version, command, total size, msgpack,
every field — and raises a :class:`~casperd.errors.ProtocolError` subclass naming what was wrong.
It never raises anything else, whatever the bytes. UUIDs travel as 16-byte msgpack bin.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
from pydantic import ValidationError

from casperd.errors import (
    DecodeError,
    InvalidBodyError,
    OversizeError,
    UnknownCommandError,
    VersionError,
)
from casperd.messages import MODELS, PROTOCOL_VERSION, SIGNATURE, STORABLE, Command, Message

HEADER = SIGNATURE + bytes([PROTOCOL_VERSION])
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
MAX_ATTACHMENTS = 16
_COMMAND_FRAMES = {c: bytes([c]) for c in Command}


@dataclass(frozen=True, slots=True)
class Decoded:
    """A decoded message: the validated body plus any binary attachments."""

    message: Message
    attachments: tuple[bytes, ...] = field(default=())

    @property
    def command(self) -> Command:
        return self.message.COMMAND


def _pack_default(obj: Any) -> Any:
    if isinstance(obj, uuid.UUID):
        return obj.bytes
    if isinstance(obj, tuple | set | frozenset):
        return list(obj)
    raise TypeError(f"cannot encode {type(obj).__name__}")


_packer_opts = {"use_bin_type": True, "default": _pack_default}


def pack_body(body: dict[str, Any]) -> bytes:
    """msgpack-encode a body map (UUIDs as bin 16)."""
    return msgpack.packb(body, **_packer_opts)  # type: ignore[no-any-return]  # msgpack ships no types


def encode(message: Message, attachments: Sequence[bytes] = ()) -> list[bytes]:
    """Frames for ``message``; deterministic, so the golden vectors can pin the bytes."""
    body = pack_body(message.model_dump(mode="python"))
    return [HEADER, _COMMAND_FRAMES[message.COMMAND], body, *attachments]


def encode_raw(command: Command, body: dict[str, Any], attachments: Sequence[bytes] = ()) -> list[bytes]:
    """Frames for a body built by a trusted fast-path builder (messages.*_body), no model."""
    return [HEADER, _COMMAND_FRAMES[command], pack_body(body), *attachments]


def encode_batches(
    command: Command, key: str, items: list[Any], max_bytes: int, max_items: int = 1000
) -> tuple[list[tuple[list[bytes], list[Any]]], list[Any]]:
    """Split a batch command (TASK, RESULT, ...) into messages of at most ``max_items`` items and
    ``max_bytes`` bytes each. Returns (messages with the items each carries, items that do not
    fit in a message even alone)."""
    out: list[tuple[list[bytes], list[Any]]] = []
    too_big: list[Any] = []
    pending = [items[i : i + max_items] for i in range(0, len(items), max_items)]
    while pending:
        chunk = pending.pop()
        frames = encode_raw(command, {key: chunk})
        if sum(map(len, frames)) <= max_bytes:
            out.append((frames, chunk))
        elif len(chunk) > 1:
            half = len(chunk) // 2
            pending += [chunk[:half], chunk[half:]]
        else:
            too_big.append(chunk[0])
    return out, too_big


def decode(frames: Sequence[bytes], *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Decoded:
    """Validate and decode the frames of one message (envelope already removed).

    Raises:
        DecodeError: too few frames, bad signature, or a body that is not a msgpack map.
        VersionError: a protocol version this node does not speak.
        UnknownCommandError: a command code not in the spec.
        OversizeError: the message is larger than ``max_bytes``.
        InvalidBodyError: the body fails validation for its command.
    """
    total = 0
    for f in frames:
        total += len(f)
    if total > max_bytes:
        raise OversizeError(
            f"message of {total} bytes exceeds the limit of {max_bytes} bytes",
            hint="split the work into smaller messages or raise max_message_bytes on both sides",
        )
    if len(frames) < 3:
        raise DecodeError(f"a CASPER message has at least 3 frames, got {len(frames)}")
    head = frames[0]
    if len(head) != 5 or head[:4] != SIGNATURE:
        raise DecodeError("first frame is not a CASPER signature", hint="is the sender a CASPER peer?")
    if head[4] != PROTOCOL_VERSION:
        raise VersionError(
            f"protocol version {head[4]} is not supported (this node speaks {PROTOCOL_VERSION})",
            hint="run the same casperd version on every node",
        )
    cmd_frame = frames[1]
    try:
        if len(cmd_frame) != 1:
            raise ValueError
        command = Command(cmd_frame[0])
    except ValueError:
        raise UnknownCommandError(f"unknown command {cmd_frame[:4].hex() or '(empty)'}") from None
    if len(frames) - 3 > MAX_ATTACHMENTS:
        raise DecodeError(f"too many attachments: {len(frames) - 3} (max {MAX_ATTACHMENTS})")
    try:
        body = msgpack.unpackb(frames[2], raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises many types on garbage; all mean the same here
        raise DecodeError(f"body of {command.name} is not valid msgpack ({type(exc).__name__})") from None
    if not isinstance(body, dict):
        raise DecodeError(f"body of {command.name} must be a map, got {type(body).__name__}")
    model = MODELS[command]
    try:
        message = model.model_validate(body)
    except ValidationError as exc:
        raise InvalidBodyError(f"invalid {command.name} body: {describe_validation(exc)}") from None
    except Exception as exc:  # defensive: a validator must never crash the loop
        raise InvalidBodyError(f"invalid {command.name} body ({type(exc).__name__})") from None
    return Decoded(message, tuple(frames[3:]))


def describe_validation(exc: ValidationError, limit: int = 3) -> str:
    """Field paths and reasons only: never echo the offending values (they may be secrets)."""
    parts = []
    for err in exc.errors(include_input=False, include_url=False)[:limit]:
        loc = ".".join(str(p) for p in err["loc"]) or "(body)"
        nul = err["type"] == "string_pattern_mismatch" and err.get("ctx", {}).get("pattern") == STORABLE
        parts.append(f"{loc}: {'contains a NUL character, which cannot be stored' if nul else err['msg']}")
    more = exc.error_count() - limit
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)
