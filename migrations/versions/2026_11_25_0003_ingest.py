"""Ingestion: jobs (the outbox and the status users see), chunks with vectors and full-text.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from pgvector.sqlalchemy import Vector
from sqlalchemy.dialects import postgresql

from appliance.db.rls import app_role_ident, enable_tenant_rls

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

EMBEDDING_DIMENSIONS = 384  # all-minilm-l6-v2; a model with another size gets its own column by migration


def upgrade() -> None:
    app = app_role_ident()
    op.execute("UPDATE document_versions SET ingest_status = 'queued' WHERE ingest_status = 'stored'")
    op.alter_column("document_versions", "ingest_status", server_default="queued")
    op.create_check_constraint(
        "ingest_status_known",
        "document_versions",
        "ingest_status IN ('queued', 'extracting', 'chunking', 'embedding', 'ready', 'failed', 'needs_ocr')",
    )
    op.add_column("document_versions", sa.Column("text_object_key", sa.String(200)))
    op.add_column("document_versions", sa.Column("text_chars", sa.BigInteger))
    op.add_column("document_versions", sa.Column("page_count", sa.Integer))
    op.add_column("document_versions", sa.Column("ingest_error", sa.Text))

    op.create_table(
        "jobs",
        sa.Column(
            "id", postgresql.UUID(as_uuid=True), primary_key=True, server_default=sa.text("gen_random_uuid()")
        ),
        sa.Column(
            "tenant_id",
            postgresql.UUID(as_uuid=True),
            sa.ForeignKey("tenants.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("document_id", postgresql.UUID(as_uuid=True)),
        sa.Column("version_id", postgresql.UUID(as_uuid=True)),
        sa.Column("status", sa.String(16), nullable=False, server_default="queued"),
        sa.Column("stage", sa.String(16), nullable=False, server_default="queued"),
        sa.Column("progress", sa.SmallInteger, nullable=False, server_default="0"),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("max_attempts", sa.Integer, nullable=False, server_default="5"),
        sa.Column("error_code", sa.String(64)),
        sa.Column("error", sa.Text),
        sa.Column("enqueued_at", sa.DateTime(timezone=True)),
        sa.Column("started_at", sa.DateTime(timezone=True)),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True)),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.CheckConstraint(
            "status IN ('queued', 'running', 'retrying', 'succeeded', 'failed', 'dead')", name="status_known"
        ),
        sa.CheckConstraint("progress BETWEEN 0 AND 100", name="progress_range"),
    )
    op.create_index("ix_jobs_tenant_status", "jobs", ["tenant_id", "status", "created_at"])
    op.create_index("ix_jobs_version_kind", "jobs", ["version_id", "kind"], unique=True)
    op.create_index(
        "ix_jobs_sweep",
        "jobs",
        ["status", "heartbeat_at"],
        postgresql_where=sa.text("status IN ('queued', 'running', 'retrying')"),
    )

    op.create_table(
        "chunks",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("tenant_id", postgresql.UUID(as_uuid=True), nullable=False),
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
        sa.Column("ordinal", sa.Integer, nullable=False),
        sa.Column("text_enc", sa.LargeBinary, nullable=False),
        sa.Column("char_start", sa.Integer, nullable=False),
        sa.Column("char_end", sa.Integer, nullable=False),
        sa.Column("page_start", sa.Integer),
        sa.Column("page_end", sa.Integer),
        sa.Column("token_count", sa.Integer, nullable=False),
        sa.Column("embedding", Vector(EMBEDDING_DIMENSIONS), nullable=False),
        sa.Column("embedding_model", sa.String(100), nullable=False),
        sa.Column("tsv", postgresql.TSVECTOR, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.UniqueConstraint("version_id", "ordinal"),
    )
    op.create_index("ix_chunks_tenant_document", "chunks", ["tenant_id", "document_id"])
    op.execute("CREATE INDEX ix_chunks_embedding_hnsw ON chunks USING hnsw (embedding vector_cosine_ops)")
    op.execute("CREATE INDEX ix_chunks_tsv ON chunks USING gin (tsv)")

    for table in ("jobs", "chunks"):
        for stmt in enable_tenant_rls(table):
            op.execute(stmt)
    op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON jobs, chunks TO {app}")

    # The sweeper re-drives jobs of every tenant: a narrow SECURITY DEFINER function lists the ids
    # (and nothing else) of jobs that are queued but not enqueued recently, or running with a stale
    # heartbeat (their worker died).
    op.execute(
        """
        CREATE FUNCTION app_stale_jobs(p_queued_after interval, p_heartbeat_after interval, p_limit int)
        RETURNS TABLE (id uuid, tenant_id uuid, kind text)
        LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp
        AS $$
          SELECT j.id, j.tenant_id, j.kind FROM jobs j
          WHERE (j.status IN ('queued', 'retrying')
                 AND coalesce(j.enqueued_at, j.created_at) < now() - p_queued_after)
             OR (j.status = 'running' AND coalesce(j.heartbeat_at, j.started_at) < now() - p_heartbeat_after)
          ORDER BY j.created_at LIMIT p_limit
        $$
        """
    )
    op.execute("REVOKE ALL ON FUNCTION app_stale_jobs(interval, interval, int) FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION app_stale_jobs(interval, interval, int) TO {app}")


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS app_stale_jobs(interval, interval, int)")
    op.drop_table("chunks")
    op.drop_table("jobs")
    for col in ("ingest_error", "page_count", "text_chars", "text_object_key"):
        op.drop_column("document_versions", col)
    op.drop_constraint(op.f("ck_document_versions_ingest_status_known"), "document_versions", type_="check")
    op.alter_column("document_versions", "ingest_status", server_default="stored")
    op.execute("UPDATE document_versions SET ingest_status = 'stored'")
