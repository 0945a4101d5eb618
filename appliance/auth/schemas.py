from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

TenantRole = Literal["admin", "editor", "viewer"]


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200, examples=["ingest-service"])
    role: TenantRole = "viewer"
    expires_at: datetime | None = Field(default=None, description="Optional expiry (timezone-aware).")
    tenant_id: uuid.UUID | None = Field(
        default=None, description="System admins only: the tenant to create the key in."
    )


class KeyOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    tenant_id: uuid.UUID | None
    name: str
    prefix: str
    role: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None


class KeyCreated(KeyOut):
    key: str = Field(description="The API key. Shown only in this response; store it now.")


class KeyList(BaseModel):
    items: list[KeyOut]


class TenantRef(BaseModel):
    id: uuid.UUID
    name: str


class WhoAmI(BaseModel):
    key_id: uuid.UUID
    key_prefix: str
    role: str
    tenant: TenantRef | None
