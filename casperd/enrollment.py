"""Enrollment: the allow-list of Curve public keys that may join the mesh (protocol/SPEC.md, "Trust").

An ``authorized_keys``-style text file, one key a line::

    # public key (z85, 40 characters)          node id or pattern   role
    rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7   developer-1          developer
    Yne@$w-vo<fVvi]a<NY6T1ed:M$fCG*[IaLV{hID   developer-*          developer

The pattern is a shell-style pattern (``fnmatch``, case-sensitive) matched against the node id a
peer claims; the role is the one role that key may register as. A node id some entry names
exactly (no wildcard) is *reserved* to that entry's key: no pattern admits it, so a key shared by
a pool of replicas (``developer-pool-*``) can never claim a fixed node's id, whatever its pattern.
Lines starting with ``#`` whose first word is not a key are comments. The file holds public keys
only, but it decides who may join, so it is written 0600. Pure apart from
:meth:`Enrollment.load` / :meth:`Enrollment.save`.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import re
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from zmq.utils import z85

from casperd.errors import ConfigError

ROLES = ("policeman", "developer", "tester")
_WILDCARDS = "*?["
_PATTERN = re.compile(r"^[A-Za-z0-9*?\[\]!._-]{1,64}$")


@dataclass(frozen=True, slots=True)
class Entry:
    key: str
    pattern: str
    role: str

    @property
    def exact(self) -> bool:
        """A plain node id, no wildcard: it reserves that id (see the module docstring)."""
        return not any(c in self.pattern for c in _WILDCARDS)

    def admits(self, node_id: str, role: str, reserved: Collection[str] = ()) -> bool:
        """Whether this key may act as node ``node_id`` with role ``role``; a pattern never admits
        an id in ``reserved`` (the ids other entries name exactly: :attr:`Enrollment.reserved`)."""
        if role != self.role:
            return False
        if self.exact:
            return node_id == self.pattern
        return node_id not in reserved and fnmatch.fnmatchcase(node_id, self.pattern)

    def line(self) -> str:
        return f"{self.key} {self.pattern} {self.role}"


def check_key(key: str) -> str:
    """A z85 Curve public key, or a ConfigError naming what is wrong with it."""
    key = key.strip()
    try:
        ok = len(key) == 40 and len(z85.decode(key)) == 32
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise ConfigError(
            f"{key[:48]!r} is not a 40-character z85 Curve public key",
            hint="use the NAME.pub file caspectl keygen made",
        )
    return key


def make_entry(key: str, pattern: str, role: str) -> Entry:
    if role not in ROLES:
        raise ConfigError(f"unknown role {role!r}", hint=f"one of: {', '.join(ROLES)}")
    if not _PATTERN.match(pattern):
        raise ConfigError(
            f"{pattern[:80]!r} is not a node id or pattern", hint="letters, digits, . _ - and the wildcards * ? [ ]"
        )
    return Entry(check_key(key), pattern, role)


def parse(text: str, source: str = "authorized_keys") -> dict[str, Entry]:
    entries: dict[str, Entry] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        words = raw.split()
        if not words or (words[0].startswith("#") and len(words[0]) != 40):
            continue
        if len(words) != 3:
            raise ConfigError(
                f"{source} line {n}: expected 'PUBLIC_KEY NODE_PATTERN ROLE'", hint="fix or remove that line"
            )
        try:
            entry = make_entry(*words)
        except ConfigError as exc:
            raise ConfigError(f"{source} line {n}: {exc.message}", hint=exc.hint) from None
        entries[entry.key] = entry
    return entries


class Enrollment:
    """The allow-list in memory, reloaded when its file changes (checked at most once a second)."""

    def __init__(self, path: Path | None, entries: dict[str, Entry] | None = None) -> None:
        self.path = path
        self.entries: dict[str, Entry] = dict(entries or {})
        self._stamp: tuple[int, int, int] | None = None
        self._reserved: frozenset[str] | None = None
        """Cached :attr:`reserved`; every change of ``entries`` clears it."""
        self._checked = 0.0
        if path is not None:
            self.reload()

    def reload(self) -> None:
        assert self.path is not None
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self.entries, self._stamp, self._reserved = {}, None, None
            return
        except OSError as exc:
            raise ConfigError(f"cannot read {self.path}: {exc.strerror}", hint="check the path and its mode") from None
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            self.entries = parse(self.path.read_text(), str(self.path))
            self._stamp, self._reserved = stamp, None

    def refresh(self, now: float | None = None, *, force: bool = False) -> None:
        """Pick up an edited file (a `caspectl keys` change made on another node, an editor):
        looked at once a second, or at once with ``force`` (a key not known yet)."""
        now = time.monotonic() if now is None else now
        if self.path is not None and (force or now - self._checked >= 1.0):
            self._checked = now
            with contextlib.suppress(ConfigError):  # a half-written file: keep the last good list
                self.reload()

    def lookup(self, key: str | None) -> Entry | None:
        return self.entries.get(key) if key else None

    @property
    def reserved(self) -> frozenset[str]:
        """The node ids entries name exactly: no pattern entry admits them."""
        if self._reserved is None:
            self._reserved = frozenset(e.pattern for e in self.entries.values() if e.exact)
        return self._reserved

    def admits(self, key: str | None, node_id: str, role: str) -> bool:
        """Whether ``key`` may act as ``node_id`` with ``role`` (reserved ids honoured)."""
        entry = self.lookup(key)
        return entry is not None and entry.admits(node_id, role, self.reserved)

    def add(self, key: str, pattern: str, role: str) -> Entry:
        entry = make_entry(key, pattern, role)
        self.entries[entry.key] = entry
        self._reserved = None
        self.save()
        return entry

    def revoke(self, key_or_pattern: str) -> list[Entry]:
        """Remove a key, or every key enrolled with exactly this node pattern."""
        gone = [e for e in self.entries.values() if key_or_pattern in (e.key, e.pattern)]
        for e in gone:
            del self.entries[e.key]
        self._reserved = None
        if gone:
            self.save()
        return gone

    def save(self) -> None:
        """Write the list back, in place when the file exists: a file bind-mounted into containers
        (a compose secret) keeps its inode, so the nodes that mount it see the change."""
        if self.path is None:
            return
        text = "".join(e.line() + "\n" for e in self.entries.values())
        try:
            if self.path.exists():
                fd = os.open(self.path, os.O_WRONLY | os.O_TRUNC)
                with contextlib.suppress(OSError):
                    os.fchmod(fd, 0o600)
                with os.fdopen(fd, "w") as fh:
                    fh.write(text)
            else:
                write_private(self.path, text)
        except OSError as exc:
            raise ConfigError(
                f"cannot write the enrollment file {self.path}: {exc.strerror}",
                hint="a read-only secret (compose, swarm)? edit it where it is made: "
                "caspectl keys add|revoke --file PATH, then restart or wait a second",
            ) from None
        st = self.path.stat()
        self._stamp = (st.st_ino, st.st_mtime_ns, st.st_size)


def write_private(path: Path, text: str) -> None:
    """Write a file readable by this user only (0600), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def enroll(path: Path, public_key_file: Path, pattern: str, role: str) -> Entry:
    """Add (or replace) one key in the file at ``path`` (``casperd up`` and make-secrets use it)."""
    book = Enrollment(path)
    return book.add(public_key_file.read_text().strip(), pattern, role)
