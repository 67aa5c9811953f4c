"""Git operations for the agents: per-node bare mirrors, detached worktrees, patches, commits.

Every git command goes through :mod:`casperd.agents.gitcmd`, which hardens it (hooks, filters
and merge drivers off; the repository trusted per command; no secrets in its environment).

A repository named by a task is never written to by :func:`make_worktree`: the node keeps a bare
mirror of it (``<mirror_root>/<sha256(abs path)[:16]>.git``, cloned once, fetched only when the
wanted commit is missing) and makes its worktrees from the mirror. Only :func:`push_ref` writes
into the repository, and only the ref it is asked to write.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import uuid
import weakref
from pathlib import Path

from casperd.agents.gitcmd import STDERR_TAIL, git_env, remote_program, run_git, tail_of
from casperd.agents.gitcmd import git as git
from casperd.agents.patchparse import changed_paths
from casperd.errors import GitError, PatchConflictError
from casperd.taskenv import reclaim_tree

__all__ = ["STDERR_TAIL", "changed_paths", "git", "git_env"]

# One lock per mirror and event loop: asyncio locks must not be shared between loops.
_LOCKS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, asyncio.Lock]] = weakref.WeakKeyDictionary()


def mirror_root(workspace: Path) -> Path:
    """Where a node keeps its bare mirrors: beside its workspace (``workspaces/NODE.mirrors``), out
    of the directory shell tasks may write to."""
    return workspace.with_name(f"{workspace.name}.mirrors")


def worktree_root(workspace: Path) -> Path:
    """Where a node makes its worktrees (``workspaces/NODE.worktrees``): each one is handed to task
    code on its own; the directory holding them is not."""
    return workspace.with_name(f"{workspace.name}.worktrees")


def _check_rev(rev: str) -> None:
    if not rev or rev.startswith("-") or any(c in rev for c in "\0\n\r"):
        raise GitError(
            f"{rev!r} is not a valid git revision",
            hint="name a commit sha, a branch or a tag (it must not start with '-')",
        )


async def _is_dir(path: Path) -> bool:
    return await asyncio.to_thread(path.is_dir)


async def resolve_commit(repo: Path | str, rev: str = "HEAD") -> str:
    """The full sha of ``rev`` in ``repo`` (read-only)."""
    _check_rev(rev)
    path = Path(repo)
    if not await _is_dir(path):
        raise GitError(
            f"repository {str(repo)!r} does not exist or is not a directory",
            hint="give the absolute path of a git repository on this node",
        )
    code, out, _err = await run_git(
        ("rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}"), path, None, 60
    )
    if code == 0:
        return out.decode().strip()
    code2, _o, _e = await run_git(("rev-parse", "--git-dir"), path, None, 60)
    if code2 != 0:
        raise GitError(
            f"{str(repo)!r} is not a git repository",
            hint="give the path of a git repository (run 'git init' and commit first)",
        )
    raise GitError(
        f"revision {rev!r} is not a commit in {str(repo)!r}",
        hint="check the branch, tag or sha (has it been committed, or fetched?)",
    )


async def list_files(repo: Path | str, rev: str) -> list[str]:
    """Every file path in ``rev`` of ``repo`` (read-only)."""
    _check_rev(rev)
    out = await git("ls-tree", "-r", "--name-only", "--end-of-options", rev, cwd=Path(repo))
    return out.decode("utf-8", "replace").splitlines()


def mirror_path(repo: Path, mirror_root: Path) -> Path:
    """Where the node keeps its bare mirror of ``repo`` (an absolute, resolved path)."""
    key = hashlib.sha256(str(repo).encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return mirror_root / f"{key}.git"


def _lock(mirror: Path) -> asyncio.Lock:
    locks = _LOCKS.setdefault(asyncio.get_running_loop(), {})
    return locks.setdefault(str(mirror), asyncio.Lock())


async def _has_commit(mirror: Path, sha: str) -> bool:
    code, _o, _e = await run_git(("cat-file", "-e", f"{sha}^{{commit}}"), mirror, None, 60)
    return code == 0


async def _ensure_mirror(repo: Path, mirror: Path, sha: str) -> None:
    if not await _is_dir(mirror):
        tmp = mirror.with_name(f"{mirror.name}.tmp-{uuid.uuid4().hex[:8]}")
        await asyncio.to_thread(mirror.parent.mkdir, parents=True, exist_ok=True)
        try:
            await git(
                "clone",
                "--bare",
                "--quiet",
                "--no-local",
                f"--upload-pack={remote_program('upload-pack', str(repo))}",
                "--",
                str(repo),
                str(tmp),
                cwd=mirror.parent,
                timeout_s=1800,
            )
            await asyncio.to_thread(os.rename, tmp, mirror)
        finally:
            await asyncio.to_thread(shutil.rmtree, tmp, True)
    if await _has_commit(mirror, sha):
        return
    upload = f"--upload-pack={remote_program('upload-pack', str(repo))}"
    await git("fetch", "--quiet", "--no-tags", upload, "--", str(repo), "+refs/*:refs/*", cwd=mirror, timeout_s=1800)
    if await _has_commit(mirror, sha):
        return
    # A commit no ref points at: ask the local upload-pack (it inherits our -c) for it by sha.
    await git(
        "-c",
        "uploadpack.allowAnySHA1InWant=true",
        "fetch",
        "--quiet",
        "--no-tags",
        upload,
        "--",
        str(repo),
        sha,
        cwd=mirror,
        timeout_s=1800,
    )
    if not await _has_commit(mirror, sha):
        raise GitError(
            f"commit {sha} could not be fetched from {str(repo)!r}",
            hint="make sure the commit exists in the repository",
        )


async def make_worktree(repo: Path | str, base: str, dest: Path, mirror_root: Path) -> Path:
    """A detached worktree of ``repo`` at ``base`` in ``dest`` (which must not exist or be an empty
    directory), made from the node's bare mirror of ``repo``; returns ``dest`` resolved."""
    repo_abs = await asyncio.to_thread(lambda: Path(repo).resolve())
    sha = await resolve_commit(repo_abs, base)
    root = await asyncio.to_thread(lambda: Path(mirror_root).resolve())
    mirror = mirror_path(repo_abs, root)
    dest_abs = await asyncio.to_thread(lambda: Path(dest).resolve())
    if await asyncio.to_thread(lambda: dest_abs.exists() and (not dest_abs.is_dir() or any(dest_abs.iterdir()))):
        raise GitError(
            f"worktree destination {str(dest_abs)!r} already exists and is not empty",
            hint="remove it, or choose a new directory for the worktree",
        )
    async with _lock(mirror):
        await _ensure_mirror(repo_abs, mirror, sha)
        await asyncio.to_thread(dest_abs.parent.mkdir, parents=True, exist_ok=True)
        await git("worktree", "add", "--detach", "--quiet", "--", str(dest_abs), sha, cwd=mirror, timeout_s=600)
    return dest_abs


async def _common_dir(dest: Path) -> Path | None:
    """The bare mirror a worktree belongs to, from its ``.git`` file (None when not a worktree)."""

    def read() -> Path | None:
        gitfile = dest / ".git"
        if not gitfile.is_file():
            return None
        text = gitfile.read_text("utf-8", "replace").strip()
        if not text.startswith("gitdir:"):
            return None
        gitdir = Path(text.split(":", 1)[1].strip())
        if not gitdir.is_absolute():
            gitdir = dest / gitdir
        return gitdir.resolve().parent.parent

    return await asyncio.to_thread(read)


async def remove_worktree(dest: Path) -> None:
    """Remove a worktree made by :func:`make_worktree` (and its registration in the mirror).
    Never raises when it is already gone; falls back to deleting the directory and pruning."""
    dest = Path(dest)
    if not await asyncio.to_thread(os.path.lexists, dest):
        return
    await asyncio.to_thread(reclaim_tree, dest)
    common = await _common_dir(dest)
    if common is None or not await _is_dir(common):
        await asyncio.to_thread(shutil.rmtree, dest, True)
        return
    async with _lock(common):
        try:
            await git("worktree", "remove", "--force", "--force", "--", str(dest), cwd=common, timeout_s=300)
        except GitError:
            await asyncio.to_thread(shutil.rmtree, dest, True)
            with contextlib.suppress(GitError):
                await git("worktree", "prune", cwd=common, timeout_s=300)
    if await asyncio.to_thread(os.path.lexists, dest):
        await asyncio.to_thread(shutil.rmtree, dest, True)


async def diff(worktree: Path, base: str) -> bytes:
    """A binary-safe patch of everything in ``worktree`` that differs from ``base``, new untracked
    files included (ignored files are not); ``b""`` when nothing changed. Stages everything."""
    _check_rev(base)
    await git("add", "-A", cwd=worktree)
    return await git(
        "diff",
        "--cached",
        "--binary",
        "--no-color",
        "--no-ext-diff",
        "--no-textconv",
        base,
        "--",
        cwd=worktree,
        timeout_s=300,
    )


async def apply(worktree: Path, patch: bytes) -> None:
    """Apply ``patch`` to ``worktree`` and its index (plainly, then with a 3-way merge). A patch
    that does not apply raises :class:`PatchConflictError` and leaves the worktree as it was."""
    if not patch.strip():
        return
    args = ("apply", "--index", "--whitespace=nowarn")
    code, _o, err = await run_git((*args, "-"), Path(worktree), patch, 300)
    if code == 0:
        return
    before = (await git("write-tree", cwd=worktree)).decode().strip()
    code, _o, err3 = await run_git((*args, "--3way", "-"), Path(worktree), patch, 300)
    if code == 0:
        return
    # A failed 3-way apply may leave conflict markers and unmerged entries: put the index and the
    # files back as they were.
    with contextlib.suppress(GitError):
        await git("read-tree", "--reset", "-u", before, cwd=worktree)
    tail = tail_of(err3 or err)
    raise PatchConflictError(
        f"the patch does not apply to the current code: {tail or 'git apply failed'}",
        hint="the code it was made for has changed: redo the change on the current code",
        stderr=tail,
    )


async def commit_all(worktree: Path, message: str) -> str:
    """Commit everything in ``worktree`` (new files included); the new commit's sha, or HEAD's when
    there was nothing to commit."""
    await git("add", "-A", cwd=worktree)
    code, _o, err = await run_git(("diff", "--cached", "--quiet"), Path(worktree), None, 120)
    if code not in (0, 1):
        raise GitError(f"git diff failed (exit {code}): {tail_of(err)}", hint="is this a git worktree?")
    if code == 1:
        text = message.strip() or "CASPER change"
        await git("commit", "--quiet", "--no-verify", "-F", "-", cwd=worktree, stdin=text.encode() + b"\n")
    return (await git("rev-parse", "--verify", "HEAD", cwd=worktree)).decode().strip()


async def push_ref(worktree: Path, repo: Path | str, ref: str) -> None:
    """Force-push the worktree's HEAD to ``ref`` in ``repo`` (a bare name means refs/heads/<ref>)."""
    full = ref if ref.startswith("refs/") else f"refs/heads/{ref}"
    code, _o, _e = await run_git(("check-ref-format", full), Path(worktree), None, 30)
    if code != 0 or ref.startswith("-"):
        raise GitError(f"{ref!r} is not a valid git ref name", hint="use a name like 'casper/job-123'")
    target = await asyncio.to_thread(lambda: str(Path(repo).resolve()))
    try:
        await git(
            "push",
            "--force",
            "--quiet",
            "--no-verify",
            f"--receive-pack={remote_program('receive-pack', target)}",
            "--",
            target,
            f"HEAD:{full}",
            cwd=worktree,
            timeout_s=600,
        )
    except GitError as exc:
        raise GitError(
            f"cannot push to {full} in {target!r}: {exc.details.get('stderr') or exc.message}",
            hint="a non-bare repository refuses a push to its checked-out branch: use another ref",
            **exc.details,
        ) from None
