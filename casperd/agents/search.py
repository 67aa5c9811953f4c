"""The agent's ``search`` tool: a regex over the text files of a worktree, in a subprocess.

The search runs in a child process (``python -I -S``) so no regex can stall the daemon, under
the subprocess module's timeout and output cap. It is casperd's own code, run as casperd; it walks
the tree through directory file descriptors (``os.fwalk``) and opens each file relative to its
directory with ``O_NOFOLLOW``, so no symlink — final or in a directory swapped in while it walks —
leads it out of the worktree, and it skips files with more than one hard link.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from casperd import subproc
from casperd.errors import TaskError, TaskTimeoutError
from casperd.taskenv import task_env

SEARCH_CAP = 200
"""Matches search shows at most."""
SEARCH_MAX_FILE = 1_000_000
"""Files larger than this are not searched."""
SEARCH_TIMEOUT_S = 60.0
MATCH_LINE_CAP = 300
"""Characters of a matching line shown by search."""


async def search_tree(root: Path, start: Path, pattern: str, glob: str | None) -> str:
    """Lines matching ``pattern`` under ``start`` (inside ``root``), as ``path:line: text``."""
    request = json.dumps(
        {
            "root": str(root),
            "start": str(start),
            "pattern": pattern,
            "glob": glob or None,
            "cap": SEARCH_CAP,
            "max_file": SEARCH_MAX_FILE,
            "line_cap": MATCH_LINE_CAP,
        }
    ).encode()
    try:
        run = await subproc.run(
            [sys.executable, "-I", "-S", "-c", _SEARCH_SCRIPT],
            cwd=root,
            env=task_env(),
            timeout_s=SEARCH_TIMEOUT_S,
            stdin=request,
            output_cap=4_000_000,
        )
    except OSError as exc:
        raise TaskError(f"cannot start the search: {exc.strerror}", hint="the node cannot run Python") from None
    if run.timed_out:
        raise TaskTimeoutError(
            f"search timed out after {SEARCH_TIMEOUT_S:g}s",
            hint="simplify the pattern or search a smaller directory",
        )
    if run.returncode != 0:
        raise TaskError(
            f"search failed: {run.stderr.decode('utf-8', 'replace').strip()[-500:]}",
            hint="check the pattern and path",
        )
    result = json.loads(run.stdout)
    lines: list[str] = result["matches"]
    if not lines:
        return f"no matches for {pattern!r}" + (f" in files matching {glob!r}" if glob else "")
    text = "\n".join(lines)
    if result["more"]:
        text += f"\n[stopped at {SEARCH_CAP} matches; narrow the pattern, path or glob]"
    return text


_SEARCH_SCRIPT = r"""
import fnmatch, json, os, re, stat, sys
req = json.loads(sys.stdin.buffer.read())
root, start = req["root"], req["start"]
rx = re.compile(req["pattern"])
glob, cap, max_file, line_cap = req["glob"], req["cap"], req["max_file"], req["line_cap"]
matches, more = [], False
FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC

def files():
    try:
        st = os.lstat(start)
    except OSError:
        return
    if not stat.S_ISDIR(st.st_mode):
        yield start, os.path.dirname(start), os.path.basename(start), None
        return
    for dirpath, dirnames, filenames, dirfd in os.fwalk(start):
        dirnames[:] = sorted(d for d in dirnames if d != ".git")
        for name in sorted(filenames):
            if name != ".git":
                yield os.path.join(dirpath, name), dirpath, name, dirfd

def read(full, name, dirfd):
    try:
        fd = os.open(name, FLAGS, dir_fd=dirfd) if dirfd is not None else os.open(full, FLAGS)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_size > max_file:
            return None
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(max_file + 1)
    except OSError:
        return None
    finally:
        os.close(fd)

for full, _dir, name, dirfd in files():
    rel = os.path.relpath(full, root).replace(os.sep, "/")
    if glob and not (fnmatch.fnmatchcase(os.path.basename(rel), glob) or fnmatch.fnmatchcase(rel, glob)):
        continue
    data = read(full, name, dirfd)
    if data is None or b"\0" in data[:8192]:
        continue
    for no, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        if rx.search(line):
            if len(matches) >= cap:
                more = True
                break
            text = line.rstrip()
            if len(text) > line_cap:
                text = text[:line_cap] + "…"
            matches.append(f"{rel}:{no}: {text}")
    if more:
        break
json.dump({"matches": matches, "more": more}, sys.stdout)
"""
