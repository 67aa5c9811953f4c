"""Git operations for the agents: per-node bare mirrors, detached worktrees, patches, commits.

Every git command runs as an asyncio subprocess (never in the event loop) with hooks disabled
(``core.hooksPath=/dev/null``), no terminal prompts, an environment without secrets or inherited
``GIT_*`` variables, and the fixed identity ``CASPER <casper@localhost>``.

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
import re
import shutil
import signal
import uuid
import weakref
from pathlib import Path

from casperd.errors import GitError, PatchConflictError
from casperd.handlers.shell import clean_env

IDENTITY_NAME = "CASPER"
IDENTITY_EMAIL = "casper@localhost"
STDERR_TAIL = 2000
"""How much of git's stderr an error message carries (the end, where git says what went wrong)."""

_CONFIG = (
    "-c",
    "core.hooksPath=/dev/null",
    "-c",
    "core.fsmonitor=false",
    "-c",
    "commit.gpgsign=false",
    "-c",
    "tag.gpgsign=false",
    "-c",
    "core.quotePath=true",
    "-c",
    "advice.detachedHead=false",
    "-c",
    "gc.auto=0",
)

# One lock per mirror and event loop: asyncio locks must not be shared between loops.
_LOCKS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, asyncio.Lock]] = weakref.WeakKeyDictionary()


def git_env() -> dict[str, str]:
    """The environment of every git command: the node's minus secrets, CASPER_* and GIT_*, plus
    the fixed identity and no prompts (set after the secret filter: GIT_AUTHOR_* looks secret)."""
    env = {k: v for k, v in clean_env().items() if not k.startswith("GIT_")}
    env.update(
        GIT_TERMINAL_PROMPT="0",
        GIT_AUTHOR_NAME=IDENTITY_NAME,
        GIT_AUTHOR_EMAIL=IDENTITY_EMAIL,
        GIT_COMMITTER_NAME=IDENTITY_NAME,
        GIT_COMMITTER_EMAIL=IDENTITY_EMAIL,
        GIT_CONFIG_NOSYSTEM="1",
        LC_ALL="C",
        LANGUAGE="C",
    )
    return env


def _tail(data: bytes, cap: int = STDERR_TAIL) -> str:
    text = data.decode("utf-8", "replace").strip()
    return text if len(text) <= cap else "…" + text[-cap:]


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


async def _run(args: tuple[str, ...], cwd: Path, stdin: bytes | None, timeout_s: float) -> tuple[int, bytes, bytes]:
    argv = ("git", *_CONFIG, *args)
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=cwd,
            env=git_env(),
            start_new_session=True,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except FileNotFoundError as exc:
        if exc.filename in (None, "git"):
            raise GitError("git is not installed on this node", hint="install git (it must be on PATH)") from None
        raise GitError(
            f"the directory {str(cwd)!r} for git does not exist", hint="check the repository or worktree path"
        ) from None
    except NotADirectoryError:
        raise GitError(f"{str(cwd)!r} is not a directory", hint="check the repository or worktree path") from None
    except OSError as exc:
        raise GitError(f"cannot start git: {exc.strerror}", hint="is git installed and executable?") from None
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), timeout_s)
    except TimeoutError:
        _kill_group(proc)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(proc.communicate(), 5)
        raise GitError(
            f"git {args[0]} timed out after {timeout_s:g}s",
            hint="the repository may be very large or locked by another git process",
        ) from None
    except asyncio.CancelledError:
        _kill_group(proc)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(proc.wait(), 5)
        raise
    assert proc.returncode is not None
    return proc.returncode, out, err


async def git(*args: str, cwd: Path, stdin: bytes | None = None, check: bool = True, timeout_s: float = 120) -> bytes:
    """Run ``git args...`` in ``cwd``; its stdout. With ``check``, a non-zero exit raises
    :class:`GitError` carrying the tail of git's stderr (``details``: ``returncode``, ``stderr``)."""
    code, out, err = await _run(args, Path(cwd), stdin, timeout_s)
    if check and code != 0:
        tail = _tail(err)
        raise GitError(
            f"git {args[0]} failed (exit {code}): {tail or 'no message'}",
            hint="see git's message above; check the repository, revision and worktree",
            returncode=code,
            stderr=tail,
        )
    return out


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
    code, out, _err = await _run(
        ("rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}"), path, None, 60
    )
    if code == 0:
        return out.decode().strip()
    code2, _o, _e = await _run(("rev-parse", "--git-dir"), path, None, 60)
    if code2 != 0:
        raise GitError(
            f"{str(repo)!r} is not a git repository",
            hint="give the path of a git repository (run 'git init' and commit first)",
        )
    raise GitError(
        f"revision {rev!r} is not a commit in {str(repo)!r}",
        hint="check the branch, tag or sha (has it been committed, or fetched?)",
    )


def mirror_path(repo: Path, mirror_root: Path) -> Path:
    """Where the node keeps its bare mirror of ``repo`` (an absolute, resolved path)."""
    key = hashlib.sha256(str(repo).encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return mirror_root / f"{key}.git"


def _lock(mirror: Path) -> asyncio.Lock:
    locks = _LOCKS.setdefault(asyncio.get_running_loop(), {})
    return locks.setdefault(str(mirror), asyncio.Lock())


async def _has_commit(mirror: Path, sha: str) -> bool:
    code, _o, _e = await _run(("cat-file", "-e", f"{sha}^{{commit}}"), mirror, None, 60)
    return code == 0


async def _ensure_mirror(repo: Path, mirror: Path, sha: str) -> None:
    if not await _is_dir(mirror):
        tmp = mirror.with_name(f"{mirror.name}.tmp-{uuid.uuid4().hex[:8]}")
        await asyncio.to_thread(mirror.parent.mkdir, parents=True, exist_ok=True)
        try:
            await git("clone", "--bare", "--quiet", "--", str(repo), str(tmp), cwd=mirror.parent, timeout_s=1800)
            await asyncio.to_thread(os.rename, tmp, mirror)
        finally:
            await asyncio.to_thread(shutil.rmtree, tmp, True)
    if await _has_commit(mirror, sha):
        return
    await git("fetch", "--quiet", "--no-tags", "--", str(repo), "+refs/*:refs/*", cwd=mirror, timeout_s=1800)
    if await _has_commit(mirror, sha):
        return
    # A commit no ref points at: ask the local upload-pack (it inherits our -c) for it by sha.
    await git(
        "-c",
        "uploadpack.allowAnySHA1InWant=true",
        "fetch",
        "--quiet",
        "--no-tags",
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
    code, _o, err = await _run((*args, "-"), Path(worktree), patch, 300)
    if code == 0:
        return
    before = (await git("write-tree", cwd=worktree)).decode().strip()
    code, _o, err3 = await _run((*args, "--3way", "-"), Path(worktree), patch, 300)
    if code == 0:
        return
    # A failed 3-way apply may leave conflict markers and unmerged entries: put the index and the
    # files back as they were.
    with contextlib.suppress(GitError):
        await git("read-tree", "--reset", "-u", before, cwd=worktree)
    tail = _tail(err3 or err)
    raise PatchConflictError(
        f"the patch does not apply to the current code: {tail or 'git apply failed'}",
        hint="the code it was made for has changed: redo the change on the current code",
        stderr=tail,
    )


async def commit_all(worktree: Path, message: str) -> str:
    """Commit everything in ``worktree`` (new files included); the new commit's sha, or HEAD's when
    there was nothing to commit."""
    await git("add", "-A", cwd=worktree)
    code, _o, err = await _run(("diff", "--cached", "--quiet"), Path(worktree), None, 120)
    if code not in (0, 1):
        raise GitError(f"git diff failed (exit {code}): {_tail(err)}", hint="is this a git worktree?")
    if code == 1:
        text = message.strip() or "CASPER change"
        await git("commit", "--quiet", "--no-verify", "-F", "-", cwd=worktree, stdin=text.encode() + b"\n")
    return (await git("rev-parse", "--verify", "HEAD", cwd=worktree)).decode().strip()


async def push_ref(worktree: Path, repo: Path | str, ref: str) -> None:
    """Force-push the worktree's HEAD to ``ref`` in ``repo`` (a bare name means refs/heads/<ref>)."""
    full = ref if ref.startswith("refs/") else f"refs/heads/{ref}"
    code, _o, _e = await _run(("check-ref-format", full), Path(worktree), None, 30)
    if code != 0 or ref.startswith("-"):
        raise GitError(f"{ref!r} is not a valid git ref name", hint="use a name like 'casper/job-123'")
    target = await asyncio.to_thread(lambda: str(Path(repo).resolve()))
    try:
        await git("push", "--force", "--quiet", "--", target, f"HEAD:{full}", cwd=worktree, timeout_s=600)
    except GitError as exc:
        raise GitError(
            f"cannot push to {full} in {target!r}: {exc.details.get('stderr') or exc.message}",
            hint="a non-bare repository refuses a push to its checked-out branch: use another ref",
            **exc.details,
        ) from None


# --- parsing patches (pure) -----------------------------------------------------------------------
_ESCAPES = {"a": 7, "b": 8, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11, "\\": 92, '"': 34}
_HUNK = re.compile(r"^@@ -\d+(?:,(\d+))? \+\d+(?:,(\d+))? @@")


def _unquote(text: str) -> tuple[str, str]:
    """Parse a C-quoted git path at the start of ``text`` (which starts with '"'); (path, rest)."""
    out = bytearray()
    i = 1
    while i < len(text):
        c = text[i]
        if c == '"':
            return out.decode("utf-8", "replace"), text[i + 1 :]
        if c == "\\" and i + 1 < len(text):
            n = text[i + 1]
            if n in "0123" and i + 3 < len(text) and all(ch in "01234567" for ch in text[i + 1 : i + 4]):
                out.append(int(text[i + 1 : i + 4], 8))
                i += 4
                continue
            out.append(_ESCAPES.get(n, ord(n) if ord(n) < 128 else 63))
            i += 2
            continue
        out.extend(c.encode("utf-8", "surrogateescape"))
        i += 1
    return out.decode("utf-8", "replace"), ""


def _one_path(text: str) -> str:
    """A path from a ---/+++/rename/copy line's value: quoted or not, trailing tab stamp removed."""
    text = text.rstrip("\n\r")
    if text.startswith('"'):
        return _unquote(text)[0]
    return text.split("\t", 1)[0]


def _strip_prefix(path: str) -> str | None:
    if path == "/dev/null":
        return None
    return path[2:] if path[:2] in ("a/", "b/") else path


def _header_paths(rest: str) -> list[str]:
    """The paths of a ``diff --git`` header line (after the prefix)."""
    paths: list[str] = []
    if rest.startswith('"'):
        first, rest = _unquote(rest)
        paths.append(first)
        rest = rest.lstrip(" ")
        paths.append(_unquote(rest)[0] if rest.startswith('"') else rest)
    elif rest.endswith('"') and ' "' in rest:
        idx = rest.index(' "')
        paths += [rest[:idx], _unquote(rest[idx + 1 :])[0]]
    else:
        # "a/X b/X": both names are the same for everything but renames and copies (which name
        # their paths on rename/copy lines), so split in the middle.
        half = (len(rest) - 1) // 2
        if len(rest) % 2 == 1 and rest[half] == " " and rest[:half][2:] == rest[half + 1 :][2:]:
            paths += [rest[:half], rest[half + 1 :]]
        else:
            idx = rest.find(" b/")
            paths += [rest[:idx], rest[idx + 1 :]] if idx > 0 else [rest]
    return [p for p in (_strip_prefix(x) for x in paths) if p]


def changed_paths(patch: bytes) -> list[str]:
    """Every path a patch touches (added, deleted, modified, renamed or copied from and to, binary),
    each once, in order of first appearance. Hunk bodies are skipped by counting their lines, so a
    removed line that looks like a header is not mistaken for one."""
    seen: dict[str, None] = {}
    section: list[str] = []
    header_paths: list[str] = []

    def close() -> None:
        for p in section or header_paths:
            seen.setdefault(p, None)

    old_left = new_left = 0
    for raw in patch.decode("utf-8", "surrogateescape").split("\n"):
        if old_left > 0 or new_left > 0:
            tag = raw[:1]
            if tag in (" ", ""):
                old_left, new_left = old_left - 1, new_left - 1
            elif tag == "-":
                old_left -= 1
            elif tag == "+":
                new_left -= 1
            # "\ No newline at end of file" counts for nothing
            continue
        if raw.startswith("diff --git "):
            close()
            section, header_paths = [], _header_paths(raw[len("diff --git ") :])
            continue
        m = _HUNK.match(raw)
        if m:
            old_left = int(m.group(1)) if m.group(1) is not None else 1
            new_left = int(m.group(2)) if m.group(2) is not None else 1
            continue
        for prefix, strip in (
            ("--- ", True),
            ("+++ ", True),
            ("rename from ", False),
            ("rename to ", False),
            ("copy from ", False),
            ("copy to ", False),
        ):
            if raw.startswith(prefix):
                path = _one_path(raw[len(prefix) :])
                p = _strip_prefix(path) if strip else path
                if p:
                    section.append(p)
                break
    close()
    return list(seen)
