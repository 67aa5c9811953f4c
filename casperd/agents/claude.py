"""The Claude client: ``anthropic.AsyncAnthropic`` with CASPER's limits, retries and caching.

* Every HTTP attempt first takes a grant from the (mesh-wide) :class:`~casperd.agents.ratelimit.Limiter`
  and reports every response's rate-limit headers back to it, so one node's 429 pauses the mesh.
* The SDK's own retries are off; CASPER retries 408/409/429/5xx/529, timeouts and connection
  errors up to ``retries`` times, waiting ``retry-after`` when the API names it, else an
  exponential backoff with jitter. Other 4xx are :class:`~casperd.errors.LlmRequestError`
  (not retryable); spent retries are :class:`~casperd.errors.LlmError` (retryable later).
* A circuit breaker around the API makes calls fail at once while the API keeps failing.
* Every call is streamed; ``timeout_s`` is the idle timeout between stream events
  (:mod:`casperd.agents.apicall`).
* The stable prefix (system prompt, tool definitions) and the newest turn are marked for prompt
  caching (``cache_turns=False``: the prefix only, as before; ``cache=False`` on a call: nothing).
* The limiter is charged the estimated input tokens before a call and settled with the real
  input and output tokens after it.
* ``deterministic=True`` calls (temperature 0) go through the shared result cache: the mesh
  pays for one identical call once.

The API key is never logged, put in an exception or shown by ``repr``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from casperd import calltrace
from casperd.agents.lazysdk import load_sdk
from casperd.agents.modelreply import Reply, block_dict
from casperd.agents.ratelimit import Limiter, estimate_tokens, parse_rate_headers
from casperd.agents.usage import Usage, cost_of
from casperd.breaker import BreakerState, CircuitBreaker
from casperd.cache import ResultCache, cache_key
from casperd.errors import LlmError, LlmRequestError, MissingApiKeyError
from casperd.retry import RetryPolicy
from casperd.settings import Settings
from casperd.settingtables import ModelPrice

if TYPE_CHECKING:  # loaded on a node's first model call (load_sdk): the SDK, httpx and anyio add ~40 MB RSS
    import anthropic

    from casperd.agents import apicall

log = logging.getLogger("casperd.agents.claude")

MAX_RETRY_AFTER_S = 300.0
"""A longer ``retry-after`` is cut to this (the limiter still pauses the mesh for the full time)."""


class ClaudeClient:
    """See the module docstring."""

    def __init__(
        self,
        *,
        api_key: str | None,
        base_url: str | None,
        timeout_s: float = 120.0,
        retries: int = 4,
        limiter: Limiter,
        prices: Mapping[str, ModelPrice],
        cache: ResultCache | None = None,
        breaker: CircuitBreaker | None = None,
        backoff: RetryPolicy | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        cache_turns: bool = True,
    ) -> None:
        self._api_key = api_key or None
        self.base_url = base_url or None
        self.timeout_s = timeout_s
        self.retries = max(0, retries)
        self.limiter = limiter
        self.prices = prices
        self.cache = cache
        self.breaker = breaker if breaker is not None else CircuitBreaker(failure_threshold=5, recovery_s=60.0)
        self.backoff = (
            backoff
            if backoff is not None
            else RetryPolicy(max_attempts=self.retries + 1, base_s=1.0, factor=2.0, cap_s=30.0)
        )
        self._sleep = sleep
        self.cache_turns = cache_turns
        self._client: anthropic.AsyncAnthropic | None = None
        self.calls = 0
        self.cache_hits = 0
        self.last_call: dict[str, Any] | None = None
        """The last API request: outcome, HTTP status, latency, when (caspectl health's api check)."""
        self.on_call: Callable[[float, str], None] | None = None
        """Called with (seconds, outcome) after every API request (the api_response_time metric)."""
        if self._api_key:
            from casperd.logsetup import register_secret

            register_secret(self._api_key)

    @classmethod
    def from_settings(cls, s: Settings, limiter: Limiter, cache: ResultCache | None) -> ClaudeClient:
        from casperd.transport import read_secret_file

        key = read_secret_file(s.anthropic_api_key_file, "Anthropic API key") or os.environ.get("ANTHROPIC_API_KEY")
        base_url = s.anthropic_base_url or os.environ.get("ANTHROPIC_BASE_URL") or None
        return cls(
            api_key=key or None,
            base_url=base_url,
            timeout_s=s.llm_timeout_s,
            retries=s.llm_retries,
            limiter=limiter,
            prices=s.model_prices,
            cache=cache,
            breaker=CircuitBreaker(failure_threshold=s.breaker_failures, recovery_s=s.breaker_recovery_s),
            backoff=RetryPolicy(max_attempts=s.llm_retries + 1, base_s=1.0, factor=2.0, cap_s=30.0),
        )

    def __repr__(self) -> str:
        return (
            f"ClaudeClient(base_url={self.base_url!r}, key={'set' if self._api_key else 'missing'}, "
            f"retries={self.retries}, breaker={self.breaker.state.value})"
        )

    @property
    def has_key(self) -> bool:
        return self._api_key is not None

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    def _sdk(self) -> anthropic.AsyncAnthropic:  # after load_sdk()
        import anthropic

        from casperd.agents import apicall

        if self._client is None:
            self._client = anthropic.AsyncAnthropic(
                api_key=self._api_key,
                base_url=self.base_url,
                timeout=apicall.idle_timeout(self.timeout_s),
                max_retries=0,  # CASPER retries (below), through the mesh's rate limiter
            )
        return self._client

    # --- the call
    async def create(
        self,
        *,
        model: str,
        system: str,
        messages: list[dict[str, Any]],
        max_tokens: int,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: dict[str, Any] | None = None,
        temperature: float | None = None,
        deterministic: bool = False,
        cache: bool = True,
    ) -> Reply:
        """One Messages API call (streamed). ``cache=False``: no prompt-cache breakpoints.

        Raises:
            MissingApiKeyError: no key is configured.
            LlmRequestError: the API refused the request (4xx other than 408/409/429); not retryable.
            LlmError: the retries are spent (429, 5xx, 529, timeouts, network); retryable later.
        """
        if not self._api_key:
            raise MissingApiKeyError(
                "no Anthropic API key on this node: ANTHROPIC_API_KEY is not set in the environment casperd was "
                "started with, and no anthropic_api_key_file is configured",
                hint="the key must reach the nodes, not caspectl: export ANTHROPIC_API_KEY before starting casperd "
                "(or 'casperd up') and restart it, or set anthropic_api_key_file (--anthropic-api-key-file / "
                "CASPER_ANTHROPIC_API_KEY_FILE) to a file holding the key",
            )
        calltrace.mark("create")
        if deterministic:
            temperature = 0.0
        await load_sdk()
        from casperd.agents import apicall

        params = apicall.build_params(
            model,
            system,
            messages,
            max_tokens,
            tools,
            tool_choice,
            temperature,
            cache_prefix=cache,
            cache_turns=self.cache_turns,
        )
        estimate = estimate_tokens(system, messages, tools)
        if not (deterministic and self.cache is not None and self.cache.enabled):
            return await self._call(params, estimate)

        key = cache_key("llm", model, system, messages, tools, tool_choice, max_tokens)
        computed = False

        async def compute() -> dict[str, Any]:
            nonlocal computed
            reply = await self._call(params, estimate)
            computed = True
            return reply.to_dict()

        value = await self.cache.get_or_compute(key, compute)
        reply = Reply.from_dict(value)
        if not computed:  # another call (this process or another node) paid for it
            self.cache_hits += 1
            reply.saved, reply.usage, reply.cached = reply.usage, Usage(), True
            log.debug("claude %s: served from the result cache (%d tokens saved)", model, reply.saved.total_tokens)
        return reply

    async def _call(self, params: dict[str, Any], estimate: int) -> Reply:
        if not self.breaker.allow(time.monotonic()):
            wait = max(0.0, self.breaker.opened_at + self.breaker.recovery_s - time.monotonic())
            raise LlmError(
                "the model API circuit breaker is open after repeated failures",
                hint=f"calls resume in about {wait:.0f}s; check the API status and the logs",
            )
        try:
            reply = await self._attempts(params, estimate)
        except LlmRequestError:
            self.breaker.record_success()  # the API answered: it is up, the request was wrong
            raise
        except LlmError:
            self.breaker.record_failure(time.monotonic())
            if self.breaker.state is BreakerState.OPEN:
                log.warning("claude: circuit breaker opened after %d failed calls", self.breaker.failures)
            raise
        except BaseException:
            self.breaker.release_probe()
            raise
        self.breaker.record_success()
        return reply

    def _observed(self, t0: float, outcome: str, status: int | None = None) -> None:
        took = time.monotonic() - t0
        self.last_call = {"outcome": outcome, "status": status, "ms": round(took * 1000, 1), "at": time.time()}
        if self.on_call is not None:
            self.on_call(took, outcome)

    async def _attempts(self, params: dict[str, Any], estimate: int) -> Reply:
        await load_sdk()
        import anthropic

        from casperd.agents import apicall

        model = str(params["model"])
        sdk = self._sdk()
        attempt = 0
        while True:
            attempt += 1
            await self.limiter.acquire(estimate)
            calltrace.mark("http start")
            t0 = time.monotonic()
            retry_after: float | None = None
            try:
                answer = await apicall.stream_once(sdk, params)
            except anthropic.APIStatusError as exc:
                status, kind, detail = apicall.error_info(exc)
                self._observed(t0, "error" if apicall.is_retryable(status) else "refused", status)
                obs = parse_rate_headers(exc.response.headers, status, time.time())
                self.limiter.observe(obs)
                self.limiter.settle(estimate, 0, 0)
                log.debug(
                    "claude %s: HTTP %d %s after %.0f ms (attempt %d)",
                    model,
                    status,
                    kind,
                    (time.monotonic() - t0) * 1000,
                    attempt,
                )
                if not apicall.is_retryable(status):
                    raise LlmRequestError(
                        f"the model API refused the request: HTTP {status} {kind}: {detail}",
                        hint=apicall.request_hint(status),
                        status=status,
                        request_id=getattr(exc, "request_id", None),
                    ) from None
                reason = f"HTTP {status} {kind}"
                retry_after = obs.retry_after_s
            except apicall.TIMEOUTS:
                self._observed(t0, "timeout")
                self.limiter.settle(estimate, 0, 0)
                reason = f"no stream event for {self.timeout_s:g}s (idle timeout)"
            except apicall.TRANSPORT_ERRORS as exc:
                self._observed(t0, "connection")
                self.limiter.settle(estimate, 0, 0)
                reason = f"connection error ({type(exc.__cause__ or exc).__name__})"
            except anthropic.APIResponseValidationError:
                self._observed(t0, "malformed")
                self.limiter.settle(estimate, 0, 0)
                reason = "malformed response"
            else:
                calltrace.mark("sdk reply")
                self._observed(t0, "ok", 200)
                return self._reply(answer, model, estimate, t0, attempt)
            if attempt > self.retries:
                raise LlmError(
                    f"the model API call failed {attempt} times; last: {reason}",
                    hint="the task can be retried later; check the API status and rate limits",
                    reason=reason,
                )
            wait = min(retry_after, MAX_RETRY_AFTER_S) if retry_after is not None else self._jittered(attempt)
            log.warning("claude %s: %s; retry %d/%d in %.2fs", model, reason, attempt, self.retries, wait)
            await self._sleep(wait)

    def _jittered(self, failed: int) -> float:
        base = self.backoff.backoff(failed)
        return base * (0.5 + random.random() / 2)

    def _reply(self, answer: apicall.Answer, model: str, estimate: int, t0: float, attempt: int) -> Reply:
        msg = answer.message
        self.limiter.observe(parse_rate_headers(answer.headers, 200, time.time()))
        u = msg.usage
        inp = int(getattr(u, "input_tokens", 0) or 0)
        out = int(getattr(u, "output_tokens", 0) or 0)
        cread = int(getattr(u, "cache_read_input_tokens", 0) or 0)
        cwrite = int(getattr(u, "cache_creation_input_tokens", 0) or 0)
        answered_model = str(getattr(msg, "model", None) or model)
        usage = Usage(
            input_tokens=inp,
            output_tokens=out,
            cache_read_tokens=cread,
            cache_write_tokens=cwrite,
            calls=1,
            cost_usd=cost_of(answered_model, inp, out, cread, cwrite, self.prices),
        )
        # the API's input-token limit counts uncached input and cache writes, not cache reads
        self.limiter.settle(estimate, inp + cwrite, out)
        self.calls += 1
        request_id = answer.headers.get("request-id")
        log.debug(
            "claude %s: HTTP 200 %s, %d in + %d out tokens (cache read %d, write %d), %.0f ms, attempt %d",
            answered_model,
            msg.stop_reason,
            inp,
            out,
            cread,
            cwrite,
            (time.monotonic() - t0) * 1000,
            attempt,
        )
        return Reply(
            content=[block_dict(b) for b in msg.content],
            stop_reason=msg.stop_reason,
            model=answered_model,
            usage=usage,
            request_id=request_id,
        )
