"""Log redaction: registered secrets and URL passwords never reach a log line."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from casperd import logsetup
from casperd.logsetup import JsonFormatter, RedactFilter, redact, register_secret

API_KEY = "sk-ant-api03-0123456789abcdef"
TOKEN = "ghp_SuperSecretToken42"


@pytest.fixture(autouse=True)
def fresh_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logsetup, "_SECRETS", set())


@pytest.fixture
def capture() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A private logger whose one handler redacts, as configure() sets up the root logger."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.addFilter(RedactFilter())
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("casper.test.redact")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    yield logger, buf
    logger.handlers[:] = []


# --- redact() -----------------------------------------------------------------------------------
def test_registered_secret_is_replaced() -> None:
    register_secret(API_KEY)
    assert redact(f"key={API_KEY}") == "key=***"
    assert redact(f"{API_KEY} and again {API_KEY}!") == "*** and again ***!"
    assert redact("nothing to hide") == "nothing to hide"


def test_several_secrets() -> None:
    register_secret(API_KEY)
    register_secret(TOKEN)
    out = redact(f"a={API_KEY} b={TOKEN}")
    assert out == "a=*** b=***"


@pytest.mark.parametrize("value", ["", "abc", "12345"])
def test_short_values_are_not_registered(value: str) -> None:
    register_secret(value)
    assert not logsetup._SECRETS
    assert redact(f"x{value}y") == f"x{value}y"


def test_six_characters_is_enough() -> None:
    register_secret("abcdef")
    assert redact("--abcdef--") == "--***--"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("postgresql://casper:s3cret@db:5432/casper", "postgresql://casper:***@db:5432/casper"),
        ("redis://user:p4ss/word@cache:6379/0", "redis://user:***@cache:6379/0"),
        (
            "connect to postgresql://u:pw@h/db failed; retry postgresql://v:pw2@h2/db",
            "connect to postgresql://u:***@h/db failed; retry postgresql://v:***@h2/db",
        ),
        ("https://admin:hunter2@example.com/path", "https://admin:***@example.com/path"),
    ],
)
def test_url_passwords_are_redacted(text: str, expected: str) -> None:
    assert redact(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "postgresql://casper@db:5432/casper",
        "tcp://127.0.0.1:5555",
        "ipc:///tmp/node.ctl",
        "http://host:8080/metrics",
        "user@example.com",
    ],
)
def test_urls_without_passwords_are_untouched(text: str) -> None:
    assert redact(text) == text


def test_url_password_with_empty_user_is_redacted() -> None:
    out = redact("redis://:hunter2secret@localhost:6379/0")
    assert "hunter2secret" not in out


def test_overlapping_secrets_are_fully_redacted() -> None:
    # one pair would pass by luck half of the time; thirty pairs cannot all be lucky
    pairs = [(f"prefix{i:02d}xx", f"prefix{i:02d}xx-and-a-longer-tail-{i:02d}") for i in range(30)]
    for short, long in pairs:
        register_secret(short)
        register_secret(long)
    for _short, long in pairs:
        out = redact(f"value={long}")
        assert "longer-tail" not in out, out


# --- the logging filter -------------------------------------------------------------------------
def test_filter_redacts_the_message(capture: tuple[logging.Logger, io.StringIO]) -> None:
    logger, buf = capture
    register_secret(API_KEY)
    logger.info(f"using key {API_KEY}")
    logger.warning("db at postgresql://casper:pw-123456@db/casper is down")
    text = buf.getvalue()
    assert API_KEY not in text and "pw-123456" not in text
    assert "using key ***" in text
    assert "postgresql://casper:***@db/casper" in text


def test_filter_redacts_the_args(capture: tuple[logging.Logger, io.StringIO]) -> None:
    logger, buf = capture
    register_secret(TOKEN)
    logger.info("token %s for %s via %s", TOKEN, "alice", "redis://u:pa55word@r:6379")
    line = buf.getvalue().strip()
    assert line == "INFO token *** for alice via redis://u:***@r:6379"


def test_filter_formats_args_even_without_secrets(capture: tuple[logging.Logger, io.StringIO]) -> None:
    logger, buf = capture
    logger.info("%d tasks on %s", 3, "dev-1")
    assert buf.getvalue().strip() == "INFO 3 tasks on dev-1"


def test_filter_keeps_the_record_consistent() -> None:
    register_secret(API_KEY)
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "key %s", (API_KEY,), None)
    assert RedactFilter().filter(record) is True
    assert record.args is None
    assert record.getMessage() == "key ***"


def test_filter_redacts_exception_text(capture: tuple[logging.Logger, io.StringIO]) -> None:
    logger, buf = capture
    register_secret(API_KEY)
    try:
        raise RuntimeError(f"auth failed for {API_KEY} at postgresql://u:dbpass99@h/d")
    except RuntimeError:
        logger.exception("request failed")
    text = buf.getvalue()
    assert "Traceback" in text and "RuntimeError" in text
    assert API_KEY not in text and "dbpass99" not in text
    assert "auth failed for ***" in text


def test_json_formatter_with_redaction() -> None:
    register_secret(API_KEY)
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.addFilter(RedactFilter())
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("casper.test.json")
    logger.handlers[:] = [handler]
    logger.propagate = False
    try:
        logger.error("key %s", API_KEY)
        try:
            raise ValueError(API_KEY)
        except ValueError:
            logger.exception("boom")
    finally:
        logger.handlers[:] = []
    lines = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert lines[0]["msg"] == "key ***" and lines[0]["level"] == "error" and lines[0]["logger"] == "casper.test.json"
    assert lines[0]["ts"].endswith("Z")
    assert "exc" in lines[1] and API_KEY not in lines[1]["exc"] and "ValueError" in lines[1]["exc"]
    assert API_KEY not in buf.getvalue()


def test_configure_installs_the_filter_on_the_root(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    try:
        logsetup.configure("DEBUG", "json")
        assert root.level == logging.DEBUG
        assert len(root.handlers) == 1
        handler = root.handlers[0]
        assert any(isinstance(f, RedactFilter) for f in handler.filters)
        assert isinstance(handler.formatter, JsonFormatter)
        logsetup.configure("nonsense", "text")
        assert root.level == logging.INFO
        assert not isinstance(root.handlers[0].formatter, JsonFormatter)
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
