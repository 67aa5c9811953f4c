"""What task code (shell tasks, ``run_command``, the tester's command) runs with: its user, its
limits and its environment — the node's secrets out of its reach.

Theory of operation. The node calls :func:`configure` once at start with its settings. The
policy is process-wide because it is a property of the node, not of a task:

* **User.** ``task_user = "auto"`` (the default): a daemon running as root runs task code as the
  user ``casper-task`` when it exists, else ``nobody``; a non-root daemon does the same when it holds
  CAP_SETUID and CAP_SETGID (the container image: see containers/Dockerfile), else task code runs
  as the daemon's own user and a warning says so. ``task_user = "none"`` turns the switch off; any
  other value names the user and is required. With a separate user, the secrets (keys, the
  Postgres passfile, secret files: all 0600 and owned by the daemon) and the daemon's
  ``/proc/PID/environ`` are unreadable to task code by the kernel's own checks, and the node's git
  mirrors are not writable by it. The directories task code works in are handed to that user with
  :func:`grant_tree` (and taken back by :func:`reclaim_tree` before the daemon deletes them).
* **Limits.** ``setrlimit`` in the child: CPU seconds, address space, processes, file size.
* **Environment** (:func:`task_env`): the node's minus every variable whose *name* looks secret
  (``*KEY*``, ``*TOKEN*``, ``*PASS*``, ``CASPER_*``, ``PG*``, ``*_FILE`` naming a protected file…)
  and every variable whose *value* holds a secret: a password in a URL, or any secret value the
  node knows (secret-looking variables, the files they and the settings name, /run/secrets/*).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import pwd
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from casperd.errors import ConfigError, SandboxError
from casperd.subproc import Confinement, Limits, RunAs

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_TASK_USER = "casper-task"
SECRETS_DIR = Path("/run/secrets")
_SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASS|CREDENTIAL|AUTH|COOKIE|SESSION)", re.I)
_URL_PASSWORD = re.compile(r"://[^/\s@:]*:[^/\s@]+@|[?&;](password|passwd|pwd)=", re.I)
_MIN_SECRET = 6
"""Shorter values are not treated as secrets when scrubbing by value (too many false hits)."""
_CAP_SETGID, _CAP_SETUID = 6, 7


@dataclass(slots=True)
class _Policy:
    confinement: Confinement
    protected: tuple[str, ...]
    """Directories (resolved) no variable of task code may point into."""
    file_secrets: frozenset[str]
    """The contents of the node's secret files, read once by :func:`configure`."""


_POLICY: _Policy | None = None


def _effective_caps() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return 0


def can_switch_user() -> bool:
    """Whether this process may run children as another user."""
    caps = _effective_caps()
    return os.geteuid() == 0 or bool(caps & (1 << _CAP_SETUID) and caps & (1 << _CAP_SETGID))


def resolve_user(setting: str) -> RunAs | None:
    """The user task code runs as under ``task_user = setting`` (see the module docstring).

    Raises:
        ConfigError: a named user does not exist or this process may not switch to it.
    """
    name = setting.strip()
    if name.lower() in ("none", "off", ""):
        return None
    if name.lower() == "auto":
        if not can_switch_user():
            return None
        for candidate in (DEFAULT_TASK_USER, "nobody") if os.geteuid() == 0 else (DEFAULT_TASK_USER,):
            try:
                pw = pwd.getpwnam(candidate)
            except KeyError:
                continue
            if pw.pw_uid != os.geteuid():
                return RunAs(pw.pw_uid, pw.pw_gid, candidate)
        return None
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise ConfigError(
            f"task_user {name!r} does not exist on this node",
            hint=f"create it (e.g. useradd --system {name}), or set task_user to auto or none",
        ) from None
    if pw.pw_uid == 0:
        raise ConfigError("task_user must not be root", hint="name an unprivileged user, or set task_user to none")
    if pw.pw_uid != os.geteuid() and not can_switch_user():
        raise ConfigError(
            f"casperd (uid {os.geteuid()}) may not run task code as {name!r}: it lacks CAP_SETUID/CAP_SETGID",
            hint="run casperd as root, grant it those capabilities, or set task_user to none",
        )
    return RunAs(pw.pw_uid, pw.pw_gid, name)


def configure(settings: Any, environ: Any = None) -> Confinement:
    """Set the node's task policy from its settings and environment (``os.environ`` by default),
    reading the secret files once; called once at start. Returns the confinement."""
    global _POLICY
    run_as = resolve_user(str(getattr(settings, "task_user", "auto")))
    limits = Limits(
        cpu_s=getattr(settings, "task_cpu_s", 3600),
        memory_bytes=getattr(settings, "task_memory_mb", 8192) * 1024 * 1024,
        processes=getattr(settings, "task_processes", 1024),
        file_bytes=getattr(settings, "task_file_mb", 4096) * 1024 * 1024,
    )
    state_dir = Path(getattr(settings, "state_dir", SECRETS_DIR))
    files = [
        Path(f)
        for f in (
            getattr(settings, name, None)
            for name in ("database_password_file", "anthropic_api_key_file", "curve_secret_key_file")
        )
        if f
    ]
    _POLICY = _Policy(
        Confinement(limits, run_as),
        protected=(os.path.realpath(state_dir), str(SECRETS_DIR)),
        file_secrets=frozenset(_file_secrets(files, os.environ if environ is None else environ)),
    )
    if run_as is None:
        log.warning(
            "task code runs as casperd's own user (uid %d): it can read this node's keys and secrets; "
            "see README 'Task isolation' (task_user)",
            os.geteuid(),
        )
    else:
        log.info("task code runs as %s (uid %d)", run_as.name, run_as.uid)
        unlistable(state_dir)
    return _POLICY.confinement


def unlistable(path: Path) -> None:
    """No read or write for group and others on the node's state directory (a fresh one is 0755
    under the usual umask): task code, another user, may pass through it to its workspace
    (``o+x``, :func:`make_traversable`) but not list it. Only when this user owns it."""
    with contextlib.suppress(OSError):
        st = path.stat()
        if st.st_uid == os.geteuid() and st.st_mode & 0o066:
            path.chmod(stat.S_IMODE(st.st_mode) & ~0o066)


def _policy() -> _Policy:
    if _POLICY is None:
        configure(object())
    assert _POLICY is not None
    return _POLICY


def confinement() -> Confinement:
    """The confinement of task code on this node."""
    return _policy().confinement


# --- the environment -----------------------------------------------------------------------------
def _read_small(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            data = f.read(65537)
    except OSError:
        return None
    if len(data) > 65536:
        return None
    return data.decode("utf-8", "replace")


def _values_of(text: str) -> set[str]:
    """A secret file's text and, for pgpass-style lines (host:port:db:user:password), each password."""
    out = {text.strip()}
    for line in text.splitlines():
        out.add(line.strip())
        if line.count(":") >= 4:
            out.add(line.rsplit(":", 1)[1].strip())
    return {v for v in out if len(v) >= _MIN_SECRET}


def _file_secrets(files: list[Path], environ: Any) -> set[str]:
    """The contents of the settings' secret files, of the files secret-named ``*_FILE`` variables
    name, and of /run/secrets/* (blocking: read once, at start)."""
    paths = list(files)
    paths += [Path(v) for k, v in environ.items() if v and _secret_name(k) and k.endswith(("_FILE", "PASSFILE"))]
    if SECRETS_DIR.is_dir():
        with contextlib.suppress(OSError):
            paths += list(SECRETS_DIR.iterdir())
    values: set[str] = set()
    for path in paths:
        text = _read_small(path) if path.is_file() else None
        if text:
            values |= _values_of(text)
    return values


def secret_values(environ: Any = None) -> set[str]:
    """Every secret value this node knows of (never logged): secret-named variables and the
    secret files read at start. No I/O."""
    env = os.environ if environ is None else environ
    values = {v for k, v in env.items() if _SECRET_NAME.search(k) and len(v) >= _MIN_SECRET}
    return values | _policy().file_secrets


def _is_protected(value: str, protected: tuple[str, ...]) -> bool:
    """Whether ``value`` is a path into a protected directory (lexically: no I/O; a path through a
    symlink is still caught by value when it names a secret file)."""
    if not value.startswith("/"):
        return False
    norm = os.path.normpath(value)
    return any(norm == p or norm.startswith(p.rstrip("/") + "/") for p in protected)


def _secret_name(name: str) -> bool:
    """Names whose variables never reach task code (a ``*_FILE`` naming a protected file is caught
    by value)."""
    return bool(_SECRET_NAME.search(name)) or name.startswith(("CASPER_", "PG"))


def task_env(extra: dict[str, str] | None = None, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of task code: the node's, scrubbed by name and by value, plus ``extra``.
    No I/O (safe on the event loop)."""
    env = dict(os.environ if environ is None else environ)
    pol = _policy()
    secrets = secret_values(env)
    out: dict[str, str] = {}
    for k, v in env.items():
        if _secret_name(k):
            continue
        if _URL_PASSWORD.search(v) or _is_protected(v, pol.protected):
            continue
        if any(s in v for s in secrets):
            continue
        out[k] = v
    out.update(extra or {})
    return out


# --- the directories task code works in -----------------------------------------------------------
def _chown_tree(root: Path, uid: int, gid: int) -> None:
    os.lchown(root, uid, gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            try:
                st = os.lstat(full)
                if st.st_uid != uid or st.st_gid != gid:
                    os.lchown(full, uid, gid)
                if stat.S_ISDIR(st.st_mode) and st.st_mode & 0o700 != 0o700:
                    os.chmod(full, st.st_mode | 0o700)
            except FileNotFoundError:
                continue


def make_traversable(path: Path) -> None:
    """Let the task user reach ``path``: o+x on it and each parent (search, not listing)."""
    for parent in [path, *path.parents]:
        try:
            mode = parent.stat().st_mode
            if not mode & stat.S_IXOTH:
                parent.chmod(mode | stat.S_IXOTH)
        except OSError:
            continue


def grant_tree(root: Path, *, recursive: bool = True) -> None:
    """Hand ``root`` (and, recursively, what is in it) to the task user. Blocking: call in a thread.
    Nothing to do when task code runs as the daemon's own user."""
    run_as = confinement().run_as
    if run_as is None:
        return
    make_traversable(root.parent)
    if recursive:
        _chown_tree(root, run_as.uid, run_as.gid)
    else:
        os.lchown(root, run_as.uid, run_as.gid)


def reclaim_tree(root: Path) -> None:
    """Take ``root`` back from the task user before the daemon edits or removes it (a non-root
    daemon may not delete in directories it does not own). Blocking: call in a thread."""
    run_as = confinement().run_as
    if run_as is None or not os.path.lexists(root):
        return
    _chown_tree(root, os.geteuid(), os.getegid())


def as_task_user(fn: Callable[..., T]) -> Callable[..., T]:
    """``fn`` run with the task user's filesystem identity (``setfsuid``/``setfsgid``, which hold
    for the calling thread only): what the daemon does on task code's behalf (the agent's file
    tools) can touch only what task code itself could, and what it creates belongs to task code.
    Call the result in a worker thread (``asyncio.to_thread``); the identity is restored after."""
    run_as = confinement().run_as
    if run_as is None:
        return fn

    def wrapped(*args: Any, **kwargs: Any) -> T:
        libc = _libc()
        old_uid, old_gid = os.geteuid(), os.getegid()
        libc.setfsgid(run_as.gid)
        libc.setfsuid(run_as.uid)
        try:
            if libc.setfsuid(-1) != run_as.uid or libc.setfsgid(-1) != run_as.gid:
                raise SandboxError(
                    f"cannot act as the task user {run_as.name}",
                    hint="casperd needs CAP_SETUID and CAP_SETGID (or root) to run task code as another user",
                )
            return fn(*args, **kwargs)
        finally:
            libc.setfsuid(old_uid)
            libc.setfsgid(old_gid)

    return wrapped


_LIBC: ctypes.CDLL | None = None


def _libc() -> ctypes.CDLL:
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
    return _LIBC
