"""Helpers for the agent tests: a sample repository with failing tests, a mesh pointed at FakeClaude,
and waiting for a job."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from casperd.ctl.client import ControlClient
from casperd.localmesh import LocalMesh

GIT_ENV = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@localhost",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@localhost",
    "GIT_CONFIG_GLOBAL": "/dev/null",
    "GIT_CONFIG_NOSYSTEM": "1",
}

SAMPLE = {
    "calc/__init__.py": "",
    "calc/add.py": "def add(a, b):\n    return a - b\n",
    "calc/mul.py": "def mul(a, b):\n    return a + b\n",
    "calc/neg.py": "def neg(a):\n    return a\n",
    "calc/names.py": 'NAME = "calc"\n',
    "tests/test_add.py": "from calc.add import add\n\n\ndef test_add():\n    assert add(2, 3) == 5\n",
    "tests/test_mul.py": "from calc.mul import mul\n\n\ndef test_mul():\n    assert mul(2, 3) == 6\n",
    "tests/test_neg.py": "from calc.neg import neg\n\n\ndef test_neg():\n    assert neg(4) == -4\n",
    "tests/test_names.py": "from calc.names import NAME\n\n\ndef test_name():\n    assert NAME.startswith('calc')\n",
}
FIXED = {
    **SAMPLE,
    "calc/add.py": "def add(a, b):\n    return a + b\n",
    "calc/mul.py": "def mul(a, b):\n    return a * b\n",
    "calc/neg.py": "def neg(a):\n    return -a\n",
}
TEST_CMD = f"{sys.executable} -m pytest -q tests"


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=repo, check=True, capture_output=True, text=True, env={**os.environ, **GIT_ENV}
    ).stdout


def make_repo(root: Path, files: dict[str, str] | None = None) -> Path:
    repo = root / "sample"
    repo.mkdir(parents=True)
    for rel, content in (files or SAMPLE).items():
        p = repo / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(content)
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "sample")
    return repo


def agent_env(url: str, **extra: str) -> dict[str, str]:
    return {
        "ANTHROPIC_API_KEY": "sk-test-not-a-real-key",
        "ANTHROPIC_BASE_URL": url,
        "CASPER_BACKOFF_BASE_S": "0.2",
        "CASPER_LLM_RETRIES": "6",
        "CASPER_LLM_RPM": "6000",
        **extra,
    }


def run_job(mesh: LocalMesh, timeout: float = 120.0, **args: Any) -> dict[str, Any]:
    with ControlClient(mesh.policeman.control, timeout_s=20) as c:
        job = c.request("job-submit", **args)
        deadline = time.monotonic() + timeout
        report: dict[str, Any] = {}
        while time.monotonic() < deadline:
            report = c.request("job", id=job["job_id"])
            if report["state"] in ("done", "failed", "budget-exhausted", "cancelled"):
                return report
            time.sleep(0.5)
    raise AssertionError(f"job did not end within {timeout:.0f}s; last report: {report}")


def checkout_and_test(repo: Path, branch: str, into: Path) -> subprocess.CompletedProcess[str]:
    """Clone the job's branch and run its tests for real."""
    subprocess.run(
        ["git", "clone", "-q", "-b", branch, str(repo), str(into)], check=True, env={**os.environ, **GIT_ENV}
    )
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=into,
        capture_output=True,
        text=True,
        timeout=120,
    )
