"""Logging: readable lines on a terminal, JSON lines in containers (``--log-format``).

A redaction filter replaces any registered secret value, and anything shaped like a password in
a URL, before a record is written: secrets never reach logs.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time

_SECRETS: set[str] = set()
_URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^\s]+@")
_KV_PASSWORD = re.compile(
    r"(?i)(\b(?:pg)?(?:password|passwd|pwd|requirepass|secret|token|api[_-]?key)\b[\"']?\s*[=:]\s*)"
    r"(\"[^\"]*\"|'[^']*'|[^\s&;,'\"}]+)"
)
"""``password=x`` (libpq key-value, ``?password=x`` / ``&password=x`` in a URL query),
``"password": "x"``, ``PGPASSWORD=x``, ``requirepass x`` is caught by the registered secret."""


def register_secret(value: str) -> None:
    """Values registered here are replaced by *** in every log record."""
    if value and len(value) >= 6:
        _SECRETS.add(value)


def redact(text: str) -> str:
    text = _URL_PASSWORD.sub(r"\1***@", text)
    text = _KV_PASSWORD.sub(r"\1***", text)
    for secret in sorted(_SECRETS, key=len, reverse=True):  # longest first: no partial leaks
        if secret in text:
            text = text.replace(secret, "***")
    return text


class RedactFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        clean = redact(msg)
        if clean != msg or record.args:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_text:
            out["exc"] = record.exc_text
        return json.dumps(out)


def configure(level: str = "INFO", fmt: str = "auto") -> None:
    if fmt == "auto":
        fmt = "text" if sys.stderr.isatty() else "json"
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    try:
        root.setLevel(level.upper())
    except ValueError:
        root.setLevel(logging.INFO)
    logging.getLogger("psycopg.pool").setLevel(logging.WARNING)
    for name in ("httpx", "httpx2"):  # the SDK's HTTP client logs one INFO line per model call otherwise
        logging.getLogger(name).setLevel(logging.WARNING)
