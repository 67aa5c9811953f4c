"""A newcomer's first hour (issue 12), the pure parts: input schemas, idempotency conflicts, why a
task waits, the mesh's cache counters, hints, the port pre-flight, caspectl's texts."""

from __future__ import annotations

import socket
import uuid
from typing import Any

import pytest
from rich.console import Console

from casperd import admission, codec, handlers
from casperd.agents.tasktypes import install
from casperd.ctl import jobs
from casperd.ctl.output import plural, table
from casperd.errors import BadInputError, IdempotencyConflictError, UnknownTaskTypeError
from casperd.hints import silent_broker_hint
from casperd.meshcache import cache_counters, sum_counters
from casperd.messages import Heartbeat, TaskSpec
from casperd.ports import PortInUseError, check_ports, port_plan
from casperd.waiting import missing_capabilities, needed_capabilities, why_waiting

pytestmark = pytest.mark.unit
CATALOG = install(handlers.Catalog())

BAD_INPUTS = [
    ("shell", {}),
    ("shell", {"cmd": ""}),
    ("shell", {"cmd": "   "}),
    ("shell", {"cmd": []}),
    ("shell", {"cmd": ["ls", 3]}),
    ("shell", {"cmd": "ls", "cwd": "../outside"}),
    ("shell", {"cmd": "ls", "cwd": "/etc"}),
    ("shell", {"cmd": "ls", "cwd": "a/../../b"}),
    ("shell", {"cmd": "ls", "timeout_s": "10"}),
    ("shell", {"cmd": "ls", "timeout_s": 0}),
    ("shell", {"cmd": "ls", "stdin": 5}),
    ("shell", {"cmd": "ls", "expect_exit": "0"}),
    ("shell", {"cmd": "ls", "cache": True}),
    ("sleep", {"seconds": "five"}),
    ("sleep", {"seconds": -1}),
    ("sleep", {"seconds": 1e9}),
    ("sleep", {"secs": 1}),
    ("ask", {}),
    ("ask", {"prompt": ""}),
    ("ask", {"prompt": "hi", "max_tokens": 0}),
    ("code", {"repo": "/r"}),
    ("code", {"repo": 1, "base": "abc"}),
    ("test", {"repo": "/r", "base": "abc"}),
    ("test", {"repo": "/r", "base": "abc", "test_cmd": " "}),
    ("job", {"goal": "x"}),
]

GOOD_INPUTS = [
    ("noop", {"anything": [1, 2]}),
    ("echo", {"cache": True, "x": {"y": 1}}),
    ("sleep", {}),
    ("sleep", {"seconds": 2}),
    ("sleep", {"seconds": 0.5, "fail": "boom"}),
    ("shell", {"cmd": "ls"}),
    ("shell", {"cmd": ["ls", "-la"], "cwd": "sub/dir", "timeout_s": 5, "stdin": "x", "expect_exit": 2}),
    ("ask", {"prompt": "hi", "job_id": "j"}),
    ("code", {"repo": "/r", "base": "abc", "instructions": "fix", "limits": {}}),
    ("test", {"repo": "/r", "base": "abc", "test_cmd": "pytest"}),
    ("job", {"goal": "g", "repo": "/r", "base": "abc", "max_parallel": 2}),
]


@pytest.mark.parametrize(("ttype", "data"), BAD_INPUTS)
def test_bad_input_is_refused_naming_the_field_not_the_value(ttype: str, data: dict[str, Any]) -> None:
    with pytest.raises(BadInputError) as info:
        handlers.check_input(CATALOG.get(ttype), data)
    assert f"bad input for a {ttype} task" in info.value.message
    assert info.value.hint and "nothing was run" in info.value.hint
    assert info.value.retryable is False
    assert "five" not in info.value.message  # values are never echoed (they may be secrets)


@pytest.mark.parametrize(("ttype", "data"), GOOD_INPUTS)
def test_good_input_passes(ttype: str, data: dict[str, Any]) -> None:
    handlers.check_input(CATALOG.get(ttype), data)


def test_every_builtin_type_but_noop_and_echo_has_an_input_model() -> None:
    for name in ("shell", "sleep", "ask", "code", "test", "job"):
        assert CATALOG.get(name).input_model is not None, name


def test_unknown_type_is_refused_by_the_admission() -> None:
    with pytest.raises(UnknownTaskTypeError):
        admission.check_specs([TaskSpec(type="nope")], CATALOG)


def test_admission_names_the_bad_task_in_a_batch() -> None:
    specs = [TaskSpec(type="echo"), TaskSpec(type="sleep", input={"seconds": "x"})]
    with pytest.raises(BadInputError, match=r"^task 1: "):
        admission.check_specs(specs, CATALOG)


def test_same_key_same_input_in_one_submit_is_fine_other_input_conflicts() -> None:
    a = TaskSpec(type="echo", input={"n": 1}, idempotency_key="k")
    admission.check_specs([a, a], CATALOG)
    b = TaskSpec(type="echo", input={"n": 2}, idempotency_key="k")
    with pytest.raises(IdempotencyConflictError, match="conflict"):
        admission.check_specs([a, b], CATALOG)


def test_reuse_of_a_key_with_other_input_or_type_conflicts() -> None:
    tid = uuid.uuid4()
    existing = {"k": (tid, "echo", {"n": 1})}
    admission.check_reuse([TaskSpec(type="echo", input={"n": 1}, idempotency_key="k")], existing)
    admission.check_reuse([TaskSpec(type="echo", input={"n": 2}, idempotency_key="other")], existing)
    for spec in (
        TaskSpec(type="echo", input={"n": 2}, idempotency_key="k"),
        TaskSpec(type="noop", input={"n": 1}, idempotency_key="k"),
    ):
        with pytest.raises(IdempotencyConflictError) as info:
            admission.check_reuse([spec], existing)
        assert str(tid) in info.value.message and info.value.hint


def _peer(node: str, caps: list[str], **kw: Any) -> dict[str, Any]:
    return {"node_id": node, "capabilities": caps, "liveness": "alive", "draining": False, "breaker": "closed", **kw}


def test_why_waiting() -> None:
    peers = [_peer("d1", ["code", "llm", "shell"]), _peer("t", ["test", "shell"])]
    assert needed_capabilities("shell", ["gpu"]) == {"shell", "gpu"}
    assert missing_capabilities({"shell", "gpu"}, peers) == {"gpu"}
    why = why_waiting({"type": "echo", "status": "pending", "requires": ["gpu"]}, peers)
    assert why and "capability gpu" in why and "--capabilities" in why
    assert why_waiting({"type": "shell", "status": "pending", "requires": []}, peers) is None
    assert why_waiting({"type": "echo", "status": "complete", "requires": ["gpu"]}, peers) is None
    assert "no peer is registered" in (why_waiting({"type": "echo", "status": "pending"}, []) or "")
    dead = [_peer("d1", ["gpu"], liveness="dead")]
    assert "gpu" in (why_waiting({"type": "echo", "status": "pending", "requires": ["gpu"]}, dead) or "")
    drained = [_peer("d1", ["gpu"], draining=True)]
    assert "caspectl resume" in (why_waiting({"type": "echo", "status": "retry", "requires": ["gpu"]}, drained) or "")
    assert why_waiting({"type": "job", "status": "pending"}, []) is None  # run by the policeman itself


def test_cache_counters_travel_in_heartbeats_and_are_summed() -> None:
    counters = cache_counters({"enabled": True, "hits": 3, "misses": 1, "bypassed": 0, "computed": 1, "breaker": "x"})
    assert counters == {"hits": 3, "misses": 1, "bypassed": 0, "computed": 1}
    frames = codec.encode(Heartbeat(load=1, cache=counters))
    assert codec.decode(frames).message.cache == counters  # type: ignore[attr-defined]
    # without counters the bytes are those of a version-1 heartbeat (no "cache" key at all)
    assert b"cache" not in codec.encode(Heartbeat())[2]
    total = sum_counters([counters, None, {"hits": 2, "misses": -5, "computed": True}])
    assert total == {"hits": 5, "misses": 1, "bypassed": 0, "computed": 1, "nodes": 2}


def test_silent_broker_hint() -> None:
    assert silent_broker_hint("tcp://x:1", False, registered=False, reconnects=1) is None
    assert silent_broker_hint("tcp://x:1", False, registered=True, reconnects=9) is None
    plain = silent_broker_hint("tcp://x:1", False, registered=False, reconnects=2) or ""
    assert "tcp://x:1" in plain and "--curve" in plain and "--broker-public-key-file" in plain
    assert "public key" in (silent_broker_hint("tcp://x:1", True, registered=False, reconnects=3) or "")


def test_port_plan_and_a_taken_port_is_named() -> None:
    assert port_plan(5555, 4, postgres=True, redis=False) == [
        (5555, "the policeman"),
        (5556, "node 1"),
        (5557, "node 2"),
        (5558, "node 3"),
        (5655, "the embedded Postgres"),
    ]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(PortInUseError) as info:
            check_ports(port - 100, 1, postgres=True, redis=False)
    assert f"port {port}" in info.value.message and "the embedded Postgres" in info.value.message
    assert info.value.hint and "--port-base" in info.value.hint


def test_plural_and_tables_wrap_instead_of_cutting() -> None:
    assert (plural(1, "task"), plural(2, "task"), plural(0, "peer")) == ("1 task", "2 tasks", "0 peers")
    assert plural(3, "capability", "capabilities") == "3 capabilities"
    long = "ipc:///a/very/long/state/directory/path/that/goes/on/and/on/policeman.ctl"
    console = Console(width=40, record=True)
    console.print(table("t", ("node", "control"), [("policeman", long)]))
    text = console.export_text().replace("│", "").replace(" ", "").replace("\n", "")
    assert long in text and "…" not in console.export_text()


def test_no_key_note_only_when_caspectl_has_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    assert jobs.key_not_passed_note("no Anthropic API key on developer-1") is None
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")
    note = jobs.key_not_passed_note("no Anthropic API key on developer-1") or ""
    assert "does not pass it on" in note and "anthropic_api_key_file" in note and "sk-test" not in note
    assert jobs.key_not_passed_note("something else failed") is None


def test_failed_job_report_has_no_nonsense_speedup_or_yet() -> None:
    report = {"job_id": "j", "state": "failed", "wall_s": 1.0, "sum_task_s": 0.0, "subtasks": [], "plan": []}
    console = Console(width=120, record=True)
    console.print(jobs.render_report(report))
    text = console.export_text()
    assert "speedup" not in text and "(yet)" not in text
    assert "the job ended before any was planned" in text
