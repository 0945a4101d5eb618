"""Engines and transactions.

Every unit of work (an API request, a worker task, a CLI command) runs in exactly one transaction
opened by `transaction()`. The tenant is set inside it with `set_config(..., is_local => true)`, so
it ends with the transaction and can never leak to the next user of a pooled connection. Services
`flush()`, never `commit()`: committing is this module's job. Audit events buffered during the
transaction are written just before the commit, in the same transaction (see appliance.audit).
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from psycopg.rows import namedtuple_row
from sqlalchemy import event, exc, text
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session

TENANT_GUC = "app.tenant_id"
PING_IDLE_S = 2.0
"""A pooled connection idle longer than this is pinged before use (see `Database`)."""


class Database:
    """One async engine per process and role."""

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 5,
        echo: bool = False,
        server_settings: dict[str, str] | None = None,
    ) -> None:
        # `server_settings` become session defaults at connection start (libpq `options`): no round
        # trip per transaction for settings that never change in a process (pgvector's HNSW ones).
        connect_args = {}
        if server_settings:
            connect_args["options"] = " ".join(f"-c {k}={v}" for k, v in server_settings.items())
        self.engine: AsyncEngine = create_async_engine(
            url,
            pool_size=pool_size,
            max_overflow=pool_size,
            pool_recycle=1800,
            echo=echo,
            connect_args=connect_args,
        )
        # Pessimistic disconnect handling, but only for connections that sat idle: SQLAlchemy's
        # pool_pre_ping costs a round trip on every checkout (0.3 ms of a 12 ms search here). A
        # connection back from a request within PING_IDLE_S is used as is; if Postgres went away in
        # that window the statement fails, SQLAlchemy invalidates the pool, and the API answers 503.
        pool = self.engine.sync_engine.pool
        dialect = self.engine.dialect

        @event.listens_for(pool, "checkin")
        def _checked_in(dbapi_connection: Any, record: Any) -> None:
            record.info["idle_since"] = time.monotonic()

        @event.listens_for(pool, "checkout")
        def _ping_if_idle(dbapi_connection: Any, record: Any, proxy: Any) -> None:
            if time.monotonic() - record.info.get("idle_since", 0.0) < PING_IDLE_S:
                return
            try:
                dialect.do_ping(dbapi_connection)
            except Exception as error:  # noqa: BLE001 - any failure: the pool opens a new connection
                raise exc.DisconnectionError(str(error)) from error

        self.server_settings = dict(server_settings or {})
        self.sessionmaker = async_sessionmaker(
            self.engine,
            expire_on_commit=False,
            autoflush=False,
            info={"server_settings": self.server_settings},
        )

    async def dispose(self) -> None:
        await self.engine.dispose()

    @asynccontextmanager
    async def transaction(self, *, tenant_id: uuid.UUID | None = None) -> AsyncIterator[AsyncSession]:
        """Open a session and a transaction; commit on success, roll back on error."""
        async with self.sessionmaker() as session:
            async with session.begin():
                if tenant_id is not None:
                    await set_tenant(session, tenant_id)
                yield session
                await before_commit(session)
                callbacks: list[Callable[[], None]] = session.info.pop("after_commit", [])
            # Committed: now it is safe to tell the outside world (enqueue jobs, invalidate caches).
            for callback in callbacks:
                callback()


async def set_tenant(session: AsyncSession, tenant_id: uuid.UUID) -> None:
    """Scope the current transaction to one tenant: row-level security does the rest."""
    await session.execute(
        text("SELECT set_config(:guc, :tenant, true)"), {"guc": TENANT_GUC, "tenant": str(tenant_id)}
    )
    session.info["tenant_id"] = tenant_id


_PARAM = re.compile(r"(?<![:\w]):(\w+)")


def driver_sql(sql: str) -> str:
    """SQLAlchemy's `:name` placeholders as psycopg's `%(name)s` (the statement must hold no `%`)."""
    return _PARAM.sub(r"%(\1)s", sql)


async def driver_rows(session: AsyncSession, sql: str, params: Mapping[str, Any]) -> list[Any]:
    """Run `sql` (psycopg placeholders, see `driver_sql`) in the session's transaction on its psycopg
    connection directly: named-tuple rows, without SQLAlchemy's statement and result layers (about
    0.15 ms a statement here). For the few statements of the hot path (search); errors surface as
    SQLAlchemy's, so the API's database-outage handling applies."""
    connection, driver = await _driver_connection(session)
    try:
        async with driver.cursor(row_factory=namedtuple_row) as cursor:
            await cursor.execute(sql, params)
            return await cursor.fetchall() if cursor.description else []
    except psycopg.Error as error:
        is_disconnect = isinstance(error, psycopg.OperationalError | psycopg.InterfaceError)
        if is_disconnect:
            await connection.invalidate(error)
        raise exc.DBAPIError.instance(
            sql, params, error, psycopg.Error, connection_invalidated=is_disconnect
        ) from error


_DRIVER = "driver_connection"


async def _driver_connection(session: AsyncSession) -> tuple[AsyncConnection, psycopg.AsyncConnection[Any]]:
    """The session's connection and its psycopg connection, looked up once per transaction (each
    lookup is two greenlet round trips through SQLAlchemy; forgotten when the transaction ends)."""
    cached: tuple[AsyncConnection, psycopg.AsyncConnection[Any]] | None = session.info.get(_DRIVER)
    if cached is not None:
        return cached
    connection = await session.connection()
    raw = await connection.get_raw_connection()
    driver: psycopg.AsyncConnection[Any] = raw.driver_connection  # type: ignore[assignment]
    session.info[_DRIVER] = (connection, driver)
    return connection, driver


def after_commit(session: AsyncSession, callback: Callable[[], None]) -> None:
    """Run `callback` once the transaction has committed (dropped on rollback)."""
    session.info.setdefault("after_commit", []).append(callback)


def current_tenant(session: AsyncSession) -> uuid.UUID | None:
    value = session.info.get("tenant_id")
    return value if isinstance(value, uuid.UUID) else None


async def before_commit(session: AsyncSession) -> None:
    """Write what must commit with the transaction (the buffered audit events)."""
    from appliance.audit.service import flush_pending

    await flush_pending(session)


@event.listens_for(Session, "before_commit")
def _refuse_unwritten_audit(session: Session) -> None:
    """Safety net: a commit with audit events still buffered means a code path skipped the flush."""
    pending: list[Any] = session.info.get("audit_pending") or []
    if pending:
        raise RuntimeError("commit with unwritten audit events: use Database.transaction()")


@event.listens_for(Session, "after_rollback")
def _drop_pending(session: Session) -> None:
    session.info.pop("audit_pending", None)
    session.info.pop("after_commit", None)
    session.info.pop("tenant_id", None)


@event.listens_for(Session, "after_commit")
def _clear_tenant(session: Session) -> None:
    session.info.pop("tenant_id", None)


@event.listens_for(Session, "after_transaction_end")
def _forget_tenant(session: Session, transaction: Any) -> None:
    """`set_tenant` is transaction-local (`set_config(..., true)`): so is what the session remembers,
    and the next transaction may run on another connection (`_driver_connection`)."""
    session.info.pop(_DRIVER, None)
    if transaction.parent is None:
        session.info.pop("tenant_id", None)
