"""The Claude client against FakeClaude on 127.0.0.1 with the real anthropic SDK (and a real Redis)."""

from __future__ import annotations

import asyncio
import copy
import logging
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from casperd.agents.claude import ClaudeClient
from casperd.agents.modelreply import Reply
from casperd.agents.ratelimit import LocalLimiter, NoLimiter
from casperd.agents.usage import cost_of
from casperd.breaker import CircuitBreaker
from casperd.cache import ResultCache
from casperd.childserver import free_port
from casperd.embedded_redis import EmbeddedRedis
from casperd.errors import LlmError, LlmRequestError, MissingApiKeyError
from casperd.retry import RetryPolicy
from casperd.settings import Settings
from casperd.settingtables import DEFAULT_PRICES
from tests.support.fakeclaude import FakeClaude, http_error, overloaded, rate_limited, reply, text, tool_use

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

SECRET = "sk-ant-test-SECRET-do-not-leak-0123456789"
MODEL = "claude-haiku-4-5-20251001"  # date-suffixed; priced as claude-haiku-4-5
TOOLS = [
    {
        "name": "read_file",
        "description": "read a file",
        "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}},
    },
    {
        "name": "run",
        "description": "run a command",
        "input_schema": {"type": "object", "properties": {"cmd": {"type": "string"}}},
    },
]
SYSTEM = "You are a careful developer. " * 40
MESSAGES = [{"role": "user", "content": "List the files."}]


@pytest.fixture(autouse=True)
def _no_ambient_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "ANTHROPIC_API_KEY",
        "ANTHROPIC_AUTH_TOKEN",
        "ANTHROPIC_BASE_URL",
        "ANTHROPIC_PROFILE",
        "ANTHROPIC_CUSTOM_HEADERS",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def fake() -> Iterator[FakeClaude]:
    with FakeClaude(min_cache_tokens=100) as f:
        yield f


@pytest.fixture
async def make_client(fake: FakeClaude) -> AsyncIterator[Callable[..., ClaudeClient]]:
    clients: list[ClaudeClient] = []

    def factory(**kw: Any) -> ClaudeClient:
        kw.setdefault("api_key", SECRET)
        kw.setdefault("base_url", fake.url)
        kw.setdefault("timeout_s", 10.0)
        kw.setdefault("retries", 3)
        kw.setdefault("limiter", LocalLimiter(rpm=10_000, tpm=10**8))
        kw.setdefault("prices", DEFAULT_PRICES)
        kw.setdefault("backoff", RetryPolicy(max_attempts=10, base_s=0.02, factor=2.0, cap_s=0.1))
        client = ClaudeClient(**kw)
        clients.append(client)
        return client

    yield factory
    for c in clients:
        await c.close()


async def call(client: ClaudeClient, **kw: Any) -> Reply:
    args: dict[str, Any] = {"model": MODEL, "system": SYSTEM, "messages": MESSAGES, "max_tokens": 256, "tools": TOOLS}
    args.update(kw)
    return await asyncio.wait_for(client.create(**args), 30)


async def test_normal_call_content_usage_cost_and_prompt_caching(fake: FakeClaude, make_client: Any) -> None:
    client = make_client()
    use = tool_use("read_file", {"path": "README.md"})
    fake.push(reply(text("Let me look."), use), reply(text("again")))
    tools_before = copy.deepcopy(TOOLS)
    first = await call(client, tool_choice={"type": "auto"}, temperature=0.5)

    assert first.content == [{"type": "text", "text": "Let me look."}, use]
    assert first.stop_reason == "tool_use" and first.model == MODEL and not first.cached
    assert first.request_id and first.request_id.startswith("req_")
    u = first.usage
    assert u.calls == 1 and u.output_tokens > 0 and u.cache_write_tokens > 0 and u.cache_read_tokens == 0
    assert u.cost_usd == pytest.approx(
        cost_of(
            "claude-haiku-4-5",
            u.input_tokens,
            u.output_tokens,
            u.cache_read_tokens,
            u.cache_write_tokens,
            DEFAULT_PRICES,
        )
    )
    assert u.cost_usd > 0
    assert first.text == "Let me look." and first.tool_uses == [use]

    sent = fake.calls()[0].body
    assert sent["system"] == [{"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}]
    assert sent["tools"][-1]["cache_control"] == {"type": "ephemeral"}
    assert "cache_control" not in sent["tools"][0]
    assert sent["stream"] is True  # every call is streamed
    assert sent["messages"][-1]["content"][-1]["cache_control"] == {"type": "ephemeral"}  # the newest turn
    assert sent["tool_choice"] == {"type": "auto"} and sent["temperature"] == 0.5
    assert tools_before == TOOLS  # the caller's dicts are never mutated

    second = await call(client)
    assert second.usage.cache_read_tokens == u.cache_write_tokens
    assert second.usage.cache_write_tokens == 0
    assert second.usage.cost_usd < u.cost_usd
    assert len(fake.calls()) == 2


async def test_429_waits_retry_after_then_succeeds(fake: FakeClaude, make_client: Any) -> None:
    limiter = LocalLimiter(rpm=10_000, tpm=10**8)
    client = make_client(limiter=limiter)
    fake.push(rate_limited(1), reply(text("finally")))
    got = await call(client)
    assert got.content == [{"type": "text", "text": "finally"}]
    first, second = fake.requests
    assert first.status == 429 and second.status == 200
    assert second.t - first.t >= 1.0
    assert limiter.snapshot()["rpm"] < 10_000  # the 429 reached the limiter and halved it


async def test_529_twice_then_ok(fake: FakeClaude, make_client: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="casperd.agents.claude")
    client = make_client(retries=3)
    fake.push(overloaded(), overloaded(), reply(text("done")))
    got = await call(client)
    assert got.content[0]["text"] == "done"
    assert [r.status for r in fake.requests] == [529, 529, 200]
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) == 2 and "529" in retries[0]
    assert all(SECRET not in r.getMessage() for r in caplog.records)


async def test_server_errors_and_connection_errors_are_retried(fake: FakeClaude, make_client: Any) -> None:
    client = make_client(retries=2)
    fake.push(http_error(500, "api_error", "internal"), http_error(503, "api_error", "unavailable"), reply(text("up")))
    assert (await call(client)).content[0]["text"] == "up"
    assert [r.status for r in fake.requests] == [500, 503, 200]

    dead = make_client(base_url=f"http://127.0.0.1:{free_port()}", retries=1)
    with pytest.raises(LlmError) as info:
        await call(dead)
    assert "connection" in str(info.value) and info.value.retryable


async def test_timeouts_are_retried(fake: FakeClaude, make_client: Any) -> None:
    client = make_client(timeout_s=0.3, retries=1)
    fake.push(reply(text("too late"), delay_s=1.0), reply(text("in time")))
    assert (await call(client)).content[0]["text"] == "in time"
    assert len(fake.requests) == 2
    fake.push(reply(text("late"), delay_s=1.0), reply(text("late"), delay_s=1.0))
    with pytest.raises(LlmError) as info:
        await call(client)
    assert "timeout" in str(info.value)


async def test_400_is_a_request_error_without_retry(fake: FakeClaude, make_client: Any) -> None:
    client = make_client(retries=3)
    fake.push(http_error(400, "invalid_request_error", "messages.0: something is wrong"))
    with pytest.raises(LlmRequestError) as info:
        await call(client)
    assert "something is wrong" in str(info.value) and "400" in str(info.value)
    assert not info.value.retryable
    assert len(fake.requests) == 1
    # the fake's own validation: a conversation that starts with the assistant
    with pytest.raises(LlmRequestError):
        await call(client, messages=[{"role": "assistant", "content": "hi"}])
    assert len(fake.requests) == 2


async def test_401_never_shows_the_key(fake: FakeClaude, make_client: Any) -> None:
    client = make_client()
    fake.push(http_error(401, "authentication_error", "invalid x-api-key"))
    with pytest.raises(LlmRequestError) as info:
        await call(client)
    err = info.value
    assert "401" in str(err) and "anthropic_api_key_file" in (err.hint or "")
    for shown in (str(err), repr(err), str(err.to_wire()), repr(client)):
        assert SECRET not in shown
    assert len(fake.requests) == 1


async def test_missing_key_fails_at_once(fake: FakeClaude, make_client: Any, tmp_path: Path) -> None:
    client = make_client(api_key=None)
    with pytest.raises(MissingApiKeyError) as info:
        await call(client)
    assert "ANTHROPIC_API_KEY" in str(info.value)
    assert "anthropic_api_key_file" in (info.value.hint or "")
    assert not info.value.retryable
    s = Settings(state_dir=tmp_path, anthropic_base_url=fake.url)
    from_settings = ClaudeClient.from_settings(s, NoLimiter(), None)
    with pytest.raises(MissingApiKeyError):
        await call(from_settings)
    await from_settings.close()
    assert fake.requests == []


async def test_from_settings_reads_the_key_file(
    fake: FakeClaude, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key_file = tmp_path / "anthropic.key"
    key_file.write_text(SECRET + "\n")
    s = Settings(state_dir=tmp_path, anthropic_api_key_file=key_file, anthropic_base_url=fake.url, llm_retries=0)
    client = ClaudeClient.from_settings(s, NoLimiter(), None)
    try:
        assert client.retries == 0 and SECRET not in repr(client)
        got = await call(client)
        assert got.content == [{"type": "text", "text": "ok"}]
    finally:
        await client.close()
    sent = fake.requests[0].headers
    assert SECRET in (sent.get("x-api-key", "") + sent.get("authorization", ""))
    # the environment variables work too
    monkeypatch.setenv("ANTHROPIC_API_KEY", SECRET)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.url)
    env_client = ClaudeClient.from_settings(Settings(state_dir=tmp_path), NoLimiter(), None)
    try:
        assert env_client.base_url == fake.url
        await call(env_client)
    finally:
        await env_client.close()
    assert len(fake.calls()) == 2


async def test_exhausted_retries_raise_llm_error(fake: FakeClaude, make_client: Any) -> None:
    client = make_client(retries=2)
    fake.script = lambda body: overloaded()
    with pytest.raises(LlmError) as info:
        await call(client)
    assert not isinstance(info.value, LlmRequestError)
    assert info.value.retryable and "3 times" in str(info.value) and "529" in str(info.value)
    assert len(fake.requests) == 3


async def test_breaker_opens_after_repeated_failures(fake: FakeClaude, make_client: Any) -> None:
    client = make_client(retries=0, breaker=CircuitBreaker(failure_threshold=2, recovery_s=60.0))
    fake.script = lambda body: overloaded()
    for _ in range(2):
        with pytest.raises(LlmError):
            await call(client)
    assert len(fake.requests) == 2
    with pytest.raises(LlmError) as info:
        await call(client)
    assert "circuit breaker" in str(info.value) and info.value.hint
    assert len(fake.requests) == 2  # failed at once, no request
    # after the recovery time a probe goes through and a success closes it
    client.breaker.opened_at -= 61.0
    fake.script = None
    assert (await call(client)).content[0]["text"] == "ok"
    assert client.breaker.state.value == "closed"


@pytest.fixture
def redis_url() -> Iterator[tuple[str, str]]:
    root = Path(tempfile.mkdtemp(prefix="casper-test-redis-"))
    server = EmbeddedRedis(root / "redis", free_port())
    server.start()
    try:
        yield server.url, server.password
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


async def test_deterministic_calls_hit_the_shared_cache(
    fake: FakeClaude, make_client: Any, redis_url: tuple[str, str]
) -> None:
    url, password = redis_url
    caches = [ResultCache(url, password=password), ResultCache(url, password=password)]  # two nodes, one Redis
    try:
        node_a, node_b = make_client(cache=caches[0]), make_client(cache=caches[1])
        fake.push(reply(text("the answer")))
        first = await call(node_a, deterministic=True, temperature=0.7)
        second = await call(node_b, deterministic=True)
        assert len(fake.requests) == 1
        assert fake.requests[0].body["temperature"] == 0.0
        assert not first.cached and first.usage.calls == 1 and first.usage.cost_usd > 0
        assert second.cached and second.content == first.content == [{"type": "text", "text": "the answer"}]
        assert second.usage.calls == 0 and second.usage.cost_usd == 0 and second.usage.total_tokens == 0
        assert second.saved is not None and second.saved.total_tokens == first.usage.total_tokens
        # concurrent identical calls on both nodes: still one request (single flight across "nodes")
        fake.push(reply(text("concurrent"), delay_s=0.3))
        other = [{"role": "user", "content": "something else"}]
        got = await asyncio.gather(
            call(node_a, deterministic=True, messages=other), call(node_b, deterministic=True, messages=other)
        )
        assert len(fake.requests) == 2
        assert [g.content[0]["text"] for g in got] == ["concurrent", "concurrent"]
        assert sorted(g.cached for g in got) == [False, True]
        # not deterministic: never cached
        await call(node_a)
        assert len(fake.requests) == 3
    finally:
        for c in caches:
            await c.close()


async def test_local_limiter_holds_the_rate_for_concurrent_callers(fake: FakeClaude, make_client: Any) -> None:
    rpm, burst = 240, 2  # 4 requests per second after a burst of 2
    fake.rpm_limit = rpm  # the API's headers agree with the setting (they would override it)
    client = make_client(limiter=LocalLimiter(rpm=rpm, tpm=10**8, burst=burst))

    async def caller(i: int) -> None:
        for j in range(4):
            await call(client, messages=[{"role": "user", "content": f"caller {i} call {j}"}])

    await asyncio.wait_for(asyncio.gather(*(caller(i) for i in range(4))), 60)
    times = sorted(r.t for r in fake.requests)
    assert len(times) == 16 and all(r.status == 200 for r in fake.requests)
    for i in range(len(times)):
        for j in range(i + 1, len(times)):
            allowed = burst + rpm / 60 * (times[j] - times[i]) + 1  # +1: arrival jitter on loopback
            assert j - i + 1 <= allowed, f"{j - i + 1} requests in {times[j] - times[i]:.3f}s"


# --- streaming -----------------------------------------------------------------------------------------
async def test_a_stream_longer_than_the_timeout_succeeds_while_events_keep_coming(
    fake: FakeClaude, make_client: Any
) -> None:
    client = make_client(timeout_s=0.6, retries=0)
    # six blocks, 0.4 s between events, a ping every 0.2 s: ~5 s in all, far past the 0.6 s idle timeout
    fake.push(reply(*(text(f"part {i} ") for i in range(5)), text("end"), gap_s=0.4, ping_s=0.2))
    got = await call(client)
    assert got.text == "".join(f"part {i} " for i in range(5)) + "end"
    assert got.stop_reason == "end_turn" and got.usage.output_tokens > 0
    assert len(fake.calls()) == 1


async def test_a_silent_stream_hits_the_idle_timeout_and_is_retried(fake: FakeClaude, make_client: Any) -> None:
    client = make_client(timeout_s=0.5, retries=1)
    fake.push(reply(text("a"), text("b"), gap_s=2.0), reply(text("second try")))  # 2 s of silence
    got = await call(client)
    assert got.text == "second try"
    assert len(fake.recorded()) == 2


async def test_an_error_event_mid_stream_is_classified_and_retried(fake: FakeClaude, make_client: Any) -> None:
    client = make_client(retries=2)
    overloaded_event = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    fake.push(reply(text("half"), stream_error=overloaded_event), reply(text("whole")))
    got = await call(client)
    assert got.text == "whole"
    assert fake.billed()["calls"] == 1  # the broken stream was not billed, nor counted


async def test_an_invalid_request_error_event_is_not_retried(fake: FakeClaude, make_client: Any) -> None:
    client = make_client(retries=3)
    bad = {"type": "error", "error": {"type": "invalid_request_error", "message": "nope"}}
    fake.push(reply(text("x"), stream_error=bad))
    with pytest.raises(LlmRequestError) as info:
        await call(client)
    assert info.value.details["status"] == 400 and len(fake.recorded()) == 1


async def test_max_tokens_mid_tool_use_comes_back_as_a_cut_answer(fake: FakeClaude, make_client: Any) -> None:
    client = make_client()
    use = tool_use("write_file", {"path": "a.py", "content": "x = 1\n" * 50})
    fake.push(reply(use, stop_reason="max_tokens", truncate_tool_input=True))
    got = await call(client)
    assert got.stop_reason == "max_tokens"
    assert got.content[-1]["type"] == "tool_use" and got.content[-1]["input"] != use["input"]


async def test_usage_sums_match_the_servers_bill(fake: FakeClaude, make_client: Any) -> None:
    client = make_client()
    total = {"input_tokens": 0, "output_tokens": 0, "cache_read_tokens": 0, "cache_write_tokens": 0, "calls": 0}
    messages: list[dict[str, Any]] = [{"role": "user", "content": "start " * 300}]
    for i in range(4):
        fake.push(reply(text(f"answer {i}")))
        got = await call(client, messages=messages)
        for k in total:
            total[k] += getattr(got.usage, k)
        messages = [*messages, {"role": "assistant", "content": got.content}, {"role": "user", "content": f"more {i}"}]
    assert total == fake.billed()
    assert total["cache_read_tokens"] > 0  # the conversation so far is read from the cache


async def test_the_limiter_follows_rate_limit_headers_that_rise_and_fall(fake: FakeClaude, make_client: Any) -> None:
    limiter = LocalLimiter(rpm=50, tpm=100_000)  # the settings' defaults
    client = make_client(limiter=limiter)
    fake.rpm_limit, fake.tpm_limit, fake.otpm_limit = 4000, 2_000_000, 400_000
    await call(client)
    snap = limiter.snapshot()
    assert (snap["rpm"], snap["input_tpm"], snap["output_tpm"]) == (4000, 2_000_000, 400_000)
    assert snap["learned_from_api"] and snap["output_tokens"] > 0
    fake.rpm_limit = 20  # the account's limit falls...
    await call(client)
    assert limiter.snapshot()["rpm"] == 20
    fake.rpm_limit = 1000  # ...and rises again: the limiter follows at once, no slow recovery
    await call(client)
    assert limiter.snapshot()["rpm"] == 1000
