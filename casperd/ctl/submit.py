"""``caspectl submit`` and ``caspectl submit-bulk``: build task specs, submit, optionally wait.

Submitting prints the task id(s) before anything else, so ``--wait`` never hides them; a wait that
times out names the tasks still open (also in ``-o json``), and a task no live peer can run is
reported at once (see :mod:`casperd.waiting`) instead of waiting in silence.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import ValidationError

from casperd.codec import describe_validation
from casperd.ctl.client import ControlClient
from casperd.ctl.jobs import key_not_passed_note
from casperd.ctl.output import emit, err, kv, out, plural, warn
from casperd.errors import CasperError, CommandError, RequestTimeoutError
from casperd.exitcodes import ExitCode
from casperd.messages import SUBMIT_MAX_TASKS, TaskSpec
from casperd.waiting import why_waiting


def spec_from_args(a: argparse.Namespace) -> TaskSpec:
    try:
        data = json.loads(a.input) if a.input else {}
    except RecursionError:
        raise CommandError("--input is nested too deeply", hint="flatten the input") from None
    except ValueError as exc:
        raise CommandError(f"--input is not valid JSON: {exc}", hint="""e.g. --input '{"cmd": "ls"}'""") from None
    if not isinstance(data, dict):
        raise CommandError("--input must be a JSON object", hint="""e.g. --input '{"cmd": "ls"}'""")
    if "cache" in data and not a.cache:
        warn(a, '"cache" inside --input is part of the task\'s input, not an option: use --cache for the result cache')
    fields: dict[str, Any] = {
        "type": a.type,
        "input": data,
        "priority": a.priority,
        "requires": tuple(a.requires or ()),
        "affinity": a.affinity,
        "idempotency_key": a.idempotency_key,
        "max_attempts": a.max_attempts,
        "timeout_s": a.timeout_s,
        "cache": a.cache,
    }
    return spec_from(fields, "the command line")


def spec_from(fields: dict[str, Any], where: str) -> TaskSpec:
    try:
        return TaskSpec.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        raise CommandError(
            f"bad task in {where}: {describe_validation(exc)}", hint="see caspectl submit --help"
        ) from None


def warn_unrunnable(c: ControlClient, a: argparse.Namespace, specs: Sequence[TaskSpec]) -> list[str]:
    """Warn about specs no live peer can run (a capability nobody has); returns the warnings."""
    try:
        answer = c.request("peers")
    except CasperError:
        return []  # a best-effort warning: the submission itself went through
    peers, outlook = answer["peers"], answer.get("autoscale")
    seen: dict[tuple[str, tuple[str, ...]], str | None] = {}
    for s in specs:
        key = (s.type, tuple(sorted(s.requires)))
        if key not in seen:
            seen[key] = why_waiting({"type": s.type, "status": "pending", "requires": s.requires}, peers, outlook)
    notes = [f"{t} task: {why}" for (t, _), why in seen.items() if why]
    for n in notes:
        warn(a, n)
    return notes


def wait(c: ControlClient, a: argparse.Namespace, ids: list[str]) -> int:
    left = set(ids)
    results: dict[str, Any] = {}
    deadline = time.monotonic() + a.wait_timeout
    try:
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
    except KeyboardInterrupt:
        err.print(f"stopped waiting; {plural(len(left), 'task')} keep running: caspectl get ID", highlight=False)
        raise
    if left:
        pending = [i for i in ids if i in left]
        shown = ", ".join(pending[:5]) + (f" and {len(pending) - 5} more" if len(pending) > 5 else "")
        raise RequestTimeoutError(
            f"{plural(len(pending), 'task')} not finished within {a.wait_timeout:g}s: {shown}",
            hint=_still_open_hint(c, pending),
            pending=pending,
        )
    values = [results[i] for i in ids]
    note = key_not_passed_note(json.dumps([v["error"] for v in values if v["error"]]))
    if note:
        warn(a, note)
    emit(a, values if len(values) > 1 else values[0], lambda d: [kv(f"task {v['id']}", v) for v in values])
    bad = [v for v in values if v["status"] != "complete"]
    return ExitCode.TASK_FAILED if bad else ExitCode.OK


def _still_open_hint(c: ControlClient, pending: list[str]) -> str:
    """Why the first open task is still open, if it cannot run; else that it keeps running."""
    try:
        task = c.request("get", id=pending[0])
        answer = c.request("peers")
        why = why_waiting(task, answer["peers"], answer.get("autoscale"))
    except CasperError:
        why = None
    if why:
        return f"task {pending[0]} cannot run: {why}"
    return "they keep running; see caspectl get ID, or raise --wait-timeout"


def _announce(a: argparse.Namespace, ids: list[str], existing: int) -> None:
    """The ids first, on stderr (stdout stays one JSON document with -o json)."""
    head = f"task {ids[0]}" if len(ids) == 1 else f"{plural(len(ids), 'task')} ({existing} already existed)"
    more = "" if len(ids) == 1 or len(ids) > 20 else ": " + ", ".join(ids)
    err.print(
        f"submitted {head}{' (it already existed)' if existing and len(ids) == 1 else ''}{more}; "
        "waiting (Ctrl-C stops waiting, not the tasks)",
        highlight=False,
    )


def cmd_submit(c: ControlClient, a: argparse.Namespace) -> int:
    spec = spec_from_args(a)
    acc = c.submit_until_accepted([spec], wait=a.wait)
    tid = str(acc.task_ids[0])
    if a.wait:
        _announce(a, [tid], int(acc.existing[0]))
        warn_unrunnable(c, a, [spec])
        return wait(c, a, [tid])
    notes = warn_unrunnable(c, a, [spec])
    data: dict[str, Any] = {"id": tid, "existing": acc.existing[0]}
    if notes:
        data["warnings"] = notes
    emit(a, data, lambda d: out.print(f"{'existing' if d['existing'] else 'accepted'} task {d['id']}"))
    return ExitCode.OK


def read_specs(a: argparse.Namespace) -> list[TaskSpec]:
    try:
        fh = sys.stdin if a.file == "-" else open(a.file, encoding="utf-8")  # noqa: SIM115
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
            specs.append(spec_from(obj, f"line {n}"))
    if not specs:
        raise CommandError("no tasks in the input", hint="one JSON object per line")
    return specs


def cmd_submit_bulk(c: ControlClient, a: argparse.Namespace) -> int:
    if not 1 <= a.batch <= SUBMIT_MAX_TASKS:
        raise CommandError(
            f"--batch must be 1 to {SUBMIT_MAX_TASKS:,} (tasks per SUBMIT message), not {a.batch:,}",
            hint="e.g. --batch 500 (the default)",
        )
    specs = read_specs(a)
    ids: list[str] = []
    fresh = 0
    for i in range(0, len(specs), a.batch):
        acc = c.submit_until_accepted(specs[i : i + a.batch], wait=a.wait)
        ids.extend(str(t) for t in acc.task_ids)
        fresh += acc.existing.count(False)
        if a.output != "json" and not a.wait:
            err.print(f"submitted {len(ids)}/{len(specs)}", end="\r")
    notes = warn_unrunnable(c, a, specs)
    if a.wait:
        _announce(a, ids, len(ids) - fresh)
        return wait(c, a, ids)
    data: dict[str, Any] = {"submitted": len(ids), "new": fresh, "ids": ids}
    if notes:
        data["warnings"] = notes
    emit(a, data, lambda d: out.print(f"submitted {plural(d['submitted'], 'task')} ({d['new']} new)"))
    return ExitCode.OK


def add_parsers(add: Callable[[str, Any, str], argparse.ArgumentParser], seconds: Callable[[str], float]) -> None:
    for name, help_text in (("submit", "submit one task"), ("submit-bulk", "submit many tasks (JSON lines)")):
        sp = add(name, cmd_submit if name == "submit" else cmd_submit_bulk, help_text)
        if name == "submit":
            sp.add_argument("type", help="task type: noop, echo, sleep, shell, ask, code, test (unknown: exit 2)")
            sp.add_argument("--input", help="the task's input, a JSON object (checked against the type's schema)")
            sp.add_argument("--priority", type=int, default=5, help="0 (low) to 9 (high); default 5")
            sp.add_argument("--requires", action="append", metavar="CAP", help="a capability the peer must have")
            sp.add_argument("--affinity", help="tasks with the same key run on the same peer")
            sp.add_argument(
                "--idempotency-key",
                help="submitting the same key and input again returns the same task; other input: exit 2 (conflict)",
            )
            sp.add_argument("--max-attempts", type=int, help="runs before the task is dead (default: mesh setting)")
            sp.add_argument("--timeout-s", type=seconds, help="kill the task after this many seconds")
            sp.add_argument(
                "--cache",
                action="store_true",
                help="go through the shared result cache: the same type and input is computed once (TTL 1 h)",
            )
        else:
            sp.add_argument("file", help='JSON-lines file, or - for stdin (a line may set "cache": true)')
            sp.add_argument(
                "--batch", type=int, default=500, help="tasks per SUBMIT message, 1 to 10,000 (default 500)"
            )
        sp.add_argument(
            "--wait", action="store_true", help="print the id(s), wait for the result(s); exit 5 if any ends badly"
        )
        sp.add_argument("--wait-timeout", type=seconds, default=300.0, help="seconds to wait with --wait (exit 6)")
