"""Helpers of the fault suite (``test_fault_suite.py``): submit a known set of tasks, collect their
DONEs, read the ledger back from Postgres, account for duplicate executions, restart the lab's
Postgres, and a fake peer that fails every task.

The ledger is the judge of every scenario: :func:`read_ledger` turns the ``tasks`` and
``task_events`` rows of the submitted ids into a :class:`Ledger`, and
:meth:`Ledger.assert_all_complete` checks the invariants every scenario shares (none lost, none
invented, every task ``complete`` with exactly one ``complete`` event).

Run as a module, this file is the fake peer (``python -m tests.faults.scenarios bad-peer ...``),
started inside a lab host so that its traffic stays on the lab's bridge.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from casperd.ctl.client import ControlClient
from casperd.errors import CasperError
from casperd.lifecycle import replay
from casperd.messages import Done, TaskSpec

REPO = Path(__file__).resolve().parents[2]

#: reasons (task_events.detail->>'reason' of an active -> pending move) meaning "the holder was lost":
#: the attempt stays counted and the task may have run (partly or wholly) where it was
HOLDER_LOST = re.compile(
    r"^(peer \S+ (dead|restarted|disconnected: .*)|holder re-registered without it"
    r"|holder \S+ did not re-register|lease expired on \S+)$"
)
#: reasons of a refunded move back to pending (the run never counted)
REFUNDED = re.compile(r"^(handed-back by \S+|draining by \S+|TASK could not be delivered to \S+)$")
ACTIVE = ("assigned", "processing", "validating")


# --- submitting and waiting -------------------------------------------------------------------
def sleeps(n: int, seconds: float, *, tag: str = "", **spec: Any) -> list[TaskSpec]:
    """``n`` sleeps with distinct inputs (``sleep`` takes only ``seconds`` and ``fail``: the i-th
    sleeps i microseconds longer). ``tag`` only names the batch where it is submitted."""
    return [TaskSpec(type="sleep", input={"seconds": seconds + i * 1e-6}, **spec) for i in range(n)]


def submit(client: ControlClient, specs: Sequence[TaskSpec], *, wait: bool = True) -> list[str]:
    return [str(t) for t in client.submit(list(specs), wait=wait).task_ids]


def gather(
    client: ControlClient,
    ids: Sequence[str],
    done: dict[str, Done],
    timeout: float,
    on_idle: Callable[[], None] | None = None,
) -> None:
    """Collect the DONE of every id into ``done`` (a repeat is a test failure), calling ``on_idle``
    about every 0.2 s; stop when all are in or after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    want = set(ids)
    while not want <= set(done) and time.monotonic() < deadline:
        slice_end = time.monotonic() + 0.2
        for ev in client.done_events(timeout_s=0.2):
            tid = str(ev.task_id)
            assert tid not in done, f"task {tid} reported DONE twice"
            done[tid] = ev
            if want <= set(done) or time.monotonic() > slice_end:
                break
        if on_idle is not None:
            on_idle()


def wait_until(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll ``pred`` until it returns something truthy (returned); AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        with contextlib.suppress(CasperError):
            last = pred()
            if last:
                return last
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f}s (last: {last!r})")
        time.sleep(interval)


def peers_by_id(admin: ControlClient) -> dict[str, dict[str, Any]]:
    return {p["node_id"]: p for p in admin.request("peers")["peers"]}


def node_status(control: str, timeout: float = 5.0) -> dict[str, Any]:
    with ControlClient(control, timeout) as c:
        return dict(c.request("status"))


def executions(mesh: Any, nodes: Sequence[str]) -> dict[str, int]:
    """Each worker's ``completed`` counter (handler runs that ended with a result, this process)."""
    return {n: int(node_status(mesh.nodes[n].control)["completed"]) for n in nodes}


def developers(mesh: Any) -> list[str]:
    return sorted(n for n, node in mesh.nodes.items() if node.role != "policeman")


# --- the ledger -------------------------------------------------------------------------------
@dataclass
class Ledger:
    ids: set[str]
    status: dict[str, str]
    attempts: dict[str, int]
    completes: Counter[str]
    finisher: dict[str, str]
    complete_at: dict[str, Any]
    assignments: list[tuple[str, str, int, Any]]  # (task, peer, attempt, at), in event order
    requeues: list[tuple[str, str | None, str, Any]]  # (task, former holder, reason, at)
    errors: list[tuple[str, str | None, str]]  # (task, peer, code)
    all_task_ids: set[str] = field(default_factory=set)  # every task in the table
    histories: dict[str, list[tuple[str | None, str, int, str]]] = field(default_factory=dict)
    """Each task's events (from, to, attempt after, requeue reason), in order."""

    def assert_histories_replay(self) -> None:
        """Every task's events are a path through the lifecycle table (``lifecycle.replay``) that
        adds up to the attempts in its row; a refunded requeue gives its attempt back and a lost
        holder's keeps it counted, as the reasons say."""
        for tid in sorted(self.ids & set(self.histories)):
            history = self.histories[tid]
            final = replay(tid, [(f, t, a) for f, t, a, _ in history])
            assert final == self.attempts[tid], (
                f"task {tid}: events add up to {final} attempts, row says {self.attempts[tid]}"
            )
            for (_, _, before, _), (frm, to, after, reason) in itertools.pairwise(history):
                if to == "pending" and frm in ACTIVE:
                    if REFUNDED.match(reason):
                        assert after == before - 1, f"task {tid}: refunded requeue ({reason}) kept its attempt"
                    elif HOLDER_LOST.match(reason):
                        assert after == before, f"task {tid}: lost holder ({reason}) refunded its attempt"

    def assert_all_complete(self) -> None:
        lost = self.ids - set(self.status)
        assert not lost, f"{len(lost)} submitted tasks are not in the ledger: {sorted(lost)[:5]}"
        extra = self.all_task_ids - self.ids
        assert not extra, f"{len(extra)} tasks in the ledger nobody submitted: {sorted(extra)[:5]}"
        statuses = Counter(self.status.values())
        assert statuses == {"complete": len(self.ids)}, f"not all complete: {dict(statuses)}"
        not_once = {t: self.completes[t] for t in self.ids if self.completes[t] != 1}
        assert not not_once, f"tasks without exactly one 'complete' event: {not_once}"
        self.assert_histories_replay()

    @property
    def extra_runs(self) -> int:
        """Runs beyond one per task (attempts counts every run but refunded ones)."""
        return sum(self.attempts.values()) - len(self.ids)

    def requeue_reasons(self) -> Counter[str]:
        return Counter(reason for _, _, reason, _ in self.requeues)

    def holder_lost(self) -> list[tuple[str, str | None, str, Any]]:
        return [r for r in self.requeues if HOLDER_LOST.match(r[2])]

    def unexpected_requeues(self) -> Counter[str]:
        return Counter(r[2] for r in self.requeues if not HOLDER_LOST.match(r[2]) and not REFUNDED.match(r[2]))

    def summary(self) -> dict[str, Any]:
        return {
            "tasks": len(self.ids),
            "statuses": dict(Counter(self.status.values())),
            "attempts": dict(sorted(Counter(self.attempts.values()).items())),
            "finishers": dict(Counter(self.finisher.values())),
            "assignments": len(self.assignments),
            "requeue_reasons": dict(self.requeue_reasons()),
            "error_codes": dict(Counter(e[2] for e in self.errors)),
            "extra_runs": self.extra_runs,
        }


def read_ledger(nm: Any, ids: Sequence[str]) -> Ledger:
    """The ledger rows of ``ids`` (and the ids of every task in the table, to catch invented ones)."""
    uuids = [uuid.UUID(t) for t in ids]
    rows = nm.ledger("SELECT id::text, status, attempts FROM tasks WHERE id = ANY(%s)", (uuids,))
    events = nm.ledger(
        "SELECT task_id::text, from_status, to_status, peer, attempt, detail, at FROM task_events "
        "WHERE task_id = ANY(%s) ORDER BY id",
        (uuids,),
    )
    led = Ledger(
        ids=set(ids),
        status={r[0]: r[1] for r in rows},
        attempts={r[0]: r[2] for r in rows},
        completes=Counter(),
        finisher={},
        complete_at={},
        assignments=[],
        requeues=[],
        errors=[],
        all_task_ids={r[0] for r in nm.ledger("SELECT id::text FROM tasks")},
    )
    for tid, frm, to, peer, attempt, detail, at in events:
        detail = detail or {}
        led.histories.setdefault(tid, []).append((frm, to, attempt, str(detail.get("reason", ""))))
        if to == "complete":
            led.completes[tid] += 1
            led.finisher[tid] = peer
            led.complete_at[tid] = at
        elif to == "assigned":
            led.assignments.append((tid, peer, attempt, at))
        elif to == "pending" and frm in ACTIVE:
            led.requeues.append((tid, peer, str(detail.get("reason", "")), at))
        elif to == "error":
            led.errors.append((tid, peer, str(detail.get("code", ""))))
    return led


def ledger_counts(nm: Any, ids: Sequence[str]) -> Counter[str]:
    uuids = [uuid.UUID(t) for t in ids]
    return Counter(dict(nm.ledger("SELECT status, count(*) FROM tasks WHERE id = ANY(%s) GROUP BY status", (uuids,))))


def wait_all_terminal(
    nm: Any,
    ids: Sequence[str],
    timeout: float,
    on_idle: Callable[[], None] | None = None,
) -> Counter[str]:
    """Poll the ledger until every id is terminal (for runs whose DONEs cannot be waited for)."""
    deadline = time.monotonic() + timeout
    counts: Counter[str] = Counter()
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            counts = ledger_counts(nm, ids)
            if counts["complete"] + counts["dead"] + counts["cancelled"] == len(ids):
                return counts
        if on_idle is not None:
            on_idle()
        time.sleep(0.25)
    return counts


# --- reporting --------------------------------------------------------------------------------
def report(record_property: Callable[[str, Any], None], name: str, data: dict[str, Any]) -> None:
    """Print the scenario's figures (shown with -s or on failure) and attach them to the junit XML."""

    def clean(v: Any) -> Any:
        if isinstance(v, float):
            return round(v, 3)
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        return v

    data = clean(data)
    print(f"\n[fault-suite] {name}: {json.dumps(data, default=str, sort_keys=True)}")
    record_property(name, json.dumps(data, default=str, sort_keys=True))


# --- netem evidence ---------------------------------------------------------------------------
def netem_counters(lab: Any, host: str) -> dict[str, int]:
    """Packets the lab's netem fallback dropped and queued to its delayer on ``host`` (iptables
    counters of the CASPER_NETEM chain); empty for the tc backend or when they cannot be read."""
    import shutil

    from tests.faults.netns import NETEM_CHAIN

    iptables = shutil.which("iptables")
    if lab.netem_backend != "iptables-nfqueue" or iptables is None:
        return {}
    res = subprocess.run(
        [*lab.exec_prefix(host), iptables, "-w", "5", "-L", NETEM_CHAIN, "-v", "-n", "-x"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    out: dict[str, int] = {}
    for line in res.stdout.splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[0].isdigit() and parts[2] in ("DROP", "NFQUEUE"):
            key = "dropped" if parts[2] == "DROP" else "delayed"
            out[key] = out.get(key, 0) + int(parts[0])
    return out


# --- Postgres in the db host ------------------------------------------------------------------
def stop_postgres(nm: Any, timeout: float = 30.0) -> None:
    """Fast shutdown (SIGINT) of the db host's Postgres; waits for it to exit."""
    proc = nm.pg_proc
    assert proc is not None and proc.poll() is None, "Postgres is not running"
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout)


def start_postgres(nm: Any, timeout: float = 60.0) -> None:
    """Start the db host's Postgres again with the command line ``meshlab`` used (taken from the
    stopped process: what follows setpriv's ``--``), as the same user, logging to the same file."""
    from casperd.embedded import PG_SYSTEM_USER

    old = nm.pg_proc
    assert old is not None and old.poll() is not None, "Postgres is still running"
    args = [str(a) for a in old.args]
    argv = args[args.index("--") + 1 :]
    with open(nm.log_dir / "postgres-db-host.log", "ab") as logf:
        nm.pg_proc = nm.lab.run("db", argv, user=PG_SYSTEM_USER, stdout=logf, stderr=logf)
    nm._wait(lambda: nm.ledger("SELECT 1"), "Postgres in the db host (restarted)", nm.pg_proc, timeout)


# --- the fake peer that fails every task ------------------------------------------------------
def enrolled_key_file(client: Any, path: Path, node_id: str, role: str = "developer") -> Path:
    """A new Curve key pair written to ``path`` (public, then secret; 0600) and enrolled for
    ``node_id`` and ``role`` through the policeman's control socket (caspectl keys add)."""
    public, secret = zmq.curve_keypair()
    path.write_bytes(public + b"\n" + secret + b"\n")
    path.chmod(0o600)
    client.request("keys-add", key=public.decode(), pattern=node_id, role=role)
    return path


def start_bad_peer(
    lab: Any,
    host: str,
    broker: str,
    server_key_file: Path,
    *,
    node_id: str = "bad-peer",
    capacity: int = 2,
    max_s: float = 120.0,
    heartbeat_s: float = 0.25,
    key_file: Path | None = None,
) -> subprocess.Popen[str]:
    """Run :func:`bad_peer_main` in lab host ``host`` (it must reach ``broker`` over the lab), with
    the key pair in ``key_file`` (see :func:`enrolled_key_file`) or, without it, a fresh unenrolled one."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CASPER_")},
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    return lab.run(
        host,
        [
            sys.executable,
            "-m",
            "tests.faults.scenarios",
            "bad-peer",
            "--broker",
            broker,
            "--server-key-file",
            server_key_file,
            "--node-id",
            node_id,
            "--capacity",
            capacity,
            "--endpoint",
            f"tcp://{lab.ip(host)}:1",
            "--max-s",
            max_s,
            "--heartbeat-s",
            heartbeat_s,
            *(["--key-file", key_file] if key_file is not None else []),
        ],
        cwd=str(REPO),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def stop_bad_peer(lab: Any, proc: subprocess.Popen[str]) -> dict[str, Any]:
    """SIGTERM it; returns the counters it prints on the way out."""
    lab.kill(proc.pid, signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate(timeout=5)
    for line in reversed(out.splitlines()):
        with contextlib.suppress(ValueError):
            return dict(json.loads(line))
    return {"exit": proc.returncode, "stderr": err[-2000:]}


def bad_peer_main(argv: list[str]) -> int:
    """A raw Curve DEALER that registers as a developer, heartbeats, and answers every TASK with a
    retryable FAILED ``boom``. Exits on SIGTERM or after ``--max-s``, printing its counters as JSON."""
    import zmq

    from casperd import codec
    from casperd.messages import Error, ErrorBody, FailedBatch, Failure, Heartbeat, Ready, TaskBatch

    ap = argparse.ArgumentParser(prog="bad-peer")
    ap.add_argument("--broker", required=True)
    ap.add_argument("--server-key-file", required=True)
    ap.add_argument("--node-id", default="bad-peer")
    ap.add_argument("--endpoint", default="tcp://127.0.0.1:1")
    ap.add_argument("--capacity", type=int, default=2)
    ap.add_argument("--max-s", type=float, default=120.0)
    ap.add_argument("--heartbeat-s", type=float, default=0.25)
    ap.add_argument("--key-file", default="", help="its Curve key pair: public and secret key, one line each")
    args = ap.parse_args(argv)

    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    epoch = f"{int(time.time() * 1000):x}.bad"
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, f"{args.node_id}/{epoch}".encode())
    if args.key_file:  # enrolled by the test (the policeman refuses unknown keys at the handshake)
        public, secret = (line.strip().encode() for line in Path(args.key_file).read_text().splitlines()[:2])
    else:
        public, secret = zmq.curve_keypair()
    sock.curve_publickey, sock.curve_secretkey = public, secret
    sock.curve_serverkey = Path(args.server_key_file).read_text().strip().encode()
    sock.connect(args.broker)
    ready = codec.encode(
        Ready(
            node_id=args.node_id,
            epoch=epoch,
            role="developer",
            endpoint=args.endpoint,
            pid=os.getpid(),
            host="bad-peer-host",
            capacity=args.capacity,
            heartbeat_ms=int(args.heartbeat_s * 4000),
        )
    )
    sock.send_multipart(ready)
    stats = {"tasks": 0, "failed": 0, "readies": 1, "errors": 0}
    deadline = time.monotonic() + args.max_s
    last_hb = 0.0
    while not stop and time.monotonic() < deadline:
        if sock.poll(50):
            msg = codec.decode(sock.recv_multipart(), max_bytes=64 * 1024 * 1024).message
            if isinstance(msg, TaskBatch):
                stats["tasks"] += len(msg.tasks)
                fails = tuple(
                    Failure(
                        task_id=a.task_id,
                        attempt=a.attempt,
                        retryable=True,
                        error=ErrorBody(code="boom", message=f"{args.node_id} fails every task"),
                    )
                    for a in msg.tasks
                )
                sock.send_multipart(codec.encode(FailedBatch(failures=fails)))
                stats["failed"] += len(fails)
            elif isinstance(msg, Error):
                stats["errors"] += 1
                if msg.code == "unknown-peer":
                    sock.send_multipart(ready)
                    stats["readies"] += 1
        now = time.monotonic()
        if now - last_hb >= args.heartbeat_s:
            last_hb = now
            sock.send_multipart(codec.encode(Heartbeat(load=0)))
    sock.close(0)
    ctx.term()
    print(json.dumps(stats), flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "bad-peer":
        raise SystemExit(bad_peer_main(sys.argv[2:]))
    raise SystemExit("usage: python -m tests.faults.scenarios bad-peer --broker ENDPOINT --server-key-file FILE")
