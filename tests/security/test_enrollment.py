"""Enrollment and identity: who may join the mesh and who they may claim to be (SPEC 14.1)."""

from __future__ import annotations

from typing import Any

from casperd.ctl.main import main as caspectl
from casperd.messages import Error, Heartbeat, Reply, Submit, TaskSpec
from tests.security.conftest import enroll, policeman_peer, status, wait_for
from tests.security.peer import Peer, fresh_epoch, key_of


def test_an_unknown_key_is_refused_at_the_handshake_on_every_router(make_mesh: Any, peers: list[Peer]) -> None:
    """Issue #9: a fresh key pair nobody enrolled registered as `0evil` and received shell tasks."""
    mesh = make_mesh(developers=1, testers=0)
    evil = policeman_peer(mesh, b"0evil/e1")
    peers.append(evil)
    assert evil.handshake() == "refused"
    wait_for(lambda: status(mesh)["trust"]["handshakes_refused"] >= 1, 20, "the refusal counted")
    with mesh.client() as c:
        assert [p["node_id"] for p in c.request("peers")["peers"]] == ["developer-1"]
    # a developer's own ROUTER (whose key the directory hands out) refuses it too
    dev = mesh.nodes["developer-1"]
    direct = Peer(dev.bind, key_of(mesh.state_dir / "keys" / "developer-1.pub"), routing_id=b"0evil/h1")
    peers.append(direct)
    assert direct.handshake() == "refused"
    log = (mesh.state_dir / "logs" / "policeman.log").read_text()
    assert "refused a Curve handshake" in log and evil.public.decode() in log


def test_an_enrolled_key_may_claim_only_its_own_id_and_role(make_mesh: Any, peers: list[Peer]) -> None:
    """Issue #9: a READY claiming developer-1 took over its task; one claiming policeman killed a job."""
    mesh = make_mesh(developers=1, testers=0)
    keys = enroll(mesh, "intruder", "developer")
    with mesh.client() as c:
        before = {p["node_id"]: p["epoch"] for p in c.request("peers")["peers"]}
    for node_id, role in (("developer-1", "developer"), ("policeman", "developer"), ("intruder", "tester")):
        epoch = fresh_epoch()
        p = policeman_peer(mesh, f"{node_id}/{epoch}".encode(), keys)
        peers.append(p)
        reply = p.ready(node_id, role, epoch=epoch)
        assert isinstance(reply, Error) and reply.code == "identity", (node_id, role, reply)
    # a key enrolled as policeman cannot register as a peer at all
    pol_keys = enroll(mesh, "policeman", "policeman")
    epoch = fresh_epoch()
    p = policeman_peer(mesh, f"policeman/{epoch}".encode(), pol_keys)
    peers.append(p)
    reply = p.ready("policeman", "policeman", epoch=epoch)
    assert isinstance(reply, Error) and reply.code == "forbidden"
    with mesh.client() as c:
        after = {p["node_id"]: p["epoch"] for p in c.request("peers")["peers"]}
    assert after == before  # developer-1 kept its registration (same epoch): nothing was taken over


def test_a_connection_cannot_speak_for_a_routing_id_another_key_registered(make_mesh: Any, peers: list[Peer]) -> None:
    """ROUTER_HANDOVER lets a connection take over a routing id; its frames still carry its own key."""
    mesh = make_mesh(developers=1, testers=0)
    keys = enroll(mesh, "intruder", "developer")
    with mesh.client() as c:
        epoch = next(p["epoch"] for p in c.request("peers")["peers"] if p["node_id"] == "developer-1")
    hijack = policeman_peer(mesh, f"developer-1/{epoch}".encode(), keys)
    peers.append(hijack)
    assert hijack.handshake() == "ok"
    hijack.send(Heartbeat(draining=True))
    msg, _ = hijack.recv_until(Error)
    assert msg.code == "identity"
    with mesh.client() as c:
        dev = next(p for p in c.request("peers")["peers"] if p["node_id"] == "developer-1")
    assert dev["draining"] is False


def test_no_mesh_peer_learns_another_nodes_routing_id(make_mesh: Any, peers: list[Peer]) -> None:
    """ROUTER_HANDOVER gives a routing id to whoever presents it: the id must stay unguessable."""
    mesh = make_mesh(developers=1, testers=0)
    epoch = fresh_epoch()
    spy = policeman_peer(mesh, f"spy-1/{epoch}".encode(), enroll(mesh, "spy-*", "developer"))
    peers.append(spy)
    assert isinstance(spy.ready("spy-1", "developer", epoch=epoch), Heartbeat)
    reply = spy.request("directory", {})
    assert isinstance(reply, Reply) and reply.ok, reply
    listed = {p["node_id"]: p for p in reply.data["peers"]}
    assert "developer-1" in listed
    with mesh.client() as c:
        real = next(p["epoch"] for p in c.request("peers")["peers"] if p["node_id"] == "developer-1")
    assert real not in repr(reply.data)  # the directory names nodes, never their epochs
    millis, _, nonce = real.partition(".")
    assert int(millis, 16) > 0 and len(nonce) == 32 and int(nonce, 16) >= 0  # 128 random bits


def test_the_role_table_refuses_commands_and_services(make_mesh: Any, peers: list[Peer]) -> None:
    mesh = make_mesh(developers=0, testers=0)
    epoch = fresh_epoch()
    tester = policeman_peer(mesh, f"tester-9/{epoch}".encode(), enroll(mesh, "tester-*", "tester"))
    peers.append(tester)
    assert isinstance(tester.ready("tester-9", "tester", epoch=epoch), Heartbeat)
    # SUBMIT is not a mesh command for any role
    tester.send(Submit(req_id=1, tasks=(TaskSpec(type="shell", input={"cmd": "id"}),)))
    msg, _ = tester.recv_until(Error)
    assert msg.code == "forbidden"
    # a service the role may not call, and one that does not exist, are answered as REPLY forbidden
    for op in ("turns-load", "no-such-service"):
        reply = tester.request(op, {"task_id": "00000000-0000-7000-8000-000000000000"})
        assert isinstance(reply, Reply) and not reply.ok and reply.error is not None
        assert reply.error.code == "forbidden", op
    forbidden = status(mesh)["trust"]["forbidden"]
    assert forbidden.get("SUBMIT") == 1 and forbidden.get("turns-load") == 1


def test_revoke_drops_the_peer_at_once_and_its_tasks_go_back_to_pending(make_mesh: Any, peers: list[Peer]) -> None:
    mesh = make_mesh(developers=0, testers=0)
    keys = enroll(mesh, "intruder", "developer")
    epoch = fresh_epoch()
    p = policeman_peer(mesh, f"intruder/{epoch}".encode(), keys)
    peers.append(p)
    assert isinstance(p.ready("intruder", epoch=epoch, capacity=1), Heartbeat)
    with mesh.client() as c:
        tid = c.submit_until_accepted([TaskSpec(type="echo", input={"x": 1})]).task_ids[0]
        wait_for(lambda: c.request("get", id=str(tid))["status"] == "assigned", 20, "the task assigned to intruder")
        out = c.request("keys-revoke", target=keys[0].decode())
        assert out["dropped"] == ["intruder"]
        wait_for(lambda: c.request("get", id=str(tid))["status"] == "pending", 20, "the task back to pending")
        assert "intruder" not in [x["node_id"] for x in c.request("peers")["peers"]]
    p.send(Heartbeat())  # the open connection: every further frame is refused
    msg, _ = p.recv_until(Error)
    assert msg.code == "forbidden"
    again = policeman_peer(mesh, f"intruder/{fresh_epoch()}".encode(), keys)
    peers.append(again)
    assert again.handshake() == "refused"
    # revoked by editing the file (as on a compose host): the policeman drops the peer within a second
    keys2 = enroll(mesh, "intruder-2", "developer")
    epoch = fresh_epoch()
    p2 = policeman_peer(mesh, f"intruder-2/{epoch}".encode(), keys2)
    peers.append(p2)
    assert isinstance(p2.ready("intruder-2", epoch=epoch, capacity=0), Heartbeat)
    assert caspectl(["keys", "revoke", "intruder-2", "--file", str(mesh.state_dir / "authorized_keys")]) == 0
    with mesh.client() as c:
        wait_for(lambda: "intruder-2" not in [x["node_id"] for x in c.request("peers")["peers"]], 20, "the drop")
