"""``casperd up --demo``: about a minute that shows what the mesh is for, in a live view.

Theory of operation: the demo is a client of the mesh like caspectl (control socket only) plus the
supervisor's power over the node processes. It runs five acts, each announced before it happens:

1. *spread* — a wave of sleep tasks fans out over the developers and the tester;
2. *failover* — developer-1 is killed (SIGKILL) while it holds tasks; the policeman notices the
   silence, hands them to the others, they finish there; developer-1 is restarted and rejoins;
3. *policeman restart* — the policeman is killed with tasks open and started again: it reloads
   them from Postgres, the workers re-register with what they hold, nothing is lost;
4. *cache* — one slow cached command, then repeats of it answered by the shared result cache;
5. *dead letter* — a task whose cause of failure is missing goes ``dead``; the cause is fixed and
   the dead letter retried (``caspectl retry``), and completes.

It ends with a summary (tasks, spread, failover times, cache, and the ledger: every task it
submitted checked in the store) and writes it to ``STATE_DIR/demo-summary.json``. State is read
by polling ``tasks`` (fresh client per call, so a policeman restart costs a few failed polls only).
Every wait is bounded; a step that does not happen in time is reported, never waited on forever.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from casperd.ctl.client import ControlClient
from casperd.errors import CasperError
from casperd.localmesh import LocalMesh
from casperd.messages import TaskSpec

ACTIVE = ("assigned", "processing", "validating")
STEP_TIMEOUT_S = 90.0


@dataclass
class DemoSummary:
    submitted: int = 0
    complete: int = 0
    lost: list[str] = field(default_factory=list)
    by_node: dict[str, int] = field(default_factory=dict)
    killed_holding: int = 0
    failover_s: float | None = None
    failover_done_s: float | None = None
    policeman_down_s: float | None = None
    open_at_policeman_kill: int = 0
    cache_first_s: float | None = None
    cache_repeat_s: float | None = None
    cache_hits: int = 0
    dead_letter: str | None = None
    dead_letter_retry: str | None = None
    dead_letter_ok: bool = False
    problems: list[str] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.lost and not self.problems and self.dead_letter_ok


class Demo:
    def __init__(self, mesh: LocalMesh, console: Console, scale: float = 1.0) -> None:
        self.mesh = mesh
        self.console = console
        self.scale = max(0.05, scale)
        self.s = DemoSummary()
        self.rows: dict[str, dict[str, Any]] = {}
        self.events: deque[str] = deque(maxlen=8)
        self.act = "starting"
        self.t0 = time.monotonic()
        self.live: Live | None = None
        self.node_state = {n.node_id: "alive" for n in mesh.nodes.values() if n.role != "policeman"}
        self.police_state = "alive"

    # --- plumbing ------------------------------------------------------------------------------
    def call(self, op: str, **args: Any) -> Any:
        with ControlClient(self.mesh.policeman.control, 2.0) as c:
            return c.request(op, **args)

    def submit(self, specs: list[TaskSpec]) -> list[str]:
        with ControlClient(self.mesh.policeman.control, 30.0) as c:
            ids = [str(t) for t in c.submit_until_accepted(specs).task_ids]
        self.s.ids.extend(ids)
        return ids

    def say(self, text: str) -> None:
        line = f"[{time.monotonic() - self.t0:5.1f}s] {text}"
        self.events.append(line)
        (self.live.console if self.live else self.console).print(line, highlight=False)

    def poll(self) -> None:
        try:
            data = self.call("tasks", limit=min(10_000, len(self.s.ids) + 50))
        except CasperError:
            return  # the policeman may be restarting: keep the last view
        mine = set(self.s.ids)
        for r in data["tasks"]:
            if r["id"] in mine:
                self.rows[r["id"]] = r

    def tick(self) -> None:
        time.sleep(0.25)
        self.poll()
        if self.live is not None:
            self.live.update(self.view())

    def wait(self, what: str, cond: Any, timeout: float = STEP_TIMEOUT_S) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.tick()
            if cond():
                return True
        self.s.problems.append(f"{what}: not within {timeout:.0f}s")
        self.say(f"[red]{what} did not happen within {timeout:.0f}s[/]")
        return False

    def status(self, tid: str) -> str:
        return str(self.rows.get(tid, {}).get("status", "?"))

    def all_in(self, ids: list[str], states: tuple[str, ...] = ("complete",)) -> bool:
        return all(self.status(t) in states for t in ids)

    # --- the view ------------------------------------------------------------------------------
    def view(self) -> Group:
        done: dict[str, int] = {}
        running: dict[str, int] = {}
        for r in self.rows.values():
            node = r.get("assigned_to") or "-"
            if r["status"] == "complete":
                done[node] = done.get(node, 0) + 1
            elif r["status"] in ACTIVE:
                running[node] = running.get(node, 0) + 1
        t = Table(title=f"act: {self.act}", title_justify="left", header_style="bold")
        for col in ("node", "state", "running", "done", ""):
            t.add_column(col)
        t.add_row("policeman", self.police_state, "", "", "")
        for node, state in self.node_state.items():
            n = done.get(node, 0)
            style = "red" if state != "alive" else ""
            t.add_row(node, Text(state, style=style), str(running.get(node, 0)), str(n), "█" * min(40, n // 2))
        total = len(self.s.ids)
        complete = sum(1 for r in self.rows.values() if r["status"] == "complete")
        head = Text(f"tasks: {complete}/{total} complete   elapsed {time.monotonic() - self.t0:.0f}s", style="bold")
        return Group(head, t, Text("\n".join(self.events), style="dim"))

    # --- the acts ------------------------------------------------------------------------------
    def act_spread_and_failover(self) -> None:
        self.act = "1. work spreads over the developers and the tester"
        n = max(16, int(150 * self.scale))
        specs = [TaskSpec(type="sleep", input={"seconds": 1.0 + (i % 5) * 0.25}) for i in range(n)]
        ids = self.submit(specs)
        self.say(f"submitted {n} sleep tasks; the policeman dispatches them to the least loaded peers")
        victim = "developer-1"
        if victim not in self.mesh.nodes:
            self.wait("the first wave", lambda: self.all_in(ids))
            return
        # kill it late in the wave, so its tasks do not queue behind the whole wave elsewhere
        late = int(n * 0.8)
        self.wait(
            f"{victim} holding tasks late in the wave",
            lambda: sum(self.status(t) == "complete" for t in ids) >= late and self.held_by(victim, ids),
            timeout=60,
        )
        held = self.held_by(victim, ids)
        self.act = f"2. failover: {victim} is killed"
        self.say(
            f"[bold yellow]killing {victim} on purpose (SIGKILL) while it runs {len(held)} tasks[/]: "
            "the policeman notices the silence and hands them to the others"
        )
        self.s.killed_holding = len(held)
        self.mesh.signal_node(victim, signal.SIGKILL)
        self.node_state[victim] = "killed"
        t_kill = time.monotonic()
        if self.wait("the killed developer's tasks reassigned", lambda: not self.held_by(victim, held, any_state=True)):
            self.s.failover_s = round(time.monotonic() - t_kill, 1)
            self.say(f"{victim}'s tasks reassigned after {self.s.failover_s}s")
        if self.wait("the killed developer's tasks finished elsewhere", lambda: self.all_in(held)):
            self.s.failover_done_s = round(time.monotonic() - t_kill, 1)
            where = sorted({str(self.rows[t].get("assigned_to")) for t in held})
            self.say(
                f"all {len(held)} finished elsewhere ({', '.join(where)}) {self.s.failover_done_s}s after the kill"
            )
        self.mesh.stop_node(victim, timeout=5)
        self.mesh.start_node(victim)
        self.node_state[victim] = "alive"
        self.say(f"{victim} restarted; it registers again and takes new work")
        self.wait("the first wave", lambda: self.all_in(ids))

    def held_by(self, node: str, ids: list[str], any_state: bool = False) -> list[str]:
        """The tasks of ``ids`` that ``node`` holds (any_state: still pending on it, or active)."""
        states = (*ACTIVE, "pending", "retry") if any_state else ACTIVE
        return [t for t in ids if self.rows.get(t, {}).get("assigned_to") == node and self.status(t) in states]

    def act_policeman_restart(self) -> None:
        self.act = "3. the policeman is restarted"
        n = max(12, int(80 * self.scale))
        ids = self.submit([TaskSpec(type="sleep", input={"seconds": 1.0}) for _ in range(n)])
        self.say(f"submitted {n} more tasks")
        self.wait("some of them done", lambda: sum(self.status(t) == "complete" for t in ids) >= n // 4)
        open_now = sum(1 for t in ids if self.status(t) != "complete")
        self.s.open_at_policeman_kill = open_now
        self.say(
            f"[bold yellow]killing the policeman (SIGKILL) with {open_now} tasks open[/]: their state is in "
            "Postgres; the workers keep running what they hold"
        )
        self.mesh.signal_node("policeman", signal.SIGKILL)
        self.police_state = "killed"
        t_kill = time.monotonic()
        if self.mesh.policeman.proc is not None:
            self.mesh.policeman.proc.wait(10)
        self.mesh.start_node("policeman")
        self.police_state = "restarting"
        try:
            self.mesh.wait_healthy("policeman", timeout=60)
        except CasperError as exc:
            self.s.problems.append(f"policeman restart: {exc.message}")
            return
        self.mesh.write_description()
        self.s.policeman_down_s = round(time.monotonic() - t_kill, 1)
        self.police_state = "alive"
        self.say(
            f"policeman back after {self.s.policeman_down_s}s: it reloaded the open tasks; the workers re-register"
        )
        self.wait("the second wave after the restart", lambda: self.all_in(ids))

    def act_cache(self) -> None:
        self.act = "4. the result cache answers repeats"
        if not self.mesh.redis_url:
            self.say("no result cache in this mesh (--no-redis): act skipped")
            return
        spec = TaskSpec(type="shell", input={"cmd": "sleep 1.5; echo the answer is 42"}, cache=True)
        first = self.submit([spec])
        self.say("a slow command (1.5 s) with cache: true; then 10 repeats of it")
        if not self.wait("the cached command", lambda: self.all_in(first)):
            return
        repeats = self.submit([spec] * 10)
        if not self.wait("the repeats", lambda: self.all_in(repeats)):
            return
        self.s.cache_first_s = _took(self.rows[first[0]])
        times = [_took(self.rows[t]) for t in repeats]
        self.s.cache_repeat_s = round(sum(times) / len(times), 3)
        # the workers report their counters in their next idle heartbeat; repeats running at once
        # on one node share one lookup, so there are fewer hits than repeats
        deadline = time.monotonic() + 5.0
        last = -1
        while time.monotonic() < deadline and (self.s.cache_hits == 0 or self.s.cache_hits != last):
            last = self.s.cache_hits
            time.sleep(0.5)
            self.tick()
            with contextlib.suppress(CasperError):
                self.s.cache_hits = int(self.call("status").get("mesh_cache", {}).get("hits", 0))
        self.say(
            f"first run {self.s.cache_first_s:.2f}s; repeats {self.s.cache_repeat_s:.2f}s each, answered from the "
            f"cache ({self.s.cache_hits} cache hits over the mesh: repeats running at once on one node share one)"
        )

    def act_dead_letter(self) -> None:
        self.act = "5. a dead letter is retried"
        flag = self.mesh.state_dir / "demo" / f"ready-{uuid.uuid4().hex[:8]}"
        flag.parent.mkdir(parents=True, exist_ok=True)
        cmd = f"test -f {flag} || {{ echo 'missing {flag.name}' >&2; exit 1; }}; echo ready"
        [tid] = self.submit([TaskSpec(type="shell", input={"cmd": cmd}, max_attempts=2)])
        self.s.dead_letter = tid
        self.say("a task that needs a file that is not there: it fails, is retried once, and goes dead")
        if not self.wait("the task going dead", lambda: self.all_in([tid], ("dead",))):
            return
        self.say(f"dead after 2 attempts; fixing the cause (creating {flag.name}) and retrying the dead letter")
        flag.touch()
        try:
            retry = str(self.call("retry", id=tid)["id"])
        except CasperError as exc:
            self.s.problems.append(f"retry: {exc.message}")
            return
        self.s.ids.append(retry)
        self.s.dead_letter_retry = retry
        if self.wait("the retried dead letter", lambda: self.all_in([retry])):
            self.s.dead_letter_ok = True
            self.say(f"the retry {retry[:8]} completed")

    # --- the end -------------------------------------------------------------------------------
    def ledger(self) -> None:
        """Every task the demo submitted, checked in the store: complete (the dead letter: dead, retried)."""
        self.act = "ledger"
        self.wait("every task terminal", lambda: self.all_in(self.s.ids, ("complete", "dead")), timeout=30)
        self.s.submitted = len(self.s.ids)
        for tid in self.s.ids:
            st = self.status(tid)
            if st == "complete":
                self.s.complete += 1
                node = str(self.rows[tid].get("assigned_to"))
                self.s.by_node[node] = self.s.by_node.get(node, 0) + 1
            elif not (tid == self.s.dead_letter and st == "dead" and self.s.dead_letter_ok):
                self.s.lost.append(tid)

    def run(self) -> DemoSummary:
        self.say("the demo: about a minute; Ctrl-C stops it and the mesh")
        with Live(self.view(), console=self.console, refresh_per_second=4, transient=True) as live:
            self.live = live
            for act in (self.act_spread_and_failover, self.act_policeman_restart, self.act_cache, self.act_dead_letter):
                try:
                    act()
                except CasperError as exc:
                    self.s.problems.append(f"{act.__name__}: {exc.message}")
                    self.say(f"[red]{exc.message}[/]")
            self.ledger()
            self.live = None
        (self.mesh.state_dir / "demo-summary.json").write_text(json.dumps(asdict(self.s), indent=2))
        self.console.print(render_summary(self.s), highlight=False)
        return self.s


def _took(row: dict[str, Any]) -> float:
    start, end = row.get("created_at"), row.get("finished_at")
    if not start or not end:
        return 0.0
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def render_summary(s: DemoSummary) -> str:
    spread = ", ".join(f"{k} {v}" for k, v in sorted(s.by_node.items()))
    lines = [
        "[bold]demo summary[/]",
        f"  tasks:      {s.submitted} submitted, {s.complete} complete"
        + (", the dead letter retried and complete" if s.dead_letter_ok else ""),
        f"  spread:     {spread or '-'}",
        f"  failover:   a developer killed holding {s.killed_holding} tasks: reassigned after "
        f"{_secs(s.failover_s)}, all finished elsewhere after {_secs(s.failover_done_s)}",
        f"  policeman:  killed with {s.open_at_policeman_kill} tasks open, back after {_secs(s.policeman_down_s)}",
        f"  cache:      first run {_secs(s.cache_first_s)}, repeats {_secs(s.cache_repeat_s)} each "
        f"({s.cache_hits} hits)",
        "  ledger:     "
        + (
            "[green]every task accounted for in Postgres: none lost[/]" if not s.lost else f"[red]{len(s.lost)} lost[/]"
        ),
    ]
    lines += [f"  [red]problem:[/] {p}" for p in s.problems]
    lines.append("next: caspectl tasks, caspectl get ID, caspectl status; README.md for more")
    return "\n".join(lines)


def _secs(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}s"


def run_demo(mesh: LocalMesh, console: Console, scale: float = 1.0) -> DemoSummary:
    return Demo(mesh, console, scale).run()
