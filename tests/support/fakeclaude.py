"""FakeClaude: a local, scripted server speaking the Anthropic Messages API (``POST /v1/messages``).

Stdlib only. It runs in a daemon thread of the test process, bound to 127.0.0.1 on a free port, so
separate processes (the mesh's developer nodes) can call it over HTTP with
``ANTHROPIC_BASE_URL=fake.url``; all scripting happens here, in the server.

    with FakeClaude() as fake:
        fake.push(reply(tool_use("read_file", {"path": "a.py"})), reply(text("done")))
        ...  # point the client at fake.url
        assert len(fake.calls()) == 2

Requests are validated the way the real API does (tests/support/fakerules.py: 400
``invalid_request_error``; 401 without a key), every request is recorded
(:attr:`FakeClaude.requests`), usage is computed deterministically (each block counts
ceil(len(JSON) / 4) tokens) with a prompt-cache simulation (breakpoints, 20-block lookback, a
minimum cacheable prefix), and every answer carries ``request-id`` and ``anthropic-ratelimit-*``
headers (requests, input tokens, output tokens, tokens). A request with ``"stream": true`` is
answered with the API's server-sent events (message_start, content_block_start/delta/stop,
message_delta with usage, message_stop, ping, and ``error`` events), optionally paced with
``gap_s`` between events and pings every ``ping_s``. With ``rpm_limit`` / ``tpm_limit`` the server
enforces them itself (429 with ``retry-after``): requests with the API's token bucket (capacity
``rpm_limit``, refilled continuously), input tokens over a sliding 60 s window; the limits may be
changed while it runs, and the headers follow.
"""

from __future__ import annotations

import contextlib
import json
import math
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.support import fakesse as sse
from tests.support.fakereplies import (
    Recorded,
    Response,
    _rfc3339,
    http_error,
    last_user_text,
    overloaded,
    rate_limited,
    reply,
    text,
    tool_use,
)
from tests.support.fakerules import InvalidRequest, PromptCache, tokens_of, validate
from tests.support.fakerules import blocks as _blocks

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
DEFAULT_OTPM = 80_000
WINDOW_S = 60.0


# --- the server -------------------------------------------------------------------------------
@dataclass
class _Answer:
    status: int
    body: dict[str, Any]
    headers: dict[str, str]
    resp: Response | None = None
    """A 200 answer's script entry (how to stream it)."""


class FakeClaude:
    """A scripted Messages API on 127.0.0.1 (see the module docstring)."""

    def __init__(
        self,
        script: Callable[[dict[str, Any]], Response] | None = None,
        latency_s: float = 0.0,
        rpm_limit: int | None = None,
        tpm_limit: int | None = None,
        otpm_limit: int | None = None,
        min_cache_tokens: int = 1024,
    ) -> None:
        self.script = script
        self.latency_s = latency_s
        self.rpm_limit = rpm_limit
        self.tpm_limit = tpm_limit
        """Input tokens per minute (enforced when set; ``anthropic-ratelimit-input-tokens-*``)."""
        self.otpm_limit = otpm_limit
        """Output tokens per minute (reported in ``anthropic-ratelimit-output-tokens-*``)."""
        self.requests: list[Recorded] = []
        self.cache = PromptCache(min_cache_tokens)
        self._lock = threading.Lock()
        self._queue: deque[Response] = deque()
        self._window: deque[tuple[float, int]] = deque()  # (arrival, input tokens) of accepted requests
        self._out_window: deque[tuple[float, int]] = deque()  # (answered, output tokens)
        self._req_bucket: tuple[float, float] | None = None  # (level, at): requests, the API's token bucket
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

    def billed(self) -> dict[str, int]:
        """The usage of every complete answer, summed (what an account would be billed), and their count."""
        out = {"calls": 0, "input_tokens": 0, "output_tokens": 0, "cache_read_tokens": 0, "cache_write_tokens": 0}
        with self._lock:
            for r in self.requests:
                if r.usage is None:
                    continue
                out["calls"] += 1
                out["input_tokens"] += r.usage["input_tokens"]
                out["output_tokens"] += r.usage["output_tokens"]
                out["cache_read_tokens"] += r.usage["cache_read_input_tokens"]
                out["cache_write_tokens"] += r.usage["cache_creation_input_tokens"]
        return out

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

    def _limits(self, now: float, wall: float, cost: int, admit: bool) -> tuple[dict[str, str], float | None]:
        """Rate-limit headers and, when ``admit`` and the window is full, the retry-after (seconds)."""
        rpm = self.rpm_limit or DEFAULT_RPM
        tpm = self.tpm_limit or DEFAULT_TPM
        otpm = self.otpm_limit or DEFAULT_OTPM
        with self._lock:
            for win in (self._window, self._out_window):
                while win and win[0][0] <= now - WINDOW_S:
                    win.popleft()
            # requests: a bucket of capacity rpm refilled continuously (as the API documents)
            level, at = self._req_bucket if self._req_bucket is not None else (float(rpm), now)
            level = min(float(rpm), level + max(0.0, now - at) * rpm / WINDOW_S)
            used_tok = sum(c for _, c in self._window)
            used_out = sum(c for _, c in self._out_window)
            retry: float | None = None
            if admit and self.rpm_limit is not None and level < 1.0:
                retry = (1.0 - level) / (rpm / WINDOW_S)
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
                level -= 1.0
                used_tok += cost
            self._req_bucket = (level, now)
            oldest = self._window[0][0] if self._window else now
        reset = _rfc3339(wall + max(0.0, oldest + WINDOW_S - now))
        p = "anthropic-ratelimit-"
        in_left, out_left = max(0, tpm - used_tok), max(0, otpm - used_out)
        headers = {
            p + "requests-limit": str(rpm),
            p + "requests-remaining": str(max(0, math.floor(level))),
            p + "requests-reset": _rfc3339(wall + (rpm - max(0.0, level)) * WINDOW_S / rpm),
            p + "input-tokens-limit": str(tpm),
            p + "input-tokens-remaining": str(in_left),
            p + "input-tokens-reset": reset,
            p + "output-tokens-limit": str(otpm),
            p + "output-tokens-remaining": str(out_left),
            p + "output-tokens-reset": reset,
            p + "tokens-limit": str(tpm + otpm),
            p + "tokens-remaining": str(in_left + out_left),
            p + "tokens-reset": reset,
        }
        return headers, (None if retry is None else max(1, math.ceil(retry)))

    def _serve(self, rec: Recorded) -> _Answer:
        now, wall = rec.t, time.time()
        if rec.path.split("?", 1)[0] != "/v1/messages":
            return _Answer(404, _err("not_found_error", f"{rec.path}: not found"), {})
        auth = rec.headers.get("authorization", "")
        if not rec.headers.get("x-api-key") and not (auth.startswith("Bearer ") and auth[7:].strip()):
            # the SDK sends the key as x-api-key or (newer versions) as "Authorization: Bearer"
            return _Answer(401, _err("authentication_error", "x-api-key header is required"), {})
        try:
            validate(rec.body)
        except InvalidRequest as exc:
            return _Answer(exc.status, _err(exc.type, exc.message), {})
        body = rec.body
        usage = self.cache.usage(body)
        headers, retry = self._limits(
            now, wall, usage["input_tokens"] + usage["cache_creation_input_tokens"], admit=True
        )
        if retry is not None:
            headers["retry-after"] = str(retry)
            return _Answer(429, _err("rate_limit_error", "This request would exceed your rate limit"), headers)
        if self.latency_s > 0:
            time.sleep(self.latency_s)
        try:
            resp = self._next_response(body)
        except Exception as exc:  # a broken script is a server error, not a hung test
            return _Answer(500, _err("api_error", f"fake script failed: {type(exc).__name__}: {exc}"), headers)
        if resp.delay_s > 0:
            time.sleep(resp.delay_s)
        headers.update(resp.headers)
        if resp.status != 200:
            return _Answer(resp.status, resp.error or _err("api_error", f"HTTP {resp.status}"), headers)
        usage["output_tokens"] = tokens_of(resp.content)
        usage.update(resp.usage or {})
        with self._lock:
            self._out_window.append((time.monotonic(), usage["output_tokens"]))
            if resp.stream_error is None:
                rec.usage = dict(usage)
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
        return _Answer(200, message, headers, resp)


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
        # Every event is its own small write: with Nagle's algorithm on, each one after the first
        # waits for the client's delayed ACK (40 ms on Linux), which added ~45 ms to every streamed
        # answer here and none on the real API (its servers send with TCP_NODELAY, as HTTP servers do).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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
            ans = _Answer(405, _err("invalid_request_error", f"{self.command} not allowed"), {})
        elif raw_body is None:
            ans = _Answer(400, _err("invalid_request_error", "request body is not valid JSON"), {})
        else:
            ans = owner._serve(rec)
        with owner._lock:
            rec.status = ans.status
        try:
            if ans.status == 200 and rec.body.get("stream") and ans.resp is not None:
                self._stream(ans, ans.resp)
            else:
                self._json(ans)
        except OSError:
            self.close_connection = True

    def _start(self, status: int, content_type: str, headers: dict[str, str]) -> None:
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("request-id", f"req_{secrets.token_hex(12)}")
        for k, v in headers.items():
            self.send_header(k, v)

    def _json(self, ans: _Answer) -> None:
        data = json.dumps(ans.body).encode()
        self._start(ans.status, "application/json", ans.headers)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _stream(self, ans: _Answer, resp: Response) -> None:
        self._start(200, "text/event-stream", ans.headers)
        self.send_header("transfer-encoding", "chunked")
        self.send_header("cache-control", "no-cache")
        self.end_headers()
        evs = sse.events(ans.body, truncate_tool_input=resp.truncate_tool_input, error=resp.stream_error)
        for data in sse.paced(evs, resp.gap_s, resp.ping_s):
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    do_POST = do_GET = do_PUT = do_DELETE = do_PATCH = _handle
