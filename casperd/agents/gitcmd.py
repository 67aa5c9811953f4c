"""How casperd runs git: every command hardened the same way (used by :mod:`gitwork`).

Every git command runs through :mod:`casperd.subproc` (never in the event loop) with hooks disabled
(``core.hooksPath=/dev/null``), every filter and merge driver the repository's config names
disabled (empty commands, looked up before each command that could run one — whoever wrote the
config: the node's mirror, or a ``.git`` file task code pointed elsewhere), no system or global
config, no fsmonitor, no prompts or credential helpers, only the file protocol, the repository
trusted for that command only (``-c safe.directory=PATH``, never ``'*'``), an environment without
secrets or inherited ``GIT_*`` variables, and the fixed identity ``CASPER <casper@localhost>``.
Commands git runs in another repository (``upload-pack`` for clone and fetch, ``receive-pack``
for push) read that repository's config, not ours: :func:`remote_program` gives them explicitly
with the same options, so a push runs no hook of the target repository.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from casperd import subproc
from casperd.errors import GitError
from casperd.taskenv import task_env as clean_env

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
    "-c",
    "core.attributesFile=/dev/null",
    "-c",
    "core.askPass=",
    "-c",
    "credential.helper=",
    "-c",
    "protocol.allow=never",
    "-c",
    "protocol.file.allow=always",
    "-c",
    "receive.denyCurrentBranch=refuse",
)
_FILTERED = frozenset({"worktree", "add", "diff", "apply", "read-tree", "commit", "checkout", "reset", "status"})
"""Commands that may run a filter or merge driver: run with every driver the config names disabled."""
_DRIVERS = r"^(filter|merge)\..*\.(clean|smudge|process|driver)$"


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
        GIT_CONFIG_GLOBAL=os.devnull,
        GIT_ATTR_NOSYSTEM="1",
        LC_ALL="C",
        LANGUAGE="C",
    )
    return env


def tail_of(data: bytes, cap: int = STDERR_TAIL) -> str:
    text = data.decode("utf-8", "replace").strip()
    return text if len(text) <= cap else "…" + text[-cap:]


def remote_program(program: str, repo: str) -> str:
    """The command a local transport runs in ``repo`` (which reads its own config, not our -c):
    with hooks off and the repository trusted for this command only."""
    args = ["git", *_CONFIG, "-c", f"safe.directory={repo}", program]
    return " ".join(shlex.quote(a) for a in args)


async def _exec(args: tuple[str, ...], cwd: Path, stdin: bytes | None, timeout_s: float) -> subproc.Completed:
    try:
        return await subproc.run(
            ("git", *args), cwd=cwd, env=git_env(), timeout_s=timeout_s, stdin=stdin, output_cap=64 * 1024 * 1024
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


async def _no_drivers(cwd: Path, base: tuple[str, ...]) -> tuple[str, ...]:
    """``-c`` options that disable every filter and merge driver the repository's config defines
    (whoever wrote them): an empty command means no driver."""
    run = await _exec((*base, "config", "--null", "--get-regexp", _DRIVERS), cwd, None, 60)
    out: list[str] = []
    for entry in run.stdout.split(b"\0"):
        key = entry.split(b"\n", 1)[0].decode("utf-8", "surrogateescape")
        if key:
            out += ["-c", f"{key}="]
            if key.startswith("filter."):
                out += ["-c", f"{key.rsplit('.', 1)[0]}.required=false"]
    return tuple(out)


async def run_git(args: tuple[str, ...], cwd: Path, stdin: bytes | None, timeout_s: float) -> tuple[int, bytes, bytes]:
    base: tuple[str, ...] = (*_CONFIG, "-c", f"safe.directory={cwd}")
    if args[0] in _FILTERED:
        base += await _no_drivers(cwd, base)
    run = await _exec((*base, *args), cwd, stdin, timeout_s)
    if run.timed_out:
        raise GitError(
            f"git {args[0]} timed out after {timeout_s:g}s",
            hint="the repository may be very large or locked by another git process",
        )
    return run.returncode if run.returncode is not None else -9, run.stdout, run.stderr


async def git(*args: str, cwd: Path, stdin: bytes | None = None, check: bool = True, timeout_s: float = 120) -> bytes:
    """Run ``git args...`` in ``cwd``; its stdout. With ``check``, a non-zero exit raises
    :class:`GitError` carrying the tail of git's stderr (``details``: ``returncode``, ``stderr``)."""
    code, out, err = await run_git(args, Path(cwd), stdin, timeout_s)
    if check and code != 0:
        tail = tail_of(err)
        raise GitError(
            f"git {args[0]} failed (exit {code}): {tail or 'no message'}",
            hint="see git's message above; check the repository, revision and worktree",
            returncode=code,
            stderr=tail,
        )
    return out
