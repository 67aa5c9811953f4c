"""One Messages API request: its parameters (with prompt-cache breakpoints), one streamed attempt,
and what an error answer means.

Every call is streamed (``messages.stream``): the SDK's own guard against long non-streaming
requests never applies, and the client's timeout is an *idle* timeout — the longest wait for the
next bytes of the event stream (the API sends ``ping`` events while the model thinks), not a
wall on the whole answer.

Prompt caching (``cache_turns=True``): besides the stable prefix (system prompt, last tool), the
last content block of the newest message carries a breakpoint, so each request reads the whole
conversation before it from the cache and writes only its new turn — three breakpoints in all,
within the API's four. The API finds the previous request's breakpoint by its 20-block lookback.

Errors arriving as an ``error`` event inside a 200 stream are classified by their type, as the
status the API would have answered with (``overloaded_error`` → 529, ``api_error`` → 500, ...).
"""

from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass
from typing import Any

import anthropic

try:  # the SDK's HTTP client: httpx2 in recent SDKs, httpx before
    _httpx: Any = importlib.import_module("httpx2")
except ImportError:  # pragma: no cover - depends on the installed SDK
    _httpx = importlib.import_module("httpx")

CACHE_CONTROL = {"type": "ephemeral"}
MAX_BREAKPOINTS = 4
RETRYABLE_STATUS = frozenset({408, 409, 429})
"""Plus every 5xx (500-599, 529 overloaded)."""
ERROR_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}
TIMEOUTS: tuple[type[BaseException], ...] = (anthropic.APITimeoutError, _httpx.TimeoutException)
"""A timeout: the SDK's before a stream starts, the HTTP client's when a stream goes idle."""
TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (anthropic.APIConnectionError, _httpx.TransportError)
"""A lost connection: the SDK's before a stream starts, the HTTP client's while it is read."""


def is_retryable(status: int) -> bool:
    return status in RETRYABLE_STATUS or 500 <= status <= 599


def idle_timeout(seconds: float) -> anthropic.Timeout:
    """An idle timeout: every read waits at most ``seconds`` for the next bytes; connecting at most 10 s."""
    return anthropic.Timeout(seconds, connect=min(10.0, seconds))


def _marked_last(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``messages`` with a cache breakpoint on the last block of the newest message (a copy)."""
    if not messages:
        return messages
    last = dict(messages[-1])
    content = last.get("content")
    blocks = [{"type": "text", "text": content}] if isinstance(content, str) else copy.deepcopy(content or [])
    if not blocks:
        return messages
    blocks[-1] = {**blocks[-1], "cache_control": dict(CACHE_CONTROL)}
    last["content"] = blocks
    return [*messages[:-1], last]


def build_params(
    model: str,
    system: str,
    messages: list[dict[str, Any]],
    max_tokens: int,
    tools: list[dict[str, Any]] | None,
    tool_choice: dict[str, Any] | None,
    temperature: float | None,
    *,
    cache_prefix: bool = True,
    cache_turns: bool = True,
) -> dict[str, Any]:
    """The SDK's keyword arguments of one request (see the module docstring for the breakpoints)."""
    params: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "messages": messages}
    if system:
        block: dict[str, Any] = {"type": "text", "text": system}
        if cache_prefix:
            block["cache_control"] = dict(CACHE_CONTROL)
        params["system"] = [block]
    if tools:
        marked = [dict(t) for t in tools]
        if cache_prefix:
            marked[-1] = {**copy.deepcopy(tools[-1]), "cache_control": dict(CACHE_CONTROL)}
        params["tools"] = marked
    if cache_prefix and cache_turns:
        params["messages"] = _marked_last(messages)
    if tool_choice is not None:
        params["tool_choice"] = tool_choice
    if temperature is not None:
        # newer SDKs dropped the keyword (the API still takes the field): send it as a body field
        params["extra_body"] = {"temperature": temperature}
    return params


@dataclass
class Answer:
    """The final message of one streamed request and its response headers."""

    message: Any
    headers: Any


async def stream_once(sdk: anthropic.AsyncAnthropic, params: dict[str, Any]) -> Answer:
    """One streamed request to its final message. Raises what the SDK and HTTP client raise."""
    async with sdk.messages.stream(**params) as stream:
        headers = stream.response.headers
        message = await stream.get_final_message()
    return Answer(message, headers)


def error_info(exc: anthropic.APIStatusError) -> tuple[int, str, str]:
    """The status (an error event's type mapped to its HTTP status), the API's error type and
    message (never the request)."""
    body: dict[str, Any] = exc.body if isinstance(exc.body, dict) else {}
    nested = body.get("error")
    err: dict[str, Any] = nested if isinstance(nested, dict) else body
    kind = str(err.get("type") or "error")
    message = str(err.get("message") or f"HTTP {exc.status_code}")
    status = int(exc.status_code)
    if status < 400:  # an error event inside a 200 stream
        status = ERROR_STATUS.get(kind, 500)
    return status, kind, message[:500]


def request_hint(status: int) -> str:
    if status == 401:
        return "the API key was rejected: check ANTHROPIC_API_KEY or the anthropic_api_key_file setting"
    if status == 402:
        return "the account cannot be billed: check the plan and billing in the Anthropic console"
    if status == 403:
        return "the API key may not use this model or feature"
    if status == 404:
        return "check the model name (the models setting) and anthropic_base_url"
    if status == 413:
        return "the request is too large: shorten the conversation or the tool output"
    return "the request is invalid; it will fail the same way if repeated"
