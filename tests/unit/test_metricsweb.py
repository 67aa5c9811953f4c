"""``/metrics`` served on the node's event loop (casperd.metricsweb): the library's own exposition
formats, short errors for anything else, and a scraper that stalls or floods costs only its own
connection."""

from __future__ import annotations

import asyncio
import socket
import urllib.error
import urllib.request

import pytest

from casperd import metricsweb
from casperd.errors import ConfigError
from casperd.metrics import Metrics


def _parts(raw: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return lines[0], headers, body


def test_get_answers_the_text_format_and_head_the_same_headers_without_a_body() -> None:
    m = Metrics()
    m.rejected.labels("decode").inc()
    status, headers, body = _parts(metricsweb.respond(m.registry, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert status == "HTTP/1.1 200 OK" and headers["content-type"].startswith("text/plain; version=0.0.4")
    assert b"# TYPE casper_queue_depth gauge" in body and int(headers["content-length"]) == len(body)
    status, head_headers, head_body = _parts(metricsweb.respond(m.registry, b"HEAD /metrics HTTP/1.1\r\n\r\n"))
    assert status == "HTTP/1.1 200 OK" and head_body == b"" and int(head_headers["content-length"]) > 0


def test_an_openmetrics_scraper_gets_openmetrics() -> None:
    accept = b"Accept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5\r\n"
    _, headers, body = _parts(metricsweb.respond(Metrics().registry, b"GET /metrics HTTP/1.1\r\n" + accept + b"\r\n"))
    assert headers["content-type"].startswith("application/openmetrics-text") and body.endswith(b"# EOF\n")


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"POST /metrics HTTP/1.1\r\n\r\n", "405 Method Not Allowed"),
        (b"GET /admin HTTP/1.1\r\n\r\n", "404 Not Found"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\r\n\r\n", "400 Bad Request"),  # a TLS hello
        (b"GET /metrics SPDY/3\r\n\r\n", "400 Bad Request"),
    ],
)
def test_anything_else_gets_a_short_error(head: bytes, status: str) -> None:
    line, headers, _ = _parts(metricsweb.respond(Metrics().registry, head))
    assert line == f"HTTP/1.1 {status}" and headers["connection"] == "close"


async def test_served_on_the_loop_to_a_real_http_client_and_closed_cleanly() -> None:
    m = Metrics()
    server = await m.serve(_free_port(), "127.0.0.1")
    assert server is not None
    port = server.sockets[0].getsockname()[1]
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())
        assert b"casper_memory_usage_bytes" in body
        with pytest.raises(urllib.error.HTTPError) as err:
            await asyncio.to_thread(urllib.request.urlopen, f"http://127.0.0.1:{port}/nope", timeout=5)
        assert err.value.code == 404
    finally:
        server.close()
        await server.wait_closed()
    assert await Metrics().serve(0) is None  # port 0: no metrics served


async def test_a_stalled_or_flooding_client_costs_only_its_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metricsweb, "HEAD_TIMEOUT_S", 0.3)
    server = await metricsweb.serve(Metrics().registry, "127.0.0.1", _free_port())
    port = server.sockets[0].getsockname()[1]
    try:
        stalled_r, stalled_w = await asyncio.open_connection("127.0.0.1", port)
        stalled_w.write(b"GET /metrics HTTP/1.1\r\n")  # never ends its head
        flood_r, flood_w = await asyncio.open_connection("127.0.0.1", port)
        flood_w.write(b"GET /metrics HTTP/1.1\r\n" + b"X-Pad: " + b"a" * (2 * metricsweb.HEAD_LIMIT) + b"\r\n\r\n")
        assert (await asyncio.wait_for(flood_r.read(), 5)).startswith(b"HTTP/1.1 400 Bad Request")
        assert await asyncio.wait_for(stalled_r.read(), 5) == b""  # dropped after the timeout
        ok = await asyncio.to_thread(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).status)
        assert ok == 200  # the server went on
        for w in (stalled_w, flood_w):
            w.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_a_taken_port_is_a_config_error_that_names_the_setting() -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        with pytest.raises(ConfigError) as err:
            await metricsweb.serve(Metrics().registry, "127.0.0.1", port)
    assert "already in use" in err.value.message and "--metrics-port" in (err.value.hint or "")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
