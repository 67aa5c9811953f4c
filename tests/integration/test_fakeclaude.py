"""FakeClaude, the scripted Messages API used by the agent tests (plain HTTP on 127.0.0.1)."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.support.fakeclaude import (
    FakeClaude,
    Response,
    http_error,
    last_user_text,
    overloaded,
    rate_limited,
    reply,
    text,
    tokens_of,
    tool_use,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

KEY = {"x-api-key": "sk-fake-test"}


def post(
    fake: FakeClaude, body: Any, headers: dict[str, str] | None = None, path: str = "/v1/messages"
) -> tuple[int, dict[str, Any], dict[str, str]]:
    data = json.dumps(body).encode()
    req = urllib.request.Request(
        fake.url + path,
        data=data,
        method="POST",
        headers={"content-type": "application/json", **(KEY if headers is None else headers)},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read()), {k.lower(): v for k, v in resp.headers.items()}
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), {k.lower(): v for k, v in err.headers.items()}


def body(*messages: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "model": "claude-test-1",
        "max_tokens": 100,
        "messages": list(messages) or [{"role": "user", "content": "hello"}],
        **extra,
    }


@pytest.fixture
def fake() -> Iterator[FakeClaude]:
    with FakeClaude() as f:
        yield f


def test_default_reply_is_a_full_message(fake: FakeClaude) -> None:
    status, msg, headers = post(fake, body())
    assert status == 200
    assert msg["type"] == "message" and msg["role"] == "assistant" and msg["model"] == "claude-test-1"
    assert msg["id"].startswith("msg_")
    assert msg["content"] == [{"type": "text", "text": "ok"}]
    assert msg["stop_reason"] == "end_turn" and msg["stop_sequence"] is None
    assert set(msg["usage"]) == {
        "input_tokens",
        "output_tokens",
        "cache_creation_input_tokens",
        "cache_read_input_tokens",
    }
    assert msg["usage"]["output_tokens"] == tokens_of(msg["content"])
    assert headers["request-id"].startswith("req_")
    for kind in ("requests", "tokens"):
        for what in ("limit", "remaining", "reset"):
            assert f"anthropic-ratelimit-{kind}-{what}" in headers
    rec = fake.requests[0]
    assert rec.status == 200 and rec.body["model"] == "claude-test-1" and rec.headers["x-api-key"]
    assert fake.calls() == [rec]


def test_bearer_authorization_is_accepted(fake: FakeClaude) -> None:
    status, _, _ = post(fake, body(), headers={"authorization": "Bearer sk-fake"})
    assert status == 200


def test_queue_then_default(fake: FakeClaude) -> None:
    tu = tool_use("read_file", {"path": "a.py"})
    fake.push(reply(tu), reply(text("second")))
    _, first, _ = post(fake, body())
    assert first["content"] == [tu] and first["stop_reason"] == "tool_use"
    assert tu["id"].startswith("toolu_")
    _, second, _ = post(fake, body())
    assert second["content"] == [{"type": "text", "text": "second"}]
    _, third, _ = post(fake, body())
    assert third["content"] == [{"type": "text", "text": "ok"}]
    assert fake.pending() == 0


def test_script_callable_sees_the_body_and_can_change(fake: FakeClaude) -> None:
    fake.script = lambda b: reply(
        text("echo: " + last_user_text(b)), stop_reason="max_tokens", usage={"output_tokens": 3}
    )
    _, msg, _ = post(fake, body({"role": "user", "content": [text("a"), text("b")]}))
    assert msg["content"][0]["text"] == "echo: a\nb"
    assert msg["stop_reason"] == "max_tokens" and msg["usage"]["output_tokens"] == 3
    fake.script = lambda b: overloaded()
    status, err, _ = post(fake, body())
    assert status == 529 and err["error"]["type"] == "overloaded_error"
    fake.script = lambda b: 1 / 0  # a broken script answers 500, it does not hang the client
    status, err, _ = post(fake, body())
    assert status == 500 and "ZeroDivisionError" in err["error"]["message"]
    assert len(fake.calls()) == 1


def test_scripted_errors_and_headers(fake: FakeClaude) -> None:
    fake.push(
        rate_limited(3),
        http_error(500, "api_error", "boom", headers={"x-extra": "1"}),
        http_error(429, "rate_limit_error", "slow", retry_after=1.5),
    )
    status, err, headers = post(fake, body())
    assert status == 429 and headers["retry-after"] == "3" and err["error"]["type"] == "rate_limit_error"
    status, err, headers = post(fake, body())
    assert (
        status == 500
        and headers["x-extra"] == "1"
        and err == {"type": "error", "error": {"type": "api_error", "message": "boom"}}
    )
    _, _, headers = post(fake, body())
    assert headers["retry-after"] == "1.5"
    assert [r.status for r in fake.requests] == [429, 500, 429]
    assert fake.calls() == []


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        ({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
        ({"model": "m", "max_tokens": 5}, "messages"),
        ({"model": "m", "max_tokens": 5, "messages": []}, "at least one"),
        ({"model": "m", "max_tokens": 5, "messages": [{"role": "assistant", "content": "x"}]}, "first message"),
        (
            {
                "model": "m",
                "max_tokens": 5,
                "messages": [
                    {"role": "user", "content": "x"},
                    {"role": "assistant", "content": []},
                    {"role": "user", "content": "y"},
                ],
            },
            "non-empty content",
        ),
        ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [text("")]}]}, "non-empty"),
        (
            {
                "model": "m",
                "max_tokens": 5,
                "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y "}],
            },
            "trailing whitespace",
        ),
        (
            {
                "model": "m",
                "max_tokens": 5,
                "system": [{"type": "text", "text": f"s{i}", "cache_control": {"type": "ephemeral"}} for i in range(5)],
                "messages": [{"role": "user", "content": "x"}],
            },
            "maximum of 4",
        ),
        ({"model": "m", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}, "role"),
    ],
)
def test_invalid_requests_are_400(fake: FakeClaude, bad: dict[str, Any], needle: str) -> None:
    status, err, _ = post(fake, bad)
    assert status == 400
    assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error"
    assert needle in err["error"]["message"]
    assert fake.requests[0].status == 400 and fake.calls() == []


def test_tool_result_must_answer_the_previous_tool_use(fake: FakeClaude) -> None:
    use = tool_use("run", {"cmd": "ls"}, id="toolu_1")
    good = body(
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": [text("sure"), use]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "a.py"}]},
    )
    status, _, _ = post(fake, good)
    assert status == 200
    assert FakeClaude.tool_results(fake.requests[0]) == [
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "a.py"}
    ]
    assert fake.tool_results(fake.requests[0].body)[0]["content"] == "a.py"

    wrong_id = body(
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": [use]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_2", "content": ""}]},
    )
    status, err, _ = post(fake, wrong_id)
    assert status == 400 and "toolu_2" in err["error"]["message"]

    unanswered = body(
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": [use]},
        {"role": "user", "content": "what now?"},
    )
    status, err, _ = post(fake, unanswered)
    assert status == 400 and "toolu_1" in err["error"]["message"]

    orphan = body({"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": ""}]})
    status, _, _ = post(fake, orphan)
    assert status == 400


def test_missing_key_is_401_and_other_paths_404(fake: FakeClaude) -> None:
    status, err, _ = post(fake, body(), headers={})
    assert status == 401 and err["error"]["type"] == "authentication_error"
    status, err, _ = post(fake, body(), path="/v1/complete")
    assert status == 404 and err["error"]["type"] == "not_found_error"
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(fake.url + "/", timeout=10)
    assert info.value.code == 404
    assert [r.status for r in fake.recorded()] == [401, 404, 404]


def test_prompt_cache_simulation() -> None:
    with FakeClaude(min_cache_tokens=100) as fake:
        _prompt_cache_checks(fake)


def _prompt_cache_checks(fake: FakeClaude) -> None:
    tools = [
        {"name": "a", "input_schema": {"type": "object"}},
        {"name": "b", "input_schema": {"type": "object"}, "cache_control": {"type": "ephemeral"}},
    ]
    system = [{"type": "text", "text": "you are a test " * 50, "cache_control": {"type": "ephemeral"}}]
    req = body(tools=tools, system=system)
    _, first, _ = post(fake, req)
    _, second, _ = post(fake, body({"role": "user", "content": "another question"}, tools=tools, system=system))
    u1, u2 = first["usage"], second["usage"]
    assert u1["cache_creation_input_tokens"] > 100 and u1["cache_read_input_tokens"] == 0
    assert u2["cache_read_input_tokens"] == u1["cache_creation_input_tokens"]
    assert u2["cache_creation_input_tokens"] == 0
    assert u1["input_tokens"] < u1["cache_creation_input_tokens"]
    # no cache_control: everything is plain input
    _, plain, _ = post(fake, body(system="you are a test " * 50))
    assert plain["usage"]["cache_creation_input_tokens"] == plain["usage"]["cache_read_input_tokens"] == 0
    assert plain["usage"]["input_tokens"] > 100
    # a different prefix is a new cache entry
    _, other, _ = post(fake, body(system=[{**system[0], "text": "different " * 50}]))
    assert other["usage"]["cache_creation_input_tokens"] > 0


def test_rate_headers_count_down() -> None:
    with FakeClaude(rpm_limit=50, tpm_limit=100_000) as fake:
        _, _, h1 = post(fake, body())
        _, _, h2 = post(fake, body())
    assert h1["anthropic-ratelimit-requests-limit"] == "50"
    assert int(h1["anthropic-ratelimit-requests-remaining"]) == 49
    assert int(h2["anthropic-ratelimit-requests-remaining"]) == 48
    assert int(h2["anthropic-ratelimit-tokens-remaining"]) < int(h1["anthropic-ratelimit-tokens-remaining"])
    assert h1["anthropic-ratelimit-requests-reset"].endswith("Z")


def test_server_enforces_rpm_limit_with_retry_after() -> None:
    with FakeClaude(rpm_limit=2) as fake:
        statuses = [post(fake, body())[0] for _ in range(2)]
        status, err, headers = post(fake, body())
    assert statuses == [200, 200]
    assert status == 429 and err["error"]["type"] == "rate_limit_error"
    assert 1 <= int(headers["retry-after"]) <= 60
    assert headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert [r.status for r in fake.requests] == [200, 200, 429]


def test_server_enforces_tpm_limit() -> None:
    with FakeClaude(tpm_limit=200) as fake:
        big = body({"role": "user", "content": "x" * 600})  # ~150+ tokens
        assert post(fake, big)[0] == 200
        status, _, headers = post(fake, big)
    assert status == 429 and int(headers["retry-after"]) >= 1


def test_serves_concurrent_requests_with_latency() -> None:
    barrier = threading.Barrier(4, timeout=10)

    def script(b: dict[str, Any]) -> Response:
        barrier.wait()  # only passes if four requests are being served at once
        return reply(text("together"))

    with FakeClaude(script=script, latency_s=0.05) as fake, ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: post(fake, body()), range(4)))
    assert [r[0] for r in results] == [200] * 4
    assert all(r[1]["content"][0]["text"] == "together" for r in results)


def test_delay_and_arrival_times() -> None:
    with FakeClaude() as fake:
        fake.push(reply(text("slow"), delay_s=0.2))
        post(fake, body())
        post(fake, body())
        first, second = fake.requests
    assert second.t - first.t >= 0.2  # the second was sent after the delayed first came back


def test_helpers() -> None:
    b = body(
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "mid"},
        {
            "role": "user",
            "content": [text("x"), {"type": "tool_result", "tool_use_id": "t", "content": "r"}, text("y")],
        },
    )
    assert last_user_text(b) == "x\ny"
    assert last_user_text({"messages": []}) == ""
    assert FakeClaude.tool_results(b) == [{"type": "tool_result", "tool_use_id": "t", "content": "r"}]
    assert reply(text("a")).stop_reason == "end_turn"
    assert reply(tool_use("t", {})).stop_reason == "tool_use"
    assert tool_use("t", {}, id="toolu_x")["id"] == "toolu_x"
    assert overloaded().status == 529
    assert rate_limited(2).headers["retry-after"] == "2"


def test_stop_closes_the_port() -> None:
    fake = FakeClaude().start()
    url = fake.url
    assert post(fake, body())[0] == 200
    fake.stop()
    with pytest.raises(OSError):
        urllib.request.urlopen(url + "/v1/messages", data=b"{}", timeout=5)
    fake.stop()  # idempotent
    with pytest.raises(RuntimeError):
        _ = fake.url


def _events(raw: str) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for chunk in raw.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in chunk.splitlines())
        out.append((lines["event"], json.loads(lines["data"])))
    return out


def test_a_stream_is_the_documented_event_sequence(fake: FakeClaude) -> None:
    use = tool_use("run", {"cmd": "ls -la"}, id="toolu_9")
    fake.push(reply(text("Looking."), use))
    req = urllib.request.Request(
        fake.url + "/v1/messages",
        data=json.dumps(body(stream=True)).encode(),
        method="POST",
        headers={"content-type": "application/json", **KEY},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.headers["content-type"] == "text/event-stream"
        evs = _events(resp.read().decode())
    names = [n for n, _ in evs]
    assert names[0] == "message_start" and names[1] == "ping" and names[-2:] == ["message_delta", "message_stop"]
    assert evs[0][1]["message"]["content"] == [] and evs[0][1]["message"]["usage"]["input_tokens"] > 0
    starts = [d["content_block"] for n, d in evs if n == "content_block_start"]
    assert starts == [{"type": "text", "text": ""}, {"type": "tool_use", "id": "toolu_9", "name": "run", "input": {}}]
    texts = "".join(d["delta"]["text"] for n, d in evs if n == "content_block_delta" and d["index"] == 0)
    partial = "".join(d["delta"]["partial_json"] for n, d in evs if n == "content_block_delta" and d["index"] == 1)
    assert texts == "Looking." and json.loads(partial) == {"cmd": "ls -la"}
    assert names.count("content_block_stop") == 2
    delta = evs[-2][1]
    assert delta["delta"]["stop_reason"] == "tool_use" and delta["usage"]["output_tokens"] > 0
    assert fake.billed()["calls"] == 1 and fake.billed()["output_tokens"] == delta["usage"]["output_tokens"]


def test_incremental_breakpoints_read_the_previous_turn_and_a_short_prefix_is_not_cached() -> None:
    with FakeClaude(min_cache_tokens=1024) as fake:
        short = body({"role": "user", "content": [{**text("hi"), "cache_control": {"type": "ephemeral"}}]})
        _, first, _ = post(fake, short)
        _, again, _ = post(fake, short)
        assert first["usage"]["cache_creation_input_tokens"] == again["usage"]["cache_read_input_tokens"] == 0

        cc = {"cache_control": {"type": "ephemeral"}}
        turn1 = [{"role": "user", "content": [{**text("long context " * 400), **cc}]}]
        _, u1, _ = post(fake, body(*turn1))
        turn2 = [
            {"role": "user", "content": [text("long context " * 400)]},
            {"role": "assistant", "content": [text("ok")]},
            {"role": "user", "content": [{**text("next question"), **cc}]},
        ]
        _, u2, _ = post(fake, body(*turn2))
    w1 = u1["usage"]["cache_creation_input_tokens"]
    assert w1 > 1024 and u1["usage"]["cache_read_input_tokens"] == 0
    # the previous breakpoint is found by the lookback: read it, write only the new blocks
    assert u2["usage"]["cache_read_input_tokens"] == w1
    assert 0 < u2["usage"]["cache_creation_input_tokens"] < 50 and u2["usage"]["input_tokens"] == 0
