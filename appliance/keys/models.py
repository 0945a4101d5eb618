from __future__ import annotations

import uuid

from sqlalchemy import ForeignKey, LargeBinary, String
from sqlalchemy.dialects.postgresql import UUID
from sqlalchemy.orm import Mapped, mapped_column

from appliance.db.base import Base, TimestampMixin
from appliance.tenants import models as _tenants  # noqa: F401  (the FK target must be mapped)


class TenantKey(TimestampMixin, Base):
    """A tenant's data key, stored only wrapped by the master key named by `kek_id`.

    Deleting this row is crypto-shredding: every blob and text of the tenant becomes unreadable.
    """

    __tablename__ = "tenant_keys"

    tenant_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True
    )
    wrapped_dek: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    kek_id: Mapped[str] = mapped_column(String(32), nullable=False, index=True)
