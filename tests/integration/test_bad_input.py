"""Hostile and malformed input on a real mesh: raw ZeroMQ clients that speak CASPER badly.

A raw DEALER (its own Curve key pair) talks to the policeman's mesh ROUTER, to a worker's mesh
ROUTER and to the control socket, and sends garbage, truncated or mistyped bodies, unknown
commands, oversize frames and READYs claiming another peer's identity. Each must be answered with
an ERROR naming the cause (or, above ZeroMQ's own MAXMSGSIZE, dropped with the connection),
logged once per peer and cause, and must leave the daemon serving and Postgres intact.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import zmq

from casperd import codec
from casperd.lifecycle import Status
from casperd.localmesh import LocalMesh
from casperd.messages import (
    Command,
    Disconnect,
    Done,
    Error,
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
from tests.support.mesh import db_rows, wait_for

MAX_BYTES = 64 * 1024  # the mesh under test runs with CASPER_MAX_MESSAGE_BYTES=65536
ZMQ_LIMIT = MAX_BYTES + 64 * 1024  # transport.py sets MAXMSGSIZE to max_message_bytes + 64 KiB
HEADER = codec.HEADER
NOT_SERVED = ("unsupported", "invalid-body", "command")  # a valid command sent where it is not served


def body(fields: Any) -> bytes:
    return codec.pack_body(fields)


def ready_fields(node_id: str = "probe", epoch: str = "1") -> dict[str, Any]:
    return Ready(
        node_id=node_id, epoch=epoch, role="developer", endpoint="tcp://127.0.0.1:1", pid=1, host="h", capacity=1
    ).model_dump(mode="python")


class Probe:
    """A raw DEALER: a Curve client (mesh; with ``keypair``, else a throwaway key pair the mesh
    refuses at the handshake) or plain (control, ipc)."""

    def __init__(
        self,
        ctx: zmq.Context[Any],
        endpoint: str,
        *,
        server_key: bytes | None = None,
        routing_id: bytes | None = None,
        keypair: tuple[bytes, bytes] | None = None,
    ) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if routing_id is not None:
            self.sock.setsockopt(zmq.ROUTING_ID, routing_id)
        if server_key is not None:
            public, secret = keypair or zmq.curve_keypair()
            self.sock.curve_publickey = public
            self.sock.curve_secretkey = secret
            self.sock.curve_serverkey = server_key
        self.sock.connect(endpoint)

    def send(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def recv(self, timeout: float = 10.0) -> Message | None:
        if not self.sock.poll(int(timeout * 1000)):
            return None
        return codec.decode(self.sock.recv_multipart(), max_bytes=64 * 1024 * 1024).message

    def expect_error(self, frames: list[bytes], code: str | tuple[str, ...], timeout: float = 10.0) -> Error:
        """Send ``frames``; the answer must be ERROR with ``code`` (or one of several)."""
        codes = (code,) if isinstance(code, str) else code
        self.send(frames)
        msg = self.recv(timeout)
        assert isinstance(msg, Error), f"expected ERROR {codes}, got {msg!r}"
        assert msg.code in codes, f"expected ERROR {codes}, got [{msg.code}] {msg.message}"
        assert msg.message
        return msg

    def close(self) -> None:
        self.sock.close(0)


class FakeWorker(Probe):
    """A registered peer that misbehaves: it heartbeats while it waits so the broker keeps it alive."""

    def next(self, want: type[Message], timeout: float = 10.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = self.recv(0.2)
            self.send(codec.encode(Heartbeat(load=0)))
            if msg is None or (isinstance(msg, Heartbeat) and want is not Heartbeat):
                continue
            assert isinstance(msg, want), f"expected {want.__name__}, got {msg!r}"
            return msg
        raise AssertionError(f"no {want.__name__} within {timeout:.0f}s")

    def expect_error(self, frames: list[bytes], code: str | tuple[str, ...], timeout: float = 10.0) -> Error:
        codes = (code,) if isinstance(code, str) else code
        self.send(frames)
        err: Error = self.next(Error, timeout)
        assert err.code in codes, f"expected ERROR {codes}, got [{err.code}] {err.message}"
        return err


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    cur = value
    for _ in range(depth):
        cur["a"] = {}
        cur = cur["a"]
    return value


@pytest.fixture
def zctx() -> Iterator[zmq.Context[Any]]:
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        yield ctx
    finally:
        ctx.destroy(linger=0)


def key(mesh: LocalMesh, name: str) -> bytes:
    return (mesh.state_dir / "keys" / f"{name}.pub").read_text().strip().encode()


def caspectl(mesh: LocalMesh, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASPER_")}
    proc = subprocess.run(
        [sys.executable, "-m", "casperd.ctl.main", "--control", mesh.policeman.control, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    return proc


def peer_names(mesh: LocalMesh) -> set[str]:
    with mesh.client() as c:
        return {p["node_id"] for p in c.request("peers")["peers"]}


def log_lines(mesh: LocalMesh, node: str, needle: str) -> list[str]:
    text = mesh.nodes[node].log_path.read_text(errors="replace")
    return [line for line in text.splitlines() if needle in line]


# (routing id suffix, frames, expected ERROR code)
GARBAGE: list[tuple[str, list[bytes], str]] = [
    ("garbage-1", [b"\xde\xad\xbe\xef not a casper message"], "decode"),
    ("garbage-n", [b"GET / HTTP/1.1\r\n", b"\x00\x01", b"\xff" * 100], "decode"),
    ("empty", [b""], "decode"),
    ("no-body", [HEADER, bytes([Command.HEARTBEAT])], "decode"),
    ("bad-signature", [b"CASQ\x01", bytes([Command.HEARTBEAT]), body({})], "decode"),
    ("truncated", [HEADER, bytes([Command.HEARTBEAT]), body({"load": 1, "draining": False})[:-3]], "decode"),
    ("version", [b"CASP\x02", bytes([Command.HEARTBEAT]), body({})], "version"),
    ("version-0", [b"CASP\x00", bytes([Command.HEARTBEAT]), body({})], "version"),
    ("unknown-cmd", [HEADER, b"\x7f", body({})], "unknown-command"),
    ("cmd-zero", [HEADER, b"\x00", body({})], "unknown-command"),
    ("empty-cmd", [HEADER, b"", body({})], "unknown-command"),
    ("long-cmd", [HEADER, b"\x02\x02", body({})], "unknown-command"),
    ("not-a-map", [HEADER, bytes([Command.HEARTBEAT]), msgpack.packb([1, 2, 3])], "decode"),
    ("scalar-body", [HEADER, bytes([Command.HEARTBEAT]), msgpack.packb("hello")], "decode"),
    ("int-keys", [HEADER, bytes([Command.HEARTBEAT]), msgpack.packb({1: 2})], "decode"),
    ("trailing-bytes", [HEADER, bytes([Command.HEARTBEAT]), body({}) + b"\x00\x00"], "decode"),
    ("too-many-frames", [HEADER, bytes([Command.HEARTBEAT]), body({}), *([b"x"] * 17)], "decode"),
    ("capacity-lots", [HEADER, bytes([Command.READY]), body({**ready_fields(), "capacity": "lots"})], "invalid-body"),
    ("ready-missing", [HEADER, bytes([Command.READY]), body({"node_id": "x"})], "invalid-body"),
    ("bad-node-id", [HEADER, bytes([Command.READY]), body({**ready_fields(), "node_id": "../../etc"})], "invalid-body"),
    ("load-negative", [HEADER, bytes([Command.HEARTBEAT]), body({"load": -1})], "invalid-body"),
    ("extra-field", [HEADER, bytes([Command.HEARTBEAT]), body({"load": 0, "bogus": 1})], "invalid-body"),
    (
        "result-bad-uuid",
        [HEADER, bytes([Command.RESULT]), body({"results": [{"task_id": b"short", "attempt": 1}]})],
        "invalid-body",
    ),
    ("oversize", [HEADER, bytes([Command.HEARTBEAT]), body({}), b"x" * (100 * 1024)], "oversize"),
]


def test_garbage_on_every_socket_is_refused_and_the_mesh_keeps_working(
    make_mesh: Any, database_url: str, zctx: zmq.Context[Any]
) -> None:
    # 10 missed heartbeats before a peer is dead: the fake peer below must survive a slow, shared machine
    mesh = make_mesh(
        developers=2, testers=0, extra_env={"CASPER_MAX_MESSAGE_BYTES": str(MAX_BYTES), "CASPER_HEARTBEAT_MISSES": "10"}
    )
    police_key = key(mesh, "policeman")
    with mesh.client() as c:
        epochs = {p["node_id"]: p["epoch"] for p in c.request("peers")["peers"]}
    assert set(epochs) == {"developer-1", "developer-2"}
    probes: list[Probe] = []
    # the probes speak with an enrolled developer key (any node id): garbage from a peer that passed
    # the handshake; a key nobody enrolled never gets this far (tests/security)
    fuzzer = zmq.curve_keypair()
    with mesh.client() as c:
        c.request("keys-add", key=fuzzer[0].decode(), pattern="*", role="developer")

    def probe(endpoint: str, name: bytes | None, server_key: bytes | None = police_key) -> Probe:
        p = Probe(zctx, endpoint, server_key=server_key, routing_id=name, keypair=fuzzer)
        probes.append(p)
        return p

    try:
        # --- the policeman's mesh ROUTER: one probe (one routing id) per kind of garbage -------------
        for name, frames, code in GARBAGE:
            err = probe(mesh.policeman.bind, f"probe-{name}".encode()).expect_error(frames, code)
            if name == "unknown-cmd":
                assert err.ref == 0x7F
            if name == "oversize":
                assert str(MAX_BYTES) in err.message

        # the same garbage 50 times from one peer: 50 ERRORs back, one log line
        flood = probe(mesh.policeman.bind, b"probe-flood")
        for _ in range(50):
            flood.send([b"\x00garbage"])
        for i in range(50):
            msg = flood.recv(10)
            assert isinstance(msg, Error) and msg.code == "decode", f"flood reply {i}: {msg!r}"

        # identity: a READY whose routing id is not NODE_ID/EPOCH is refused
        impostor = probe(mesh.policeman.bind, b"developer-1/x")
        err = impostor.expect_error(codec.encode(Ready.model_validate(ready_fields("developer-2", "x"))), "identity")
        assert err.ref == Command.READY
        impostor.expect_error(codec.encode(Ready.model_validate(ready_fields("developer-1", "y"))), "identity")
        # ... and frames from an unregistered routing id are refused until it sends READY
        ghost = probe(mesh.policeman.bind, b"ghost/1")
        ghost.expect_error(codec.encode(Heartbeat()), "unknown-peer")
        ghost.expect_error(
            codec.encode(ResultBatch(results=(Outcome(task_id=uuid.uuid4(), attempt=1),))), "unknown-peer"
        )
        ghost.expect_error(codec.encode(Request(req_id=1, op="status")), "unknown-peer")
        # a probe without an explicit routing id (ZeroMQ assigns one) gets the same treatment
        probe(mesh.policeman.bind, None).expect_error(codec.encode(Heartbeat(load=3)), "unknown-peer")

        # above ZeroMQ's MAXMSGSIZE the transport drops the connection: no reply, no crash
        big = probe(mesh.policeman.bind, b"probe-huge")
        big.send([HEADER, bytes([Command.HEARTBEAT]), body({}), b"x" * (ZMQ_LIMIT + 64 * 1024)])
        assert big.recv(2.0) is None
        assert mesh.policeman.alive
        probe(mesh.policeman.bind, b"probe-after-huge").expect_error([b"junk"], "decode")

        # --- a worker's own mesh ROUTER (Curve server with developer-1's key) -------------------------
        dev = mesh.nodes["developer-1"]
        wprobe = probe(dev.bind, b"probe-worker", key(mesh, "developer-1"))
        for name, frames, code in GARBAGE:
            if name.startswith(("capacity", "ready", "bad-node", "load", "extra", "result")):
                continue  # body validation is covered above; the worker shares the codec
            wprobe.expect_error(frames, code)
        unsupported = wprobe.expect_error(codec.encode(Ready.model_validate(ready_fields())), "unsupported")
        assert unsupported.ref == Command.READY
        wprobe.send(codec.encode(Heartbeat()))
        assert isinstance(wprobe.recv(10), Heartbeat), "the worker stopped answering pings after garbage"
        assert dev.alive

        # --- the control socket (ipc, no Curve) -----------------------------------------------------
        ctl = probe(mesh.policeman.control, b"probe-control", None)
        for name, frames, code in GARBAGE:
            if name == "oversize":
                continue
            ctl.expect_error(frames, code)
        ctl.expect_error([HEADER, bytes([Command.HEARTBEAT]), body({}), b"x" * (100 * 1024)], "oversize")
        # a mesh command on the control socket ("command" in SPEC 7.3, "unsupported" since the code change)
        ctl.expect_error(codec.encode(Heartbeat()), NOT_SERVED)
        ctl.expect_error([HEADER, bytes([Command.SUBMIT]), body({"req_id": 1, "tasks": []})], "invalid-body")
        ctl.expect_error(codec.encode(Submit(req_id=2, tasks=(TaskSpec(type="no-such-type"),))), "unknown-task-type")
        ctl.expect_error(
            [
                HEADER,
                bytes([Command.SUBMIT]),
                body({"req_id": 3, "tasks": [{"type": "echo", "input": {"blob": b"\x00\xff"}}]}),
            ],
            "invalid-body",
        )
        ctl.send(codec.encode(Request(req_id=4, op="no-such-op")))
        reply = ctl.recv(10)
        assert isinstance(reply, Reply) and reply.req_id == 4 and not reply.ok
        assert reply.error is not None and reply.error.code == "command" and "status" in (reply.error.hint or "")
        ctl.send(codec.encode(Request(req_id=5, op="get", args={"id": "not-a-uuid"})))
        reply = ctl.recv(10)
        assert isinstance(reply, Reply) and not reply.ok and reply.error is not None
        assert reply.error.code == "command"
        ctl.send(codec.encode(Request(req_id=6, op="drain", args={"peer": "nobody"})))
        reply = ctl.recv(10)
        assert isinstance(reply, Reply) and not reply.ok and reply.error is not None
        assert reply.error.code == "not-found"
        # mistyped arguments are answered, never crash the control loop
        for req_id, op, args in (
            (7, "tasks", {"limit": "lots"}),
            (8, "tasks", {"limit": None}),
            (9, "tasks", {"status": [1]}),
            (10, "tasks", {"limit": True}),
            (11, "get", {"id": {"a": 1}}),
            (12, "drain", {"peer": ["x"]}),
            (13, "cancel", {}),
        ):
            ctl.send(codec.encode(Request(req_id=req_id, op=op, args=args)))
            reply = ctl.recv(10)
            assert isinstance(reply, Reply) and reply.req_id == req_id, f"{op} {args}: {reply!r}"
            assert not reply.ok and reply.error is not None, f"{op} {args} was accepted"
            assert reply.error.code in ("command", "not-found"), f"{op} {args}: {reply.error}"
        # inputs Postgres cannot store (NaN, Infinity, NUL) are refused up front, nothing half-done
        for bad in ({"x": float("nan")}, {"x": float("inf")}, {"s": "a\x00b"}, {"k": {"deep": ["\x00"]}}):
            ctl.expect_error(
                codec.encode(
                    Submit(req_id=20, tasks=(TaskSpec(type="echo", input={"ok": 1}), TaskSpec(type="echo", input=bad)))
                ),
                "invalid-body",
            )
        ctl.expect_error(
            [HEADER, bytes([Command.SUBMIT]), body({"req_id": 22, "tasks": [{"type": "echo", "input": nested(1000)}]})],
            "invalid-body",
        )
        ctl.send(codec.encode(Request(req_id=21, op="status")))
        reply = ctl.recv(10)
        assert isinstance(reply, Reply) and reply.ok and reply.data["node_id"] == "policeman"

        # --- a registered peer that lies: stale, foreign and out-of-range reports ---------------------
        fake = FakeWorker(zctx, mesh.policeman.bind, server_key=police_key, routing_id=b"fake/1", keypair=fuzzer)
        probes.append(fake)
        fake.send(
            codec.encode(
                Ready(
                    node_id="fake",
                    epoch="1",
                    role="developer",
                    endpoint="tcp://127.0.0.1:9",
                    pid=1,
                    host="fake",
                    capabilities=("fakecap",),
                    capacity=2,
                )
            )
        )
        fake.next(Heartbeat)  # the registration acknowledgement
        with mesh.client() as c:
            acc = c.submit(
                [
                    TaskSpec(type="echo", input={"n": 1}, requires=("fakecap",), max_attempts=1),
                    TaskSpec(type="echo", input={"n": 2}, requires=("fakecap",), max_attempts=1),
                ],
                wait=True,
            )
            got: list[Any] = []
            while len(got) < 2:
                got.extend(fake.next(TaskBatch).tasks)
            a, b = sorted(got, key=lambda t: t.input["n"])
            assert {a.task_id, b.task_id} == set(acc.task_ids) and a.attempt == b.attempt == 1
            fake.send(codec.encode(ResultBatch(results=(Outcome(task_id=uuid.uuid4(), attempt=1),))))  # not held
            fake.send(codec.encode(ResultBatch(results=(Outcome(task_id=a.task_id, attempt=7, output="stale"),))))
            fake.send(codec.encode(Progress(task_ids=(uuid.uuid4(), a.task_id))))
            fake.expect_error(
                [
                    HEADER,
                    bytes([Command.RESULT]),
                    body({"results": [{"task_id": a.task_id, "attempt": 1, "output": None, "duration_ms": 1e300}]}),
                ],
                "invalid-body",
            )
            fake.expect_error(
                codec.encode(Submit(req_id=1, tasks=(TaskSpec(type="noop"),))), "forbidden"
            )  # SUBMIT is no mesh command (SPEC 14.1)
            fake.expect_error(
                codec.encode(
                    Ready(
                        node_id="fake",
                        epoch="2",
                        role="developer",
                        endpoint="tcp://x:1",
                        pid=1,
                        host="fake",
                        capacity=2,
                    )
                ),
                "identity",
            )
            # an output Postgres cannot store fails that task only; a huge but valid duration is fine
            fake.send(
                codec.encode(ResultBatch(results=(Outcome(task_id=a.task_id, attempt=1, output={"x": float("nan")}),)))
            )
            fake.send(
                codec.encode(
                    ResultBatch(results=(Outcome(task_id=b.task_id, attempt=1, output={"n": 2}, duration_ms=1e10),))
                )
            )
            done: dict[uuid.UUID, Done] = {}
            deadline = time.monotonic() + 30
            while len(done) < 2 and time.monotonic() < deadline:
                for d in c.done_events(timeout_s=0.3):
                    done[d.task_id] = d
                    break
                fake.send(codec.encode(Heartbeat()))
            assert set(done) == {a.task_id, b.task_id}, done
            assert done[a.task_id].status == "dead" and done[a.task_id].error is not None
            assert done[a.task_id].error.code == "invalid-output"
            assert done[b.task_id].status == "complete" and done[b.task_id].output == {"n": 2}
            assert {p["node_id"]: p["inflight"] for p in c.request("peers")["peers"]}["fake"] == 0
        fake.send(codec.encode(Disconnect(reason="bye")))
        wait_for(lambda: "fake" not in peer_names(mesh), 10, "the fake peer to be dropped after DISCONNECT")
        fake.expect_error(codec.encode(Heartbeat()), "unknown-peer")

        # --- afterwards: everyone alive, each rejection logged once per peer and cause -------------
        for node in mesh.nodes.values():
            assert node.alive, f"{node.node_id} died (see {node.log_path})"

        def logged(route: bytes) -> list[str]:
            return log_lines(mesh, "policeman", f"rejected a frame from {route!r}")

        for name, _, code in GARBAGE:
            lines = wait_for(lambda n=name: logged(f"probe-{n}".encode()), 10, f"log line for {name}")
            assert len(lines) == 1, lines
            assert f"[{code}]" in lines[0]
        flood_lines = logged(b"probe-flood")
        assert len(flood_lines) == 1, f"the same garbage 50 times was logged {len(flood_lines)} times"
        assert len([ln for ln in logged(b"developer-1/x") if "[identity]" in ln]) == 1
        assert len([ln for ln in logged(b"ghost/1") if "[unknown-peer]" in ln]) == 1
        for node in mesh.nodes:
            assert not log_lines(mesh, node, "Traceback"), f"{node} logged a traceback"
            assert not log_lines(mesh, node, "crashed"), f"{node} logged a crash"
        # the impostor READYs changed nothing: the real developers are registered with their epochs
        with mesh.client() as c:
            peers = {p["node_id"]: p for p in c.request("peers")["peers"]}
        assert {n: p["epoch"] for n, p in peers.items()} == epochs
        assert all(p["liveness"] == "alive" for p in peers.values())
    finally:
        for p in probes:
            p.close()

    # --- the same through caspectl: NaN input refused; a NUL byte in a task's output fails that task
    proc = caspectl(mesh, "--timeout", "10", "submit", "echo", "--input", '{"x": NaN}', "-o", "json")
    assert proc.returncode in (1, 2), f"exit {proc.returncode}: {proc.stdout} {proc.stderr}"
    assert json.loads(proc.stdout)["error"]["code"] == "invalid-body"
    proc = caspectl(
        mesh,
        "submit",
        "shell",
        "--input",
        json.dumps({"cmd": "printf 'a\\000b'"}),
        "--max-attempts",
        "1",
        "--wait",
        "--wait-timeout",
        "30",
        "-o",
        "json",
    )
    assert proc.returncode == 5, f"exit {proc.returncode}: {proc.stdout} {proc.stderr}"
    nul = json.loads(proc.stdout)
    assert nul["status"] == "dead" and nul["error"]["code"] == "invalid-output"

    # --- the mesh still does real work, and Postgres holds only legitimate tasks ------------------
    proc = caspectl(mesh, "submit", "echo", "--input", '{"after": "garbage"}', "--wait", "-o", "json")
    assert proc.returncode == 0, proc.stderr
    done = json.loads(proc.stdout)
    assert done["status"] == "complete" and done["output"] == {"after": "garbage"}
    with mesh.client() as c:
        accepted = c.submit([TaskSpec(type="noop"), TaskSpec(type="echo", input=nested(500))], wait=True)
        finished: dict[uuid.UUID, str] = {}
        for d in c.done_events(timeout_s=30):
            finished[d.task_id] = d.status
            if set(accepted.task_ids) <= set(finished):
                break
    assert [finished.get(t) for t in accepted.task_ids] == ["complete", "complete"]
    # six legitimate tasks: two the fake peer ran (one with an unstorable output), the NUL-output shell
    # task, and three that completed normally; nothing from the refused SUBMITs
    wait_for(
        lambda: db_rows(database_url, "select count(*) from tasks where status = 'complete'")[0][0] == 4,
        30,
        "the legitimate tasks complete in Postgres",
    )
    rows = db_rows(database_url, "select type, status from tasks")
    assert sorted(rows) == sorted(
        [
            ("echo", "dead"),
            ("echo", "complete"),
            ("shell", "dead"),
            ("echo", "complete"),
            ("noop", "complete"),
            ("echo", "complete"),
        ]
    ), rows
    legal = {s.value for s in Status}
    for (to_status,) in db_rows(database_url, "select distinct to_status from task_events"):
        assert to_status in legal
    assert db_rows(database_url, "select count(distinct task_id) from task_events")[0][0] == 6
    assert db_rows(database_url, "select count(*) from tasks where assigned_to = 'fake'")[0][0] == 2
    # only the tasks caspectl submitted carry (its automatic) idempotency keys; refused SUBMITs left none
    keys = db_rows(database_url, "select key from task_idempotency")
    keyed = db_rows(database_url, "select count(*) from tasks where idempotency_key like 'ctl-%%'")[0][0]
    assert all(k.startswith("ctl-") for (k,) in keys) and len(keys) == keyed
    assert mesh.policeman.alive
