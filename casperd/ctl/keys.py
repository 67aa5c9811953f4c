"""``caspectl keygen`` and ``caspectl keys list | add | revoke``: Curve keys and their enrollment.

``keygen`` works offline and refuses to overwrite an existing key pair without ``--force``.
``keys`` talks to the policeman's control socket (``keys-list``, ``keys-add``, ``keys-revoke``),
which keeps its allow-list file (``authorized_keys``, 0600) and applies a change at once: a
revoked key's peer is dropped and its tasks go back to pending. With ``--file PATH`` the
allow-list file is edited directly, without a daemon (before the first start, or in a
compose secrets directory); a running policeman picks the change up within a second.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from casperd.enrollment import Enrollment, check_key
from casperd.errors import CommandError, ConfigError, TaskNotFoundError

Emit = Callable[[argparse.Namespace, Any, Callable[[Any], None]], None]


def write_new_keypair(directory: Path, name: str, *, force: bool) -> tuple[Path, Path]:
    """Make NAME.key (0600) and NAME.pub; an existing pair is kept unless ``force``."""
    from casperd.transport import write_keypair

    sec, pub = directory / f"{name}.key", directory / f"{name}.pub"
    if not force and (sec.exists() or pub.exists()):
        raise CommandError(
            f"{sec if sec.exists() else pub} already exists; not overwriting a key",
            hint="a new key must be enrolled again (caspectl keys add); pass --force to replace it",
        )
    try:
        return write_keypair(directory, name)
    except OSError as exc:
        raise CommandError(
            f"cannot write keys to {directory}: {exc.strerror}", hint="give a directory you can write to"
        ) from None


def key_argument(text: str) -> str:
    """A z85 public key given as itself or as the path of a NAME.pub file."""
    path = Path(text)
    if len(text) != 40 and path.is_file():
        text = path.read_text().strip()
    try:
        return check_key(text)
    except ConfigError as exc:
        raise CommandError(exc.message, hint=exc.hint) from None


def offline(a: argparse.Namespace) -> dict[str, Any]:
    """``caspectl keys ... --file PATH``: edit the allow-list file itself."""
    book = Enrollment(Path(a.file))
    if a.keys_action == "list":
        return {
            "file": a.file,
            "keys": [{"key": e.key, "pattern": e.pattern, "role": e.role} for e in book.entries.values()],
        }
    if a.keys_action == "add":
        try:
            e = book.add(key_argument(a.key), a.pattern, a.role)
        except ConfigError as exc:
            raise CommandError(exc.message, hint=exc.hint) from None
        return {"key": e.key, "pattern": e.pattern, "role": e.role}
    gone = book.revoke(a.target)
    if not gone:
        raise TaskNotFoundError(
            f"no enrolled key or pattern {a.target[:80]!r} in {a.file}", hint="see caspectl keys list"
        )
    return {"revoked": [e.key for e in gone], "dropped": []}


def online(client: Any, a: argparse.Namespace) -> dict[str, Any]:
    if a.keys_action == "list":
        return dict(client.request("keys-list"))
    if a.keys_action == "add":
        return dict(client.request("keys-add", key=key_argument(a.key), pattern=a.pattern, role=a.role))
    return dict(client.request("keys-revoke", target=a.target))


def show(out: Console, a: argparse.Namespace, data: dict[str, Any]) -> None:
    if a.keys_action == "list":
        for k in data["keys"]:
            where = f"  online as {k['online']}" if k.get("online") else ""
            out.print(f"{k['key']}  {k['pattern']}  {k['role']}{where}", highlight=False)
        if not data["keys"]:
            out.print(f"no keys enrolled in {data['file']}")
    elif a.keys_action == "add":
        out.print(f"enrolled {data['key']} as {data['pattern']} ({data['role']})", highlight=False)
    else:
        dropped = f"; dropped {', '.join(data['dropped'])}" if data.get("dropped") else ""
        out.print(f"revoked {len(data['revoked'])} key(s){dropped}", highlight=False)


def add_parsers(add: Callable[[str, Any, str], argparse.ArgumentParser], keygen: Any, keys: Any) -> None:
    sp = add("keygen", keygen, "make a CurveZMQ key pair (NAME.key secret 0600, NAME.pub public)")
    sp.add_argument("directory")
    sp.add_argument("name")
    sp.add_argument("--force", action="store_true", help="replace an existing key pair (enroll the new key again)")
    sp = add("keys", keys, "the enrolled Curve keys: list | add KEY NODE_OR_PATTERN ROLE | revoke KEY_OR_PATTERN")
    sp.add_argument("keys_action", choices=["list", "add", "revoke"], metavar="ACTION", help="list, add or revoke")
    sp.add_argument(
        "args", nargs="*", metavar="ARG", help="add: KEY (or NAME.pub) NODE_ID_OR_PATTERN ROLE; revoke: KEY_OR_PATTERN"
    )
    sp.add_argument("--file", help="edit this authorized_keys file directly instead of asking the policeman")


def parse_action(a: argparse.Namespace) -> None:
    """Check the action's arguments (before any daemon is contacted)."""
    want = {"list": 0, "add": 3, "revoke": 1}[a.keys_action]
    if len(a.args) != want:
        usage = {
            "list": "keys list",
            "add": "keys add KEY NODE_ID_OR_PATTERN ROLE",
            "revoke": "keys revoke KEY_OR_PATTERN",
        }
        raise CommandError(f"usage: caspectl {usage[a.keys_action]}", hint="see caspectl keys --help")
    if a.keys_action == "add":
        a.key, a.pattern, a.role = a.args
    elif a.keys_action == "revoke":
        a.target = a.args[0]
