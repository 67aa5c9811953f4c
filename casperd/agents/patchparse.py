"""Parsing git patches (pure): which paths a patch touches."""

from __future__ import annotations

import re

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
