"""The client half of the control protocol: a DEALER to a node's control socket.

Used by caspectl, by ``casperd up`` and by the benchmarks. Synchronous (plain ``zmq``): an admin
command is one process doing one thing, with a deadline on every wait.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import zmq

from casperd import codec
from casperd.errors import (
    CommandError,
    NoDaemonError,
    NoDefaultError,
    OverloadedError,
    RequestTimeoutError,
    StorageError,
    from_wire,
)
from casperd.messages import SUBMIT_MAX_TASKS, Accepted, Done, DoneBatch, Error, Reply, Request, Submit, TaskSpec
from casperd.quotas import retry_after
from casperd.settings import DEFAULT_STATE_DIR

MESH_FILE = "mesh.json"


def find_control(explicit: str | None = None, state_dir: Path | None = None) -> str:
    """Where caspectl talks: --control, else CASPER_CONTROL, else the local mesh's policeman."""
    if explicit:
        return explicit
    if os.environ.get("CASPER_CONTROL"):
        return os.environ["CASPER_CONTROL"]
    state = state_dir or Path(os.environ.get("CASPER_STATE_DIR") or DEFAULT_STATE_DIR)
    mesh = state / MESH_FILE
    if mesh.exists():
        try:
            return str(json.loads(mesh.read_text())["policeman"]["control"])
        except (ValueError, KeyError, TypeError):
            raise NoDefaultError(
                f"{mesh} is not a valid mesh description", hint="restart casperd up, or pass --control"
            ) from None
    raise NoDefaultError(
        f"no running mesh found (no {mesh})",
        hint="start one with 'casperd up'; a mesh started with 'casperd up --state-dir DIR' is found with "
        "caspectl --state-dir DIR (or CASPER_STATE_DIR=DIR); or pass --control ENDPOINT / set CASPER_CONTROL",
    )


class ControlClient:
    def __init__(self, endpoint: str, timeout_s: float = 10.0, overload_wait_s: float = 600.0) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.overload_wait_s = overload_wait_s
        """How long submit_until_accepted keeps waiting out ``overloaded`` refusals (quotas)."""
        self.ctx = zmq.Context.instance()
        self.sock = self._socket()
        if endpoint.startswith("ipc://") and not Path(endpoint[6:]).exists():
            raise NoDaemonError(
                f"no daemon at {endpoint} (the socket file does not exist)",
                hint="start one with 'casperd up' or check --control / CASPER_CONTROL",
            )
        try:
            self.sock.connect(endpoint)
        except zmq.ZMQError as exc:
            self.sock.close(0)
            raise CommandError(
                f"invalid control endpoint {endpoint!r}: {exc.strerror}",
                hint="e.g. ipc:///path/to/node.ctl or tcp://127.0.0.1:5556",
            ) from None
        self._ids = itertools.count(1)
        self.early: collections.deque[Done] = collections.deque()

    def close(self) -> None:
        self.sock.close(0)

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _recv(self, deadline: float) -> Any:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(int(left * 1000)):
                raise RequestTimeoutError(
                    f"no answer from {self.endpoint} within {self.timeout_s:g}s",
                    hint="is the daemon running? 'casperd up' starts a local mesh; raise --timeout if it is busy",
                )
            frames = self.sock.recv_multipart()
            msg = codec.decode(frames, max_bytes=64 * 1024 * 1024).message
            if isinstance(msg, Error):
                raise from_wire(msg.model_dump())
            return msg

    def request(self, op: str, **args: Any) -> Any:
        req_id = next(self._ids)
        self.sock.send_multipart(codec.encode(Request(req_id=req_id, op=op, args=args)))
        deadline = time.monotonic() + self.timeout_s
        while True:
            msg = self._recv(deadline)
            if isinstance(msg, Reply) and msg.req_id == req_id:
                if not msg.ok:
                    raise from_wire(msg.error.model_dump() if msg.error else {})
                return msg.data
            if isinstance(msg, DoneBatch):
                self.early.extend(msg.done)

    def submit(self, specs: Sequence[TaskSpec], *, wait: bool = False) -> Accepted:
        if not 1 <= len(specs) <= SUBMIT_MAX_TASKS:
            raise CommandError(
                f"one SUBMIT carries 1 to {SUBMIT_MAX_TASKS:,} tasks, not {len(specs):,}",
                hint=f"submit them in parts of at most {SUBMIT_MAX_TASKS:,} (caspectl submit-bulk --batch N does)",
            )
        req_id = next(self._ids)
        try:
            frames = codec.encode(Submit(req_id=req_id, tasks=tuple(specs), wait=wait))
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:
            raise CommandError(
                f"the task cannot be encoded: {type(exc).__name__} (integers must fit in 64 bits)",
                hint="use strings for very large numbers",
            ) from None
        self.sock.send_multipart(frames)
        deadline = time.monotonic() + self.timeout_s
        while True:
            msg = self._recv(deadline)
            if isinstance(msg, Accepted) and msg.req_id == req_id:
                return msg
            if isinstance(msg, DoneBatch):
                self.early.extend(msg.done)

    def submit_until_accepted(
        self, specs: Sequence[TaskSpec], *, wait: bool = False, tries: int = 3, pause_s: float = 0.5
    ) -> Accepted:
        """Submit, and on no answer or a store outage submit again (fresh socket, backoff) until the
        policeman says ACCEPTED. Safe because every task carries an idempotency key: tasks without
        one get a fresh key here, so a repeat returns the tasks the first try created."""
        keyed = tuple(
            s if s.idempotency_key else s.model_copy(update={"idempotency_key": f"ctl-{uuid.uuid4()}"}) for s in specs
        )
        attempt, waited = 1, 0.0
        while True:
            try:
                return self.submit(keyed, wait=wait)
            except OverloadedError as exc:  # a quota: wait as long as the policeman says, then again
                pause = min(retry_after(exc.hint) or 1.0, 30.0)
                if waited + pause > self.overload_wait_s:
                    exc.message = f"{exc.message} (waited {waited:.0f}s)"
                    raise
                waited += pause
                time.sleep(pause)
            except (RequestTimeoutError, StorageError) as exc:
                if attempt == tries:
                    exc.message = f"{exc.message} (tried {tries} times)"
                    raise
                time.sleep(pause_s * 2 ** (attempt - 1))
                attempt += 1
                self._reconnect()

    def _reconnect(self) -> None:
        self.sock.close(0)
        self.sock = self._socket()
        self.sock.connect(self.endpoint)

    def _socket(self) -> zmq.Socket[bytes]:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        return sock

    def done_events(self, timeout_s: float) -> Iterator[Done]:
        """One Done per waited-on task (a DONE carries many), until ``timeout_s`` passes with nothing new."""
        deadline = time.monotonic() + timeout_s
        while True:
            while self.early:  # DONEs that arrived while we waited for another reply
                yield self.early.popleft()
                deadline = time.monotonic() + timeout_s
            try:
                msg = self._recv(deadline)
            except RequestTimeoutError:
                return
            if isinstance(msg, DoneBatch):  # one DONE carries every task of a commit that ended
                self.early.extend(msg.done)


def parse_id(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise CommandError(f"{text!r} is not a task id", hint="task ids are UUIDs; see caspectl tasks") from None
