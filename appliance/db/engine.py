"""Engines and transactions.

Every unit of work (an API request, a worker task, a CLI command) runs in exactly one transaction
opened by `transaction()`. The tenant is set inside it with `set_config(..., is_local => true)`, so
it ends with the transaction and can never leak to the next user of a pooled connection. Services
`flush()`, never `commit()`: committing is this module's job. Audit events buffered during the
transaction are written just before the commit, in the same transaction (see appliance.audit).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session

TENANT_GUC = "app.tenant_id"


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
            pool_pre_ping=True,
            pool_recycle=1800,
            echo=echo,
            connect_args=connect_args,
        )
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
    """`set_tenant` is transaction-local (`set_config(..., true)`): so is what the session remembers."""
    if transaction.parent is None:
        session.info.pop("tenant_id", None)
