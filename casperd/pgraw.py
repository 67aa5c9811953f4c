"""One prepared statement run straight on libpq, for the group-commit writer's hot path.

psycopg's ``AsyncConnection.execute`` spends 70-100 µs of CPU per call in Python (a cursor, query
conversion, parameter dumping, the prepared-statement cache, the wait generator), which is most of
what the policeman spends on a one-task commit. The writer runs one statement, with text
parameters, on a connection of its own: this sends it as a named prepared statement through the
connection's ``pgconn`` (psycopg's libpq wrapper, nonblocking) and waits on the socket with the
event loop, 15-30 µs per call. Errors are psycopg's own exception classes (``error_from_result``),
so the writer's retry and poison rules see what they saw before; after any failure the caller
must drop the connection (:attr:`PreparedStatement.broken`), since its protocol state is unknown.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import pq
from psycopg.errors import error_from_result

_PLACEHOLDER = re.compile(r"%s")


def numbered(sql: str) -> str:
    """psycopg's ``%s`` placeholders as Postgres's ``$1, $2, ...`` (the statement has no other ``%``)."""
    counter = iter(range(1, 10_000))
    return _PLACEHOLDER.sub(lambda _m: f"${next(counter)}", sql)


class PreparedStatement:
    """``name`` prepared on ``conn`` (an autocommit AsyncConnection used for nothing else while
    this statement runs); :meth:`run` executes it with text parameters and returns its result."""

    def __init__(self, conn: psycopg.AsyncConnection[Any], name: str) -> None:
        self.conn = conn
        self.name = name.encode()
        self.broken = False

    @classmethod
    async def prepare(cls, conn: psycopg.AsyncConnection[Any], name: str, sql: str) -> PreparedStatement:
        await conn.execute(f"PREPARE {name} AS {numbered(sql)}")
        return cls(conn, name)

    async def run(self, params: Sequence[str]) -> pq.abc.PGresult:
        """Execute with ``params`` (text); raises psycopg's error for a failed statement and
        ``psycopg.OperationalError`` for a lost connection (then :attr:`broken` is set)."""
        pgconn = self.conn.pgconn
        if any("\x00" in p for p in params):  # libpq would cut the text there; psycopg refuses it too
            raise psycopg.DataError("PostgreSQL text fields cannot contain NUL (0x00) bytes")
        try:
            pgconn.send_query_prepared(self.name, [p.encode() for p in params])
            while pgconn.flush():  # 1: the socket buffer is full; wait until it can take more
                await self._ready(pgconn.socket, write=True)
            result: pq.abc.PGresult | None = None
            while True:
                while pgconn.is_busy():
                    await self._ready(pgconn.socket, write=False)
                    pgconn.consume_input()
                res = pgconn.get_result()
                if res is None:
                    break
                if result is None or result.status != pq.ExecStatus.FATAL_ERROR:
                    result = res  # keep the first error, if any
        except BaseException:
            self.broken = True
            raise
        if result is None:
            self.broken = True
            raise psycopg.OperationalError("the server sent no result for the group commit")
        if result.status == pq.ExecStatus.FATAL_ERROR:
            raise error_from_result(result, encoding="utf-8")
        if pgconn.status != pq.ConnStatus.OK:
            self.broken = True
        return result

    @staticmethod
    async def _ready(fd: int, *, write: bool) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not fut.done():
                fut.set_result(None)

        (loop.add_writer if write else loop.add_reader)(fd, wake)
        try:
            await fut
        finally:
            (loop.remove_writer if write else loop.remove_reader)(fd)
