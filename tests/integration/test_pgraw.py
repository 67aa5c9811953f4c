"""casperd.pgraw: the writer's prepared statement on libpq answers like psycopg would."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest
from psycopg import errors as pgerr

from casperd.pgraw import PreparedStatement, numbered


def test_placeholders_are_numbered_in_order() -> None:
    assert numbered("SELECT %s::int + %s::int, '%s'") == "SELECT $1::int + $2::int, '$3'"


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_a_statement_returns_its_row_refuses_bad_input_and_survives_it(database_url: str) -> None:
    async def go() -> None:
        conn = await psycopg.AsyncConnection.connect(database_url, autocommit=True)
        try:
            await conn.execute("CREATE TABLE t (v text NOT NULL CHECK (v <> 'bad'))")
            stmt = await PreparedStatement.prepare(conn, "ins", "INSERT INTO t SELECT %s RETURNING length(v)")
            res = await stmt.run(["hello"])
            assert res.get_value(0, 0) == b"5"
            big = "x" * 3_000_000  # more than a socket buffer: the send waits until it can go on
            assert (await stmt.run([big])).get_value(0, 0) == b"3000000"
            with pytest.raises(pgerr.CheckViolation):
                await stmt.run(["bad"])  # Postgres refuses the row; the connection stays usable
            with pytest.raises(psycopg.DataError):
                await stmt.run(["a\x00b"])  # libpq would cut the text at the NUL: refused, as psycopg does
            assert not stmt.broken
            assert (await stmt.run(["ok"])).get_value(0, 0) == b"2"
            cur = await conn.execute("SELECT count(*) FROM t")
            assert (await cur.fetchone()) == (3,)
        finally:
            await conn.close()

    _run(go())


def test_a_lost_connection_raises_operational_error_and_marks_it_broken(database_url: str) -> None:
    async def go() -> None:
        conn = await psycopg.AsyncConnection.connect(database_url, autocommit=True)
        killer = await psycopg.AsyncConnection.connect(database_url, autocommit=True)
        try:
            stmt = await PreparedStatement.prepare(conn, "sleepy", "SELECT pg_sleep(%s::float)")
            pid = conn.info.backend_pid
            run = asyncio.ensure_future(stmt.run(["5"]))
            await asyncio.sleep(0.3)
            await killer.execute("SELECT pg_terminate_backend(%s)", (pid,))
            with pytest.raises(psycopg.OperationalError):
                await asyncio.wait_for(run, 10)
            assert stmt.broken
        finally:
            await conn.close()
            await killer.close()

    _run(go())
