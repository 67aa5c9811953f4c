"""A node started with --metrics-port serves /metrics on its loop while it works (casperd.metricsweb)."""

from __future__ import annotations

import re
import socket
import urllib.request
from typing import Any

from casperd.messages import TaskSpec
from tests.integration.test_mesh import submit_and_wait


def test_the_policeman_serves_its_metrics_while_it_brokers(make_mesh: Any) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mesh = make_mesh(developers=1, testers=0, policeman_env={"CASPER_METRICS_PORT": str(port)})
    submit_and_wait(mesh, [TaskSpec(type="echo", input={"i": i}) for i in range(3)], timeout=60)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    done = re.search(r'^casper_task_completion_seconds_count\{status="complete"\} (\S+)$', text, re.M)
    assert done is not None and float(done.group(1)) >= 3, text[:2000]
