"""The git side of a job: tested patches applied onto its integration branch, and the branch pushed.

Each step works in a fresh worktree of the node's mirror (``workspace/jobs/JOB/...``) that is
removed afterwards; the repository itself only receives refs (:func:`gitwork.push_ref`, hooks
off). A worktree that cannot be removed is logged: the work is in the repository already.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Any

from casperd.agents import gitwork
from casperd.errors import GitError

log = logging.getLogger("casperd.agents.jobs")


async def _remove(wt: Path) -> None:
    try:
        await gitwork.remove_worktree(wt)
    except (GitError, OSError) as exc:  # the work is kept; only a directory is left behind
        log.warning("could not remove the worktree %s: %s", wt, exc)


async def integrate(
    workspace: Path, job_id: uuid.UUID, spec: dict[str, Any], head: str, n: int, patch: bytes, message: str
) -> str:
    """Apply ``patch`` on the integration head and push the new head to
    ``refs/casper/jobs/JOB/integration``; the new head's sha. A patch that does not apply raises
    :class:`~casperd.errors.PatchConflictError` and nothing is pushed."""
    wt = workspace / "jobs" / str(job_id) / f"int-{n}"
    await gitwork.make_worktree(spec["repo"], head, wt, gitwork.mirror_root(workspace))
    try:
        await gitwork.apply(wt, patch)
        new_head = await gitwork.commit_all(wt, message)
        await gitwork.push_ref(wt, spec["repo"], f"refs/casper/jobs/{job_id}/integration")
        return new_head
    finally:
        await _remove(wt)


async def push_branch(workspace: Path, job_id: uuid.UUID, spec: dict[str, Any], head: str) -> str:
    """Push the integration head to the job's branch ``casper/job-<8 hex digits>``; its name."""
    branch = f"casper/job-{str(job_id)[:8]}"
    wt = workspace / "jobs" / str(job_id) / "branch"
    await gitwork.make_worktree(spec["repo"], head, wt, gitwork.mirror_root(workspace))
    try:
        await gitwork.push_ref(wt, spec["repo"], f"refs/heads/{branch}")
    finally:
        await _remove(wt)
    return branch
