"""API keys: authenticate, create, list, revoke. Services flush; the caller's transaction commits."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession

from appliance.audit import service as audit
from appliance.auth import keys
from appliance.auth.models import ApiKey
from appliance.auth.principal import Principal
from appliance.context import Actor
from appliance.db.engine import TENANT_GUC, Database, driver_rows, driver_sql, set_tenant
from appliance.errors import AppError, NotFound, Unauthorized


class AuthFailure(Unauthorized):
    """Carries the internal reason for the audit trail; clients see a stable code."""

    def __init__(
        self,
        reason: str,
        *,
        code: str = "invalid_api_key",
        detail: str | None = None,
        key_id: uuid.UUID | None = None,
        tenant_id: uuid.UUID | None = None,
    ) -> None:
        super().__init__(detail or "The API key is missing, malformed or unknown.", code=code)
        self.reason = reason
        self.key_id = key_id
        self.tenant_id = tenant_id


_AUTH_SQL = driver_sql(
    "SELECT l.*, set_config(:guc, CASE WHEN l.secret_hash = :h AND l.revoked_at IS NULL"
    " AND (l.expires_at IS NULL OR l.expires_at > now())"
    " AND (l.tenant_id IS NULL OR l.tenant_status = 'active')"
    " THEN coalesce(l.tenant_id::text, '') ELSE '' END, true) AS scoped,"
    " e.active_model AS embedding_active, e.target_model AS embedding_target"
    " FROM app_auth_lookup(:p) AS l LEFT JOIN embedding_state AS e ON e.id = 1"
)
TOUCH_INTERVAL_S = 60.0
_touched: dict[uuid.UUID, float] = {}  # key id -> when this process last ran app_auth_touch for it


async def authenticate(session: AsyncSession, authorization: str | None) -> Principal:
    """Resolve a `Bearer` key to a principal and scope the transaction to its tenant."""
    if not authorization:
        raise AuthFailure(
            "missing", code="unauthorized", detail="Send an API key as 'Authorization: Bearer KEY'."
        )
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthFailure("bad_scheme", code="unauthorized", detail="Use 'Authorization: Bearer KEY'.")
    prefix = keys.parse_prefix(token)
    if prefix is None:
        raise AuthFailure("malformed")
    # One round trip: the key; the transaction scoped to its tenant only if the key passes every check
    # below (which repeats them, to say which failed; a failure rolls the transaction back); and the
    # embedding models' state, which most requests need next (appliance.ingest.reindex.state).
    rows = await driver_rows(session, _AUTH_SQL, {"p": prefix, "h": keys.hash_key(token), "guc": TENANT_GUC})
    row = rows[0]._asdict() if rows else None
    if row is None:
        raise AuthFailure("unknown_prefix")
    if not keys.matches(token, row["secret_hash"]):
        raise AuthFailure("bad_secret", key_id=row["id"], tenant_id=row["tenant_id"])
    now = datetime.now(UTC)
    if row["revoked_at"] is not None:
        raise AuthFailure(
            "revoked",
            code="api_key_revoked",
            detail="This API key has been revoked.",
            key_id=row["id"],
            tenant_id=row["tenant_id"],
        )
    if row["expires_at"] is not None and row["expires_at"] <= now:
        raise AuthFailure(
            "expired",
            code="api_key_expired",
            detail="This API key has expired.",
            key_id=row["id"],
            tenant_id=row["tenant_id"],
        )
    if row["tenant_id"] is not None and row["tenant_status"] != "active":
        raise AuthFailure(
            "tenant_suspended",
            code="tenant_suspended",
            detail="This tenant is suspended.",
            key_id=row["id"],
            tenant_id=row["tenant_id"],
        )
    if _touched.get(row["id"], -TOUCH_INTERVAL_S) < time.monotonic() - TOUCH_INTERVAL_S:
        # last_used_at moves at most once a minute (app_auth_touch checks too): skip the round trip
        # when this process has already moved it within the minute.
        await session.execute(text("SELECT app_auth_touch(:k)"), {"k": row["id"]})
        if len(_touched) > 10_000:
            _touched.clear()
        _touched[row["id"]] = time.monotonic()
    principal = Principal(
        key_id=row["id"],
        key_prefix=prefix,
        role=row["role"],
        tenant_id=row["tenant_id"],
        tenant_name=row["tenant_name"],
    )
    if principal.tenant_id is not None:
        session.info["tenant_id"] = principal.tenant_id  # what set_tenant records; the GUC is set above
    session.info["embedding_state"] = (row["embedding_active"], row["embedding_target"])
    return principal


async def record_auth_failure(db: Database, failure: AuthFailure) -> None:
    """Auth failures commit on their own: the request's transaction is rolled back."""
    async with db.transaction() as session:
        audit.record(
            session,
            "auth.failure",
            outcome="denied",
            tenant_id=failure.tenant_id,
            actor=Actor("api_key", str(failure.key_id)) if failure.key_id else Actor("anonymous"),
            resource_type="api_key" if failure.key_id else None,
            resource_id=failure.key_id,
            details={"reason": failure.reason},
        )


async def record_denial(db: Database, principal: Principal, code: str, path: str) -> None:
    """A valid key asking for more than its role allows: recorded in its own transaction too."""
    async with db.transaction(tenant_id=principal.tenant_id) as session:
        audit.record(
            session,
            "auth.denied",
            outcome="denied",
            resource_type="api_key",
            resource_id=principal.key_id,
            details={"reason": code, "role": principal.role, "path": path},
        )


async def create_key(
    session: AsyncSession,
    *,
    tenant_id: uuid.UUID | None,
    name: str,
    role: str,
    expires_at: datetime | None = None,
    created_by: uuid.UUID | None = None,
) -> tuple[ApiKey, str]:
    """Create a key in `tenant_id` (None only for system admins). Returns the row and the plaintext."""
    if (role == "system_admin") != (tenant_id is None):
        raise AppError("System-admin keys have no tenant; tenant keys need one.", code="invalid_role")
    if expires_at is not None and expires_at <= datetime.now(UTC):
        raise AppError("expires_at must be in the future.", code="invalid_expiry")
    if tenant_id is not None:
        await set_tenant(session, tenant_id)
    new = keys.generate_key()
    row = ApiKey(
        tenant_id=tenant_id,
        name=name,
        prefix=new.prefix,
        secret_hash=new.secret_hash,
        role=role,
        expires_at=expires_at,
        created_by=created_by,
    )
    session.add(row)
    await session.flush()
    await session.refresh(row)
    audit.record(
        session,
        "api_key.create",
        tenant_id=tenant_id,
        resource_type="api_key",
        resource_id=row.id,
        details={
            "prefix": row.prefix,
            "role": role,
            "name": name,
            "expires_at": expires_at.isoformat() if expires_at else None,
        },
    )
    return row, new.plaintext


async def list_keys(session: AsyncSession, *, tenant_id: uuid.UUID) -> Sequence[ApiKey]:
    await set_tenant(session, tenant_id)
    result = await session.execute(
        select(ApiKey).where(ApiKey.tenant_id == tenant_id).order_by(ApiKey.created_at, ApiKey.id)
    )
    return result.scalars().all()


async def get_key(session: AsyncSession, *, tenant_id: uuid.UUID, key_id: uuid.UUID) -> ApiKey:
    await set_tenant(session, tenant_id)
    row = (await session.execute(select(ApiKey).where(ApiKey.id == key_id))).scalar_one_or_none()
    if row is None:
        raise NotFound(f"No API key {key_id} in this tenant.", code="api_key_not_found")
    return row


async def find_key_by_prefix(session: AsyncSession, *, tenant_id: uuid.UUID, prefix: str) -> ApiKey:
    await set_tenant(session, tenant_id)
    row = (await session.execute(select(ApiKey).where(ApiKey.prefix == prefix))).scalar_one_or_none()
    if row is None:
        raise NotFound(f"No API key with prefix {prefix} in this tenant.", code="api_key_not_found")
    return row


async def revoke_key(session: AsyncSession, *, tenant_id: uuid.UUID, key_id: uuid.UUID) -> ApiKey:
    row = await get_key(session, tenant_id=tenant_id, key_id=key_id)
    if row.revoked_at is None:
        row.revoked_at = datetime.now(UTC)
        await session.flush()
        audit.record(
            session,
            "api_key.revoke",
            resource_type="api_key",
            resource_id=row.id,
            details={"prefix": row.prefix},
        )
    return row


async def system_admin_exists(session: AsyncSession) -> bool:
    # System keys have no tenant, so RLS hides them from the app role: ask the lookup-free way.
    result = await session.execute(text("SELECT app_system_admin_count()"))
    return bool(result.scalar_one())
