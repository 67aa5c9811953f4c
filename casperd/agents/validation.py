"""The policeman's checks of a developer's patch before it is accepted.

Each check returns a list of problems (human sentences naming the file and the rule); an empty
list means acceptable. The pure checks (paths, secrets, size) never touch the disk; the syntax
check compiles Python in a subprocess (never in the event loop), and :func:`validate_patch` runs
everything, applying the patch to a scratch worktree at its base.

Secrets are reported by kind, file and line, never by value.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import math
import posixpath
import re
import sys
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from casperd import subproc
from casperd.agents import gitwork
from casperd.errors import PatchConflictError
from casperd.taskenv import task_env as clean_env

SYNTAX_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class PatchLimits:
    max_bytes: int = 1_000_000
    max_files: int = 200


# --- paths ------------------------------------------------------------------------------------------
def _norm_pattern(pattern: str) -> str:
    pattern = pattern.strip()
    while pattern.startswith("./"):
        pattern = pattern[2:]
    return pattern


def path_allowed(path: str, pattern: str) -> bool:
    """Whether ``path`` matches one allowed ``pattern``: ``dir/`` (everything under dir), a plain
    path without wildcards (that file, or everything under it if it is a directory), or an fnmatch
    glob where ``*`` may cross ``/`` and ``**/`` also matches no directory at all."""
    pattern = _norm_pattern(pattern)
    if not pattern:
        return False
    if pattern in ("**", "*", "**/*"):
        return True
    if pattern.endswith("/"):
        return path.startswith(pattern)
    if not any(c in pattern for c in "*?["):
        return path == pattern or path.startswith(pattern + "/")
    candidates = {pattern}
    # "**/" may stand for zero directories: "src/**/x.py" also matches "src/x.py".
    for _ in range(pattern.count("**/")):
        candidates |= {c.replace("**/", "", 1) for c in candidates}
    return any(fnmatch.fnmatchcase(path, c) for c in candidates)


def check_paths(paths: list[str], allowed: list[str]) -> list[str]:
    """Problems with the paths a patch touches: absolute paths, '..', anything in .git, and (when
    ``allowed`` is not empty) paths that match none of the allowed patterns."""
    problems: list[str] = []
    shown = ", ".join(repr(a) for a in allowed)
    for path in paths:
        parts = path.split("/")
        if not path or path.startswith("/") or posixpath.isabs(path):
            problems.append(f"{path!r}: absolute paths are not allowed in a patch (paths are relative to the repo)")
        elif ".." in parts:
            problems.append(f"{path!r}: paths with '..' are not allowed in a patch")
        elif ".git" in parts:
            problems.append(f"{path!r}: a patch may not touch git's own data (.git)")
        elif allowed and not any(path_allowed(path, a) for a in allowed):
            problems.append(f"{path!r} is outside the allowed paths ({shown})")
    return problems


# --- secrets ----------------------------------------------------------------------------------------
_SECRET_KINDS: list[tuple[str, re.Pattern[str]]] = [
    ("an Anthropic API key", re.compile(r"sk-ant-[A-Za-z0-9_-]{20,}")),
    ("an AWS access key id", re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")),
    ("a private key block", re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----")),
    ("a GitHub token", re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{22,})")),
    ("a Slack token", re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}")),
]
_GENERIC = re.compile(r"""(?i)(api[_-]?key|secret|token|passw(?:or)?d)[\w.-]*['"]?\s*[:=]\s*['"]([^'"\s]{16,})['"]""")
_GENERIC_KIND = "a hard-coded credential"


def _entropy(text: str) -> float:
    counts = Counter(text)
    n = len(text)
    return -sum(c / n * math.log2(c / n) for c in counts.values())


def _looks_random(value: str) -> bool:
    """High entropy and a mix of letters and digits: a generated secret, not 'changeme-changeme'."""
    return (
        _entropy(value) >= 3.3
        and any(c.isdigit() for c in value)
        and any(c.isalpha() for c in value)
        and not re.fullmatch(r"[A-Za-z_]\w*(\.\w+)+", value)
    )  # a dotted name, e.g. settings.path


def _added_lines(patch: bytes) -> list[tuple[str, int, str]]:
    """(file, line number in the new file, text) of every added line of a unified/git patch."""
    out: list[tuple[str, int, str]] = []
    current = "?"
    old_left = new_left = 0
    lineno = 0
    for raw in patch.decode("utf-8", "replace").split("\n"):
        if old_left > 0 or new_left > 0:
            tag = raw[:1]
            if tag in (" ", ""):
                old_left, new_left, lineno = old_left - 1, new_left - 1, lineno + 1
            elif tag == "-":
                old_left -= 1
            elif tag == "+":
                out.append((current, lineno, raw[1:]))
                new_left, lineno = new_left - 1, lineno + 1
            continue
        if raw.startswith("diff --git "):
            paths = gitwork.changed_paths((raw + "\n").encode())
            current = paths[-1] if paths else "?"
        elif raw.startswith("+++ "):
            paths = gitwork.changed_paths(f"--- /dev/null\n{raw}\n".encode())
            if paths:
                current = paths[-1]
        elif raw.startswith("@@"):
            m = re.match(r"^@@ -\d+(?:,(\d+))? \+(\d+)(?:,(\d+))? @@", raw)
            if m:
                old_left = int(m.group(1)) if m.group(1) is not None else 1
                lineno = int(m.group(2))
                new_left = int(m.group(3)) if m.group(3) is not None else 1
    return out


def find_secrets(patch: bytes) -> list[str]:
    """Problems for every added line that looks like it carries a secret: the file, the line and
    the kind of secret, never the value."""
    problems: list[str] = []
    for path, lineno, text in _added_lines(patch):
        kinds = [kind for kind, rx in _SECRET_KINDS if rx.search(text)]
        if not kinds:
            for m in _GENERIC.finditer(text):
                if _looks_random(m.group(2)):
                    kinds.append(f"{_GENERIC_KIND} ({m.group(1).lower()})")
                    break
        for kind in kinds:
            problems.append(
                f"{path}:{lineno}: adds what looks like {kind} (value not shown); "
                f"secrets must not be committed: read them from the environment or a secret store"
            )
    return problems


# --- size -------------------------------------------------------------------------------------------
def check_size(patch: bytes, paths: list[str], limits: PatchLimits) -> list[str]:
    problems: list[str] = []
    if len(patch) > limits.max_bytes:
        problems.append(
            f"the patch is {len(patch)} bytes; the limit is {limits.max_bytes} bytes "
            f"(split the change into smaller tasks)"
        )
    files = len(set(paths))
    if files > limits.max_files:
        problems.append(
            f"the patch touches {files} files; the limit is {limits.max_files} files "
            f"(split the change into smaller tasks)"
        )
    return problems


# --- Python syntax ----------------------------------------------------------------------------------
_COMPILE_SCRIPT = r"""
import json, sys
out = []
for path in json.loads(sys.stdin.read()):
    try:
        with open(path, "rb") as f:
            source = f.read()
        compile(source, path, "exec", dont_inherit=True)
    except SyntaxError as exc:
        out.append([path, exc.lineno or 0, exc.msg or "invalid syntax"])
    except (ValueError, OSError) as exc:
        out.append([path, 0, str(exc)])
json.dump(out, sys.stdout)
"""


def _existing_python(root: Path, paths: list[str]) -> list[str]:
    real_root = root.resolve()
    found: list[str] = []
    for rel in paths:
        if not rel.endswith(".py") or rel.startswith("/") or ".." in rel.split("/"):
            continue
        full = real_root / rel
        with contextlib.suppress(OSError):
            real = full.resolve()
            if (real_root in real.parents) and real.is_file():
                found.append(rel)
    return found


async def check_python_syntax(root: Path, paths: list[str]) -> list[str]:
    """Problems (``file:line: message``) for the changed ``*.py`` files under ``root`` that do not
    compile (with this node's Python). Compiled in a subprocess: nothing runs in the event loop,
    and compiling never executes the code."""
    files = await asyncio.to_thread(_existing_python, Path(root), paths)
    if not files:
        return []
    env = clean_env()
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    run = await subproc.run(
        [sys.executable, "-I", "-S", "-c", _COMPILE_SCRIPT],
        cwd=root,
        env=env,
        timeout_s=SYNTAX_TIMEOUT_S,
        stdin=json.dumps(files).encode(),
        output_cap=4_000_000,
    )
    if run.timed_out:
        return [f"compiling the changed Python files timed out after {SYNTAX_TIMEOUT_S:g}s"]
    if run.returncode != 0:
        return [f"could not check Python syntax: {run.stderr.decode('utf-8', 'replace').strip()[-500:]}"]
    out = run.stdout
    return [f"{path}:{line}: {msg}" for path, line, msg in json.loads(out)]


# --- everything ---------------------------------------------------------------------------------
async def validate_patch(
    patch: bytes,
    *,
    repo: Path | str,
    base: str,
    allowed: list[str],
    limits: PatchLimits,
    scratch: Path,
    mirror_root: Path,
) -> list[str]:
    """Every problem with ``patch`` (made against ``base`` of ``repo``); [] when it is acceptable.

    Runs the pure checks, then applies the patch to a scratch worktree at ``base`` (a conflict is a
    problem) and compiles the changed Python files; the worktree is always removed. A ``GitError``
    (the repository or base is unusable) propagates: that is not the patch's fault."""
    if not patch.strip():
        return ["the patch is empty: nothing was changed"]
    paths = gitwork.changed_paths(patch)
    problems = check_size(patch, paths, limits) + check_paths(paths, allowed) + find_secrets(patch)
    if len(patch) > limits.max_bytes:
        return problems  # too big to be worth applying
    dest = Path(scratch) / f"validate-{uuid.uuid4().hex[:12]}"
    try:
        worktree = await gitwork.make_worktree(repo, base, dest, mirror_root)
        try:
            await gitwork.apply(worktree, patch)
        except PatchConflictError as exc:
            problems.append(f"{exc.message} ({exc.hint})" if exc.hint else exc.message)
        else:
            problems += await check_python_syntax(worktree, [p for p in paths if p.endswith(".py")])
    finally:
        await asyncio.shield(gitwork.remove_worktree(dest))
    return problems
