"""Tenant data keys: create, unwrap (cached), rewrap under a new master key, destroy."""

from __future__ import annotations

import uuid
from collections import OrderedDict
from dataclasses import dataclass

from sqlalchemy import delete, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from appliance.audit import service as audit
from appliance.db.engine import current_tenant, set_tenant
from appliance.keys.kek import generate_dek
from appliance.keys.keyring import Keyring
from appliance.keys.models import TenantKey


def dek_aad(tenant_id: uuid.UUID) -> bytes:
    return b"appliance-dek-v1|" + tenant_id.bytes


class DekCache:
    """Unwrapped DEKs by (tenant, wrapped bytes): a rewrap or a shred changes the key, so never stale."""

    def __init__(self, size: int = 256) -> None:
        self._items: OrderedDict[tuple[uuid.UUID, bytes], bytes] = OrderedDict()
        self._size = size

    def get(self, tenant_id: uuid.UUID, wrapped: bytes) -> bytes | None:
        key = (tenant_id, wrapped)
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, tenant_id: uuid.UUID, wrapped: bytes, dek: bytes) -> None:
        self._items[(tenant_id, wrapped)] = dek
        if len(self._items) > self._size:
            self._items.popitem(last=False)


_cache = DekCache()


class TenantKeyDestroyed(Exception):
    pass


async def tenant_dek(session: AsyncSession, keyring: Keyring, tenant_id: uuid.UUID, *, create: bool) -> bytes:
    """The tenant's DEK, creating (and wrapping) one on first use when `create`."""
    if current_tenant(session) != tenant_id:
        await set_tenant(session, tenant_id)
    row = (
        await session.execute(select(TenantKey).where(TenantKey.tenant_id == tenant_id))
    ).scalar_one_or_none()
    if row is None:
        if not create:
            raise TenantKeyDestroyed(f"tenant {tenant_id} has no data key")
        provider = keyring.current
        dek = generate_dek()
        wrapped = provider.wrap(dek, aad=dek_aad(tenant_id))
        # Two first uploads may race: the loser reads the winner's key.
        await session.execute(
            insert(TenantKey)
            .values(tenant_id=tenant_id, wrapped_dek=wrapped, kek_id=provider.key_id)
            .on_conflict_do_nothing(index_elements=["tenant_id"])
        )
        row = (await session.execute(select(TenantKey).where(TenantKey.tenant_id == tenant_id))).scalar_one()
        if row.wrapped_dek == wrapped:
            audit.record(
                session,
                "key.dek_create",
                resource_type="tenant_key",
                resource_id=tenant_id,
                details={"kek_id": provider.key_id},
            )
    return unwrap_dek(keyring, tenant_id, bytes(row.wrapped_dek), row.kek_id)


def unwrap_dek(keyring: Keyring, tenant_id: uuid.UUID, wrapped: bytes, kek_id: str) -> bytes:
    """The DEK in a `tenant_keys` row (read by the caller, e.g. joined into its own query)."""
    cached = _cache.get(tenant_id, wrapped)
    if cached is not None:
        return cached
    dek = keyring.get(kek_id).unwrap(wrapped, aad=dek_aad(tenant_id))
    _cache.put(tenant_id, wrapped, dek)
    return dek


async def destroy_tenant_key(session: AsyncSession, tenant_id: uuid.UUID) -> bool:
    """Crypto-shred: delete the wrapped DEK. Returns whether there was one."""
    await set_tenant(session, tenant_id)
    result = await session.execute(delete(TenantKey).where(TenantKey.tenant_id == tenant_id))
    destroyed = bool(result.rowcount)  # type: ignore[attr-defined]
    audit.record(
        session,
        "key.dek_destroy",
        resource_type="tenant_key",
        resource_id=tenant_id,
        details={"existed": destroyed},
    )
    return destroyed


@dataclass(frozen=True)
class KeyStatus:
    current_kek_id: str
    known_kek_ids: list[str]
    deks_by_kek: dict[str, int]
    rotation_in_progress: bool
