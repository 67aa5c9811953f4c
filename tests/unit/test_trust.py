"""The pure parts of trust: the enrollment file, the role table, quotas, the llm-permit clamp."""

from __future__ import annotations

import math
import stat
from pathlib import Path

import pytest
import zmq

from casperd import authz
from casperd.agents.police import _clamp_observation
from casperd.enrollment import Enrollment, parse
from casperd.errors import ConfigError, ForbiddenError, IdentityError, InvalidBodyError, OverloadedError
from casperd.messages import Command, Heartbeat, Ready, Request, Role
from casperd.quotas import Limits, Quotas, retry_after


def key() -> str:
    return zmq.curve_keypair()[0].decode()


def ready(node_id: str, role: str = "developer") -> Ready:
    return Ready(node_id=node_id, epoch="e1", role=Role(role), endpoint="tcp://x:1", pid=1, host="h", capacity=1)


def test_enrollment_file_round_trip_patterns_and_mode(tmp_path: Path) -> None:
    path = tmp_path / "authorized_keys"
    book = Enrollment(path)
    k1, k2 = key(), key()
    book.add(k1, "developer-*", "developer")
    book.add(k2, "tester", "tester")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = Enrollment(path)
    e1 = again.lookup(k1)
    assert e1 is not None and e1.admits("developer-7", "developer")
    assert not e1.admits("developer-7", "tester") and not e1.admits("policeman", "developer")
    assert not e1.admits("developer", "developer")  # the pattern needs the dash
    assert [e.key for e in again.revoke("developer-*")] == [k1]
    assert Enrollment(path).lookup(k1) is None and Enrollment(path).lookup(k2) is not None


def test_enrollment_parse_refuses_bad_lines_and_skips_comments() -> None:
    k = key()
    assert list(parse(f"# a comment\n\n{k} developer-1 developer\n")) == [k]
    for bad in (f"{k} developer-1", f"{k} developer-1 admin", f"{',' * 40} d developer", f"{k} a/b developer"):
        with pytest.raises(ConfigError):
            parse(bad)


def test_enrollment_picks_up_a_changed_file(tmp_path: Path) -> None:
    path = tmp_path / "ak"
    path.write_text("")
    book = Enrollment(path)
    k = key()
    path.write_text(f"{k} developer-1 developer\n")
    book.refresh(force=True)
    assert book.lookup(k) is not None


def test_admit_binds_identity_to_the_key() -> None:
    k = key()
    entry = parse(f"{k} developer-* developer")[k]
    assert authz.admit(ready("developer-2"), enforced=True, entry=entry, key=k, peer_role=None, peer_key=None) == (
        "developer"
    )
    with pytest.raises(IdentityError):
        authz.admit(ready("tester"), enforced=True, entry=entry, key=k, peer_role=None, peer_key=None)
    with pytest.raises(IdentityError):
        authz.admit(ready("developer-2", "tester"), enforced=True, entry=entry, key=k, peer_role=None, peer_key=None)
    with pytest.raises(ForbiddenError):  # revoked / unknown
        authz.admit(Heartbeat(), enforced=True, entry=None, key=k, peer_role="developer", peer_key=k)
    with pytest.raises(IdentityError):  # a frame on a route another key registered
        authz.admit(Heartbeat(), enforced=True, entry=entry, key=k, peer_role="developer", peer_key=key())
    # an unregistered sender of something other than READY: no role yet (answered unknown-peer)
    assert authz.admit(Heartbeat(), enforced=True, entry=entry, key=k, peer_role=None, peer_key=None) is None


def test_role_table() -> None:
    authz.authorize("developer", Command.RESULT)
    authz.authorize("tester", Command.REQUEST, service="llm-permit")
    for role, cmd, service in (
        ("developer", Command.SUBMIT, None),
        ("policeman", Command.READY, None),
        ("tester", Command.REQUEST, "turns-save"),
        ("developer", Command.REQUEST, "no-such-op"),
        (None, Command.HEARTBEAT, None),
    ):
        with pytest.raises(ForbiddenError):
            authz.authorize(role, cmd, service=service)
    req = Request(req_id=1, op="turns-load", args={})
    with pytest.raises(ForbiddenError):
        authz.admit(req, enforced=False, entry=None, key=None, peer_role="tester", peer_key=None)


def test_task_type_policy_and_handoff_rules() -> None:
    for t in ("shell", "code", "job", "echo"):
        authz.may_create("control", t)
        authz.may_create("policeman", t)
        for peer in ("developer", "tester", None):
            with pytest.raises(ForbiddenError):
                authz.may_create(peer, t)
    authz.check_handoff("developer", "test", hold=False, sender_role=None)
    authz.check_handoff("tester", "test", hold=True, sender_role="developer")
    authz.check_handoff("tester", "test", hold=False, sender_role="developer")
    for role, t, hold, sender in (
        ("developer", "shell", False, None),
        ("developer", "test", True, None),
        ("tester", "test", True, None),
        ("tester", "test", True, "tester"),
    ):
        with pytest.raises(ForbiddenError):
            authz.check_handoff(role, t, hold=hold, sender_role=sender)


def test_job_limits() -> None:
    authz.check_job_limits({"max_parallel": 4, "budget_usd": 2.5})
    authz.check_job_limits({})
    for bad in ({"max_parallel": 65}, {"max_parallel": True}, {"budget_usd": -1}, {"budget_usd": math.inf}):
        with pytest.raises(InvalidBodyError):
            authz.check_job_limits(bad)


def test_quotas() -> None:
    q = Quotas(Limits(open_tasks=10, open_per_submitter=2, peer_rate_per_s=1.0, peer_burst=2))
    q.check_open("a", 2, 0)
    q.opened("a")
    q.opened("a")
    with pytest.raises(OverloadedError) as info:
        q.check_open("a", 1, 2)
    assert retry_after(info.value.hint) == 5.0
    q.check_open("b", 1, 2)
    with pytest.raises(OverloadedError):
        q.check_open("b", 9, 2)  # mesh-wide
    q.closed("a")
    q.check_open("a", 1, 1)
    q.take("p", 0.0)
    q.take("p", 0.0)
    with pytest.raises(OverloadedError) as info:
        q.take("p", 0.0)
    assert retry_after(info.value.hint) == 1.0
    q.take("p", 1.0)  # refilled at 1 a second
    with pytest.raises(InvalidBodyError):
        q.check_bytes("a saved turn", 11, 10)


def test_llm_permit_observation_clamp() -> None:
    out = _clamp_observation({"status": 429, "retry_after_s": 1e9, "tokens_reset_s": float("nan")})
    assert out["retry_after_s"] == 300.0 and out["tokens_reset_s"] is None
    out = _clamp_observation({"status": "429", "requests_remaining": -5, "requests_limit": "x"})
    assert out["status"] == 0 and out["requests_remaining"] is None and out["requests_limit"] is None
