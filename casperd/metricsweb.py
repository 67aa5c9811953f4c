"""``/metrics`` over HTTP on the node's event loop.

prometheus_client's ``start_http_server`` runs a threaded WSGI server: a thread for the server
and one more per scrape, in a daemon whose I/O is otherwise all on one asyncio loop (and 0.1-0.3 MB
more of the policeman's idle RSS than this, measured with three scrapes, issue #13). The endpoint
needs little of HTTP: one GET (or HEAD) per connection, answered with the registry's exposition
in the format the scraper asks for (prometheus_client's own ``choose_encoder`` and encoders, so
text and OpenMetrics are exactly the library's), then the connection is closed.

Anything else gets a short error status: a method other than GET or HEAD 405, another path 404,
a request head that is not HTTP or is larger than 16 KiB 400, and a client that does not send its
head within 5 s is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from casperd.errors import ConfigError

log = logging.getLogger("casperd.metrics")

HEAD_LIMIT = 16 * 1024
HEAD_TIMEOUT_S = 5.0
PATHS = ("/metrics", "/")


def _answer(status: str, body: bytes, content_type: str = "text/plain; charset=utf-8", head: bool = False) -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + (b"" if head else body)


def respond(registry: CollectorRegistry, request_head: bytes) -> bytes:
    """The whole HTTP response to one request head (pure: no I/O)."""
    try:
        lines = request_head.decode("latin-1").split("\r\n")
        method, target, version = lines[0].split(" ")
    except ValueError:
        return _answer("400 Bad Request", b"not an HTTP request\n")
    if not version.startswith("HTTP/"):
        return _answer("400 Bad Request", b"not an HTTP request\n")
    if method not in ("GET", "HEAD"):
        return _answer("405 Method Not Allowed", b"only GET and HEAD\n")
    if target.split("?", 1)[0] not in PATHS:
        return _answer("404 Not Found", b"metrics are at /metrics\n")
    accept = ""
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "accept":
            accept = value.strip()
    encoder, content_type = choose_encoder(accept)
    return _answer("200 OK", encoder(registry), content_type, head=method == "HEAD")


async def serve(registry: CollectorRegistry, addr: str, port: int) -> asyncio.Server:
    """Listen on ``addr:port``; the caller closes the returned server."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT_S)
            except (asyncio.LimitOverrunError, asyncio.IncompleteReadError, ValueError):
                writer.write(_answer("400 Bad Request", b"request head too large or cut short\n"))
            else:
                writer.write(respond(registry, head))
            await asyncio.wait_for(writer.drain(), HEAD_TIMEOUT_S)
        except (TimeoutError, ConnectionError):
            pass  # a slow or vanished scraper costs its own connection only
        except Exception:  # a bug must cost one scrape, never the node
            log.exception("internal error serving /metrics")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    try:
        return await asyncio.start_server(handle, addr, port, limit=HEAD_LIMIT, reuse_address=True)
    except OSError as exc:
        why = "is already in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc.strerror})"
        raise ConfigError(
            f"the metrics port {addr}:{port} {why}",
            hint="choose another --metrics-port (CASPER_METRICS_PORT), or 0 to serve no metrics",
        ) from None
