from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from appliance.enrich.schemas import (
    CLASSIFY_DOC,
    SUMMARIZE_DOC,
    AssignedLabel,
    ClassifyMethod,
    EnrichmentJobOut,
    SummaryOut,
)


class DocumentMetadata(BaseModel):
    """The optional `metadata` part of an upload (JSON)."""

    model_config = ConfigDict(extra="forbid")

    title: str | None = Field(default=None, max_length=500)
    tags: list[str] = Field(default_factory=list, max_length=50)
    extra: dict[str, Any] = Field(default_factory=dict, description="Free JSON, kept as given.")
    # Enrichment options, the same as the `summarize` and `classify` query parameters (either asks).
    summarize: bool = Field(default=False, description=SUMMARIZE_DOC)
    classify: ClassifyMethod | bool = Field(default=False, description=CLASSIFY_DOC)

    @field_validator("tags")
    @classmethod
    def _tags(cls, tags: list[str]) -> list[str]:
        clean = []
        for tag in tags:
            tag = tag.strip()
            if not tag or len(tag) > 100:
                raise ValueError("tags are 1-100 characters")
            if tag not in clean:
                clean.append(tag)
        return clean


class VersionOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    document_id: uuid.UUID
    version: int
    sha256: str
    size: int
    content_type: str
    source_filename: str | None
    ingest_status: str
    created_at: datetime


class DocumentOut(BaseModel):
    id: uuid.UUID
    title: str | None
    tags: list[str]
    metadata: dict[str, Any]
    status: str
    created_at: datetime
    updated_at: datetime
    current_version: VersionOut
    summary: SummaryOut | None = Field(
        default=None,
        description="The current version's summary (upload with `summarize=true`), once its job succeeded.",
    )
    labels: list[AssignedLabel] = Field(
        default_factory=list,
        description="The tenant's labels assigned to the current version (upload with `classify=true`), "
        "best first.",
    )
    enrichment_jobs: list[EnrichmentJobOut] = Field(
        default_factory=list,
        description="The current version's summarize/classify jobs and their status (details at /jobs/{id}).",
    )


class DocumentList(BaseModel):
    items: list[DocumentOut]
    next_cursor: str | None = None


class VersionList(BaseModel):
    items: list[VersionOut]


class DownloadUrlRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version_id: uuid.UUID | None = Field(default=None, description="Default: the current version.")
    expires_in: int = Field(default=300, ge=1, description="Seconds until the URL stops working.")


class DownloadUrl(BaseModel):
    url: str
    expires_at: datetime
    version_id: uuid.UUID
