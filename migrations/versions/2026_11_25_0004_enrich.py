"""Enrichment: what each version asked for (summary, labels), per-tenant labels, and the results.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from pgvector.sqlalchemy import Vector
from sqlalchemy.dialects import postgresql

from appliance.db.rls import app_role_ident, enable_tenant_rls

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

EMBEDDING_DIMENSIONS = 384  # the chunks' vector size (0003): label vectors are compared with them


def _timestamps() -> list[sa.Column]:
    return [
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    ]


def upgrade() -> None:
    app = app_role_ident()
    # The enrichment a version's uploads asked for: {"summarize": true, "classify": "embedding" | "llm"}.
    # The job that indexes the version creates the follow-up jobs from it, in the same transaction.
    op.add_column(
        "document_versions",
        sa.Column("enrich", postgresql.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    )

    op.create_table(
        "labels",
        sa.Column(
            "id", postgresql.UUID(as_uuid=True), primary_key=True, server_default=sa.text("gen_random_uuid()")
        ),
        sa.Column(
            "tenant_id",
            postgresql.UUID(as_uuid=True),
            sa.ForeignKey("tenants.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("description", sa.Text, nullable=False, server_default=""),
        sa.Column("position", sa.Integer, nullable=False),
        # A cache: the label's "name: description" embedded by `embedding_model`, filled by the first
        # classify job that needs it and cleared when the text changes.
        sa.Column("embedding", Vector(EMBEDDING_DIMENSIONS)),
        sa.Column("embedding_model", sa.String(100)),
        *_timestamps(),
        sa.UniqueConstraint("tenant_id", "name"),
    )

    op.create_table(
        "document_enrichments",
        sa.Column(
            "id", postgresql.UUID(as_uuid=True), primary_key=True, server_default=sa.text("gen_random_uuid()")
        ),
        sa.Column(
            "tenant_id",
            postgresql.UUID(as_uuid=True),
            sa.ForeignKey("tenants.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column(
            "document_id",
            postgresql.UUID(as_uuid=True),
            sa.ForeignKey("documents.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column(
            "version_id",
            postgresql.UUID(as_uuid=True),
            sa.ForeignKey("document_versions.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("method", sa.String(32), nullable=False),
        sa.Column("model", sa.String(100), nullable=False),
        sa.Column("content_enc", sa.LargeBinary),  # the summary, sealed with the tenant key (kind "summary")
        sa.Column("labels", postgresql.JSONB),  # [{"name", "score", "method"}], best first
        sa.Column("details", postgresql.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("job_id", postgresql.UUID(as_uuid=True)),
        *_timestamps(),
        sa.CheckConstraint("kind IN ('summary', 'labels')", name="kind_known"),
        sa.CheckConstraint(
            "(kind = 'summary' AND content_enc IS NOT NULL) OR (kind = 'labels' AND labels IS NOT NULL)",
            name="result_present",
        ),
        # One result per (version, kind): a re-run overwrites it.
        sa.UniqueConstraint("version_id", "kind"),
    )
    op.create_index("ix_document_enrichments_document_id", "document_enrichments", ["document_id"])

    for table in ("labels", "document_enrichments"):
        for stmt in enable_tenant_rls(table):
            op.execute(stmt)
    op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON labels, document_enrichments TO {app}")


def downgrade() -> None:
    op.drop_table("document_enrichments")
    op.drop_table("labels")
    op.drop_column("document_versions", "enrich")
