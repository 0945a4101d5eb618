from __future__ import annotations

import uuid
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field


class TenantCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        min_length=1,
        max_length=63,
        examples=["acme-bank"],
        description="Lowercase letters, digits and '-'; unique.",
    )
    display_name: str | None = Field(default=None, max_length=200)


class TenantOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    name: str
    display_name: str
    status: str
    created_at: datetime


class TenantList(BaseModel):
    items: list[TenantOut]
    next_cursor: str | None = None
