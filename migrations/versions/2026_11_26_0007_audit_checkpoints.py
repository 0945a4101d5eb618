"""Signed audit checkpoints: Ed25519 signatures over the hash chain's head (docs/audit.md).

Global like the chain (no tenant column, no RLS: a checkpoint holds a sequence number and hashes,
nothing of any tenant). The application role signs (INSERT) and reads (SELECT) them, never
rewrites or deletes one.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from appliance.db.rls import app_role_ident

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_checkpoints",
        sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("hash", sa.LargeBinary(32), nullable=False),
        sa.Column("signed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("signature", sa.LargeBinary(64), nullable=False),
    )
    op.execute(f"GRANT SELECT, INSERT ON audit_checkpoints TO {app_role_ident()}")


def downgrade() -> None:
    op.drop_table("audit_checkpoints")
