"""Mesh services: holder checks, the task-type policy, llm-permit clamping, quotas and NUL input."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import pytest

from casperd.ctl.client import ControlClient
from casperd.errors import InvalidBodyError, OverloadedError
from casperd.messages import Error, Heartbeat, Reply, TaskBatch, TaskSpec
from casperd.quotas import retry_after
from tests.security.conftest import enroll, policeman_peer
from tests.security.peer import Peer, fresh_epoch, key_of
from tests.support.mesh import db_rows


def registered(mesh: Any, peers: list[Peer], node_id: str, role: str, pattern: str | None = None, **kw: Any) -> Peer:
    keys = enroll(mesh, pattern or node_id, role)
    epoch = fresh_epoch()
    p = policeman_peer(mesh, f"{node_id}/{epoch}".encode(), keys)
    peers.append(p)
    assert isinstance(p.ready(node_id, role, epoch=epoch, **kw), Heartbeat)
    return p


def refused(reply: Reply | Error, code: str = "forbidden") -> bool:
    if isinstance(reply, Error):
        return reply.code == code
    return not reply.ok and reply.error is not None and reply.error.code == code


def test_services_touch_only_tasks_the_sender_holds(make_mesh: Any, database_url: str, peers: list[Peer]) -> None:
    """Issue #9: turns-save/turns-load read and overwrote a task the peer never held; calls-save
    recorded a fake $12,345; turns-save stored 3.9 MB rows for invented task ids."""
    mesh = make_mesh(developers=0, testers=0, extra_env={"CASPER_MAX_TURN_BYTES": "4096"})
    intruder = registered(mesh, peers, "intruder", "developer", capacity=1)
    with mesh.client() as c:
        theirs = c.submit_until_accepted([TaskSpec(type="echo", input={"x": 1}, requires=("nobody-has-this",))])
    other = str(theirs.task_ids[0])
    invented = str(uuid.uuid4())
    fake_call = [{"model": "claude-opus-4", "input_tokens": 10**9, "output_tokens": 10**9, "cost_usd": 12345.0}]
    for tid in (other, invented):
        assert refused(intruder.request("turns-save", {"task_id": tid, "attempt": 1, "messages": ["x"], "usage": {}}))
        assert refused(intruder.request("turns-load", {"task_id": tid}))
        assert refused(intruder.request("calls-save", {"task_id": tid, "calls": fake_call}))
    assert db_rows(database_url, "SELECT count(*) FROM llm_calls")[0][0] == 0
    # a task it does hold: allowed, within the byte limit per saved turn
    with mesh.client() as c:
        mine = str(c.submit_until_accepted([TaskSpec(type="echo", input={"x": 2})]).task_ids[0])
    batch, _ = intruder.recv_until(TaskBatch)  # the policeman assigns it the task
    assert [str(a.task_id) for a in batch.tasks] == [mine]
    held = intruder.request("turns-save", {"task_id": mine, "attempt": 1, "messages": ["hello"], "usage": {}})
    assert isinstance(held, Reply) and held.ok, held
    big = intruder.request("turns-save", {"task_id": mine, "attempt": 1, "messages": ["x" * 8000], "usage": {}})
    assert refused(big, "invalid-body")


def test_handoff_record_creates_only_test_tasks_with_the_right_holder(make_mesh: Any, peers: list[Peer]) -> None:
    """Issue #9: handoff-record created a shell task (run on a developer) and a job with no budget."""
    mesh = make_mesh(developers=0, testers=0, extra_env={"CASPER_PEER_TASKS_PER_S": "0.5"})
    dev = registered(mesh, peers, "intruder", "developer", capacity=0)
    for spec in (
        {"type": "shell", "input": {"cmd": "cat /proc/$PPID/environ"}},
        {"type": "code", "input": {"goal": "x"}},
        {"type": "job", "input": {"goal": "x", "repo": "/", "max_parallel": 64}},
        {"type": "echo", "input": {}},
    ):
        assert refused(dev.request("handoff-record", {"spec": spec})), spec["type"]
        assert refused(dev.request("handoff-record", {"spec": spec, "hold": True})), spec["type"]
    assert refused(dev.request("handoff-record", {"spec": {"type": "test", "input": {}}, "hold": True}))
    ok = dev.request("handoff-record", {"spec": {"type": "test", "input": {}}})
    assert isinstance(ok, Reply) and ok.ok and ok.data["assigned"] is False
    # a tester may hold a test only when a registered developer handed it over
    tester = registered(mesh, peers, "tester-7", "tester", capacity=0)
    assert refused(tester.request("handoff-record", {"spec": {"type": "test"}, "hold": True, "from": "nobody"}))
    assert refused(tester.request("handoff-record", {"spec": {"type": "test"}, "hold": False}))
    assert refused(tester.request("handoff-record", {"spec": {"type": "test"}, "hold": True, "from": "tester-7"}))
    # tasks created per peer per second: a burst of 2 at 0.5/s, then overloaded with a retry-after
    second = dev.request("handoff-record", {"spec": {"type": "test", "input": {}}})
    assert isinstance(second, Reply) and second.ok
    third = dev.request("handoff-record", {"spec": {"type": "test", "input": {}}})
    assert refused(third, "overloaded") and isinstance(third, Reply) and third.error is not None
    assert retry_after(third.error.hint) is not None
    with mesh.client() as c:
        types = {t["type"] for t in c.request("tasks", limit=100)["tasks"]}
    assert types == {"test"}


def test_direct_handoff_on_a_developers_router_needs_a_developer_key(make_mesh: Any, peers: list[Peer]) -> None:
    """Issue #9: a developer's own ROUTER, whose key the directory hands out, ran a shell task."""
    mesh = make_mesh(developers=1, testers=0)
    dev = mesh.nodes["developer-1"]
    server = key_of(mesh.state_dir / "keys" / "developer-1.pub")
    from casperd.messages import Request

    def ask(keys: tuple[bytes, bytes], routing: bytes, spec: dict[str, Any]) -> Reply | Error:
        p = Peer(dev.bind, server, routing_id=routing, keypair=keys)
        peers.append(p)
        p.send(Request(req_id=1, op="handoff", args={"spec": spec}))
        msg, _ = p.recv_until((Reply, Error))
        return msg

    dev_keys = enroll(mesh, "intruder", "developer")
    assert refused(ask(dev_keys, b"intruder/handoff.1", {"type": "shell", "input": {"cmd": "id"}}))
    assert refused(ask(dev_keys, b"intruder/handoff.2", {"type": "code", "input": {}}))
    # a key may not speak for another node id, and a tester key may not hand off at all
    assert refused(ask(dev_keys, b"developer-2/handoff.3", {"type": "test", "input": {}}), "identity")
    tester_keys = enroll(mesh, "tester-5", "tester")
    assert refused(ask(tester_keys, b"tester-5/handoff.4", {"type": "test", "input": {}}), "identity")
    with mesh.client() as c:
        assert c.request("tasks", limit=10)["tasks"] == []


def test_llm_permit_observations_are_clamped(make_mesh: Any, peers: list[Peer]) -> None:
    """Issue #9: observe [{status: 429, retry_after_s: 1e9}] paused every Claude call until a restart."""
    mesh = make_mesh(developers=0, testers=0)
    p = registered(mesh, peers, "intruder", "developer", capacity=0)
    r = p.request("llm-permit", {"tokens": 0, "observe": [{"status": 429, "retry_after_s": 1e9}]})
    assert isinstance(r, Reply) and r.ok
    r = p.request("llm-permit", {"tokens": 1})
    assert isinstance(r, Reply) and r.ok and 0 < r.data["wait_s"] <= 300


def test_nul_in_text_is_refused_and_the_store_keeps_working(make_mesh: Any, peers: list[Peer]) -> None:
    """Issue #9: one NUL (affinity "a\\x00b" through handoff-record) wedged every group commit."""
    mesh = make_mesh(developers=1, testers=0)
    p = registered(mesh, peers, "intruder", "developer", capacity=0)
    bad = p.request("handoff-record", {"spec": {"type": "test", "input": {}, "affinity": "a\x00b"}})
    assert refused(bad, "invalid-body") and isinstance(bad, Reply) and bad.error is not None
    assert "NUL" in bad.error.message
    bad = p.request("handoff-record", {"spec": {"type": "test", "input": {"k": "v\x00"}}})
    assert refused(bad, "invalid-body")
    # the control socket: the whole SUBMIT is refused at decoding
    from casperd import codec
    from casperd.messages import Command

    frames = codec.encode_raw(Command.SUBMIT, {"req_id": 1, "tasks": [{"type": "echo", "affinity": "a\x00b"}]})
    with mesh.client() as c:
        c.sock.send_multipart(frames)
        with pytest.raises(InvalidBodyError):
            c._recv(time.monotonic() + 10)
        done = c.submit_until_accepted([TaskSpec(type="echo", input={"ok": True})], wait=True)
        assert done.task_ids
        assert c.request("health")["healthy"]


def test_open_task_quota_answers_overloaded_and_caspectl_waits(make_mesh: Any) -> None:
    """Issue #9: 50,000 queued tasks and no push-back."""
    mesh = make_mesh(developers=0, testers=0, extra_env={"CASPER_MAX_OPEN_PER_SUBMITTER": "3"})
    with mesh.client() as c:
        ids = c.submit_until_accepted([TaskSpec(type="echo", input={"n": i}) for i in range(3)]).task_ids
    with ControlClient(mesh.policeman.control, 10.0, overload_wait_s=0) as c, pytest.raises(OverloadedError) as info:
        c.submit_until_accepted([TaskSpec(type="echo", input={"n": 4})])
    assert retry_after(info.value.hint) is not None
    # a caspectl that waits: it submits again after the retry-after, and gets in once there is room
    result: dict[str, Any] = {}

    def submit() -> None:
        with ControlClient(mesh.policeman.control, 10.0, overload_wait_s=120) as c:
            result["ids"] = c.submit_until_accepted([TaskSpec(type="echo", input={"n": 5})]).task_ids

    t = threading.Thread(target=submit)
    t.start()
    with mesh.client() as c:
        c.request("cancel", id=str(ids[0]))
    t.join(150)
    assert len(result.get("ids", ())) == 1
