from __future__ import annotations

import uuid

from fastapi import APIRouter, Query, status

from appliance.audit import service as audit
from appliance.auth.deps import AnyPrincipal, SessionDep, SystemAdmin
from appliance.errors import AppError, Conflict, Forbidden, NotFound, Unauthorized, problem_responses
from appliance.tenants import service
from appliance.tenants.schemas import TenantCreate, TenantList, TenantOut

router = APIRouter(prefix="/tenants", tags=["tenants"])


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=TenantOut,
    responses=problem_responses(Unauthorized, Forbidden, Conflict, AppError),
)
async def create_tenant(body: TenantCreate, principal: SystemAdmin, session: SessionDep) -> TenantOut:
    """Create a tenant (system admin)."""
    tenant = await service.create_tenant(session, name=body.name, display_name=body.display_name)
    return TenantOut.model_validate(tenant)


@router.get("", response_model=TenantList, responses=problem_responses(Unauthorized, Forbidden))
async def list_tenants(
    principal: SystemAdmin,
    session: SessionDep,
    cursor: str | None = Query(default=None, description="next_cursor from the previous page"),
    limit: int = Query(default=100, ge=1, le=500),
) -> TenantList:
    """List tenants by name (system admin)."""
    rows = await service.list_tenants(session, after=cursor, limit=limit)
    audit.record(
        session, "tenant.list", tenant_id=None, resource_type="tenant", details={"returned": len(rows)}
    )
    items = [TenantOut.model_validate(t) for t in rows]
    return TenantList(items=items, next_cursor=items[-1].name if len(items) == limit else None)


@router.get("/{tenant_id}", response_model=TenantOut, responses=problem_responses(Unauthorized, NotFound))
async def get_tenant(tenant_id: uuid.UUID, principal: AnyPrincipal, session: SessionDep) -> TenantOut:
    """A system admin reads any tenant; a tenant key reads only its own (others are 404)."""
    if not principal.is_system_admin and principal.tenant_id != tenant_id:
        raise NotFound(f"No tenant {tenant_id}.", code="tenant_not_found")
    tenant = await service.get_tenant(session, tenant_id)
    audit.record(session, "tenant.read", tenant_id=tenant.id, resource_type="tenant", resource_id=tenant.id)
    return TenantOut.model_validate(tenant)
