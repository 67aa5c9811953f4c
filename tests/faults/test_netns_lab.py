"""Self-tests of the network-namespace lab: fixed IPs, link faults, delay/loss, signals, cleanup.

Traffic goes only between the lab's own hosts: a TCP echo server in host A, one-shot clients in
host B. Every server exits by itself after a bound; every client has a connect/read timeout.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

from tests.faults.netns import NetnsLab, leftovers_of, netns_names, root_link_names

pytestmark = pytest.mark.faults

PORT = 7000

ECHO_SERVER = r"""
import socket, sys, threading, time
ip, port, max_s = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((ip, port))
srv.listen(16)
srv.settimeout(0.2)
print("listening", flush=True)
def echo(conn):
    with conn:
        conn.settimeout(max_s)
        try:
            while data := conn.recv(4096):
                conn.sendall(data)
        except OSError:
            pass
deadline = time.monotonic() + max_s
while time.monotonic() < deadline:
    try:
        conn, _ = srv.accept()
    except socket.timeout:
        continue
    threading.Thread(target=echo, args=(conn,), daemon=True).start()
"""

ECHO_CLIENT = r"""
import json, socket, sys, time
ip, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
out = {"ok": False}
t0 = time.monotonic()
try:
    with socket.create_connection((ip, port), timeout=timeout) as s:
        out["connect_s"] = time.monotonic() - t0
        t1 = time.monotonic()
        s.sendall(b"casper-echo")
        got = b""
        while len(got) < 11:
            chunk = s.recv(64)
            if not chunk:
                break
            got += chunk
        out["rtt_s"] = time.monotonic() - t1
        out["ok"] = got == b"casper-echo"
except OSError as exc:
    out["error"] = f"{type(exc).__name__}: {exc}"
out["elapsed_s"] = time.monotonic() - t0
print(json.dumps(out), flush=True)
"""


def start_echo_server(lab: NetnsLab, host: str, max_s: float = 60) -> subprocess.Popen[str]:
    proc = lab.run(
        host, [sys.executable, "-c", ECHO_SERVER, lab.ip(host), PORT, max_s], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "listening"
    return proc


def probe(lab: NetnsLab, src: str, dst: str, timeout: float = 1.0) -> dict[str, Any]:
    """One echo round trip from host ``src`` to host ``dst``'s fixed IP (a fresh process)."""
    proc = lab.run(
        src,
        [sys.executable, "-c", ECHO_CLIENT, lab.ip(dst), PORT, timeout],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = proc.communicate(timeout=timeout * 2 + 15)
    assert proc.returncode == 0, err
    return json.loads(out)


def probe_until(lab: NetnsLab, src: str, dst: str, ok: bool, within: float) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        res = probe(lab, src, dst)
        if res["ok"] is ok or time.monotonic() > deadline:
            return res
        time.sleep(0.1)


@pytest.fixture
def two(lab: NetnsLab) -> NetnsLab:
    lab.add_host("a")
    lab.add_host("b")
    start_echo_server(lab, "a")
    return lab


def test_hosts_get_fixed_ips_and_talk(two: NetnsLab) -> None:
    lab = two
    assert lab.ip("a") == str(lab.subnet.network_address + 10)
    assert lab.ip("b") == str(lab.subnet.network_address + 11)
    for name in ("a", "b"):
        addrs = subprocess.run(
            [*lab.exec_prefix(name), "ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, check=True
        ).stdout
        assert f"{lab.ip(name)}/24" in addrs and "127.0.0.1/8" in addrs
    assert not [n for n in root_link_names() if lab.uid in n], "the root namespace gets no lab interface"
    res = probe(lab, "b", "a")
    assert res["ok"], res
    assert res["rtt_s"] < 0.2, res


def test_link_down_blocks_and_link_up_restores(two: NetnsLab) -> None:
    lab = two
    assert probe(lab, "b", "a")["ok"]
    lab.link_down("a")
    t0 = time.monotonic()
    res = probe(lab, "b", "a", timeout=1.0)
    assert not res["ok"], res
    assert res["elapsed_s"] < 1.5, res  # the connect attempt fails or times out within its bound
    assert time.monotonic() - t0 < 10
    lab.link_up("a")
    res = probe_until(lab, "b", "a", ok=True, within=10)
    assert res["ok"], res


def test_netem_delay_loss_and_clear(two: NetnsLab) -> None:
    lab = two
    base = probe(lab, "b", "a")
    assert base["ok"] and base["rtt_s"] < 0.2, base

    lab.netem("a", delay_ms=200)
    delayed = probe(lab, "b", "a", timeout=3.0)
    assert delayed["ok"], delayed
    assert delayed["rtt_s"] >= 0.2, delayed  # A's echo is held 200 ms on its way out
    assert delayed["rtt_s"] < 1.0, delayed
    assert delayed["connect_s"] >= 0.2, delayed  # so is its SYN-ACK

    lab.netem("a", loss_pct=100)
    lost = probe(lab, "b", "a", timeout=1.0)
    assert not lost["ok"] and lost["elapsed_s"] < 1.5, lost

    lab.netem("a", delay_ms=50, jitter_ms=20, loss_pct=0)
    jittered = probe(lab, "b", "a", timeout=3.0)
    assert jittered["ok"] and 0.03 <= jittered["rtt_s"] < 1.0, jittered

    lab.clear_netem("a")
    again = probe(lab, "b", "a")
    assert again["ok"] and again["rtt_s"] < 0.2, (again, lab.netem_backend)


def test_pause_resume_kill(two: NetnsLab) -> None:
    lab = two
    server = lab.procs[0]
    lab.pause(server.pid)
    try:
        res = probe(lab, "b", "a", timeout=1.0)
        assert not res["ok"], res  # the kernel completes the handshake, nobody echoes
    finally:
        lab.resume(server.pid)
    assert probe(lab, "b", "a")["ok"]
    lab.kill(server.pid)
    assert server.poll() is not None
    res = probe(lab, "b", "a", timeout=1.0)
    assert not res["ok"] and "Refused" in res.get("error", ""), res


def test_cleanup_leaves_nothing_even_when_the_body_raises(lab: NetnsLab) -> None:
    with pytest.raises(RuntimeError, match="boom"), NetnsLab() as inner:
        inner.add_host("x")
        inner.add_host("y")
        sleeper = inner.run("x", ["sleep", "120"])
        orphan = inner.run("y", ["sh", "-c", "sleep 120 & sleep 120"])  # leaves a child behind
        inner.netem("x", delay_ms=20)
        inner.pause(sleeper.pid)
        raise RuntimeError("boom")
    assert sleeper.poll() is not None and orphan.poll() is not None
    assert inner.leftovers() == []
    # other labs (other tests, other runs) may come and go meanwhile: look only at this one's names
    assert not [n for n in netns_names() if n.startswith(inner.prefix + "-")]
    inner.cleanup()  # idempotent
    assert leftovers_of([inner.uid]) == []


def test_cleanup_after_a_half_finished_setup(lab: NetnsLab, monkeypatch: pytest.MonkeyPatch) -> None:
    inner = NetnsLab()
    try:
        inner.add_host("ok")
        real = inner._ip

        def failing(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
            if "master" in args:  # the new host's namespace and veth exist, the cable is not plugged in
                raise subprocess.CalledProcessError(1, ["ip", *args], "", "injected failure")
            return real(*args, check=check)

        monkeypatch.setattr(inner, "_ip", failing)
        with pytest.raises(subprocess.CalledProcessError):
            inner.add_host("broken")
        monkeypatch.setattr(inner, "_ip", real)
        assert any(n.startswith(inner.prefix) for n in netns_names())
        with pytest.raises(ValueError):
            inner.add_host("outside", ip="192.0.2.250")  # not in the lab subnet: refused before any change
    finally:
        inner.cleanup()
    assert inner.leftovers() == []


def test_signal_based_kill_wakes_a_paused_process(lab: NetnsLab) -> None:
    lab.add_host("a")
    proc = lab.run("a", ["sleep", "120"])
    lab.pause(proc.pid)
    lab.kill(proc.pid, signal.SIGTERM)
    assert proc.poll() == -signal.SIGTERM


def test_unavailable_machines_skip_with_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.faults import netns
    from tests.faults.conftest import make_lab_or_skip

    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    with pytest.raises(pytest.skip.Exception, match="need root"):
        make_lab_or_skip()
    monkeypatch.setattr(netns.os, "geteuid", lambda: 0)
    monkeypatch.setattr(netns.shutil, "which", lambda name: None)
    with pytest.raises(pytest.skip.Exception, match="no 'ip' binary"):
        make_lab_or_skip()


def test_labs_of_a_killed_run_are_swept(lab: NetnsLab) -> None:
    from tests.faults.netns import OWNERS_DIR, sweep_stale_labs

    inner = NetnsLab()
    try:
        inner.add_host("x")
        sleeper = inner.run("x", ["sleep", "120"])
        gone = subprocess.Popen(["true"])
        gone.wait()
        (OWNERS_DIR / inner.uid).write_text(f"{gone.pid}\n")  # as if the owning run had been killed
        swept = sweep_stale_labs()
        assert inner.uid in swept and lab.uid not in swept  # the live lab is left alone
        assert sleeper.wait(5) == -signal.SIGKILL
        assert inner.leftovers() == [] and not (OWNERS_DIR / inner.uid).exists()
        assert lab.leftovers() == [f"netns {lab.switch}"] and (OWNERS_DIR / lab.uid).exists()
    finally:
        inner.cleanup()
