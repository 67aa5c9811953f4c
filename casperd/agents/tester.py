"""The tester: apply a patch to a clean worktree of the base commit and run the test command.

Input of a ``test`` task: ``repo``, ``base``, ``test_cmd``, optional ``timeout_s``, and the patch as
attachment 0 (none: test the base commit as it is, e.g. an integration branch). pytest commands get
``--junitxml`` so the counts and failing tests come from the JUnit XML; other runners are read
from their summary line. The output: passed / failed / errors / skipped counts, ``ok``, the failing
tests with their messages, the exit code and the tail of the output.
"""

from __future__ import annotations

import contextlib
import shlex
import tempfile
import time
from pathlib import Path
from typing import Any

from casperd.agents import gitwork
from casperd.agents.junit import TestReport, parse_junit, parse_pytest_summary
from casperd.errors import PatchConflictError, TaskError, TaskTimeoutError
from casperd.handlers import RunContext
from casperd.handlers.shell import run_shell


def _with_junit(cmd: str, xml: Path) -> str:
    words = shlex.split(cmd) if cmd.strip() else []
    if any(w == "pytest" or w.endswith("/pytest") for w in words[:4]) or "-m pytest" in cmd:
        return f"{cmd} --junitxml={shlex.quote(str(xml))} -p no:cacheprovider"
    return cmd


async def run_test(ctx: RunContext, data: dict[str, Any]) -> dict[str, Any]:
    repo, base, cmd = data.get("repo"), data.get("base"), data.get("test_cmd")
    if not isinstance(repo, str) or not isinstance(base, str) or not isinstance(cmd, str) or not cmd.strip():
        raise TaskError("a test task needs 'repo', 'base' and 'test_cmd'", hint="see caspectl run --help")
    timeout = float(data.get("timeout_s") or (ctx.services.settings.test_timeout_s if ctx.services else 600.0))
    mirrors = ctx.workspace / "mirrors"
    assert ctx.task_id is not None
    wt = ctx.workspace / "worktrees" / f"test-{ctx.task_id}-{ctx.attempt}-{int(time.time() * 1000) % 100000}"
    t0 = time.monotonic()
    await gitwork.make_worktree(repo, base, wt, mirrors)
    try:
        patch = ctx.attachments[0] if ctx.attachments else b""
        if patch:
            try:
                await gitwork.apply(wt, patch)
            except PatchConflictError as exc:
                return {
                    "ok": False,
                    "passed": 0,
                    "failed": 0,
                    "errors": 1,
                    "skipped": 0,
                    "exit_code": None,
                    "failures": [{"name": "(patch)", "kind": "error", "message": exc.message[:2000]}],
                    "output_tail": "",
                    "duration_s": round(time.monotonic() - t0, 3),
                }
        with tempfile.TemporaryDirectory(prefix="casper-junit-") as tmp:
            xml = Path(tmp) / "junit.xml"
            shell_ctx = RunContext(ctx.node_id, wt, timeout, ctx.output_cap)
            try:
                # any exit code is a test result, not a failure of the tester: with expect_exit set,
                # run_shell returns on a non-zero exit instead of raising ShellExitError
                run = await run_shell(shell_ctx, {"cmd": _with_junit(cmd, xml), "timeout_s": timeout, "expect_exit": 0})
            except TaskTimeoutError:  # a hanging test suite is a test result, not a tester failure
                return {
                    "ok": False,
                    "passed": 0,
                    "failed": 0,
                    "errors": 1,
                    "skipped": 0,
                    "exit_code": None,
                    "failures": [
                        {
                            "name": "(test command)",
                            "kind": "error",
                            "message": f"the test command timed out after {timeout:g}s",
                        }
                    ],
                    "output_tail": "",
                    "duration_s": round(time.monotonic() - t0, 3),
                    "node": ctx.node_id,
                }
            report: TestReport | None = None
            if xml.exists():
                with contextlib.suppress(ValueError):
                    report = parse_junit(xml.read_bytes())
            output = (run.get("stdout") or "") + (run.get("stderr") or "")
            if report is None:
                report = parse_pytest_summary(output) or TestReport()
    finally:
        with contextlib.suppress(Exception):
            await gitwork.remove_worktree(wt)
    out = report.to_dict()
    if run["exit_code"] != 0 and report.failed == 0 and report.errors == 0:
        out["errors"] = out.get("errors", 0) + 1  # the command failed without naming a test: still a failure
        out.setdefault("failures", []).append(
            {"name": "(test command)", "kind": "error", "message": f"exit code {run['exit_code']}"}
        )
    out["ok"] = run["exit_code"] == 0 and report.failed == 0 and report.errors == 0
    out["exit_code"] = run["exit_code"]
    out["output_tail"] = output[-4000:]
    out["duration_s"] = round(time.monotonic() - t0, 3)
    out["node"] = ctx.node_id
    return out
