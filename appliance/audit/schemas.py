"""The audit API's contract: `GET /api/v1/audit` (tenant admins)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict


class AuditEventOut(BaseModel):
    """One recorded event with its chain position (`seq`, `hash`) so it can be matched to an export."""

    model_config = ConfigDict(from_attributes=True)

    seq: int
    id: uuid.UUID
    occurred_at: datetime
    tenant_id: uuid.UUID | None
    actor_type: str
    actor_id: str | None
    action: str
    resource_type: str | None
    resource_id: str | None
    outcome: str
    request_id: str | None
    client_addr: str | None
    details: dict[str, Any]
    hash: str


class AuditEventList(BaseModel):
    items: list[AuditEventOut]
    next_cursor: str | None = None
