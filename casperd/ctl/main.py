"""``caspectl``: the admin client of a CASPER mesh, over a node's control socket.

Every command takes ``-o json`` for scripts; the default is a readable table. Errors name the
cause and the fix, and the exit code says what kind of failure it was (see ``--help``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from casperd import __version__
from casperd.ctl import jobs, keys, submit, top
from casperd.ctl.client import ControlClient, find_control, parse_id
from casperd.ctl.output import emit, err, fail, kv, out, plural, table
from casperd.errors import (
    CasperError,
    NoDaemonError,
    NotFoundError,
    RequestTimeoutError,
)
from casperd.exitcodes import ExitCode
from casperd.waiting import why_waiting

USAGE_CODES = frozenset({"command", "bad-input", "unknown-task-type", "idempotency-conflict"})
"""Error codes that mean the request itself was wrong: exit 2, like a bad flag."""

EPILOG = """\
examples:
  caspectl status
  caspectl submit shell --input '{"cmd": "pytest -q"}' --wait
  caspectl submit echo --input '{"hello": "mesh"}' --idempotency-key greet-1 -o json
  caspectl submit shell --input '{"cmd": "make test", "timeout_s": 600}' --cache --wait
  caspectl submit-bulk tasks.jsonl            # one JSON task per line: {"type": ..., "input": {...}, ...}
  caspectl tasks --status dead --limit 20 && caspectl retry ID
  caspectl drain developer-1 && caspectl resume developer-1
  caspectl keygen ./keys node-1
  caspectl keys add ./keys/node-1.pub developer-3 developer && caspectl keys list
  caspectl run "fix the flaky parser test" --repo . --budget-usd 2 --max-parallel 4
  caspectl run "add type hints" --repo ~/src/app --detach && caspectl job JOB_ID --watch

the control socket: --control, else CASPER_CONTROL, else the mesh started by 'casperd up'
(found through STATE_DIR/mesh.json; --state-dir or CASPER_STATE_DIR).

a task's input is checked against its type's schema at submit; shell: a non-zero exit fails the
task unless input.expect_exit names the code you expect.

exit codes: 0 ok, 1 failed, 2 bad usage or input (a schema, an unknown type, an idempotency
            conflict), 3 no daemon reachable, 4 not found,
            5 a waited-on task ended dead or cancelled, 6 timed out, 7 unhealthy.
            run / job: 0 done with passing tests (or still running, or Ctrl-C), 1 failed,
            budget exhausted or final tests failing, 5 cancelled.
"""

_emit, _table, _kv = emit, table, kv


# --- commands -------------------------------------------------------------------------------------
def cmd_status(c: ControlClient, a: argparse.Namespace) -> int:
    data = c.request("status")

    def human(d: dict[str, Any]) -> None:
        _kv(f"{d.get('node_id')} ({d.get('role')})", d)
        mesh = d.get("mesh_cache")
        if isinstance(mesh, dict) and mesh:
            hits, misses = int(mesh.get("hits", 0)), int(mesh.get("misses", 0))
            rate = f", hit rate {hits / (hits + misses):.0%}" if hits + misses else ""
            out.print(
                f"result cache over the mesh ({plural(int(mesh.get('nodes', 0)), 'node')} reporting): "
                f"{hits} hits, {misses} misses{rate}",
                highlight=False,
            )

    _emit(a, data, human)
    return ExitCode.OK


def cmd_peers(c: ControlClient, a: argparse.Namespace) -> int:
    data = c.request("peers")
    cols: tuple[str, ...] = (
        "node_id",
        "role",
        "endpoint",
        "liveness",
        "breaker",
        "inflight",
        "capacity",
        "draining",
        "capabilities",
    )
    cols += ("spawned",) if any(p.get("spawned") for p in data["peers"]) else ()
    _emit(
        a,
        data,
        lambda d: out.print(
            _table(
                plural(len(d["peers"]), "peer"),
                cols,
                ([p.get(k) if k != "capabilities" else ",".join(p[k]) for k in cols] for p in d["peers"]),
            )
        ),
    )
    return ExitCode.OK


def cmd_get(c: ControlClient, a: argparse.Namespace) -> int:
    data = c.request("get", id=str(parse_id(a.id)))
    why = _why(c, [data]).get(str(data.get("id")))
    if why:
        data["waiting"] = why

    def human(d: dict[str, Any]) -> None:
        events = d.pop("events", [])
        _kv(f"task {d['id']}", d)
        if why:
            err.print(f"[yellow]this task waits:[/] {why}", highlight=False)
        out.print(
            _table(
                "events",
                ("at", "from", "to", "peer", "attempt"),
                ((e["at"], e["from_status"], e["to_status"], e["peer"], e["attempt"]) for e in events),
            )
        )

    _emit(a, data, human)
    return ExitCode.OK


def cmd_tasks(c: ControlClient, a: argparse.Namespace) -> int:
    data = c.request("tasks", status=a.status, limit=a.limit)
    cols = ("id", "type", "status", "priority", "attempts", "assigned_to", "created_at")

    whys = _why(c, data["tasks"])
    for t in data["tasks"]:
        if t["id"] in whys:
            t["waiting"] = whys[t["id"]]

    def human(d: dict[str, Any]) -> None:
        out.print(_table(plural(len(d["tasks"]), "task"), cols, ([t[k] for k in cols] for t in d["tasks"])))
        out.print("totals: " + ", ".join(f"{k}={v}" for k, v in sorted(d["counts"].items())))
        reasons: dict[str, list[str]] = {}
        for tid, why in whys.items():
            reasons.setdefault(why, []).append(tid)
        for why, ids in reasons.items():
            err.print(
                f"[yellow]{plural(len(ids), 'task')} cannot run now:[/] {why} ({', '.join(ids[:3])}"
                f"{', ...' if len(ids) > 3 else ''})",
                highlight=False,
            )

    _emit(a, data, human)
    return ExitCode.OK


def _why(c: ControlClient, tasks: list[dict[str, Any]]) -> dict[str, str]:
    """task id -> why it cannot run now, for the open tasks that cannot (see casperd.waiting)."""
    if not any(t.get("status") in ("pending", "retry") for t in tasks):
        return {}
    try:
        answer = c.request("peers")
    except CasperError:
        return {}
    peers, outlook = answer["peers"], answer.get("autoscale")
    found = {str(t.get("id")): why_waiting(t, peers, outlook) for t in tasks}
    return {k: v for k, v in found.items() if v}


def cmd_cancel(c: ControlClient, a: argparse.Namespace) -> int:
    data = c.request("cancel", id=str(parse_id(a.id)))
    _emit(
        a,
        data,
        lambda d: out.print(
            f"task {d['id']} cancelled"
            + (f" (it was running on {d['was_running_on']})" if d.get("was_running_on") else "")
        ),
    )
    return ExitCode.OK


def cmd_retry(c: ControlClient, a: argparse.Namespace) -> int:
    data = c.request("retry", id=str(parse_id(a.id)))
    _emit(a, data, lambda d: out.print(f"task {d['retry_of']} runs again as task {d['id']}"))
    return ExitCode.OK


def cmd_drain(c: ControlClient, a: argparse.Namespace) -> int:
    data = c.request("drain", peer=a.peer)
    _emit(a, data, lambda d: out.print(f"{d['peer']} drained: no new tasks ({d['inflight']} still running)"))
    return ExitCode.OK


def cmd_resume(c: ControlClient, a: argparse.Namespace) -> int:
    data = c.request("resume", peer=a.peer)
    _emit(a, data, lambda d: out.print(f"{d['peer']} resumed"))
    return ExitCode.OK


def cmd_health(c: ControlClient, a: argparse.Namespace) -> int:
    data = c.request("health")
    if not a.quiet:
        _emit(
            a,
            data,
            lambda d: out.print(
                _table(
                    f"{d['node_id']}: {'healthy' if d['healthy'] else 'UNHEALTHY'}",
                    ("check", "ok", "detail"),
                    ((k, "yes" if v["ok"] else "NO", v["detail"]) for k, v in d["checks"].items()),
                )
            ),
        )
    return ExitCode.OK if data["healthy"] else ExitCode.UNHEALTHY


def cmd_keygen(a: argparse.Namespace) -> int:
    sec, pub = keys.write_new_keypair(Path(a.directory), a.name, force=a.force)
    _emit(
        a,
        {"secret": str(sec), "public": str(pub)},
        lambda d: out.print(f"wrote {d['secret']} (secret, 0600) and {d['public']}"),
    )
    return ExitCode.OK


def cmd_keys(c: ControlClient | None, a: argparse.Namespace) -> int:
    data = keys.offline(a) if c is None else keys.online(c, a)
    _emit(a, data, lambda d: keys.show(out, a, d))
    return ExitCode.OK


# --- parser ---------------------------------------------------------------------------------------
SUBPARSERS: dict[str, argparse.ArgumentParser] = {}
_seconds = jobs.poll_seconds  # a positive, finite number of seconds (argparse type)


def _common(suppress: bool) -> argparse.ArgumentParser:
    """Global options, accepted before or after the command (after: SUPPRESS keeps the earlier value)."""

    def d(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-o", "--output", choices=("table", "json"), default=d("table"), help="output format")
    common.add_argument(
        "--control", default=d(None), help="control socket endpoint, e.g. ipc:///path/node.ctl [CASPER_CONTROL]"
    )
    common.add_argument(
        "--state-dir", type=Path, default=d(None), help="where 'casperd up' keeps the mesh [CASPER_STATE_DIR]"
    )
    common.add_argument("--timeout", type=_seconds, default=d(10.0), help="seconds to wait for an answer (default 10)")
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common(suppress=True)
    p = argparse.ArgumentParser(
        prog="caspectl",
        description="Admin client of a CASPER mesh.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_common(False)],
    )
    p.add_argument("--version", action="version", version=f"caspectl {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, fn: Any, help_text: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_text, description=help_text, parents=[common])
        sp.set_defaults(fn=fn)
        SUBPARSERS[name] = sp
        return sp

    add("status", cmd_status, "the node's state: peers, open tasks, store and cache")
    add("peers", cmd_peers, "registered peers with liveness, breaker, load")
    submit.add_parsers(add, _seconds)
    sp = add("get", cmd_get, "one task with its events")
    sp.add_argument("id")
    sp = add("tasks", cmd_tasks, "recent tasks")
    sp.add_argument("--status", help="only this status (pending, assigned, ..., dead, cancelled)")
    sp.add_argument("--limit", type=int, default=50)
    sp = add("cancel", cmd_cancel, "cancel a pending or running task")
    sp.add_argument("id")
    sp = add("retry", cmd_retry, "run a dead or cancelled task again (as a new task)")
    sp.add_argument("id")
    sp = add("drain", cmd_drain, "stop sending new tasks to a peer")
    sp.add_argument("peer")
    sp = add("resume", cmd_resume, "let a drained peer take tasks again")
    sp.add_argument("peer")
    sp = add("health", cmd_health, "health checks; exit 7 when unhealthy")
    sp.add_argument("-q", "--quiet", action="store_true", help="print nothing; the exit code says it")
    keys.add_parsers(add, cmd_keygen, cmd_keys)
    jobs.add_parsers(add, out, err)
    top.add_parsers(add, out)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a, extra = parser.parse_known_args(argv)
    if extra:  # a mistyped flag: the subcommand's usage, not the top-level one
        sub = SUBPARSERS.get(getattr(a, "command", ""), parser)
        sub.error(f"unrecognized arguments: {' '.join(extra)} (see {sub.prog} --help)")
    try:
        code = _run(a)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # the reader went away (caspectl tasks -o json | head -1): not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return ExitCode.OK


def _run(a: argparse.Namespace) -> int:
    try:
        if a.command == "keygen":
            return cmd_keygen(a)
        if a.command == "keys":
            keys.parse_action(a)
            if a.file:
                return cmd_keys(None, a)
        if a.command == "run":
            jobs.check_run(a)  # before any daemon is contacted
        endpoint = find_control(a.control, a.state_dir)
        with ControlClient(endpoint, a.timeout) as client:
            return int(a.fn(client, a))
    except NoDaemonError as exc:
        return _fail(a, exc, ExitCode.UNAVAILABLE)
    except RequestTimeoutError as exc:
        return _fail(a, exc, ExitCode.TIMEOUT)
    except NotFoundError as exc:
        return _fail(a, exc, ExitCode.NOT_FOUND)
    except CasperError as exc:
        note = jobs.key_not_passed_note(exc.message)
        if note:
            exc.hint = f"{exc.hint}; {note}" if exc.hint else note
        return _fail(a, exc, ExitCode.USAGE if exc.code in USAGE_CODES else ExitCode.FAILURE)
    except KeyboardInterrupt:
        return ExitCode.FAILURE


_fail = fail


if __name__ == "__main__":
    sys.exit(main())
