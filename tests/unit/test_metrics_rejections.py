"""metrics.Rejections: every rejected frame counted, each socket, sender and cause logged once."""

from __future__ import annotations

import logging

import pytest

from casperd.errors import IdentityError, ProtocolError
from casperd.messages import Error, ErrorBody
from casperd.metrics import Metrics


def test_every_frame_counted_each_sender_and_cause_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    m = Metrics()
    bad = ProtocolError("garbage")
    with caplog.at_level(logging.WARNING, logger="casperd.rejects"):
        for _ in range(50):
            m.rejections.record("mesh", b"probe", bad)
        m.rejections.record("control", b"probe", bad)  # another socket: its own line
        m.rejections.record("mesh", b"other", bad)  # another sender
        m.rejections.record("mesh", b"probe", IdentityError("not you"))  # another cause
    assert m.registry.get_sample_value("casper_rejected_frames_total", {"code": bad.code}) == 52
    assert m.registry.get_sample_value("casper_rejected_frames_total", {"code": IdentityError.code}) == 1
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4, lines
    assert lines[0] == f"rejected a frame from b'probe' on the mesh socket: [{bad.code}] garbage"


def test_errors_on_the_wire_are_cut_to_fit() -> None:
    exc = ProtocolError("x" * 5000, hint="fix it")
    body = ErrorBody.of(exc)
    assert (body.code, len(body.message), body.hint) == (exc.code, 4000, "fix it")
    msg = Error.of(exc, 7)
    assert (msg.code, len(msg.message), msg.hint, msg.ref) == (exc.code, 4000, "fix it", 7)
