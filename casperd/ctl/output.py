"""How caspectl prints: tables that fit the terminal, ``-o json`` for scripts, errors with hints.

Tables wrap long cells (endpoints, paths, ids) instead of cutting them; on a pipe the width is
generous so scripts see whole values. Human notes and warnings go to stderr, so stdout stays one
JSON document with ``-o json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable
from typing import Any

from rich.console import Console
from rich.table import Table

from casperd.errors import CasperError

out = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 200)


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 task``, ``2 tasks``, ``1 capability``, ``3 capabilities``."""
    return f"{n} {word if n == 1 else many or word + 's'}"


def emit(args: argparse.Namespace, data: Any, human: Callable[[Any], None]) -> None:
    if args.output == "json":
        print(json.dumps(data, indent=2, default=str))
    else:
        human(data)


def table(title: str, columns: Iterable[str], rows: Iterable[Iterable[Any]]) -> Table:
    t = Table(title=title, title_justify="left", header_style="bold")
    for c in columns:
        t.add_column(c, overflow="fold")  # wrap long words (endpoints, paths) instead of cutting them
    for r in rows:
        t.add_row(*("" if v is None else str(v) for v in r))
    return t


def kv(title: str, data: dict[str, Any]) -> None:
    rows = [(k, json.dumps(v) if isinstance(v, dict | list) else v) for k, v in data.items()]
    out.print(table(title, ("field", "value"), rows))


def warn(args: argparse.Namespace, text: str) -> None:
    """A warning on stderr (in both output modes: stdout stays clean for scripts)."""
    err.print(f"[yellow]caspectl: warning:[/] {text}", highlight=False)


def fail(args: argparse.Namespace, exc: CasperError, code: int) -> int:
    """Print an error (cause and hint; in JSON with ``-o json``) and return the exit code."""
    if getattr(args, "output", "table") == "json":
        body: dict[str, Any] = {"error": exc.to_wire(), "exit_code": int(code)}
        body.update({k: v for k, v in exc.details.items() if isinstance(v, str | int | float | list | dict)})
        print(json.dumps(body))
    else:
        err.print(
            f"[bold red]caspectl:[/] {exc.message}" + (f"\n  hint: {exc.hint}" if exc.hint else ""), highlight=False
        )
    return int(code)
