"""Re-indexing with another embedding model: which model search and ingest use, and the switch-over.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from appliance.db.rls import app_role_ident

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    app = app_role_ident()
    # One row, global (the index is one): active_model NULL means the settings' / manifest's default.
    op.create_table(
        "embedding_state",
        sa.Column("id", sa.SmallInteger, primary_key=True),
        sa.Column("active_model", sa.String(100)),
        sa.Column("target_model", sa.String(100)),
        sa.Column("started_at", sa.DateTime(timezone=True)),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.CheckConstraint("id = 1", name="single_row"),
    )
    op.execute("INSERT INTO embedding_state (id) VALUES (1)")
    op.execute(f"GRANT SELECT, UPDATE ON embedding_state TO {app}")
    # Searchable chunks (of versions not deleted) not yet embedded by `p_model`, across tenants: a count
    # only (RLS hides the rows themselves). Chunks of deleted versions are never searched; purge removes them.
    op.execute(
        """
        CREATE FUNCTION app_chunks_not_embedded_by(p_model text) RETURNS bigint
        LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp
        AS $$
          SELECT count(*) FROM chunks c JOIN document_versions v ON v.id = c.version_id
          WHERE c.embedding_model <> p_model AND v.deleted_at IS NULL
        $$
        """
    )
    op.execute("REVOKE ALL ON FUNCTION app_chunks_not_embedded_by(text) FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION app_chunks_not_embedded_by(text) TO {app}")
    op.create_index("ix_chunks_embedding_model", "chunks", ["embedding_model"])


def downgrade() -> None:
    op.drop_index("ix_chunks_embedding_model", table_name="chunks")
    op.execute("DROP FUNCTION IF EXISTS app_chunks_not_embedded_by(text)")
    op.drop_table("embedding_state")
