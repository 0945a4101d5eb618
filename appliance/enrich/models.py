from __future__ import annotations

import uuid
from typing import Any

from pgvector.sqlalchemy import Vector
from sqlalchemy import CheckConstraint, ForeignKey, Integer, LargeBinary, String, Text, UniqueConstraint
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import Mapped, mapped_column

from appliance.db.base import Base, TimestampMixin, UUIDPrimaryKey
from appliance.documents import models as _documents  # noqa: F401  (the FK targets must be mapped)
from appliance.ingest.models import EMBEDDING_DIMENSIONS


class Label(UUIDPrimaryKey, TimestampMixin, Base):
    """One of a tenant's labels for `classify`. The vector is a cache of "name: description" embedded
    by `embedding_model`; it is cleared when the text changes and refilled by the next classify job."""

    __tablename__ = "labels"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)

    tenant_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False
    )
    name: Mapped[str] = mapped_column(String(100), nullable=False)
    description: Mapped[str] = mapped_column(Text, nullable=False, server_default="")
    position: Mapped[int] = mapped_column(Integer, nullable=False)
    embedding: Mapped[list[float] | None] = mapped_column(Vector(EMBEDDING_DIMENSIONS))
    embedding_model: Mapped[str | None] = mapped_column(String(100))


class DocumentEnrichment(UUIDPrimaryKey, TimestampMixin, Base):
    """The result of one enrichment job, one row per (version, kind): a re-run overwrites it.

    `kind` "summary": `content_enc` holds the text sealed with the tenant key (BlobContext kind
    "summary"). `kind` "labels": `labels` holds [{"name", "score", "method"}], best first, in clear
    like the label names themselves. `created_at` is when this result was produced."""

    __tablename__ = "document_enrichments"
    __table_args__ = (
        CheckConstraint("kind IN ('summary', 'labels')", name="kind_known"),
        CheckConstraint(
            "(kind = 'summary' AND content_enc IS NOT NULL) OR (kind = 'labels' AND labels IS NOT NULL)",
            name="result_present",
        ),
        UniqueConstraint("version_id", "kind"),
    )

    tenant_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False
    )
    document_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("documents.id", ondelete="CASCADE"), nullable=False, index=True
    )
    version_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("document_versions.id", ondelete="CASCADE"), nullable=False
    )
    kind: Mapped[str] = mapped_column(String(16), nullable=False)
    method: Mapped[str] = mapped_column(String(32), nullable=False)
    model: Mapped[str] = mapped_column(String(100), nullable=False)
    content_enc: Mapped[bytes | None] = mapped_column(LargeBinary)
    labels: Mapped[list[dict[str, Any]] | None] = mapped_column(JSONB)
    details: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, server_default="{}")
    job_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
