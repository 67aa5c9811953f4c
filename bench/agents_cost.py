"""What a multi-turn developer task costs, with and without incremental prompt caching.

A fixed job against the scripted Messages API (tests/support/fakeclaude.py, on 127.0.0.1, with the
API's cache rules: breakpoints, 20-block lookback, 1,024-token minimum): one developer task on a
small library (six modules of a few KB and their tests) that reads four modules, lists and
searches, runs the test suite, fixes three planted bugs, runs the suite again and finishes —
fourteen model turns, through the real ``run_code`` loop, client (streamed) and sandbox.

It runs the job twice: ``before`` (caching as it was: the system prompt and tools only) and
``after`` (plus a breakpoint on the newest turn), and prints calls, input tokens (uncached + cache
write + cache read), the cache-read share of input, the cost at the developer model's prices and
the wall time.

    .venv/bin/python -m bench.agents_cost            # both, a table
    .venv/bin/python -m bench.agents_cost --json     # figures as JSON
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from casperd.agents import developer, gitwork
from casperd.agents.claude import ClaudeClient
from casperd.agents.ratelimit import NoLimiter
from casperd.handlers import RunContext
from casperd.settings import Settings
from casperd.settingtables import DEFAULT_PRICES
from tests.support.devnode import Services
from tests.support.fakeclaude import FakeClaude, Response, reply, tool_use

MODEL = "claude-sonnet-4-6"
GIT_ENV = {
    "GIT_AUTHOR_NAME": "b",
    "GIT_AUTHOR_EMAIL": "b@localhost",
    "GIT_COMMITTER_NAME": "b",
    "GIT_COMMITTER_EMAIL": "b@localhost",
    "GIT_CONFIG_GLOBAL": "/dev/null",
    "GIT_CONFIG_NOSYSTEM": "1",
}
BUGS = {  # module: (planted, fixed)
    "bar/render.py": ("return width - filled", "return width - filled - 0"),
    "bar/eta.py": ("return done / elapsed", "return done / max(elapsed, 1e-9)"),
    "bar/units.py": ("return value * 1000", "return value * 1024"),
}


def _module(name: str, body: str) -> str:
    helpers = "\n\n".join(
        f'def {name}_helper_{i}(value, scale=1.0):\n    """Helper {i} of {name}: scales and clamps a value."""\n'
        f"    result = value * scale + {i}\n    if result < 0:\n        return 0\n    return result"
        for i in range(18)
    )
    return f'"""The {name} module of bar, a progress-bar library."""\n\n{helpers}\n\n\n{body}\n'


def make_repo(root: Path) -> Path:
    repo = root / "bar"
    files = {
        "bar/__init__.py": '"""bar: progress bars."""\n',
        "bar/render.py": _module("render", "def gap(width, filled):\n    return width - filled\n"),
        "bar/eta.py": _module("eta", "def rate(done, elapsed):\n    return done / elapsed\n"),
        "bar/units.py": _module("units", "def kib(value):\n    return value * 1000\n"),
        "bar/style.py": _module("style", "STYLE = 'classic'\n"),
        "bar/term.py": _module("term", "WIDTH = 80\n"),
        "tests/test_bar.py": "def test_ok():\n    assert True\n",
    }
    for rel, text in files.items():
        path = repo / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    env = {**os.environ, **GIT_ENV}
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "bar"]):
        subprocess.run(["git", *args], cwd=repo, check=True, env=env, capture_output=True)
    return repo


def script() -> list[Response]:
    """The developer's fourteen turns."""
    steps: list[dict[str, Any]] = [
        tool_use("list_files", {"path": "."}),
        tool_use("read_file", {"path": "bar/render.py"}),
        tool_use("read_file", {"path": "bar/eta.py"}),
        tool_use("read_file", {"path": "bar/units.py"}),
        tool_use("read_file", {"path": "bar/style.py"}),
        tool_use("search", {"pattern": "def "}),
        tool_use("run_command", {"command": "python3 -c \"import bar.render, bar.eta, bar.units; print('ok')\""}),
    ]
    for path, (old, new) in BUGS.items():
        steps.append(tool_use("replace_in_file", {"path": path, "old": old, "new": new}))
    steps += [
        tool_use("read_file", {"path": "bar/term.py"}),
        tool_use("run_command", {"command": "git diff --stat"}),
        tool_use("read_file", {"path": "bar/units.py", "start_line": 1, "end_line": 40}),
        tool_use("finish", {"summary": "fixed the three bugs in render, eta and units"}),
    ]
    return [reply(s) for s in steps]


async def run_once(incremental: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="casper-bench-cost-") as tmp, FakeClaude() as fake:
        root = Path(tmp)
        repo = make_repo(root)
        fake.push(*script())
        settings = Settings(state_dir=root / "state", node_id="developer-bench")
        claude = ClaudeClient(
            api_key="sk-bench",
            base_url=fake.url,
            limiter=NoLimiter(),
            prices=DEFAULT_PRICES,
            cache_turns=incremental,
        )
        svc = Services(settings, claude)
        ctx = RunContext(
            node_id="developer-bench",
            workspace=settings.workspace,
            shell_timeout_s=60,
            output_cap=16384,
            task_id=uuid.uuid4(),
            services=svc,
        )
        base = (await gitwork.git("rev-parse", "HEAD", cwd=repo)).decode().strip()
        t0 = time.perf_counter()
        try:
            result = await developer.run_code(
                ctx, {"repo": str(repo), "base": base, "instructions": "fix the three bugs in bar", "model": MODEL}
            )
        finally:
            await claude.close()
        wall = time.perf_counter() - t0
        billed = fake.billed()
    usage = result.output["usage"]
    total_in = usage["input_tokens"] + usage["cache_read_tokens"] + usage["cache_write_tokens"]
    assert {k: usage[k] for k in billed} == billed, (usage, billed)  # our report is the server's bill
    return {
        "mode": "after (incremental)" if incremental else "before (prefix only)",
        "calls": usage["calls"],
        "input_tokens": total_in,
        "uncached_input": usage["input_tokens"],
        "cache_write": usage["cache_write_tokens"],
        "cache_read": usage["cache_read_tokens"],
        "cache_read_share": round(usage["cache_read_tokens"] / total_in, 3) if total_in else 0.0,
        "output_tokens": usage["output_tokens"],
        "cost_usd": usage["cost_usd"],
        "wall_s": round(wall, 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.agents_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--only", choices=("before", "after"), help="run one mode only")
    a = p.parse_args(argv)
    modes = [m for m in (False, True) if a.only is None or (a.only == "after") == m]
    rows = [asyncio.run(run_once(m)) for m in modes]
    if a.json:
        print(json.dumps(rows, indent=2))
        return 0
    cols = list(rows[0])
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r[c]) for c in cols))
    if len(rows) == 2:
        saved = 1 - rows[1]["cost_usd"] / rows[0]["cost_usd"] if rows[0]["cost_usd"] else 0.0
        print(f"cost saved by incremental caching: {saved:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
