"""The database layer's hot-path helpers: statements straight on psycopg report errors as SQLAlchemy
does, and a pooled connection that died while idle is replaced before anyone uses it."""

from __future__ import annotations

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, OperationalError, ProgrammingError

from appliance.db import engine as db_engine
from appliance.db.engine import Database, driver_rows, driver_sql
from appliance.settings import Settings
from tests.db.test_rls import app_conninfo


def test_driver_sql_turns_named_parameters_into_psycopg_ones_and_leaves_casts() -> None:
    assert driver_sql("SELECT CAST(:q AS vector), x::text FROM t WHERE a = :a_1") == (
        "SELECT CAST(%(q)s AS vector), x::text FROM t WHERE a = %(a_1)s"
    )


async def test_driver_rows_returns_named_rows_and_raises_sqlalchemy_errors(app_db: Database) -> None:
    async with app_db.transaction() as session:
        rows = await driver_rows(session, driver_sql("SELECT :x::int + 1 AS y, 'a' AS z"), {"x": 41})
        assert [(r.y, r.z) for r in rows] == [(42, "a")]
    with pytest.raises(ProgrammingError) as caught:
        async with app_db.transaction() as session:
            await driver_rows(session, "SELECT no_such_column FROM api_keys", {})
    assert isinstance(caught.value, DBAPIError) and isinstance(caught.value.orig, psycopg.Error)


async def test_driver_rows_runs_on_the_current_transactions_connection(
    settings: Settings,
) -> None:
    """driver_rows remembers the psycopg connection for the rest of a transaction, and forgets it when
    the transaction ends: the session's next transaction may hold another connection."""
    db = Database(settings.app_database_url, pool_size=2)
    pid_and_txid = "SELECT pg_backend_pid() AS pid, txid_current() AS txid"
    try:
        async with db.sessionmaker() as session:
            async with session.begin():
                first, again = [(await driver_rows(session, pid_and_txid, {}))[0] for _ in range(2)]
                assert (first.pid, first.txid) == (again.pid, again.txid)
            # The first connection, back in the pool, is taken by someone else meanwhile …
            async with db.engine.connect() as holder:
                held = (await holder.execute(text("SELECT pg_backend_pid()"))).scalar_one()
                assert held == first.pid
                async with session.begin():  # … so this transaction runs on another connection
                    (second,) = await driver_rows(session, pid_and_txid, {})
                    (orm,) = (await session.execute(text("SELECT pg_backend_pid()"))).one()
                assert second.pid == orm != first.pid
            with pytest.raises(ProgrammingError):  # a failed transaction is forgotten too
                async with session.begin():
                    await driver_rows(session, "SELECT no_such_column FROM api_keys", {})
            async with session.begin():
                (third,) = await driver_rows(session, pid_and_txid, {})
                assert third.txid not in (first.txid, second.txid)
    finally:
        await db.dispose()


async def test_a_connection_killed_while_idle_is_replaced_on_checkout(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = Database(settings.app_database_url, pool_size=1)
    try:
        async with db.transaction() as session:
            (first,) = await driver_rows(session, "SELECT pg_backend_pid() AS pid", {})
        with psycopg.connect(app_conninfo(settings), autocommit=True) as other:
            other.execute("SELECT pg_terminate_backend(%s)", (first.pid,))
        # Used again at once, the dead connection fails the statement (and the pool is invalidated) …
        with pytest.raises(OperationalError):
            async with db.transaction() as session:
                await driver_rows(session, "SELECT 1 AS one", {})
        # … and after idling past PING_IDLE_S a connection is pinged and replaced before use.
        async with db.transaction() as session:
            (second,) = await driver_rows(session, "SELECT pg_backend_pid() AS pid", {})
        with psycopg.connect(app_conninfo(settings), autocommit=True) as other:
            other.execute("SELECT pg_terminate_backend(%s)", (second.pid,))
        monkeypatch.setattr(db_engine, "PING_IDLE_S", 0.0)
        async with db.transaction() as session:
            (third,) = await driver_rows(session, "SELECT pg_backend_pid() AS pid", {})
        assert third.pid not in (first.pid, second.pid)
    finally:
        await db.dispose()
