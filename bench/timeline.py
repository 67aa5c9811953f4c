"""Where one round trip's milliseconds go: timestamps along a task's path, one task in flight.

Starts a local mesh (a policeman, two developers) whose nodes load a tracing hook (a
``sitecustomize`` written to a temporary directory and put on their ``PYTHONPATH``; nothing of it is
in the daemon): every receive and send of the mesh's sockets and every group commit's start and end
is stamped with CLOCK_MONOTONIC, which all processes on the machine share. The client stamps its
submit, ACCEPTED and DONE. For each round trip, every stamp is taken relative to its submit; the
table prints the median of each step over ``--samples`` round trips.

    python -m bench.timeline --samples 300

Commands in the table: 03 SUBMIT, 04 ACCEPTED, 05 TASK, 07 RESULT, 0e DONE (``send``: the frame's
first bytes, ``recv``: the command byte of each message in the batch).
"""

from __future__ import annotations

import argparse
import bisect
import glob
import shutil
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from bench.common import drain, exit_on_sigterm
from casperd.localmesh import LocalMesh, free_port_base
from casperd.messages import TaskSpec

HOOK = """
import os, time
_path = os.environ.get("BENCH_TIMELINE_TRACE")
if _path:
    import casperd.groupcommit as G
    import casperd.transport as T
    _fd = os.open(f"{_path}.{os.getpid()}", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    _clk, _M = time.clock_gettime_ns, time.CLOCK_MONOTONIC

    def _rec(what):
        os.write(_fd, f"{_clk(_M)} {what}\\n".encode())

    def _cmd(frames):
        return next((bytes(f[:1]).hex() for f in frames[1:] if len(f) == 1), "?")

    _send = T.send_now

    def send_now(sock, frames):
        _rec("send " + _cmd(list(frames)))
        return _send(sock, frames)

    _rb, _rbu = T.recv_batch, T.recv_batch_users

    async def recv_batch(sock, limit=512):
        b = await _rb(sock, limit)
        _rec("recv " + ",".join(_cmd(m) for m in b))
        return b

    async def recv_batch_users(sock, limit=512):
        b = await _rbu(sock, limit)
        _rec("recv " + ",".join(_cmd(m) for m, _ in b))
        return b

    _w = G.GroupCommitWriter._write

    async def _write(self, batch):
        _rec("commit-start")
        try:
            return await _w(self, batch)
        finally:
            _rec("commit-end")

    T.send_now, T.recv_batch, T.recv_batch_users = send_now, recv_batch, recv_batch_users
    G.GroupCommitWriter._write = _write
"""


def run(samples: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="casper-bench-timeline-"))
    (work / "hook").mkdir()
    (work / "hook" / "sitecustomize.py").write_text(HOOK)
    trace = str(work / "trace")
    mesh = LocalMesh(
        work / "mesh",
        developers=2,
        testers=0,
        port_base=free_port_base(),
        log_level="WARNING",
        extra_env={
            "CASPER_CAPACITY": "2",
            "CASPER_EVENT_LOOP": "auto",
            "BENCH_TIMELINE_TRACE": trace,
            "PYTHONPATH": str(work / "hook"),
        },
    )
    clock = time.monotonic_ns
    trips: list[tuple[int, int, int]] = []
    try:
        mesh.start()
        time.sleep(2.0)
        # the two developers take turns: one row for whichever ran the task
        names = {nd.proc.pid: nid.rstrip("0123456789-") for nid, nd in mesh.nodes.items() if nd.proc is not None}
        with mesh.client(timeout_s=60) as c:
            c.submit([TaskSpec(type="noop", input={"i": i}) for i in range(200)], wait=True)
            drain(c, 200)
            one = [TaskSpec(type="noop", input={"pad": "x" * 64})]
            for _ in range(samples + 50):
                s = clock()
                c.submit(one, wait=True)
                a = clock()
                drain(c, 1)
                trips.append((s, a, clock()))
        events: list[tuple[int, str]] = []
        for f in glob.glob(trace + ".*"):
            who = names.get(int(f.rsplit(".", 1)[1]), "?")
            for line in Path(f).read_text().splitlines():
                stamp, what = line.split(" ", 1)
                events.append((int(stamp), f"{who}: {what}"))
    finally:
        mesh.stop()
        shutil.rmtree(work, ignore_errors=True)
    events.sort()
    stamps = [t for t, _ in events]
    offsets: dict[str, list[float]] = defaultdict(list)
    for s, a, e in trips[50:]:
        seen: dict[str, int] = defaultdict(int)
        for t, what in events[bisect.bisect_left(stamps, s) : bisect.bisect_right(stamps, e)]:
            seen[what] += 1
            offsets[f"{what} #{seen[what]}"].append((t - s) / 1000)
        offsets["client: ACCEPTED"].append((a - s) / 1000)
        offsets["client: DONE"].append((e - s) / 1000)
    rows = sorted((statistics.median(v), k) for k, v in offsets.items() if len(v) > samples // 2)
    print(f"one task in flight, {samples} round trips; median µs after the client's submit, and the step")
    prev = 0.0
    for med, k in rows:
        print(f"{med:8.0f} µs  (+{med - prev:5.0f})  {k}")
        prev = med


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=300)
    run(ap.parse_args().samples)


if __name__ == "__main__":
    exit_on_sigterm()
    main()
