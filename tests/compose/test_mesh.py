"""compose.yaml brought up for real: a healthy mesh that runs work into Postgres, runs casperd as
casper (10001) and task code as casper-task (10002) with its secrets as files only that task code
cannot read, and takes a developer added next to the fixed ones.

One mesh for the module (see conftest.py); the tests leave it as they found it.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from tests.compose.composemesh import (
    CASPER_UID,
    NODES,
    SERVICES,
    TASK_UID,
    TIMINGS,
    WORKERS,
    ComposeMesh,
    new_tag,
    sleep_tasks,
)

pytestmark = [pytest.mark.compose, pytest.mark.timeout(600)]

DEVELOPER_3 = Path(__file__).with_name("compose.developer-3.yaml")


def test_mesh_is_healthy_and_runs_500_tasks_into_postgres(healthy_mesh: ComposeMesh) -> None:
    m = healthy_mesh
    assert {s: m.health(s) for s in SERVICES} == dict.fromkeys(SERVICES, "healthy")
    # caspectl in any node finds its own daemon through CASPER_CONTROL
    for node in NODES:
        proc = m.run("exec", "-T", "-u", "casper", node, "caspectl", "health", "-o", "json", timeout=60)
        health = json.loads(proc.stdout)
        assert health["node_id"] == node and health["healthy"], health
    peers = m.peers()
    assert set(peers) == set(WORKERS)
    for node in WORKERS:
        assert peers[node]["endpoint"] == f"tcp://{m.ip(node)}:5555"  # each advertises its fixed address

    tag = new_tag("bulk")
    lines = "".join(json.dumps({"type": "echo", "input": {"tag": tag, "i": i}}) + "\n" for i in range(500))
    proc = m.run(
        "exec",
        "-T",
        "-u",
        "casper",
        "policeman",
        "caspectl",
        "submit-bulk",
        "-",
        "--wait",
        "--wait-timeout",
        "180",
        "-o",
        "json",
        stdin=lines,
        timeout=240,
    )
    results = json.loads(proc.stdout)
    assert len(results) == 500
    assert {r["status"] for r in results} == {"complete"}
    assert sorted(r["output"]["i"] for r in results) == list(range(500))

    # every row is in Postgres, asked inside its container
    out = m.run(
        "exec",
        "-T",
        "postgres",
        "psql",
        "-U",
        "casper",
        "-d",
        "casper",
        "-tAc",
        "select status, count(*) from tasks group by 1",
        timeout=60,
    ).stdout
    by_status = {s: int(n) for s, n in (line.split("|") for line in out.split())}
    assert set(by_status) == {"complete"} and by_status["complete"] >= 500, by_status
    assert m.counts(tag) == {"complete": 500}
    ran_on = m.ran_on(tag)
    assert set(ran_on) <= set(WORKERS) and len(ran_on) >= 2, ran_on  # spread over the workers


def _secret_values(m: ComposeMesh) -> dict[str, str]:
    """Every secret value, read where it is mounted, by the user that may read it."""
    values = {}
    for node in NODES:
        proc = m.exec(node, ["cat", "/run/secrets/curve.key"])
        assert proc.returncode == 0, f"{node} cannot read its own key: {proc.stderr}"
        values[f"{node} curve key"] = proc.stdout.strip()
    proc = m.exec("policeman", ["cat", "/run/secrets/database_password"])
    assert proc.returncode == 0, proc.stderr
    values["database password"] = proc.stdout.strip()
    proc = m.exec("postgres", ["cat", "/run/secrets/postgres_password"], user="postgres")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == values["database password"]
    for name in ("redis_password", "cache_key"):
        proc = m.exec("policeman", ["cat", f"/run/secrets/{name}"])
        assert proc.returncode == 0, proc.stderr
        values[name] = proc.stdout.strip()
    proc = m.exec("developer-1", ["cat", "/run/secrets/anthropic_api_key"])
    assert proc.returncode == 0, proc.stderr
    if proc.stdout.strip():
        values["anthropic api key"] = proc.stdout.strip()
    assert all(len(v) >= 20 for v in values.values())
    return values


# casperd's pid in a casperd container: the child of the init (PID 1) whose command names casperd
CASPERD_PID = (
    "for d in /proc/[0-9]*; do "
    "[ \"$(awk '/^PPid:/{print $2}' $d/status 2>/dev/null)\" = 1 ] && "
    "tr '\\0' ' ' < $d/cmdline 2>/dev/null | grep -q casperd && echo ${d#/proc/}; "
    "done"
)
STATE_DIR = "/home/casper/.local/state/casper"
HEALTHCHECKS = ("caspectl health", "redis-cli ping", "pg_isready")


def _status(m: ComposeMesh, service: str, pid: str) -> dict[str, str]:
    text = m.exec(service, ["cat", f"/proc/{pid}/status"]).stdout
    return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


# Imports every node makes, in a fresh interpreter with the node's environment; ``-v`` names the
# file each module's code comes from, and a module compiled from source has no such line.
IMPORTS = "import casperd.node, casperd.broker, casperd.store, casperd.worker, casperd.ctl.main"


def test_nodes_start_from_the_images_bytecode(healthy_mesh: ComposeMesh) -> None:
    """Every import is served by bytecode compiled into the image (the builder's compileall and the
    final stage's, for the standard library), none compiled at start: compiling cost a node 1.4 s
    of CPU at each start and ~4 MB of RSS for its lifetime."""
    for node in NODES:
        proc = healthy_mesh.exec(node, ["python3", "-v", "-c", f"import sys; {IMPORTS}; print(sys.pycache_prefix)"])
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.strip() == "None", (node, proc.stdout)  # bytecode beside the sources, not elsewhere
        from_bytecode = re.findall(r"^# code object from '[^']+\.pyc'$", proc.stderr, re.M)
        from_source = re.findall(r"^# code object from [^'].*$", proc.stderr, re.M)
        loaded = re.findall(r"^import '[^']+' # <_frozen_importlib_external\.SourceFileLoader", proc.stderr, re.M)
        assert len(loaded) > 300, (node, len(loaded))
        assert from_source == [] and len(from_bytecode) == len(loaded), (node, from_source[:10])


def test_casperd_as_casper_with_four_capabilities_and_secrets_are_private_files(healthy_mesh: ComposeMesh) -> None:
    m = healthy_mesh
    # casperd runs as casper (10001); the containers start as root, and only the init (PID 1,
    # docker-init) stays root; the data services run no root process at all
    for service in SERVICES:
        c = m.container(service)
        top = c.top(ps_args="-eo pid,uid,args")
        uid_col, args_col = top["Titles"].index("UID"), top["Titles"].index("COMMAND")
        # (a healthcheck in flight runs as the container's user: not part of the service)
        procs = [(r[uid_col], r[args_col]) for r in top["Processes"] if not any(h in r[args_col] for h in HEALTHCHECKS)]
        if service not in NODES:
            assert procs and all(uid != "0" for uid, _ in procs), (service, procs)
            continue
        assert c.attrs["Config"]["User"] == "0:0"
        assert c.attrs["HostConfig"]["CapDrop"] == ["ALL"]
        assert sorted(c.attrs["HostConfig"]["CapAdd"]) == ["CHOWN", "KILL", "SETGID", "SETUID"]
        root = [args for uid, args in procs if uid == "0"]
        assert len(root) == 1 and "docker-init" in root[0], (service, procs)
        assert {uid for uid, args in procs if "casperd" in args} == {str(CASPER_UID)}, (service, procs)
        # inside: casperd is casper with exactly SETUID, SETGID, CHOWN, KILL (0xe1) as ambient
        # capabilities and bounding set, under no-new-privileges
        pids = m.exec(service, ["sh", "-c", CASPERD_PID]).stdout.split()
        assert len(pids) == 1, (service, pids)
        pid = pids[0]
        st = _status(m, service, pid)
        assert st["Uid"].split() == [str(CASPER_UID)] * 4, st
        assert (st["CapAmb"], st["CapBnd"], st["CapEff"]) == ("00000000000000e1",) * 3, st
        assert st["NoNewPrivs"] == "1", st
        assert m.exec(service, ["id", "-u"]).stdout.strip() == str(CASPER_UID)  # exec as casper (composemesh)
        # docker-compose exec's default user, root, holds no CAP_DAC_OVERRIDE: casper's key is closed to it
        denied = m.exec(service, ["cat", "/run/secrets/curve.key"], user="0")
        assert denied.returncode != 0 and "Permission denied" in denied.stderr, (service, denied.returncode)

    # secret files: mode 0400, owned by the service's user; nobody else may read them
    for node in NODES:
        listing = m.exec(node, ["sh", "-c", "stat -c '%n %a %u' /run/secrets/*"]).stdout.split("\n")
        files = {line.split()[0]: line.split()[1:] for line in listing if line.strip()}
        expected = {"curve.key", "curve.pub", "authorized_keys", "redis_password", "cache_key"} | (
            {"database_password", "anthropic_api_key"} if node == "policeman" else {"broker.pub"}
        )
        if node.startswith("developer"):
            expected.add("anthropic_api_key")  # the API key only where Claude is called (issue #9)
        assert set(files) == {f"/run/secrets/{name}" for name in expected}, files
        for name, (mode, uid) in files.items():
            assert (mode, uid) == ("400", str(CASPER_UID)), (node, name, mode, uid)
        for user in ("65534:65534", f"{TASK_UID}:{TASK_UID}"):
            other = m.exec(node, ["cat", "/run/secrets/curve.key"], user=user)
            assert other.returncode != 0 and "Permission denied" in other.stderr, (node, user, other.returncode)
    pg_uid = m.exec("postgres", ["id", "-u", "postgres"]).stdout.strip()
    assert m.exec("postgres", ["stat", "-c", "%a %u", "/run/secrets/postgres_password"]).stdout.split() == [
        "400",
        pg_uid,
    ]
    other = m.exec("postgres", ["cat", "/run/secrets/postgres_password"], user="65534:65534")
    assert other.returncode != 0 and "Permission denied" in other.stderr

    # no secret value in any container's configuration (docker inspect) or log (docker logs)
    values = _secret_values(m)
    for c in m.containers():
        inspect = json.dumps(c.attrs)
        logs = c.logs().decode(errors="replace")
        for what, value in values.items():
            assert value not in inspect, f"{what} appears in docker inspect of {c.name}"
            assert value not in logs, f"{what} appears in docker logs of {c.name}"
        for var in c.attrs["Config"]["Env"] or []:
            name = var.split("=", 1)[0]
            if re.search(r"PASSWORD|SECRET|API_KEY|TOKEN", name):
                assert name.endswith("_FILE"), f"{c.name}: {name} is a secret-looking variable with a value"


def test_jobs_see_one_repository_everywhere_and_name_the_missing_key(healthy_mesh: ComposeMesh) -> None:
    """/repos is one volume on every casperd node; with the (empty) API key secret of the test
    secrets, `caspectl run` is refused at once and says which key is missing (no API is called)."""
    m = healthy_mesh
    make = (
        "set -e; rm -rf /repos/sample; mkdir -p /repos/sample; cd /repos/sample; git init -q; "
        "printf 'def add(a, b):\\n    return a - b\\n' > calc.py; git add calc.py; "
        "git -c user.name=t -c user.email=t@localhost commit -qm sample"
    )
    made = m.exec("policeman", ["sh", "-c", make])
    assert made.returncode == 0, made.stderr
    for node in ("developer-1", "developer-2", "tester"):
        log = m.exec(node, ["git", "-C", "/repos/sample", "log", "--oneline"])
        assert log.returncode == 0 and "sample" in log.stdout, (node, log.stderr)
    t0 = time.monotonic()
    run = m.exec("policeman", ["caspectl", "run", "make add add", "--repo", "/repos/sample", "-o", "json"], timeout=120)
    assert run.returncode == 1, (run.returncode, run.stdout[-2000:], run.stderr[-2000:])
    report = json.loads(run.stdout)
    assert report["state"] == "failed" and any("ANTHROPIC_API_KEY" in n for n in report["notes"]), report
    assert time.monotonic() - t0 < 60


def test_added_developer_receives_work(healthy_mesh: ComposeMesh) -> None:
    """`--scale` cannot add a developer with a fixed address: an override file can (and must
    stay in the project's file list, so that the module's `down -v` removes its volume)."""
    m = healthy_mesh
    m.files.append(DEVELOPER_3)
    try:
        t0 = time.monotonic()
        m.run("up", "-d", "--no-build", "--no-deps", "developer-3", timeout=180)
        m.wait_healthy(["developer-3"], timeout=120)
        peers = m.wait_peers({*WORKERS, "developer-3"}, timeout=60)
        TIMINGS.append(("added developer-3: up -> healthy and registered", time.monotonic() - t0))
        assert peers["developer-3"]["endpoint"] == f"tcp://{m.ip('developer-3')}:5555"
        networks = m.container("developer-3").attrs["NetworkSettings"]["Networks"]
        assert networks[m.claude_net]["IPAddress"] == m.ip("developer-3")

        tag = new_tag("scale")
        m.submit(sleep_tasks(64, 0.25, tag))
        assert m.wait_complete(tag, 64, timeout=120) == {"complete": 64}
        ran_on = m.ran_on(tag)
        assert ran_on.get("developer-3", 0) > 0, ran_on
    finally:
        m.run("rm", "-s", "-f", "developer-3", timeout=120, check=False)


def test_a_shell_task_runs_as_casper_task_and_cannot_read_any_secret(healthy_mesh: ComposeMesh) -> None:
    """Issue #9 point 5 in containers: task code runs as casper-task (10002), which cannot read
    /run/secrets/*, the node's key, its state directory or casperd's environment."""
    m = healthy_mesh
    secrets = {n: m.exec(n, ["sh", "-c", "ls /run/secrets"]).stdout.split() for n in ("developer-1", "developer-2")}
    state_files = {
        n: m.exec(n, ["find", STATE_DIR, "-path", f"{STATE_DIR}/workspaces", "-prune", "-o", "-print"]).stdout.split()
        for n in ("developer-1", "developer-2")
    }
    assert all(secrets.values()) and all(state_files.values()), (secrets, state_files)
    values = _secret_values(m)
    # one task per developer (only developers offer llm); each tries every path, both nodes' lists
    paths = sorted(
        {f"/run/secrets/{f}" for fs in secrets.values() for f in fs} | {p for ps in state_files.values() for p in ps}
    )
    probe = (
        "id -u; id -g; "
        f"for p in {' '.join(paths)}; do "
        '[ -e "$p" ] || continue; '
        'if [ -d "$p" ]; then ls "$p" >/dev/null 2>&1 && echo "READ $p" || echo "DENIED $p"; '
        'else cat "$p" 2>/dev/null && echo "READ $p" || echo "DENIED $p"; fi; done; '
        f"for pid in $({CASPERD_PID}); do "
        'cat /proc/$pid/environ 2>/dev/null && echo "READ environ" || echo "DENIED environ"; done; echo END'
    )
    tag = new_tag("isolation")
    tasks = [
        {"type": "shell", "input": {"cmd": probe}, "requires": ["llm"], "idempotency_key": f"{tag}-{i}"}
        for i in range(6)
    ]
    ids = m.submit(tasks)
    where = "id in (" + ",".join(f"'{i}'" for i in ids) + ")"
    deadline = time.monotonic() + 120
    rows: list[list[str]] = []
    while time.monotonic() < deadline:
        rows = m.psql(f"select assigned_to, output::text from tasks where {where} and status = 'complete'")
        if len(rows) == len(ids):
            break
        time.sleep(0.5)
    assert len(rows) == len(ids), m.psql(f"select status, error::text from tasks where {where}")
    for node, output in rows:
        assert node.startswith("developer-"), node
        out = json.loads(output)
        lines = out["stdout"].splitlines()
        assert lines[:2] == [str(TASK_UID), str(TASK_UID)] and lines[-1] == "END", (node, out)
        verdicts = [line for line in lines[2:-1] if line.startswith(("READ ", "DENIED "))]
        assert not [v for v in verdicts if v.startswith("READ")], (node, verdicts)
        denied = {v.split(" ", 1)[1] for v in verdicts}
        assert {f"/run/secrets/{f}" for f in secrets[node]} <= denied, (node, verdicts)
        assert "/run/secrets/curve.key" in denied and STATE_DIR in denied and "environ" in denied, (node, verdicts)
        everything = out["stdout"] + out.get("stderr", "")
        for what, value in values.items():
            assert value not in everything, f"{what} reached task code on {node}"
