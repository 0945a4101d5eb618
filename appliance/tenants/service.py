"""Tenants: create, list, get. Only system admins (and the CLI) create and list them."""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

import anyio
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from appliance.audit import service as audit
from appliance.backup.guard import allow_blob_deletion
from appliance.db.engine import set_tenant
from appliance.errors import AppError, Conflict, NotFound
from appliance.storage.base import ObjectStore
from appliance.tenants.models import Tenant

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


async def create_tenant(session: AsyncSession, *, name: str, display_name: str | None = None) -> Tenant:
    if not NAME_RE.match(name):
        raise AppError(
            "Tenant names are 1-63 characters of lowercase letters, digits and '-', starting with a "
            "letter or digit.",
            code="invalid_tenant_name",
            status=422,
        )
    tenant = Tenant(name=name, display_name=display_name or name)
    try:
        async with session.begin_nested():
            session.add(tenant)
            await session.flush()
    except IntegrityError as exc:
        raise Conflict(f"A tenant named {name!r} already exists.", code="tenant_exists") from exc
    await session.refresh(tenant)
    # The event belongs to the new tenant, so its admins see their tenant's creation.
    await set_tenant(session, tenant.id)
    audit.record(
        session,
        "tenant.create",
        tenant_id=tenant.id,
        resource_type="tenant",
        resource_id=tenant.id,
        details={"name": name},
    )
    return tenant


async def list_tenants(
    session: AsyncSession, *, after: str | None = None, limit: int = 100
) -> Sequence[Tenant]:
    stmt = select(Tenant).order_by(Tenant.name).limit(limit)
    if after:
        stmt = stmt.where(Tenant.name > after)
    return (await session.execute(stmt)).scalars().all()


async def get_tenant(session: AsyncSession, tenant_id: uuid.UUID, *, include_deleted: bool = False) -> Tenant:
    tenant = await session.get(Tenant, tenant_id)
    if tenant is None or (tenant.status == "deleted" and not include_deleted):
        raise NotFound(f"No tenant {tenant_id}.", code="tenant_not_found")
    return tenant


async def get_tenant_by_name(session: AsyncSession, name: str, *, include_deleted: bool = False) -> Tenant:
    tenant = (await session.execute(select(Tenant).where(Tenant.name == name))).scalar_one_or_none()
    if tenant is None or (tenant.status == "deleted" and not include_deleted):
        raise NotFound(f"No tenant named {name!r}.", code="tenant_not_found")
    return tenant


async def mark_deleted(session: AsyncSession, tenant: Tenant) -> bool:
    """Crypto-shred and close a tenant in one transaction: its data key is destroyed first, its API
    keys revoked, its documents hidden. Returns whether a data key existed. Blobs are purged after."""
    from sqlalchemy import update

    from appliance.auth.models import ApiKey
    from appliance.documents.models import Document, DocumentVersion
    from appliance.keys.service import destroy_tenant_key

    await set_tenant(session, tenant.id)
    destroyed = await destroy_tenant_key(session, tenant.id)
    now = datetime.now(UTC)
    await session.execute(
        update(ApiKey)
        .where(ApiKey.tenant_id == tenant.id, ApiKey.revoked_at.is_(None))
        .values(revoked_at=now)
    )
    await session.execute(
        update(Document)
        .where(Document.tenant_id == tenant.id, Document.status == "active")
        .values(status="deleted", deleted_at=now)
    )
    await session.execute(
        update(DocumentVersion)
        .where(DocumentVersion.tenant_id == tenant.id, DocumentVersion.deleted_at.is_(None))
        .values(deleted_at=now)
    )
    if tenant.status != "deleted":
        tenant.status, tenant.deleted_at = "deleted", now
        await session.flush()
        audit.record(
            session,
            "tenant.delete",
            resource_type="tenant",
            resource_id=tenant.id,
            details={"name": tenant.name, "data_key_destroyed": destroyed},
        )
    return destroyed


async def purge_deleted(session: AsyncSession, store: ObjectStore, tenant_id: uuid.UUID) -> int:
    """Remove a deleted tenant's blobs, then its document rows (chunks and summaries cascade) and its
    classification labels (idempotent). Audit rows stay."""
    from sqlalchemy import delete, select

    from appliance.documents.models import Document, DocumentVersion
    from appliance.enrich.models import Label

    tenant = await get_tenant(session, tenant_id, include_deleted=True)
    if tenant.status != "deleted":
        raise AppError(f"Tenant {tenant.name} is not deleted.", code="tenant_not_deleted", status=409)
    await set_tenant(session, tenant_id)
    rows = (await session.execute(select(DocumentVersion.object_key, DocumentVersion.text_object_key))).all()
    keys = [k for row in rows for k in row if k]
    if keys:
        await allow_blob_deletion(session)  # not while a backup still copies blobs
    for key in keys:
        await anyio.to_thread.run_sync(store.delete, key)
    await session.execute(delete(DocumentVersion))
    await session.execute(delete(Document))
    await session.execute(delete(Label))
    audit.record(
        session, "tenant.purge", resource_type="tenant", resource_id=tenant_id, details={"blobs": len(keys)}
    )
    return len(keys)
