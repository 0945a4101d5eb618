"""Write audit events in the same transaction as the change they record.

`record()` buffers an event on the session; `flush_pending()` (called by Database.transaction
just before COMMIT) takes the chain head's row lock, chains and inserts the events. The lock is
held only for the commit itself, so unrelated requests serialise for milliseconds, not for the
length of a request. If the insert fails, the transaction fails: no change without its record.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from appliance.audit.chain import CHAINED_FIELDS, VerifyResult, link_hash, verify_chain
from appliance.audit.models import AuditChainHead, AuditEvent
from appliance.context import Actor, actor_var, client_addr_var, request_id_var
from appliance.db.engine import TENANT_GUC


@dataclass
class PendingEvent:
    action: str
    outcome: str
    tenant_id: uuid.UUID | None
    actor: Actor
    resource_type: str | None
    resource_id: str | None
    details: dict[str, Any]
    request_id: str | None
    client_addr: str | None
    occurred_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    id: uuid.UUID = field(default_factory=uuid.uuid4)


_UNSET: Any = object()


def record(
    session: AsyncSession,
    action: str,
    *,
    outcome: str = "success",
    tenant_id: uuid.UUID | None = _UNSET,
    actor: Actor | None = None,
    resource_type: str | None = None,
    resource_id: object | None = None,
    details: dict[str, Any] | None = None,
) -> None:
    """Buffer one audit event; it is written when the transaction commits (or dropped on rollback).

    `tenant_id` defaults to the transaction's tenant. Actor, request id and client address default
    to the current request's context.
    """
    if tenant_id is _UNSET:
        tenant_id = session.info.get("tenant_id")
    pending: list[PendingEvent] = session.info.setdefault("audit_pending", [])
    pending.append(
        PendingEvent(
            action=action,
            outcome=outcome,
            tenant_id=tenant_id,
            actor=actor or actor_var.get() or Actor("system"),
            resource_type=resource_type,
            resource_id=str(resource_id) if resource_id is not None else None,
            details=details or {},
            request_id=request_id_var.get(),
            client_addr=client_addr_var.get(),
        )
    )


async def flush_pending(session: AsyncSession) -> None:
    pending: list[PendingEvent] = session.info.pop("audit_pending", None) or []
    if not pending:
        return
    head = (
        await session.execute(
            select(AuditChainHead.seq, AuditChainHead.hash).where(AuditChainHead.id == 1).with_for_update()
        )
    ).one()
    seq, prev_hash = int(head.seq), bytes(head.hash)
    txn_tenant = session.info.get("tenant_id")
    rows: list[dict[str, Any]] = []
    for event in pending:
        seq += 1
        row: dict[str, Any] = {
            "seq": seq,
            "id": event.id,
            "occurred_at": event.occurred_at,
            "tenant_id": event.tenant_id,
            "actor_type": event.actor.type,
            "actor_id": event.actor.id,
            "action": event.action,
            "resource_type": event.resource_type,
            "resource_id": event.resource_id,
            "outcome": event.outcome,
            "request_id": event.request_id,
            "client_addr": event.client_addr,
            "details": event.details,
        }
        row["prev_hash"] = prev_hash
        row["hash"] = prev_hash = link_hash(prev_hash, row)
        rows.append(row)
    head_update = update(AuditChainHead).where(AuditChainHead.id == 1).values(seq=seq, hash=prev_hash)
    if all(row["tenant_id"] == txn_tenant for row in rows):
        # The usual case (one request, one tenant): the rows and the new head in one statement.
        await session.execute(head_update.add_cte(insert(AuditEvent).values(rows).cte("audit_rows")))
        return
    # RLS checks each row against the transaction's tenant: write each under its own.
    current_guc: uuid.UUID | None = txn_tenant
    for row in rows:
        if row["tenant_id"] != current_guc:
            await _set_guc(session, row["tenant_id"])
            current_guc = row["tenant_id"]
        await session.execute(insert(AuditEvent).values(**row))
    await session.execute(head_update)
    if current_guc != txn_tenant:
        await _set_guc(session, txn_tenant)


async def _set_guc(session: AsyncSession, tenant_id: uuid.UUID | None) -> None:
    await session.execute(
        text("SELECT set_config(:guc, :tenant, true)"),
        {"guc": TENANT_GUC, "tenant": str(tenant_id) if tenant_id else ""},
    )


# Verification (as the owner role, which sees every tenant's rows) -----------------------------

_COLUMNS = ", ".join([*CHAINED_FIELDS, "prev_hash", "hash"])


def iter_rows(conn: Connection, *, batch: int = 5000) -> Iterator[dict[str, Any]]:
    """Stream the whole trail in seq order with keyset pagination (constant memory)."""
    last = 0
    while True:
        rows = (
            conn.execute(
                text(f"SELECT {_COLUMNS} FROM audit_events WHERE seq > :last ORDER BY seq LIMIT :n"),
                {"last": last, "n": batch},
            )
            .mappings()
            .all()
        )
        if not rows:
            return
        for r in rows:
            yield dict(r)
        last = int(rows[-1]["seq"])


def verify_database(conn: Connection) -> VerifyResult:
    head = conn.execute(text("SELECT seq, hash FROM audit_chain_head WHERE id = 1")).one()
    return verify_chain(iter_rows(conn), expected_head=(int(head.seq), bytes(head.hash)))
