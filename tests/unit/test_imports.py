"""The layering of casperd/: no import cycles anywhere (function-level and TYPE_CHECKING imports
included), the protocol core and the two sans-io cores import no I/O, and the generic task types
import no plugin."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "casperd"


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the casperd modules it imports (anywhere in the file)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Import):
                graph[m].update(a.name for a in node.names if a.name in mods)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                for a in node.names:
                    full = f"{base}.{a.name}"
                    if full in mods:
                        graph[m].add(full)
                    elif base in mods:
                        graph[m].add(base)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph[v]:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        for n in graph[m] - seen:
            seen.add(n)
            todo.append(n)
    return seen


def test_there_is_no_import_cycle_in_casperd() -> None:
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_cycles() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"a"}}) == [["a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_cores_and_handlers_import_no_io_and_no_plugin() -> None:
    graph = import_graph()
    io = {"casperd.store", "casperd.transport", "casperd.node", "casperd.broker", "casperd.worker", "casperd.cache"}
    for core in ("casperd.policeman", "casperd.policeman.core", "casperd.workercore", "casperd.lifecycle"):
        reached = _reach(graph, core)
        assert not reached & io, f"{core} reaches {sorted(reached & io)}"
        assert not any(m.startswith("casperd.agents") for m in reached), core
    assert not any(m.startswith("casperd.agents") for m in _reach(graph, "casperd.handlers"))


def test_the_sans_io_cores_import_no_clock_socket_or_event_loop() -> None:
    banned = {"asyncio", "zmq", "time", "random", "socket", "os", "psycopg", "redis"}
    files = [*sorted((PKG / "policeman").glob("*.py")), PKG / "workercore.py"]
    for path in files:
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.split(".")[0])
        assert not names & banned, f"{path.name} imports {sorted(names & banned)}"


# --- what a running node loads (issue #13: idle memory <= 60 MB per casperd) ----------------------
_NODE_PROBE = """
import json, sys, tempfile
from casperd.cache import ResultCache
from casperd.node import Node
from casperd.settings import load_settings

state = tempfile.mkdtemp()
s = load_settings({"role": ROLE, "state_dir": state, "curve": False, "redis_url": "redis://127.0.0.1:1/0"})
node = Node(s)
node.cache = ResultCache(s.redis_url, password="pw")  # a cache configured, never used
if ROLE != "policeman":
    from casperd.agents.services import WorkerServices

    WorkerServices(s, None, node.cache)  # what start() builds for a worker: the model client too
else:
    import casperd.agents.police, casperd.broker, casperd.elastic, casperd.store  # noqa: F401
HEAVY = ("anthropic", "httpx", "psycopg", "psycopg_pool", "rich", "opentelemetry", "redis")
LATER = ("casperd.agents.claude", "casperd.agents.gitwork", "casperd.agents.validation", "casperd.agents.jobs",
         "casperd.agents.planner")
print(json.dumps(sorted(m for m in HEAVY + (LATER if ROLE == "policeman" else ()) if m in sys.modules)))
"""


def _heavy_after_start(role: str) -> list[str]:
    import json
    import subprocess
    import sys

    code = _NODE_PROBE.replace("ROLE", repr(role))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return list(json.loads(out.stdout.strip().splitlines()[-1]))


def test_a_worker_node_loads_no_model_sdk_driver_cache_client_or_ui_before_its_first_use() -> None:
    """The anthropic SDK (~45 MB RSS) loads on the first model call, redis-py (~9 MB) on the first
    cache operation, psycopg only on the policeman, rich only in caspectl."""
    for role in ("developer", "tester"):
        assert _heavy_after_start(role) == [], role


def test_the_policeman_loads_its_postgres_driver_but_no_model_sdk_cache_client_or_ui() -> None:
    """Nor its own model client, the job coordinator and planner, or git and patch validation: they
    load with the first job, model call or code result."""
    assert _heavy_after_start("policeman") == ["psycopg", "psycopg_pool"]


def _probe_with(role: str, extra: str) -> str:
    """The node probe's output for ``role`` after it also imports the module ``extra``."""
    import subprocess
    import sys

    code = _NODE_PROBE.replace("ROLE", repr(role)).replace("HEAVY = (", f"import {extra}  # noqa: F401\nHEAVY = (")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_the_policeman_probe_sees_an_agents_module_loaded_at_start() -> None:
    assert "casperd.agents.gitwork" in _probe_with("policeman", "casperd.agents.gitwork")


def test_the_probe_sees_a_heavy_import() -> None:
    """The probe can fail: a role that imports the SDK at start is seen."""
    assert "anthropic" in _probe_with("developer", "casperd.agents.apicall")
