"""Archived audit segments: contiguous runs of the chain copied to the object store (docs/audit.md).

One row per segment: the seq range (ending at a signed checkpoint), the object key and the sha256
of the segment as stored. The audit rows themselves stay: the application never deletes them. Only
the owner role (the CLI) writes here.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_archives",
        sa.Column("first_seq", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("last_seq", sa.BigInteger, nullable=False, unique=True),
        sa.Column("object_key", sa.String(200), nullable=False),
        sa.Column("sha256", sa.LargeBinary(32), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("events", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.CheckConstraint("first_seq <= last_seq", name="range_ordered"),
    )


def downgrade() -> None:
    op.drop_table("audit_archives")
