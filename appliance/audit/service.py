"""Write audit events in the same transaction as the change they record.

`record()` buffers an event on the session; `flush_pending()` (called by Database.transaction
just before COMMIT) takes the chain head's row lock, chains and inserts the events. The lock is
held only for the commit itself, so unrelated requests serialise for milliseconds, not for the
length of a request. If the insert fails, the transaction fails: no change without its record.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import Connection, func, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from appliance.audit import signing
from appliance.audit.chain import CHAINED_FIELDS, VerifyResult, link_hash, verify_chain
from appliance.audit.models import AuditChainHead, AuditCheckpoint, AuditEvent
from appliance.context import Actor, actor_var, client_addr_var, request_id_var
from appliance.db.engine import TENANT_GUC, Database, driver_rows, driver_sql
from appliance.errors import AppError
from appliance.settings import Settings


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


_EVENT_CASTS = {
    "seq": "bigint",
    "id": "uuid",
    "occurred_at": "timestamptz",
    "tenant_id": "uuid",
    "actor_type": "text",
    "actor_id": "text",
    "action": "text",
    "resource_type": "text",
    "resource_id": "text",
    "outcome": "text",
    "request_id": "text",
    "client_addr": "text",
    "details": "jsonb",
    "prev_hash": "bytea",
    "hash": "bytea",
}
_last_head: list[tuple[int, bytes]] = []
"""Where this process last left the chain head (seq, hash): the guess `flush_pending` tries first."""


def _chain(pending: list[PendingEvent], seq: int, prev_hash: bytes) -> list[dict[str, Any]]:
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
    return rows


async def _append_if_head(
    session: AsyncSession, rows: list[dict[str, Any]], head_seq: int, head_hash: bytes
) -> bool:
    """One round trip: move the head from (`head_seq`, `head_hash`) to the last row and insert the
    rows, or change nothing when the head is elsewhere (another process appended meanwhile). The UPDATE
    takes the head's row lock and, under READ COMMITTED, re-checks its condition against the latest
    committed head, so two writers can never both append after the same event."""
    params: dict[str, Any] = {
        "old_seq": head_seq,
        "old_hash": head_hash,
        "new_seq": rows[-1]["seq"],
        "new_hash": rows[-1]["hash"],
    }
    selects = []
    for i, row in enumerate(rows):
        values = []
        for column, cast in _EVENT_CASTS.items():
            params[f"{column}_{i}"] = json.dumps(row[column]) if column == "details" else row[column]
            values.append(f"CAST(:{column}_{i} AS {cast})")
        selects.append(f"SELECT {', '.join(values)} FROM head")
    sql = (
        "WITH head AS (UPDATE audit_chain_head SET seq = :new_seq, hash = :new_hash"
        " WHERE id = 1 AND seq = :old_seq AND hash = :old_hash RETURNING 1),"
        f" ins AS (INSERT INTO audit_events ({', '.join(_EVENT_CASTS)}) {' UNION ALL '.join(selects)}"
        " RETURNING 1)"
        " SELECT count(*) AS n FROM ins"
    )
    (inserted,) = await driver_rows(session, driver_sql(sql), params)
    return int(inserted.n) == len(rows)


async def flush_pending(session: AsyncSession) -> None:
    pending: list[PendingEvent] = session.info.pop("audit_pending", None) or []
    if not pending:
        return
    txn_tenant = session.info.get("tenant_id")
    same_tenant = all(event.tenant_id == txn_tenant for event in pending)
    if same_tenant and _last_head:
        # Usually nobody else appended since this process did: chain onto that head without
        # reading it first (saves a round trip and the row lock's wait on the way in).
        seq, prev_hash = _last_head[0]
        rows = _chain(pending, seq, prev_hash)
        if await _append_if_head(session, rows, seq, prev_hash):
            _last_head[:] = [(rows[-1]["seq"], rows[-1]["hash"])]
            return
    head = (
        await session.execute(
            select(AuditChainHead.seq, AuditChainHead.hash).where(AuditChainHead.id == 1).with_for_update()
        )
    ).one()
    rows = _chain(pending, int(head.seq), bytes(head.hash))
    _last_head[:] = [(rows[-1]["seq"], rows[-1]["hash"])]  # if this rolls back, the next guess misses
    head_update = (
        update(AuditChainHead)
        .where(AuditChainHead.id == 1)
        .values(seq=rows[-1]["seq"], hash=rows[-1]["hash"])
    )
    if same_tenant:
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


# Reading the tenant's trail (the API) ---------------------------------------------------------


@dataclass(frozen=True)
class EventFilters:
    action: str | None = None
    outcome: str | None = None
    actor_id: str | None = None
    resource_type: str | None = None
    resource_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None


def _encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"seq:{seq}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> int:
    try:
        kind, _, value = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode().partition(":")
        if kind != "seq":
            raise ValueError(kind)
        return int(value)
    except (ValueError, UnicodeDecodeError) as exc:
        raise AppError("The cursor is not valid.", code="invalid_cursor", status=422) from exc


async def list_events(
    session: AsyncSession,
    tenant_id: uuid.UUID,
    filters: EventFilters,
    *,
    cursor: str | None = None,
    limit: int = 100,
) -> tuple[Sequence[AuditEvent], str | None]:
    """The tenant's events, newest first, `limit` per page. RLS already limits the application role
    to the transaction's tenant; the explicit filter keeps the query honest on its own."""
    query = select(AuditEvent).where(AuditEvent.tenant_id == tenant_id)
    for column, value in (
        (AuditEvent.action, filters.action),
        (AuditEvent.outcome, filters.outcome),
        (AuditEvent.actor_id, filters.actor_id),
        (AuditEvent.resource_type, filters.resource_type),
        (AuditEvent.resource_id, filters.resource_id),
    ):
        if value is not None:
            query = query.where(column == value)
    if filters.since is not None:
        query = query.where(AuditEvent.occurred_at >= filters.since)
    if filters.until is not None:
        query = query.where(AuditEvent.occurred_at <= filters.until)
    if cursor:
        query = query.where(AuditEvent.seq < _decode_cursor(cursor))
    rows = (await session.execute(query.order_by(AuditEvent.seq.desc()).limit(limit + 1))).scalars().all()
    next_cursor = _encode_cursor(rows[limit - 1].seq) if len(rows) > limit else None
    return rows[:limit], next_cursor


# Signed checkpoints --------------------------------------------------------------------------


async def create_checkpoint(
    session: AsyncSession, private_key: Ed25519PrivateKey, *, now: datetime | None = None
) -> signing.Checkpoint | None:
    """Sign the chain head if it moved since the last checkpoint; None when there is nothing new.

    The head's row lock (the one appends take) makes the (seq, hash) signed a committed row's and
    serialises concurrent signers, so two sweepers never sign the same head twice.
    """
    head = (
        await session.execute(
            select(AuditChainHead.seq, AuditChainHead.hash).where(AuditChainHead.id == 1).with_for_update()
        )
    ).one()
    seq = int(head.seq)
    last = (await session.execute(select(func.max(AuditCheckpoint.seq)))).scalar_one_or_none()
    if seq == 0 or (last is not None and last >= seq):
        return None
    cp = signing.sign(private_key, seq, bytes(head.hash), now or datetime.now(UTC))
    session.add(
        AuditCheckpoint(
            seq=cp.seq, hash=cp.hash, signed_at=cp.signed_at, key_id=cp.key_id, signature=cp.signature
        )
    )
    await session.flush()
    return cp


async def checkpoint_due(session: AsyncSession, interval_s: int, *, now: datetime | None = None) -> bool:
    """True when the newest checkpoint is older than `interval_s` (or there is none)."""
    last = (await session.execute(select(func.max(AuditCheckpoint.signed_at)))).scalar_one_or_none()
    return last is None or ((now or datetime.now(UTC)) - last).total_seconds() >= interval_s


async def checkpoint_if_due(db: Database, settings: Settings) -> signing.Checkpoint | None:
    """What the workers' sweeper runs: a checkpoint when the last is older than the interval."""
    async with db.transaction() as session:
        if not await checkpoint_due(session, settings.audit_checkpoint_interval_s):
            return None
        return await create_checkpoint(session, signing.load_private_key(settings.audit_signing_key_path))


def _checkpoint(row: Any) -> signing.Checkpoint:
    return signing.Checkpoint(
        int(row.seq), bytes(row.hash), row.signed_at, str(row.key_id), bytes(row.signature)
    )


def list_checkpoints(
    conn: Connection, *, first: int | None = None, last: int | None = None
) -> list[signing.Checkpoint]:
    """Checkpoints in seq order, within [first, last] when given (one per interval: a few thousand a year)."""
    rows = conn.execute(
        text(
            "SELECT seq, hash, signed_at, key_id, signature FROM audit_checkpoints "
            "WHERE (CAST(:a AS bigint) IS NULL OR seq >= :a) AND (CAST(:b AS bigint) IS NULL OR seq <= :b) "
            "ORDER BY seq"
        ),
        {"a": first, "b": last},
    )
    return [_checkpoint(r) for r in rows]


# Verification (as the owner role, which sees every tenant's rows) -----------------------------

_COLUMNS = ", ".join([*CHAINED_FIELDS, "prev_hash", "hash"])


def iter_rows(
    conn: Connection, *, first: int = 1, last_seq: int | None = None, batch: int = 5000
) -> Iterator[dict[str, Any]]:
    """Stream the trail (or seqs first..last_seq) in seq order with keyset pagination (constant memory)."""
    last = first - 1
    stop = last_seq if last_seq is not None else 2**63 - 1
    while True:
        rows = (
            conn.execute(
                text(
                    f"SELECT {_COLUMNS} FROM audit_events WHERE seq > :last AND seq <= :stop "
                    "ORDER BY seq LIMIT :n"
                ),
                {"last": last, "stop": stop, "n": batch},
            )
            .mappings()
            .all()
        )
        if not rows:
            return
        for r in rows:
            yield dict(r)
        last = int(rows[-1]["seq"])


def verify_database(conn: Connection, public_keys: list[Ed25519PublicKey] | None = None) -> VerifyResult:
    """Recompute the whole chain; with `public_keys`, check every checkpoint too: its signature, and
    that the hash it signed is the chain's at its seq (the CLI always passes the appliance's key).
    Without keys the checkpoints are not looked at."""
    head = conn.execute(text("SELECT seq, hash FROM audit_chain_head WHERE id = 1")).one()
    anchors = signing.anchors(list_checkpoints(conn), public_keys) if public_keys is not None else []
    return verify_chain(iter_rows(conn), expected_head=(int(head.seq), bytes(head.hash)), anchors=anchors)
