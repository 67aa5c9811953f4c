"""``casperd``: the daemon's entry point (thin: parse, configure, run).

casperd [--role ROLE] [options]     run one node (the default command)
casperd up [--developers N] ...     run a whole local mesh on embedded Postgres and Redis
casperd migrate [--database-url U]  apply the SQL migrations and exit
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import types
import typing
from pathlib import Path
from typing import Any

from casperd import __version__
from casperd.errors import CasperError
from casperd.exitcodes import ExitCode
from casperd.settings import Settings, load_settings

EPILOG = """\
precedence: flags > CASPER_* environment variables > --config file (TOML) > defaults.

examples:
  casperd up                                   # a local mesh: embedded Postgres + Redis, 2 developers, 1 tester
  casperd --role policeman --database-url postgresql://casper@db/casper --bind tcp://0.0.0.0:5555
  casperd --role developer --broker tcp://172.20.0.10:5555 --bind tcp://0.0.0.0:5555 \\
          --advertise tcp://172.20.0.11:5555
  casperd migrate --database-url postgresql://casper@db/casper

exit codes: 0 ok, 2 bad usage or configuration, 3 a dependency (database) is unreachable, 1 other failure.
"""


def _flag_type(annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin in (typing.Union, types.UnionType) and args:
        return _flag_type(args[0])
    if origin is typing.Annotated:
        return _flag_type(args[0])
    if annotation in (int, float):
        return annotation
    if annotation is Path:
        return Path
    return str


def add_settings_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One ``--flag`` per settings field, documented with its variable and default."""
    group = parser.add_argument_group("node settings (each also CASPER_<NAME>)")
    for name, field in Settings.model_fields.items():
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        default = field.get_default(call_default_factory=True)
        structured = isinstance(default, dict) and any(hasattr(v, "model_dump") for v in default.values())
        shown = "" if default in ("", None, []) or structured else f" (default: {default})"
        help_text = f"{field.description}{shown} [CASPER_{name.upper()}]"
        if field.annotation is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            group.add_argument(
                flag, dest=name, type=_flag_type(field.annotation), default=None, help=help_text, metavar=name.upper()
            )


def settings_from_args(ns: argparse.Namespace) -> Settings:
    overrides = {k: getattr(ns, k) for k in Settings.model_fields if getattr(ns, k, None) is not None}
    return load_settings(overrides, getattr(ns, "config", None))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="casperd",
        description="CASPER mesh daemon: one node of a swarm of Claude agents (policeman = broker, developer, tester).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"casperd {__version__}")
    p.add_argument("--config", type=Path, help="TOML file with settings (keys as the flag names, underscores)")
    add_settings_flags(p)
    return p


def setup_logging(level: str, fmt: str) -> None:
    from casperd.logsetup import configure

    configure(level, fmt)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "up":
        from casperd.up import main as up_main

        return up_main(argv[1:])
    if argv and argv[0] == "migrate":
        return _migrate(argv[1:])
    if argv and argv[0] == "run":
        argv = argv[1:]
    ns = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(ns)
    except CasperError as exc:
        print(f"casperd: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    setup_logging(settings.log_level, settings.log_format)
    from casperd.eventloop import loop_factory
    from casperd.node import Node

    try:
        with asyncio.Runner(loop_factory=loop_factory(settings.event_loop)) as runner:
            runner.run(Node(settings).run())
    except CasperError as exc:
        logging.getLogger("casperd").error("%s", exc)
        return ExitCode.UNAVAILABLE if exc.code in ("storage", "migration") else ExitCode.FAILURE
    except KeyboardInterrupt:
        pass
    return ExitCode.OK


def _migrate(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="casperd migrate",
        description="Apply CASPER's SQL migrations (sql/NNN_*.sql) "
        "to a Postgres database and exit; already applied ones are skipped.",
    )
    p.add_argument("--database-url", help="Postgres URL [CASPER_DATABASE_URL]")
    p.add_argument("--config", type=Path)
    ns = p.parse_args(argv)
    try:
        settings = load_settings({"database_url": ns.database_url, "role": "policeman"}, ns.config)
        if not settings.database_url:
            raise CasperError("no database given", hint="pass --database-url or set CASPER_DATABASE_URL")
    except CasperError as exc:
        print(f"casperd migrate: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    from casperd.store import Store

    async def run() -> list[str]:
        store = Store(settings.database_url)
        await store.open()
        try:
            return await store.migrate()
        finally:
            await store.close()

    try:
        applied = asyncio.run(run())
    except CasperError as exc:
        print(f"casperd migrate: {exc}", file=sys.stderr)
        return ExitCode.UNAVAILABLE
    print(json.dumps({"applied": applied}))
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
