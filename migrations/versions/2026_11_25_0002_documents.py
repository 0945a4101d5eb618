"""Documents and versions; tenant data keys (wrapped); tenant deletion state.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from appliance.db.rls import app_role_ident, enable_tenant_rls

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _timestamps() -> list[sa.Column]:
    return [
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    ]


def upgrade() -> None:
    app = app_role_ident()
    op.drop_constraint(op.f("ck_tenants_status_known"), "tenants", type_="check")
    op.create_check_constraint("status_known", "tenants", "status IN ('active', 'suspended', 'deleted')")
    op.add_column("tenants", sa.Column("deleted_at", sa.DateTime(timezone=True)))

    op.create_table(
        "tenant_keys",
        sa.Column(
            "tenant_id",
            postgresql.UUID(as_uuid=True),
            sa.ForeignKey("tenants.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("wrapped_dek", sa.LargeBinary, nullable=False),
        sa.Column("kek_id", sa.String(32), nullable=False),
        *_timestamps(),
    )
    op.create_index("ix_tenant_keys_kek_id", "tenant_keys", ["kek_id"])

    op.create_table(
        "documents",
        sa.Column(
            "id", postgresql.UUID(as_uuid=True), primary_key=True, server_default=sa.text("gen_random_uuid()")
        ),
        sa.Column(
            "tenant_id",
            postgresql.UUID(as_uuid=True),
            sa.ForeignKey("tenants.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("title", sa.String(500)),
        sa.Column("tags", postgresql.ARRAY(sa.Text), nullable=False, server_default="{}"),
        sa.Column("metadata", postgresql.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("status", sa.String(16), nullable=False, server_default="active"),
        sa.Column("current_version", sa.Integer, nullable=False, server_default="1"),
        sa.Column("created_by", postgresql.UUID(as_uuid=True)),
        sa.Column("deleted_at", sa.DateTime(timezone=True)),
        sa.Column("purged_at", sa.DateTime(timezone=True)),
        *_timestamps(),
        sa.CheckConstraint("status IN ('active', 'deleted')", name="status_known"),
    )
    op.create_index("ix_documents_tenant_created", "documents", ["tenant_id", "created_at", "id"])
    op.create_index("ix_documents_tags", "documents", ["tags"], postgresql_using="gin")

    op.create_table(
        "document_versions",
        sa.Column(
            "id", postgresql.UUID(as_uuid=True), primary_key=True, server_default=sa.text("gen_random_uuid()")
        ),
        sa.Column("tenant_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column(
            "document_id",
            postgresql.UUID(as_uuid=True),
            sa.ForeignKey("documents.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("content_sha256", sa.LargeBinary(32), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("content_type", sa.String(200), nullable=False),
        sa.Column("source_filename", sa.String(500)),
        sa.Column("object_key", sa.String(200), nullable=False),
        sa.Column("stored_size", sa.BigInteger, nullable=False),
        sa.Column("ingest_status", sa.String(16), nullable=False, server_default="stored"),
        sa.Column("created_by", postgresql.UUID(as_uuid=True)),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("deleted_at", sa.DateTime(timezone=True)),
        sa.UniqueConstraint("document_id", "version"),
        sa.UniqueConstraint("object_key"),
    )
    # Dedup: one live copy of given bytes per tenant.
    op.create_index(
        "uq_document_versions_tenant_sha256",
        "document_versions",
        ["tenant_id", "content_sha256"],
        unique=True,
        postgresql_where=sa.text("deleted_at IS NULL"),
    )
    op.create_index("ix_document_versions_document_id", "document_versions", ["document_id"])

    for table in ("tenant_keys", "documents", "document_versions"):
        for stmt in enable_tenant_rls(table):
            op.execute(stmt)
    op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON tenant_keys, documents, document_versions TO {app}")


def downgrade() -> None:
    op.drop_table("document_versions")
    op.drop_table("documents")
    op.drop_table("tenant_keys")
    op.execute("UPDATE tenants SET status = 'suspended' WHERE status = 'deleted'")
    op.drop_column("tenants", "deleted_at")
    op.drop_constraint(op.f("ck_tenants_status_known"), "tenants", type_="check")
    op.create_check_constraint("status_known", "tenants", "status IN ('active', 'suspended')")
