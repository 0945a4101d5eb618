from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import CheckConstraint, DateTime, ForeignKey, LargeBinary, String
from sqlalchemy.dialects.postgresql import UUID
from sqlalchemy.orm import Mapped, mapped_column

from appliance.db.base import Base, TimestampMixin, UUIDPrimaryKey
from appliance.tenants import models as _tenants  # noqa: F401  (the FK target must be mapped)

ROLES = ("system_admin", "admin", "editor", "viewer")


class ApiKey(UUIDPrimaryKey, TimestampMixin, Base):
    """An API key. Only its SHA-256 is stored; the prefix is public and identifies it in logs."""

    __tablename__ = "api_keys"
    __table_args__ = (
        CheckConstraint("role IN ('system_admin', 'admin', 'editor', 'viewer')", name="role_known"),
        CheckConstraint("(role = 'system_admin') = (tenant_id IS NULL)", name="system_keys_have_no_tenant"),
    )

    tenant_id: Mapped[uuid.UUID | None] = mapped_column(
        UUID(as_uuid=True), ForeignKey("tenants.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(200), nullable=False)
    prefix: Mapped[str] = mapped_column(String(32), unique=True, nullable=False)
    secret_hash: Mapped[bytes] = mapped_column(LargeBinary(32), nullable=False)
    role: Mapped[str] = mapped_column(String(16), nullable=False)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_by: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
