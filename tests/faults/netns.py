"""A multi-host lab without Docker: Linux network namespaces on one bridge, with fixed IPs.

Topology of one :class:`NetnsLab` (``uid`` = 6 random hex digits, names at most 15 characters)::

    namespace casper-UID-sw        bridge cbrUID  <- veth cvhUID0 ... cvhUIDn (the "cables")
    namespace casper-UID-0 ..n     eth0 = the other end of cvhUIDi, 10.231.X.(10+i)/24, lo up

Every host is a namespace whose ``eth0`` is a veth plugged into the lab's bridge. The bridge lives
in a namespace of its own (``casper-UID-sw``), not in the root namespace: on a host where
``br_netfilter`` is loaded (Docker loads it) bridged frames go through the root namespace's
iptables FORWARD chain, whose policy Docker sets to DROP, so a root-namespace bridge would
silently drop all traffic between the hosts (and fixing that means editing the host firewall).
In its own namespace the bridge meets an empty ruleset, the root namespace gets no interface,
no address and no route at all, and every packet the lab carries stays inside the lab.

Faults: ``link_down``/``link_up`` unplug the host's cable at the bridge; ``netem`` delays, jitters
or drops the host's egress (``tc qdisc netem`` on ``eth0`` when the kernel has it; otherwise, as
on kernels built without ``sch_netem``, iptables rules in the host's own namespace: ``statistic``
DROP for loss and NFQUEUE to the delayer in ``nfq_delay.py`` for delay and jitter);
``pause``/``resume``/``kill`` signal processes. ``cleanup`` kills every process left in the lab's
namespaces and deletes the namespaces (which deletes the veths and the bridge with them); it is
idempotent, safe after a half-finished setup, and registered with ``atexit`` as a last resort.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import os
import pwd
import random
import secrets
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NFQ_DELAY = Path(__file__).with_name("nfq_delay.py")
NS_PREFIX = "casper-"
NETEM_CHAIN = "CASPER_NETEM"
#: every lab uid made by this process, for the session-end leak check
CREATED: list[str] = []
#: one file per live lab, named by its uid, holding the pid of the process that owns it
OWNERS_DIR = Path("/run/casper-netns-labs")


class LabUnavailable(RuntimeError):
    """This machine cannot run a lab (not root, no ``ip``, no namespaces, no bridge or veth)."""


@dataclass
class Host:
    name: str
    index: int
    ns: str
    ip: str
    cable: str  # the host-side veth, in the switch namespace
    ifname: str = "eth0"


def _run(
    argv: list[str],
    *,
    check: bool = True,
    timeout: float = 20.0,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
    )
    if check and res.returncode != 0:
        raise subprocess.CalledProcessError(res.returncode, argv, res.stdout, res.stderr)
    return res


def netns_names() -> list[str]:
    """Names in ``ip netns list`` (empty when ``ip`` is missing or fails)."""
    ip = shutil.which("ip")
    if ip is None:
        return []
    res = _run([ip, "netns", "list"], check=False)
    return [line.split()[0] for line in res.stdout.splitlines() if line.strip()]


def root_link_names() -> list[str]:
    """Interface names in the root namespace (``ip -o link``)."""
    ip = shutil.which("ip")
    if ip is None:
        return []
    res = _run([ip, "-o", "link", "show"], check=False)
    names = []
    for line in res.stdout.splitlines():
        parts = line.split(":", 2)
        if len(parts) > 1:
            names.append(parts[1].strip().split("@")[0])
    return names


def leftovers_of(uids: list[str]) -> list[str]:
    """Namespaces and root-namespace links still named after any of ``uids``."""
    if not uids:
        return []
    found = [f"netns {n}" for n in netns_names() if any(n.startswith(f"{NS_PREFIX}{u}-") for u in uids)]
    found += [f"link {n}" for n in root_link_names() if any(u in n for u in uids)]
    return found


def pick_subnet() -> ipaddress.IPv4Network:
    """A 10.231.X.0/24 that no address or route of the root namespace overlaps."""
    ip = shutil.which("ip") or "ip"
    used: list[ipaddress.IPv4Network] = []
    for argv in ([ip, "-4", "-o", "addr", "show"], [ip, "-4", "route", "show", "table", "all"]):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            for tok in _run(argv, check=False).stdout.split():
                with contextlib.suppress(ValueError):
                    if tok[0].isdigit():
                        used.append(ipaddress.IPv4Network(tok, strict=False))
    octets = list(range(256))
    random.shuffle(octets)
    for x in octets:
        net = ipaddress.IPv4Network(f"10.231.{x}.0/24")
        if not any(net.overlaps(u) for u in used):
            return net
    raise LabUnavailable("no free 10.231.X.0/24 subnet")


class NetnsLab:
    """N hosts (network namespaces) on one bridge; see the module docstring."""

    def __init__(self, subnet: str | None = None, uid: str | None = None) -> None:
        if os.geteuid() != 0:
            raise LabUnavailable("network namespaces need root (CAP_SYS_ADMIN and CAP_NET_ADMIN)")
        ip = shutil.which("ip")
        if ip is None:
            raise LabUnavailable("no 'ip' binary (apt-get install iproute2)")
        self.ip_bin = ip
        self.uid = uid or secrets.token_hex(3)
        self.prefix = f"{NS_PREFIX}{self.uid}"
        self.switch = f"{self.prefix}-sw"
        self.bridge = f"cbr{self.uid}"
        self.subnet = ipaddress.IPv4Network(subnet) if subnet else pick_subnet()
        self.hosts: dict[str, Host] = {}
        self.procs: list[subprocess.Popen[Any]] = []
        self.netem_backend: str | None = None
        self._namespaces: list[str] = []  # every namespace we tried to make, in order
        self._delayers: dict[str, subprocess.Popen[str]] = {}
        self._closed = False
        CREATED.append(self.uid)
        atexit.register(self.cleanup)
        with contextlib.suppress(OSError):
            OWNERS_DIR.mkdir(mode=0o700, exist_ok=True)
            (OWNERS_DIR / self.uid).write_text(f"{os.getpid()}\n")
        try:
            self._make_switch()
        except BaseException:
            self.cleanup()
            raise

    # --- setup --------------------------------------------------------------------------------
    def _ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run([self.ip_bin, *args], check=check)

    def _make_switch(self) -> None:
        self._namespaces.append(self.switch)
        res = self._ip("netns", "add", self.switch, check=False)
        if res.returncode != 0:
            raise LabUnavailable(f"'ip netns add' failed (no CAP_SYS_ADMIN?): {res.stderr.strip()}")
        res = self._ip("-n", self.switch, "link", "add", self.bridge, "type", "bridge", check=False)
        if res.returncode != 0:
            raise LabUnavailable(f"cannot create a bridge (no bridge support?): {res.stderr.strip()}")
        probe = f"cvp{self.uid}"
        res = self._ip(
            "-n", self.switch, "link", "add", probe, "type", "veth", "peer", "name", probe + "x", check=False
        )
        if res.returncode != 0:
            raise LabUnavailable(f"cannot create a veth pair (no veth support?): {res.stderr.strip()}")
        self._ip("-n", self.switch, "link", "del", probe)
        self._ip("-n", self.switch, "link", "set", self.bridge, "up")
        self._ip("-n", self.switch, "link", "set", "lo", "up")

    def host_ip(self, index: int) -> str:
        return str(self.subnet.network_address + 10 + index)

    def add_host(self, name: str, ip: str | None = None) -> Host:
        """A new namespace ``casper-UID-i`` with ``eth0`` at ``ip`` (default .10, .11, ...) on the bridge."""
        if self._closed:
            raise RuntimeError("this lab was cleaned up")
        if name in self.hosts:
            raise ValueError(f"host {name!r} exists")
        index = len(self._namespaces) - 1
        addr = ipaddress.IPv4Address(ip or self.host_ip(index))
        if addr not in self.subnet:
            raise ValueError(f"{addr} is not in the lab subnet {self.subnet}")
        ns, cable = f"{self.prefix}-{index}", f"cvh{self.uid}{index}"
        self._namespaces.append(ns)
        self._ip("netns", "add", ns)
        self._ip(
            "-n",
            self.switch,
            "link",
            "add",
            cable,
            "type",
            "veth",
            "peer",
            "name",
            f"cvn{self.uid}{index}",
            "netns",
            ns,
        )
        self._ip("-n", self.switch, "link", "set", cable, "master", self.bridge, "up")
        self._ip("-n", ns, "link", "set", f"cvn{self.uid}{index}", "name", "eth0")
        self._ip("-n", ns, "addr", "add", f"{addr}/{self.subnet.prefixlen}", "dev", "eth0")
        self._ip("-n", ns, "link", "set", "eth0", "up")
        self._ip("-n", ns, "link", "set", "lo", "up")
        host = Host(name, index, ns, str(addr), cable)
        self.hosts[name] = host
        return host

    def ip(self, name: str) -> str:
        return self.hosts[name].ip

    # --- processes ----------------------------------------------------------------------------
    def exec_prefix(self, name: str) -> list[str]:
        return [self.ip_bin, "netns", "exec", self.hosts[name].ns]

    def run(self, name: str, argv: list[str], *, user: str | None = None, **popen_kw: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` in host ``name`` (as ``user`` if given); the lab kills it at cleanup."""
        prefix = self.exec_prefix(name)
        if user is not None:  # drop privileges after entering the namespace (setns needs root)
            setpriv = shutil.which("setpriv")
            if setpriv is None:
                raise LabUnavailable("running as another user needs 'setpriv' (util-linux)")
            pw = pwd.getpwnam(user)
            prefix += [setpriv, f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups", "--"]
        popen_kw.setdefault("stdin", subprocess.DEVNULL)
        popen_kw.setdefault("start_new_session", True)
        proc = subprocess.Popen([*prefix, *map(str, argv)], **popen_kw)
        self.procs.append(proc)
        return proc

    def pause(self, pid: int) -> None:
        os.kill(pid, signal.SIGSTOP)

    def resume(self, pid: int) -> None:
        os.kill(pid, signal.SIGCONT)

    def kill(self, pid: int, sig: int = signal.SIGKILL) -> None:
        """Signal ``pid`` (SIGKILL by default; a paused process is woken to act on other signals);
        if it is a process ``run`` started, reap it (bounded)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
            if sig != signal.SIGKILL:
                os.kill(pid, signal.SIGCONT)
        for proc in self.procs:
            if proc.pid == pid:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)

    # --- faults -------------------------------------------------------------------------------
    def link_down(self, name: str) -> None:
        self._ip("-n", self.switch, "link", "set", self.hosts[name].cable, "down")

    def link_up(self, name: str) -> None:
        self._ip("-n", self.switch, "link", "set", self.hosts[name].cable, "up")

    def netem(self, name: str, delay_ms: float = 0, jitter_ms: float = 0, loss_pct: float = 0) -> None:
        """Delay (± jitter) and/or drop ``loss_pct`` % of the host's egress on ``eth0``."""
        if not 0 <= loss_pct <= 100 or delay_ms < 0 or jitter_ms < 0:
            raise ValueError("need delay_ms >= 0, jitter_ms >= 0, 0 <= loss_pct <= 100")
        self.clear_netem(name)
        if not (delay_ms or jitter_ms or loss_pct):
            return
        host = self.hosts[name]
        if self.netem_backend in (None, "tc-netem"):
            args = ["netem"]
            if delay_ms or jitter_ms:
                args += ["delay", f"{delay_ms}ms"] + ([f"{jitter_ms}ms"] if jitter_ms else [])
            if loss_pct:
                args += ["loss", f"{loss_pct}%"]
            res = (
                _run(["tc", "-n", host.ns, "qdisc", "replace", "dev", host.ifname, "root", *args], check=False)
                if shutil.which("tc")
                else None
            )
            if res is not None and res.returncode == 0:
                self.netem_backend = "tc-netem"
                return
            if self.netem_backend == "tc-netem":
                raise RuntimeError(f"tc netem failed: {res.stderr.strip() if res else 'no tc'}")
            self.netem_backend = "iptables-nfqueue"  # this kernel has no sch_netem (or there is no tc)
        self._netem_nfqueue(host, delay_ms, jitter_ms, loss_pct)

    def _netem_nfqueue(self, host: Host, delay_ms: float, jitter_ms: float, loss_pct: float) -> None:
        iptables = shutil.which("iptables")
        if iptables is None:
            raise LabUnavailable("no sch_netem in this kernel and no 'iptables' for the NFQUEUE fallback")
        rules: list[list[str]] = []
        if loss_pct >= 100:
            rules.append(["-o", host.ifname, "-j", "DROP"])
        elif loss_pct > 0:
            rules.append(
                [
                    "-o",
                    host.ifname,
                    "-m",
                    "statistic",
                    "--mode",
                    "random",
                    "--probability",
                    f"{loss_pct / 100:.6f}",
                    "-j",
                    "DROP",
                ]
            )
        if delay_ms or jitter_ms:
            proc = self.run(
                host.name,
                [
                    sys.executable,
                    str(NFQ_DELAY),
                    "--queue",
                    "0",
                    "--delay-ms",
                    str(delay_ms),
                    "--jitter-ms",
                    str(jitter_ms),
                    "--max-s",
                    "900",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            self._delayers[host.name] = proc
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], 15)
            line = proc.stdout.readline() if ready else ""
            if line.strip() != "ready":
                self._stop_delayer(host.name)
                raise RuntimeError(f"the NFQUEUE delayer did not start: {line!r}")
            rules.append(["-o", host.ifname, "-j", "NFQUEUE", "--queue-num", "0", "--queue-bypass"])
        ipt = [*self.exec_prefix(host.name), iptables, "-w", "5"]
        _run([*ipt, "-N", NETEM_CHAIN])
        for rule in rules:
            _run([*ipt, "-A", NETEM_CHAIN, *rule])
        _run([*ipt, "-I", "OUTPUT", "1", "-j", NETEM_CHAIN])

    def _stop_delayer(self, name: str) -> None:
        proc = self._delayers.pop(name, None)
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()

    def clear_netem(self, name: str) -> None:
        host = self.hosts[name]
        if shutil.which("tc"):
            _run(["tc", "-n", host.ns, "qdisc", "del", "dev", host.ifname, "root"], check=False)
        iptables = shutil.which("iptables")
        if iptables is not None and self.netem_backend == "iptables-nfqueue":
            # the rules go first, so no new packet is queued to a delayer about to exit
            ipt = [*self.exec_prefix(name), iptables, "-w", "5"]
            _run([*ipt, "-D", "OUTPUT", "-j", NETEM_CHAIN], check=False)
            _run([*ipt, "-F", NETEM_CHAIN], check=False)
            _run([*ipt, "-X", NETEM_CHAIN], check=False)
        self._stop_delayer(name)

    # --- teardown -----------------------------------------------------------------------------
    def _ns_pids(self, ns: str) -> list[int]:
        res = self._ip("netns", "pids", ns, check=False)
        return [int(p) for p in res.stdout.split() if p.isdigit()]

    def cleanup(self) -> None:
        """Kill everything in the lab, delete its namespaces (and with them veths and bridge)."""
        if self._closed:
            return
        for name in list(self._delayers):
            with contextlib.suppress(Exception):
                self._stop_delayer(name)
        for proc in self.procs:  # what run() started: SIGTERM, a short grace, then SIGKILL
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGCONT)
                    proc.terminate()
        deadline = time.monotonic() + 3
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.0, deadline - time.monotonic()))
        existing = set(netns_names())
        mine = [ns for ns in self._namespaces if ns in existing]
        for _ in range(50):  # anything else still running in our namespaces (children, LocalMesh nodes)
            pids = [pid for ns in mine for pid in self._ns_pids(ns)]
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            for proc in self.procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(0.05)
            time.sleep(0.1)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(2)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        for ns in reversed(mine):  # hosts first, the switch (and its bridge) last
            self._ip("netns", "del", ns, check=False)
        self._closed = True
        atexit.unregister(self.cleanup)
        if not self.leftovers():
            (OWNERS_DIR / self.uid).unlink(missing_ok=True)

    def leftovers(self) -> list[str]:
        return leftovers_of([self.uid])

    @classmethod
    def _orphan(cls, uid: str) -> NetnsLab:
        """A handle on a lab some dead process made, good for ``cleanup`` only."""
        lab = cls.__new__(cls)
        lab.ip_bin, lab.uid, lab.prefix = shutil.which("ip") or "ip", uid, f"{NS_PREFIX}{uid}"
        lab.switch, lab.procs, lab._delayers, lab._closed = f"{lab.prefix}-sw", [], {}, False
        hosts = sorted(n for n in netns_names() if n.startswith(lab.prefix + "-") and n != lab.switch)
        lab._namespaces = [lab.switch, *hosts]
        return lab

    def __enter__(self) -> NetnsLab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def sweep_stale_labs() -> list[str]:
    """Clean up labs whose owning process is gone (killed before its cleanup could run): their
    namespaces, the processes still in them, and their owner files. Live labs are left alone."""
    swept: list[str] = []
    if os.geteuid() != 0 or not OWNERS_DIR.is_dir():
        return swept
    for owner in OWNERS_DIR.iterdir():
        try:
            pid = int(owner.read_text().split()[0])
            os.kill(pid, 0)
            continue  # the owner still runs (or its pid was reused: then leave it alone, to be safe)
        except ProcessLookupError:
            pass
        except (OSError, ValueError, IndexError):
            continue
        lab = NetnsLab._orphan(owner.name)
        lab.cleanup()
        if not lab.leftovers():
            owner.unlink(missing_ok=True)
            swept.append(owner.name)
    return swept
