"""FakeClaude: a local, scripted server speaking the Anthropic Messages API (``POST /v1/messages``).

Stdlib only. It runs in a daemon thread of the test process, bound to 127.0.0.1 on a free port, so
separate processes (the mesh's developer nodes) can call it over HTTP with
``ANTHROPIC_BASE_URL=fake.url``; all scripting happens here, in the server.

    with FakeClaude() as fake:
        fake.push(reply(tool_use("read_file", {"path": "a.py"})), reply(text("done")))
        ...  # point the client at fake.url
        assert len(fake.calls()) == 2

Requests are validated the way the real API does (400 ``invalid_request_error``; 401 without an
``x-api-key``), every request is recorded (:attr:`FakeClaude.requests`), usage is computed
deterministically (tokens = ceil(len(JSON) / 4)) with a prompt-cache simulation, and every answer
carries ``request-id`` and ``anthropic-ratelimit-*`` headers. With ``rpm_limit`` / ``tpm_limit``
the server enforces a sliding 60 s window itself (429 with ``retry-after``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = [
    "FakeClaude",
    "Recorded",
    "Response",
    "http_error",
    "last_user_text",
    "overloaded",
    "rate_limited",
    "reply",
    "text",
    "tokens_of",
    "tool_use",
]

DEFAULT_RPM = 4000
DEFAULT_TPM = 400_000
WINDOW_S = 60.0


# --- response builders ------------------------------------------------------------------------
@dataclass
class Response:
    """One scripted answer: a message (status 200, ``content``) or an error (``error`` body)."""

    status: int = 200
    content: list[dict[str, Any]] = field(default_factory=list)
    stop_reason: str | None = None
    usage: dict[str, int] | None = None
    """Overrides of the computed usage fields (e.g. ``{"output_tokens": 7}``)."""
    error: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    """Extra latency of this answer (on top of the server's ``latency_s``)."""


def text(s: str) -> dict[str, Any]:
    return {"type": "text", "text": s}


def tool_use(name: str, input: dict[str, Any], id: str | None = None) -> dict[str, Any]:
    return {"type": "tool_use", "id": id or f"toolu_{secrets.token_hex(12)}", "name": name, "input": input}


def reply(
    *blocks: dict[str, Any], stop_reason: str | None = None, usage: dict[str, int] | None = None, delay_s: float = 0.0
) -> Response:
    if stop_reason is None:
        stop_reason = "tool_use" if any(b.get("type") == "tool_use" for b in blocks) else "end_turn"
    return Response(status=200, content=list(blocks), stop_reason=stop_reason, usage=usage, delay_s=delay_s)


def http_error(
    status: int,
    type: str,
    message: str,
    retry_after: float | None = None,
    headers: dict[str, str] | None = None,
    delay_s: float = 0.0,
) -> Response:
    hdrs = dict(headers or {})
    if retry_after is not None:
        hdrs["retry-after"] = _fmt_seconds(retry_after)
    return Response(
        status=status,
        error={"type": "error", "error": {"type": type, "message": message}},
        headers=hdrs,
        delay_s=delay_s,
    )


def overloaded(message: str = "Overloaded") -> Response:
    return http_error(529, "overloaded_error", message)


def rate_limited(retry_after_s: float, message: str = "Number of requests has exceeded your rate limit") -> Response:
    return http_error(429, "rate_limit_error", message, retry_after=retry_after_s)


def _fmt_seconds(s: float) -> str:
    return str(int(s)) if float(s).is_integer() else f"{s:g}"


# --- request helpers --------------------------------------------------------------------------
def tokens_of(obj: Any) -> int:
    """The fake's deterministic token count: ceil(len(compact JSON) / 4)."""
    if not obj:
        return 0
    return math.ceil(len(json.dumps(obj, separators=(",", ":"), sort_keys=True, default=str)) / 4)


def _blocks(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list):
        return [b for b in content if isinstance(b, dict)]
    return []


def last_user_text(body: dict[str, Any]) -> str:
    """The text of the last user message of a request body (string content, or text blocks joined)."""
    for msg in reversed(body.get("messages") or []):
        if isinstance(msg, dict) and msg.get("role") == "user":
            content = msg.get("content")
            if isinstance(content, str):
                return content
            return "\n".join(str(b.get("text", "")) for b in _blocks(content) if b.get("type") == "text")
    return ""


@dataclass
class Recorded:
    t: float
    """time.monotonic() when the request arrived."""
    body: dict[str, Any]
    headers: dict[str, str]
    status: int = 0
    """What was answered (0 while the request is still being served)."""
    path: str = "/v1/messages"


class _InvalidRequest(Exception):
    def __init__(self, status: int, type: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.type = type
        self.message = message


def _validate(body: Any) -> None:
    def bad(message: str) -> _InvalidRequest:
        return _InvalidRequest(400, "invalid_request_error", message)

    if not isinstance(body, dict):
        raise bad("request body must be a JSON object")
    for name in ("model", "max_tokens", "messages"):
        if name not in body:
            raise bad(f"{name}: Field required")
    if not isinstance(body["model"], str) or not body["model"]:
        raise bad("model: Input should be a non-empty string")
    if not isinstance(body["max_tokens"], int) or isinstance(body["max_tokens"], bool) or body["max_tokens"] < 1:
        raise bad("max_tokens: Input should be an integer greater than or equal to 1")
    messages = body["messages"]
    if not isinstance(messages, list) or not messages:
        raise bad("messages: at least one message is required")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or msg.get("role") not in ("user", "assistant"):
            raise bad(f"messages.{i}.role: Input should be 'user' or 'assistant'")
        content = msg.get("content")
        if not isinstance(content, (str, list)):
            raise bad(f"messages.{i}.content: Input should be a string or a list of content blocks")
        if isinstance(content, list) and any(not isinstance(b, dict) or "type" not in b for b in content):
            raise bad(f"messages.{i}.content: every content block needs a type")
    if messages[0]["role"] != "user":
        raise bad('messages: first message must use the "user" role')
    for i in range(1, len(messages)):
        if messages[i]["role"] == messages[i - 1]["role"]:
            raise bad(f'messages: roles must alternate between "user" and "assistant" (messages.{i})')
    for i, msg in enumerate(messages):
        if msg["role"] != "user":
            continue
        results = [b for b in _blocks(msg["content"]) if b.get("type") == "tool_result"]
        prev_ids = (
            {b.get("id") for b in _blocks(messages[i - 1]["content"]) if b.get("type") == "tool_use"}
            if i > 0
            else set()
        )
        for b in results:
            if b.get("tool_use_id") not in prev_ids:
                raise bad(
                    f"messages.{i}.content: unexpected `tool_use_id` found in `tool_result` blocks: "
                    f"{b.get('tool_use_id')}. Each `tool_result` block must have a corresponding "
                    f"`tool_use` block in the previous message."
                )
    for i, msg in enumerate(messages[:-1]):
        if msg["role"] != "assistant":
            continue
        uses = [b.get("id") for b in _blocks(msg["content"]) if b.get("type") == "tool_use"]
        answered = {b.get("tool_use_id") for b in _blocks(messages[i + 1]["content"]) if b.get("type") == "tool_result"}
        missing = [u for u in uses if u not in answered]
        if missing:
            raise bad(
                f"messages.{i}: `tool_use` ids were found without `tool_result` blocks immediately after: "
                f"{', '.join(str(m) for m in missing)}. Each `tool_use` block must have a corresponding "
                f"`tool_result` block in the next message."
            )
    system = body.get("system")
    if system is not None and not isinstance(system, (str, list)):
        raise bad("system: Input should be a string or a list of text blocks")
    tools = body.get("tools")
    if tools is not None and (
        not isinstance(tools, list) or any(not isinstance(t, dict) or "name" not in t for t in tools)
    ):
        raise bad("tools: every tool needs a name")


def _rfc3339(wall: float) -> str:
    return datetime.fromtimestamp(wall, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- the server -------------------------------------------------------------------------------
class FakeClaude:
    """A scripted Messages API on 127.0.0.1 (see the module docstring)."""

    def __init__(
        self,
        script: Callable[[dict[str, Any]], Response] | None = None,
        latency_s: float = 0.0,
        rpm_limit: int | None = None,
        tpm_limit: int | None = None,
    ) -> None:
        self.script = script
        self.latency_s = latency_s
        self.rpm_limit = rpm_limit
        self.tpm_limit = tpm_limit
        self.requests: list[Recorded] = []
        self._lock = threading.Lock()
        self._queue: deque[Response] = deque()
        self._prefixes: set[str] = set()
        self._window: deque[tuple[float, int]] = deque()  # (arrival, tokens) of accepted requests
        self._conns: set[socket.socket] = set()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle
    def start(self) -> FakeClaude:
        if self._server is not None:
            return self
        fake = self

        class Handler(_Handler):
            owner = fake

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="fakeclaude", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:  # keep-alive connections must not outlive the server
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> FakeClaude:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("FakeClaude is not running")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- scripting and inspection
    def push(self, *responses: Response) -> None:
        with self._lock:
            self._queue.extend(responses)

    def pending(self) -> int:
        with self._lock:
            return len(self._queue)

    def calls(self) -> list[Recorded]:
        """Requests answered 200."""
        with self._lock:
            return [r for r in self.requests if r.status == 200]

    def recorded(self) -> list[Recorded]:
        """A snapshot of every request so far."""
        with self._lock:
            return list(self.requests)

    @staticmethod
    def tool_results(req: Recorded | dict[str, Any]) -> list[dict[str, Any]]:
        """The tool_result blocks of the last user message of a request."""
        body = req.body if isinstance(req, Recorded) else req
        for msg in reversed(body.get("messages") or []):
            if isinstance(msg, dict) and msg.get("role") == "user":
                return [b for b in _blocks(msg.get("content")) if b.get("type") == "tool_result"]
        return []

    # --- serving (runs in the server's threads)
    def _next_response(self, body: dict[str, Any]) -> Response:
        script = self.script
        if script is not None:
            return script(body)
        with self._lock:
            if self._queue:
                return self._queue.popleft()
        return reply(text("ok"))

    def _usage(self, body: dict[str, Any], content: list[dict[str, Any]]) -> dict[str, int]:
        system = body.get("system")
        system_blocks = _blocks(system) if system is not None else []
        items: list[Any] = [{"tool": t} for t in body.get("tools") or []] + [{"system": b} for b in system_blocks]
        last_cc = max((i for i, it in enumerate(items) if "cache_control" in next(iter(it.values()))), default=-1)
        out = tokens_of(content)
        if last_cc < 0:
            return {
                "input_tokens": tokens_of([items, body["messages"]]),
                "output_tokens": out,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
            }
        prefix, rest = items[: last_cc + 1], items[last_cc + 1 :]
        prefix_tokens = tokens_of(prefix)
        digest = hashlib.sha256(json.dumps([body["model"], prefix], sort_keys=True, default=str).encode()).hexdigest()
        with self._lock:
            seen = digest in self._prefixes
            self._prefixes.add(digest)
        return {
            "input_tokens": tokens_of([rest, body["messages"]]),
            "output_tokens": out,
            "cache_creation_input_tokens": 0 if seen else prefix_tokens,
            "cache_read_input_tokens": prefix_tokens if seen else 0,
        }

    def _limits(self, now: float, wall: float, cost: int, admit: bool) -> tuple[dict[str, str], float | None]:
        """Rate-limit headers and, when ``admit`` and the window is full, the retry-after (seconds)."""
        rpm = self.rpm_limit or DEFAULT_RPM
        tpm = self.tpm_limit or DEFAULT_TPM
        with self._lock:
            while self._window and self._window[0][0] <= now - WINDOW_S:
                self._window.popleft()
            used_req = len(self._window)
            used_tok = sum(c for _, c in self._window)
            retry: float | None = None
            if admit and self.rpm_limit is not None and used_req + 1 > rpm:
                retry = self._window[0][0] + WINDOW_S - now
            if admit and self.tpm_limit is not None and used_tok + cost > tpm and self._window:
                freed, t_free = used_tok, now
                for t, c in self._window:
                    freed -= c
                    t_free = t + WINDOW_S
                    if freed + cost <= tpm:
                        break
                retry = max(retry or 0.0, t_free - now)
            if admit and retry is None:
                self._window.append((now, cost))
                used_req += 1
                used_tok += cost
            oldest = self._window[0][0] if self._window else now
        reset = _rfc3339(wall + max(0.0, oldest + WINDOW_S - now))
        headers = {
            "anthropic-ratelimit-requests-limit": str(rpm),
            "anthropic-ratelimit-requests-remaining": str(max(0, rpm - used_req)),
            "anthropic-ratelimit-requests-reset": reset,
            "anthropic-ratelimit-tokens-limit": str(tpm),
            "anthropic-ratelimit-tokens-remaining": str(max(0, tpm - used_tok)),
            "anthropic-ratelimit-tokens-reset": reset,
        }
        return headers, (None if retry is None else max(1, math.ceil(retry)))

    def _serve(self, rec: Recorded) -> tuple[int, dict[str, Any], dict[str, str]]:
        now, wall = rec.t, time.time()
        if rec.path.split("?", 1)[0] != "/v1/messages":
            return 404, _err("not_found_error", f"{rec.path}: not found"), {}
        auth = rec.headers.get("authorization", "")
        if not rec.headers.get("x-api-key") and not (auth.startswith("Bearer ") and auth[7:].strip()):
            # the SDK sends the key as x-api-key or (newer versions) as "Authorization: Bearer"
            return 401, _err("authentication_error", "x-api-key header is required"), {}
        try:
            _validate(rec.body)
        except _InvalidRequest as exc:
            return exc.status, _err(exc.type, exc.message), {}
        body = rec.body
        headers, retry = self._limits(
            now, wall, tokens_of([body.get("tools"), body.get("system"), body["messages"]]), admit=True
        )
        if retry is not None:
            headers["retry-after"] = str(retry)
            return 429, _err("rate_limit_error", "This request would exceed your rate limit"), headers
        if self.latency_s > 0:
            time.sleep(self.latency_s)
        try:
            resp = self._next_response(body)
        except Exception as exc:  # a broken script is a server error, not a hung test
            return 500, _err("api_error", f"fake script failed: {type(exc).__name__}: {exc}"), headers
        if resp.delay_s > 0:
            time.sleep(resp.delay_s)
        headers.update(resp.headers)
        if resp.status != 200:
            return resp.status, resp.error or _err("api_error", f"HTTP {resp.status}"), headers
        usage = self._usage(body, resp.content)
        usage.update(resp.usage or {})
        message = {
            "id": f"msg_{secrets.token_hex(12)}",
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": resp.content,
            "stop_reason": resp.stop_reason,
            "stop_sequence": None,
            "usage": usage,
        }
        return 200, message, headers


def _err(type: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": type, "message": message}}


class _Handler(BaseHTTPRequestHandler):
    owner: FakeClaude
    protocol_version = "HTTP/1.1"
    timeout = 60  # an idle keep-alive connection is dropped after this

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet

    def setup(self) -> None:
        super().setup()
        with self.owner._lock:
            self.owner._conns.add(self.connection)

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()
        with self.owner._lock:
            self.owner._conns.discard(self.connection)

    def _read_body(self) -> Any:
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length > 0 else b""
        if not raw:
            return {}
        try:
            return json.loads(raw)
        except ValueError:
            return None

    def _handle(self) -> None:
        t = time.monotonic()
        raw_body = self._read_body() if self.command in ("POST", "PUT", "PATCH") else {}
        rec = Recorded(
            t=t,
            body=raw_body if isinstance(raw_body, dict) else {},
            headers={k.lower(): v for k, v in self.headers.items()},
            path=self.path,
        )
        owner = self.owner
        with owner._lock:
            owner.requests.append(rec)
        if self.command != "POST" and self.path.split("?", 1)[0] == "/v1/messages":
            status, body, headers = 405, _err("invalid_request_error", f"{self.command} not allowed"), {}
        elif raw_body is None:
            status, body, headers = 400, _err("invalid_request_error", "request body is not valid JSON"), {}
        else:
            status, body, headers = owner._serve(rec)
        data = json.dumps(body).encode()
        with owner._lock:
            rec.status = status
        try:
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.send_header("request-id", f"req_{secrets.token_hex(12)}")
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            self.close_connection = True

    do_POST = do_GET = do_PUT = do_DELETE = do_PATCH = _handle
