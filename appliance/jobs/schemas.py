from __future__ import annotations

import uuid
from datetime import datetime

from pydantic import BaseModel, ConfigDict


class JobOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    kind: str
    document_id: uuid.UUID | None
    version_id: uuid.UUID | None
    status: str
    stage: str
    progress: int
    attempts: int
    max_attempts: int
    error_code: str | None
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime


class JobList(BaseModel):
    items: list[JobOut]
    next_cursor: str | None = None
