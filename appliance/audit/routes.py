"""`GET /api/v1/audit`: the caller tenant's audit trail, for its admins (and system admins, per tenant)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from fastapi import APIRouter, Query

from appliance.audit import service
from appliance.audit.schemas import AuditEventList, AuditEventOut
from appliance.auth.deps import SessionDep, TenantAdminOrSystem
from appliance.auth.principal import Principal
from appliance.db.engine import set_tenant
from appliance.errors import AppError, Forbidden, NotFound, Unauthorized, problem_responses
from appliance.tenants import service as tenants

router = APIRouter(tags=["audit"])


async def _target_tenant(session: SessionDep, principal: Principal, requested: uuid.UUID | None) -> uuid.UUID:
    """Tenant admins read their own tenant's trail; system admins name the tenant (which must exist)."""
    if principal.is_system_admin:
        if requested is None:
            raise AppError("System admins must pass tenant_id.", code="tenant_id_required", status=422)
        await tenants.get_tenant(session, requested)
        await set_tenant(session, requested)
        return requested
    assert principal.tenant_id is not None
    if requested is not None and requested != principal.tenant_id:
        raise NotFound(f"No tenant {requested}.", code="tenant_not_found")
    return principal.tenant_id


@router.get(
    "/audit",
    response_model=AuditEventList,
    responses=problem_responses(Unauthorized, Forbidden, NotFound, AppError),
)
async def list_audit_events(
    principal: TenantAdminOrSystem,
    session: SessionDep,
    action: str | None = Query(default=None, description="e.g. document.download"),
    outcome: Literal["success", "failure", "denied"] | None = Query(default=None),
    actor_id: str | None = Query(default=None, description="An API key id."),
    resource_type: str | None = Query(default=None),
    resource_id: str | None = Query(default=None),
    since: datetime | None = Query(default=None, description="occurred_at >= since"),
    until: datetime | None = Query(default=None, description="occurred_at <= until"),
    cursor: str | None = Query(default=None, description="next_cursor from the previous page"),
    limit: int = Query(default=100, ge=1, le=1000),
    tenant_id: uuid.UUID | None = Query(default=None, description="System admins: the tenant to read."),
) -> AuditEventList:
    """The tenant's audit events, newest first (tenant admin). This read is itself audited
    (`audit.read`). `hash` places an event in the chain, to match it against a signed export."""
    target = await _target_tenant(session, principal, tenant_id)
    filters = service.EventFilters(action, outcome, actor_id, resource_type, resource_id, since, until)
    rows, next_cursor = await service.list_events(session, target, filters, cursor=cursor, limit=limit)
    service.record(
        session,
        "audit.read",
        tenant_id=target,
        resource_type="audit",
        details={
            "filters": {k: v for k, v in _filter_json(filters).items() if v is not None},
            "returned": len(rows),
            "seq_range": [rows[-1].seq, rows[0].seq] if rows else None,
        },
    )
    items = [AuditEventOut.model_validate({**_columns(r), "hash": bytes(r.hash).hex()}) for r in rows]
    return AuditEventList(items=items, next_cursor=next_cursor)


def _filter_json(filters: service.EventFilters) -> dict[str, str | None]:
    return {
        "action": filters.action,
        "outcome": filters.outcome,
        "actor_id": filters.actor_id,
        "resource_type": filters.resource_type,
        "resource_id": filters.resource_id,
        "since": filters.since.isoformat() if filters.since else None,
        "until": filters.until.isoformat() if filters.until else None,
    }


def _columns(row: object) -> dict[str, object]:
    return {f: getattr(row, f) for f in AuditEventOut.model_fields if f != "hash"}
