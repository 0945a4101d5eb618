from __future__ import annotations

import uuid
from dataclasses import dataclass

ROLE_RANK = {"viewer": 1, "editor": 2, "admin": 3}


@dataclass(frozen=True)
class Principal:
    """Who is calling: one API key, its role and (unless a system admin) its tenant."""

    key_id: uuid.UUID
    key_prefix: str
    role: str
    tenant_id: uuid.UUID | None
    tenant_name: str | None

    @property
    def is_system_admin(self) -> bool:
        return self.role == "system_admin"

    def has_role(self, minimum: str) -> bool:
        """Tenant roles are ordered viewer < editor < admin; a system admin holds no tenant role."""
        if self.is_system_admin:
            return False
        return ROLE_RANK.get(self.role, 0) >= ROLE_RANK[minimum]
