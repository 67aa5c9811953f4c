"""The developer agent's tools, confined to one worktree.

A :class:`Sandbox` answers the model's tool calls (read, write, edit, list, search, run a command)
inside one directory, its root. Paths are relative to the root; a path that is absolute, climbs out
with ``..``, or resolves (through any symlink, final component included) to a place outside the
root is refused, and so is anything in a ``.git`` directory or file. The file tools act with the
task user's filesystem identity (:func:`casperd.taskenv.as_task_user`), never follow a final
symlink and refuse files with more than one hard link. Commands (:mod:`casperd.agents.sandboxcmd`)
run confined as task code; the search is :mod:`casperd.agents.search`.

The tools' definitions for the model and the dispatch of its calls are in :mod:`casperd.agents.tools`.
"""

from __future__ import annotations

import asyncio
import fnmatch
import os
import posixpath
import re
import stat
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from casperd.agents.sandboxcmd import SandboxCommands
from casperd.agents.search import search_tree
from casperd.errors import SandboxError, TaskError
from casperd.taskenv import as_task_user

T = TypeVar("T")
LIST_CAP = 2000
"""Entries list_files shows at most."""
BINARY_SNIFF = 8192


def _refuse(message: str, hint: str) -> SandboxError:
    return SandboxError(message, hint=hint)


def _is_binary(head: bytes) -> bool:
    return b"\0" in head[:BINARY_SNIFF]


def _check_plain(st: os.stat_result, path: str) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise TaskError(f"{path!r} is not a regular file", hint="tools read and write regular files only")
    if st.st_nlink > 1:
        raise _refuse(
            f"{path!r} has {st.st_nlink} hard links; tools refuse files linked from elsewhere",
            "remove the link (rm it and write the file anew)",
        )


def _open_plain(real: Path, path: str) -> int:
    """An fd for reading ``real``: no final symlink followed, a regular file with one link."""
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise TaskError(f"cannot read {path!r}: {exc.strerror}", hint="check the path") from None
    try:
        _check_plain(os.fstat(fd), path)
    except BaseException:
        os.close(fd)
        raise
    return fd


class Sandbox(SandboxCommands):
    """Tools over one worktree (``root``). The constructor resolves ``root``, which must exist."""

    def __init__(
        self,
        root: Path,
        *,
        command_timeout_s: float = 120.0,
        output_cap: int = 16384,
        max_read_bytes: int = 256_000,
        max_write_bytes: int = 2_000_000,
    ) -> None:
        self.root = Path(os.path.realpath(root))
        self.command_timeout_s = float(command_timeout_s)
        self.output_cap = int(output_cap)
        self.max_read_bytes = int(max_read_bytes)
        self.max_write_bytes = int(max_write_bytes)
        self._home: str | None = None
        self._home_finalizer: weakref.finalize | None = None
        self._granted = False

    # --- paths ------------------------------------------------------------------------------------
    def resolve(self, rel: str, *, for_write: bool = False) -> Path:
        """The real location of ``rel`` inside the root; :class:`SandboxError` when it is not allowed.

        Blocking (it follows symlinks on disk): the async tools call it in a thread."""
        if not isinstance(rel, str):
            raise _refuse(f"path must be a string, not {type(rel).__name__}", "give a path relative to the worktree")
        if "\0" in rel:
            raise _refuse("path contains a NUL character", "give a plain path relative to the worktree")
        if rel.strip() == "":
            rel = "."
        if os.path.isabs(rel):
            raise _refuse(
                f"absolute path {rel!r} refused: tools only see the worktree",
                "use a path relative to the worktree root, e.g. 'src/app.py'",
            )
        norm = posixpath.normpath(rel)
        parts = norm.split("/")
        if parts[0] == "..":
            raise _refuse(f"path {rel!r} leaves the worktree", "use a path inside the worktree, without '..'")
        if ".git" in parts:
            raise _refuse(
                f"path {rel!r} is inside git's own data (.git), which tools may not touch",
                "work on the project's files; the git state is managed for you",
            )
        target = self.root if norm == "." else self.root / norm
        real = Path(os.path.realpath(target))
        if real != self.root and self.root not in real.parents:
            raise _refuse(
                f"path {rel!r} resolves outside the worktree (through a symlink)",
                "use paths whose real location is inside the worktree",
            )
        inside = real.relative_to(self.root).parts
        if ".git" in inside:
            raise _refuse(
                f"path {rel!r} resolves into git's own data (.git), which tools may not touch",
                "work on the project's files; the git state is managed for you",
            )
        if for_write and real == self.root:
            raise _refuse("cannot write to the worktree root itself", "name a file inside the worktree")
        return real

    async def _as_task(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a file tool in a thread with the task user's filesystem identity (see
        :func:`casperd.taskenv.as_task_user`), the worktree handed to that user first."""
        await self._grant()
        return await asyncio.to_thread(as_task_user(fn), *args)

    def _display(self, real: Path) -> str:
        rel = real.relative_to(self.root).as_posix()
        return rel or "."

    # --- files ------------------------------------------------------------------------------------
    async def read_file(self, path: str, start_line: int | None = None, end_line: int | None = None) -> str:
        """The text of a file (or of lines start_line..end_line, 1-based, inclusive), capped at
        max_read_bytes with a note; binary files are described, not shown."""
        for name, value in (("start_line", start_line), ("end_line", end_line)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise TaskError(f"{name} must be a whole number of at least 1", hint="lines are numbered from 1")
        if start_line is not None and end_line is not None and end_line < start_line:
            raise TaskError(
                f"end_line {end_line} is before start_line {start_line}", hint="give end_line >= start_line"
            )
        return await self._as_task(self._read_file, path, start_line, end_line)

    def _read_file(self, path: str, start_line: int | None, end_line: int | None) -> str:
        real = self.resolve(path)
        if not real.exists():
            raise TaskError(f"{path!r} does not exist", hint="use list_files to see what is there")
        if real.is_dir():
            raise TaskError(f"{path!r} is a directory", hint="use list_files to see its contents")
        if not real.is_file():
            raise TaskError(f"{path!r} is not a regular file", hint="read regular files only")
        ranged = start_line is not None or end_line is not None
        fd = _open_plain(real, path)
        size = os.fstat(fd).st_size
        # A whole-file read needs only the first max_read_bytes; a line range needs the whole file
        # (bounded: beyond 64 MB only the beginning is considered).
        limit = min(size, 64_000_000) if ranged else self.max_read_bytes + 1
        with os.fdopen(fd, "rb") as f:
            data = f.read(limit)
        if _is_binary(data):
            return f"{path}: binary file ({size} bytes), not shown"
        text = data.decode("utf-8", "replace")
        if not ranged:
            if size == 0:
                return f"{path}: (empty file)"
            if size <= self.max_read_bytes:
                return text
            cut = data[: self.max_read_bytes].decode("utf-8", "ignore")
            shown = cut.count("\n")
            return (
                f"{cut}\n[truncated: showing the first {self.max_read_bytes} of {size} bytes "
                f"(lines 1-{shown}); read the rest with start_line={shown + 1}]"
            )
        lines = text.splitlines(keepends=True)
        total = len(lines)
        first = start_line or 1
        last = min(end_line or total, total)
        if first > total:
            raise TaskError(
                f"{path!r} has only {total} lines; start_line {first} is past the end",
                hint=f"give a start_line between 1 and {max(total, 1)}",
            )
        chunk = "".join(lines[first - 1 : last])
        encoded = chunk.encode()
        header = f"[{path}: lines {first}-{last} of {total}]\n"
        if len(encoded) <= self.max_read_bytes:
            return header + chunk
        cut = encoded[: self.max_read_bytes].decode("utf-8", "ignore")
        upto = first + cut.count("\n") - 1
        return f"{header}{cut}\n[truncated: showing {self.max_read_bytes} bytes; continue with start_line={upto + 1}]"

    async def write_file(self, path: str, content: str) -> str:
        """Create or overwrite a file with ``content`` (parent directories are created)."""
        if not isinstance(content, str):
            raise TaskError("content must be a string", hint="pass the whole new text of the file")
        data = content.encode("utf-8", "surrogateescape")
        if len(data) > self.max_write_bytes:
            raise _refuse(
                f"content is {len(data)} bytes; the limit for one file is {self.max_write_bytes} bytes",
                "write smaller files, or generate large data with a command",
            )
        return await self._as_task(self._write_file, path, data)

    def _write_file(self, path: str, data: bytes) -> str:
        real = self.resolve(path, for_write=True)
        if real.is_dir():
            raise TaskError(f"{path!r} is a directory", hint="name a file, not a directory")
        existed = real.exists()
        # Create the missing parents one by one, re-checking each: none may be (or become) a link.
        missing: list[Path] = []
        parent = real.parent
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        for d in reversed(missing):
            d.mkdir()
            self.resolve(self._display(d))
        self._write_bytes(real, data, path)
        verb = "overwrote" if existed else "created"
        lines = data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)
        return f"{verb} {self._display(real)} ({len(data)} bytes, {lines} lines)"

    def _write_bytes(self, real: Path, data: bytes, path: str) -> None:
        """Write through an fd opened without following a final symlink; a file with more than one
        hard link (one a command may have made to a file outside the worktree) is refused before
        it is truncated."""
        try:
            fd = os.open(real, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
        except OSError as exc:
            raise TaskError(
                f"cannot write {path!r}: {exc.strerror}", hint="check that the path names a file you may write"
            ) from None
        with os.fdopen(fd, "wb") as f:
            _check_plain(os.fstat(fd), path)
            os.ftruncate(fd, 0)
            f.write(data)

    async def replace_in_file(self, path: str, old: str, new: str, replace_all: bool = False) -> str:
        """Replace the exact text ``old`` with ``new``; ``old`` must occur exactly once unless
        ``replace_all``."""
        if not isinstance(old, str) or not isinstance(new, str):
            raise TaskError("old and new must be strings", hint="copy old exactly from the file")
        if old == "":
            raise TaskError(
                "old must not be empty",
                hint="copy the exact text to replace from the file; use write_file to create a file",
            )
        if old == new:
            raise TaskError("old and new are the same: nothing would change", hint="give the new text")
        return await self._as_task(self._replace, path, old, new, bool(replace_all))

    def _replace(self, path: str, old: str, new: str, replace_all: bool) -> str:
        real = self.resolve(path, for_write=True)
        if not real.is_file():
            raise TaskError(
                f"{path!r} does not exist or is not a file",
                hint="use list_files to find it, or write_file to create it",
            )
        size = real.stat().st_size
        if size > self.max_write_bytes:
            raise _refuse(
                f"{path!r} is {size} bytes, larger than the {self.max_write_bytes}-byte edit limit",
                "edit it with a command instead",
            )
        with os.fdopen(_open_plain(real, path), "rb") as f:
            data = f.read()
        if _is_binary(data):
            raise TaskError(f"{path!r} is a binary file", hint="replace_in_file edits text files only")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise TaskError(f"{path!r} is not valid UTF-8 text", hint="edit it with a command instead") from None
        count = text.count(old)
        if count == 0:
            raise TaskError(
                f"old text not found in {path!r}",
                hint="read the file again and copy the text exactly (whitespace and indentation must match)",
            )
        if count > 1 and not replace_all:
            raise TaskError(
                f"old text occurs {count} times in {path!r}; it must occur exactly once",
                hint="include more surrounding lines to make it unique, or set replace_all",
            )
        result = text.replace(old, new) if replace_all else text.replace(old, new, 1)
        out = result.encode("utf-8")
        if len(out) > self.max_write_bytes:
            raise _refuse(
                f"the edited file would be {len(out)} bytes; the limit is {self.max_write_bytes} bytes",
                "make a smaller change",
            )
        self._write_bytes(real, out, path)
        n = count if replace_all else 1
        return f"replaced {n} occurrence{'s' if n != 1 else ''} in {self._display(real)}"

    async def list_files(self, path: str = ".", pattern: str | None = None) -> str:
        """Files under ``path``, recursively, sorted, .git skipped; ``pattern`` (a glob) filters by
        name or by path relative to the root. At most LIST_CAP entries."""
        if pattern is not None and not isinstance(pattern, str):
            raise TaskError("pattern must be a string glob", hint="e.g. '*.py'")
        return await self._as_task(self._list_files, path, pattern or None)

    def _walk(self, real: Path) -> Any:
        """(relative path, absolute path) of every file under ``real`` in sorted depth-first order,
        without following directory symlinks and without .git."""

        def onerror(_exc: OSError) -> None:
            return None

        for dirpath, dirnames, filenames in os.walk(real, onerror=onerror):
            dirnames[:] = sorted(d for d in dirnames if d != ".git")
            base = Path(dirpath)
            for name in sorted(filenames):
                if name == ".git":
                    continue
                full = base / name
                yield full.relative_to(self.root).as_posix(), full

    def _list_files(self, path: str, pattern: str | None) -> str:
        real = self.resolve(path)
        if not real.exists():
            raise TaskError(f"{path!r} does not exist", hint="list '.' to see the worktree")
        if real.is_file():
            return self._display(real)
        out: list[str] = []
        more = False
        for rel, _full in self._walk(real):
            if pattern and not (
                fnmatch.fnmatchcase(rel, pattern) or fnmatch.fnmatchcase(posixpath.basename(rel), pattern)
            ):
                continue
            if len(out) >= LIST_CAP:
                more = True
                break
            out.append(rel)
        if not out:
            return "no files" + (f" matching {pattern!r}" if pattern else "") + f" under {path!r}"
        text = "\n".join(out)
        if more:
            text += f"\n[listing stopped at {LIST_CAP} entries; list a subdirectory or give a pattern]"
        return text

    async def search(self, pattern: str, path: str = ".", glob: str | None = None) -> str:
        """Lines matching the Python regex ``pattern`` in text files under ``path`` (``glob`` filters
        file names), as ``path:line: text``. Runs in a subprocess so no regex can stall the daemon."""
        if not isinstance(pattern, str) or not pattern:
            raise TaskError("pattern must be a non-empty regular expression", hint="e.g. 'def main'")
        if glob is not None and not isinstance(glob, str):
            raise TaskError("glob must be a string", hint="e.g. '*.py'")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise TaskError(
                f"invalid regular expression {pattern!r}: {exc}",
                hint="use Python re syntax; escape special characters like ( [ . *",
            ) from None
        real = await self._as_task(self.resolve, path)
        return await search_tree(self.root, real, pattern, glob)
