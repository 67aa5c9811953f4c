"""compose.yaml brought up for real: a healthy mesh that runs work into Postgres, runs as non-root
with its secrets as files only, and takes a developer added next to the fixed ones.

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
        proc = m.run("exec", "-T", node, "caspectl", "health", "-o", "json", timeout=60)
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


def test_non_root_and_secrets_are_private_files(healthy_mesh: ComposeMesh) -> None:
    m = healthy_mesh
    # every process of every container runs as a non-root user; casperd's as casper (10001)
    for service in SERVICES:
        c = m.container(service)
        top = c.top(ps_args="-eo pid,uid,args")
        uid_col = top["Titles"].index("UID")
        uids = {row[uid_col] for row in top["Processes"]}
        assert uids and "0" not in uids, (service, top["Processes"])
        if service in NODES:
            assert uids == {str(CASPER_UID)}, (service, top["Processes"])
            assert c.attrs["Config"]["User"] == f"{CASPER_UID}:{CASPER_UID}"
            assert m.exec(service, ["id", "-u"]).stdout.strip() == str(CASPER_UID)

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
        other = m.exec(node, ["cat", "/run/secrets/curve.key"], user="65534:65534")
        assert other.returncode != 0 and "Permission denied" in other.stderr, (node, other.returncode)
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
