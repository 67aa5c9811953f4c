"""``caspectl``: the admin client of a CASPER mesh, over a node's control socket.

Every command takes ``-o json`` for scripts; the default is a readable table. Errors name the
cause and the fix, and the exit code says what kind of failure it was (see ``--help``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from casperd import __version__
from casperd.codec import describe_validation
from casperd.ctl import jobs
from casperd.ctl.client import ControlClient, find_control, parse_id
from casperd.errors import CasperError, CommandError, NoDaemonError, RequestTimeoutError, TaskNotFoundError
from casperd.exitcodes import ExitCode
from casperd.messages import TaskSpec

EPILOG = """\
examples:
  caspectl status
  caspectl submit shell --input '{"cmd": "pytest -q"}' --wait
  caspectl submit echo --input '{"hello": "mesh"}' --idempotency-key greet-1 -o json
  caspectl submit-bulk tasks.jsonl            # one JSON task per line: {"type": ..., "input": {...}, ...}
  caspectl tasks --status dead --limit 20 && caspectl retry ID
  caspectl drain developer-1 && caspectl resume developer-1
  caspectl keygen ./keys node-1
  caspectl run "fix the flaky parser test" --repo . --budget-usd 2 --max-parallel 4
  caspectl run "add type hints" --repo ~/src/app --detach && caspectl job JOB_ID --watch

the control socket: --control, else CASPER_CONTROL, else the mesh started by 'casperd up'
(found through STATE_DIR/mesh.json; --state-dir or CASPER_STATE_DIR).

exit codes: 0 ok, 1 failed, 2 bad usage or input, 3 no daemon reachable, 4 not found,
            5 a waited-on task ended dead or cancelled, 6 timed out, 7 unhealthy.
            run / job: 0 done with passing tests (or still running, or Ctrl-C), 1 failed,
            budget exhausted or final tests failing, 5 cancelled.
"""

out = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 200)


def _emit(args: argparse.Namespace, data: Any, human: Callable[[Any], None]) -> None:
    if args.output == "json":
        print(json.dumps(data, indent=2, default=str))
    else:
        human(data)


def _table(title: str, columns: Iterable[str], rows: Iterable[Iterable[Any]]) -> Table:
    t = Table(title=title, title_justify="left", header_style="bold")
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*("" if v is None else str(v) for v in r))
    return t


def _kv(title: str, data: dict[str, Any]) -> None:
    rows = [(k, json.dumps(v) if isinstance(v, dict | list) else v) for k, v in data.items()]
    out.print(_table(title, ("field", "value"), rows))


# --- commands -------------------------------------------------------------------------------------
def cmd_status(c: ControlClient, a: argparse.Namespace) -> int:
    data = c.request("status")
    _emit(a, data, lambda d: _kv(f"{d.get('node_id')} ({d.get('role')})", d))
    return ExitCode.OK


def cmd_peers(c: ControlClient, a: argparse.Namespace) -> int:
    data = c.request("peers")
    cols = ("node_id", "role", "endpoint", "liveness", "breaker", "inflight", "capacity", "draining", "capabilities")
    _emit(
        a,
        data,
        lambda d: out.print(
            _table(
                f"{len(d['peers'])} peers",
                cols,
                ([p[k] if k != "capabilities" else ",".join(p[k]) for k in cols] for p in d["peers"]),
            )
        ),
    )
    return ExitCode.OK


def _spec_from_args(a: argparse.Namespace) -> TaskSpec:
    try:
        data = json.loads(a.input) if a.input else {}
    except RecursionError:
        raise CommandError("--input is nested too deeply", hint="flatten the input") from None
    except ValueError as exc:
        raise CommandError(f"--input is not valid JSON: {exc}", hint="""e.g. --input '{"cmd": "ls"}'""") from None
    if not isinstance(data, dict):
        raise CommandError("--input must be a JSON object", hint="""e.g. --input '{"cmd": "ls"}'""")
    fields: dict[str, Any] = {
        "type": a.type,
        "input": data,
        "priority": a.priority,
        "requires": tuple(a.requires or ()),
        "affinity": a.affinity,
        "idempotency_key": a.idempotency_key,
        "max_attempts": a.max_attempts,
        "timeout_s": a.timeout_s,
    }
    return _spec(fields, "the command line")


def _spec(fields: dict[str, Any], where: str) -> TaskSpec:
    try:
        return TaskSpec.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        raise CommandError(
            f"bad task in {where}: {describe_validation(exc)}", hint="see caspectl submit --help"
        ) from None


def _wait(c: ControlClient, a: argparse.Namespace, ids: list[str]) -> int:
    left = set(ids)
    results: dict[str, Any] = {}
    deadline = time.monotonic() + a.wait_timeout
    for done in c.done_events(timeout_s=a.wait_timeout):
        tid = str(done.task_id)
        if tid in left:
            left.discard(tid)
            results[tid] = {
                "id": tid,
                "status": done.status,
                "output": done.output,
                "error": done.error.model_dump() if done.error else None,
            }
        if not left or time.monotonic() > deadline:
            break
    if left:
        raise RequestTimeoutError(
            f"{len(left)} task(s) not finished within {a.wait_timeout:g}s",
            hint="they keep running; see caspectl get ID, or raise --wait-timeout",
        )
    values = [results[i] for i in ids]
    _emit(a, values if len(values) > 1 else values[0], lambda d: [_kv(f"task {v['id']}", v) for v in values])
    bad = [v for v in values if v["status"] != "complete"]
    return ExitCode.TASK_FAILED if bad else ExitCode.OK


def cmd_submit(c: ControlClient, a: argparse.Namespace) -> int:
    spec = _spec_from_args(a)
    acc = c.submit_until_accepted([spec], wait=a.wait)
    tid = str(acc.task_ids[0])
    if a.wait:
        return _wait(c, a, [tid])
    data = {"id": tid, "existing": acc.existing[0]}
    _emit(a, data, lambda d: out.print(f"{'existing' if d['existing'] else 'accepted'} task {d['id']}"))
    return ExitCode.OK


def cmd_submit_bulk(c: ControlClient, a: argparse.Namespace) -> int:
    src = sys.stdin if a.file == "-" else None
    try:
        fh = src or open(a.file, encoding="utf-8")  # noqa: SIM115
    except OSError as exc:
        raise CommandError(
            f"cannot read {a.file}: {exc.strerror}", hint="give a JSON-lines file, or - for stdin"
        ) from None
    specs: list[TaskSpec] = []
    with fh:
        try:
            lines = list(fh)
        except UnicodeDecodeError as exc:
            raise CommandError(
                f"{a.file} is not UTF-8 text (byte {exc.start})", hint="one JSON object per line"
            ) from None
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except (ValueError, RecursionError) as exc:
                raise CommandError(
                    f"line {n}: not JSON ({type(exc).__name__})", hint="one JSON object per line"
                ) from None
            if not isinstance(obj, dict):
                raise CommandError(f"line {n}: expected a JSON object", hint='e.g. {"type": "echo", "input": {}}')
            specs.append(_spec(obj, f"line {n}"))
    if not specs:
        raise CommandError("no tasks in the input", hint="one JSON object per line")
    ids: list[str] = []
    fresh = 0
    for i in range(0, len(specs), a.batch):
        acc = c.submit_until_accepted(specs[i : i + a.batch], wait=a.wait)
        ids.extend(str(t) for t in acc.task_ids)
        fresh += acc.existing.count(False)
        if a.output != "json" and not a.wait:
            err.print(f"submitted {len(ids)}/{len(specs)}", end="\r")
    if a.wait:
        return _wait(c, a, ids)
    _emit(
        a,
        {"submitted": len(ids), "new": fresh, "ids": ids},
        lambda d: out.print(f"submitted {d['submitted']} tasks ({d['new']} new)"),
    )
    return ExitCode.OK


def cmd_get(c: ControlClient, a: argparse.Namespace) -> int:
    data = c.request("get", id=str(parse_id(a.id)))

    def human(d: dict[str, Any]) -> None:
        events = d.pop("events", [])
        _kv(f"task {d['id']}", d)
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

    def human(d: dict[str, Any]) -> None:
        out.print(_table(f"{len(d['tasks'])} tasks", cols, ([t[k] for k in cols] for t in d["tasks"])))
        out.print("totals: " + ", ".join(f"{k}={v}" for k, v in sorted(d["counts"].items())))

    _emit(a, data, human)
    return ExitCode.OK


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
    from casperd.transport import write_keypair

    try:
        sec, pub = write_keypair(Path(a.directory), a.name)
    except OSError as exc:
        raise CommandError(
            f"cannot write keys to {a.directory}: {exc.strerror}", hint="give a directory you can write to"
        ) from None
    _emit(
        a,
        {"secret": str(sec), "public": str(pub)},
        lambda d: out.print(f"wrote {d['secret']} (secret, 0600) and {d['public']}"),
    )
    return ExitCode.OK


# --- parser ---------------------------------------------------------------------------------------
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
        return sp

    add("status", cmd_status, "the node's state: peers, open tasks, store and cache")
    add("peers", cmd_peers, "registered peers with liveness, breaker, load")
    for name, help_text in (("submit", "submit one task"), ("submit-bulk", "submit many tasks (JSON lines)")):
        sp = add(name, cmd_submit if name == "submit" else cmd_submit_bulk, help_text)
        if name == "submit":
            sp.add_argument("type", help="task type: noop, echo, sleep, shell, ...")
            sp.add_argument("--input", help="the task's input, a JSON object")
            sp.add_argument("--priority", type=int, default=5, help="0 (low) to 9 (high); default 5")
            sp.add_argument("--requires", action="append", metavar="CAP", help="a capability the peer must have")
            sp.add_argument("--affinity", help="tasks with the same key run on the same peer")
            sp.add_argument("--idempotency-key", help="submitting the same key again returns the same task")
            sp.add_argument("--max-attempts", type=int, help="runs before the task is dead (default: mesh setting)")
            sp.add_argument("--timeout-s", type=_seconds, help="kill the task after this many seconds")
        else:
            sp.add_argument("file", help="JSON-lines file, or - for stdin")
            sp.add_argument("--batch", type=int, default=500, help="tasks per SUBMIT message (default 500)")
        sp.add_argument("--wait", action="store_true", help="wait for the result(s); exit 5 if any ends badly")
        sp.add_argument("--wait-timeout", type=_seconds, default=300.0, help="seconds to wait with --wait")
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
    sp = add("keygen", cmd_keygen, "make a CurveZMQ key pair (NAME.key secret, NAME.pub public)")
    sp.add_argument("directory")
    sp.add_argument("name")
    jobs.add_parsers(add, out, err)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        if a.command == "keygen":
            return cmd_keygen(a)
        if a.command == "run":
            jobs.check_run(a)  # before any daemon is contacted
        endpoint = find_control(a.control, a.state_dir)
        if a.command == "submit-bulk" and a.batch < 1:
            raise CommandError("--batch must be at least 1")
        with ControlClient(endpoint, a.timeout) as client:
            return int(a.fn(client, a))
    except NoDaemonError as exc:
        return _fail(a, exc, ExitCode.UNAVAILABLE)
    except RequestTimeoutError as exc:
        return _fail(a, exc, ExitCode.TIMEOUT)
    except TaskNotFoundError as exc:
        return _fail(a, exc, ExitCode.NOT_FOUND)
    except CommandError as exc:
        return _fail(a, exc, ExitCode.USAGE if exc.code == "command" else ExitCode.FAILURE)
    except CasperError as exc:
        return _fail(a, exc, ExitCode.FAILURE)
    except KeyboardInterrupt:
        return ExitCode.FAILURE


def _fail(a: argparse.Namespace, exc: CasperError, code: int) -> int:
    if getattr(a, "output", "table") == "json":
        print(json.dumps({"error": exc.to_wire(), "exit_code": int(code)}))
    else:
        err.print(
            f"[bold red]caspectl:[/] {exc.message}" + (f"\n  hint: {exc.hint}" if exc.hint else ""), highlight=False
        )
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
