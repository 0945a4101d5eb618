"""Tenants: create, list, get. Only system admins (and the CLI) create and list them."""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from appliance.audit import service as audit
from appliance.db.engine import set_tenant
from appliance.errors import AppError, Conflict, NotFound
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


async def get_tenant(session: AsyncSession, tenant_id: uuid.UUID) -> Tenant:
    tenant = await session.get(Tenant, tenant_id)
    if tenant is None:
        raise NotFound(f"No tenant {tenant_id}.", code="tenant_not_found")
    return tenant


async def get_tenant_by_name(session: AsyncSession, name: str) -> Tenant:
    tenant = (await session.execute(select(Tenant).where(Tenant.name == name))).scalar_one_or_none()
    if tenant is None:
        raise NotFound(f"No tenant named {name!r}.", code="tenant_not_found")
    return tenant
