from __future__ import annotations

import uuid

from fastapi import APIRouter, Query, status

from appliance.audit import service as audit
from appliance.auth import service
from appliance.auth.deps import AnyPrincipal, SessionDep, TenantAdminOrSystem
from appliance.auth.principal import Principal
from appliance.auth.schemas import KeyCreate, KeyCreated, KeyList, KeyOut, TenantRef, WhoAmI
from appliance.errors import AppError, Forbidden, NotFound, Unauthorized, problem_responses
from appliance.tenants import service as tenants

router = APIRouter(tags=["auth"])


async def _target_tenant(session: SessionDep, principal: Principal, requested: uuid.UUID | None) -> uuid.UUID:
    """Tenant admins act on their own tenant; system admins must name one (which must exist)."""
    if principal.is_system_admin:
        if requested is None:
            raise AppError("System admins must pass tenant_id.", code="tenant_id_required", status=422)
        await tenants.get_tenant(session, requested)
        return requested
    assert principal.tenant_id is not None
    if requested is not None and requested != principal.tenant_id:
        raise NotFound(f"No tenant {requested}.", code="tenant_not_found")
    return principal.tenant_id


@router.get("/whoami", response_model=WhoAmI, responses=problem_responses(Unauthorized))
async def whoami(principal: AnyPrincipal) -> WhoAmI:
    tenant = (
        TenantRef(id=principal.tenant_id, name=principal.tenant_name or "") if principal.tenant_id else None
    )
    return WhoAmI(
        key_id=principal.key_id, key_prefix=principal.key_prefix, role=principal.role, tenant=tenant
    )


@router.post(
    "/keys",
    status_code=status.HTTP_201_CREATED,
    response_model=KeyCreated,
    responses=problem_responses(Unauthorized, Forbidden, NotFound, AppError),
)
async def create_key(body: KeyCreate, principal: TenantAdminOrSystem, session: SessionDep) -> KeyCreated:
    """Create an API key (tenant admin). The key is in this response only."""
    tenant_id = await _target_tenant(session, principal, body.tenant_id)
    row, plaintext = await service.create_key(
        session,
        tenant_id=tenant_id,
        name=body.name,
        role=body.role,
        expires_at=body.expires_at,
        created_by=principal.key_id,
    )
    return KeyCreated(**KeyOut.model_validate(row).model_dump(), key=plaintext)


@router.get("/keys", response_model=KeyList, responses=problem_responses(Unauthorized, Forbidden, NotFound))
async def list_keys(
    principal: TenantAdminOrSystem, session: SessionDep, tenant_id: uuid.UUID | None = Query(default=None)
) -> KeyList:
    """List the tenant's API keys (never their secrets)."""
    target = await _target_tenant(session, principal, tenant_id)
    rows = await service.list_keys(session, tenant_id=target)
    audit.record(session, "api_key.list", resource_type="api_key", details={"returned": len(rows)})
    return KeyList(items=[KeyOut.model_validate(r) for r in rows])


@router.get(
    "/keys/{key_id}", response_model=KeyOut, responses=problem_responses(Unauthorized, Forbidden, NotFound)
)
async def get_key(
    key_id: uuid.UUID,
    principal: TenantAdminOrSystem,
    session: SessionDep,
    tenant_id: uuid.UUID | None = Query(default=None),
) -> KeyOut:
    target = await _target_tenant(session, principal, tenant_id)
    row = await service.get_key(session, tenant_id=target, key_id=key_id)
    audit.record(session, "api_key.read", resource_type="api_key", resource_id=row.id)
    return KeyOut.model_validate(row)


@router.post(
    "/keys/{key_id}/revoke",
    response_model=KeyOut,
    responses=problem_responses(Unauthorized, Forbidden, NotFound),
)
async def revoke_key(
    key_id: uuid.UUID,
    principal: TenantAdminOrSystem,
    session: SessionDep,
    tenant_id: uuid.UUID | None = Query(default=None),
) -> KeyOut:
    """Revoke a key at once; it is kept (revoked) for the audit trail."""
    target = await _target_tenant(session, principal, tenant_id)
    return KeyOut.model_validate(await service.revoke_key(session, tenant_id=target, key_id=key_id))
