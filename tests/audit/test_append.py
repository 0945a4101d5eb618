"""Appending to the chain: one statement when this process's guess of the head is right, the locked
read when another writer moved it, and never a fork, a gap or a lost event."""

from __future__ import annotations

import asyncio

import psycopg
import pytest
from sqlalchemy import Connection

from appliance.audit import service as audit
from appliance.audit.service import verify_database
from appliance.db.engine import Database
from appliance.settings import Settings
from tests.api.test_auth import owner_conninfo
from tests.factories import make_tenant


def _seq_of(settings: Settings, action: str) -> list[int]:
    with psycopg.connect(owner_conninfo(settings)) as conn:
        rows = conn.execute("SELECT seq FROM audit_events WHERE action = %s ORDER BY seq", (action,))
        return [int(r[0]) for r in rows]


async def test_a_stale_or_rolled_back_guess_falls_back_to_the_locked_read(
    owner_conn: Connection, app_db: Database, settings: Settings
) -> None:
    t = await make_tenant(app_db)
    async with app_db.transaction(tenant_id=t.id) as session:
        audit.record(session, "test.append.one", resource_type="test")
    seq, _ = audit._last_head[0]
    # What another process's append leaves behind: this process's guess is one event short.
    audit._last_head[:] = [(seq - 1, b"\x00" * 32)]
    async with app_db.transaction(tenant_id=t.id) as session:
        audit.record(session, "test.append.two", resource_type="test")
    # An append that rolls back leaves a guess past the head.
    with pytest.raises(RuntimeError, match="boom"):
        async with app_db.transaction(tenant_id=t.id) as session:
            audit.record(session, "test.append.rolled_back", resource_type="test")
            await audit.flush_pending(session)
            raise RuntimeError("boom")
    async with app_db.transaction(tenant_id=t.id) as session:
        audit.record(session, "test.append.three", resource_type="test")

    (one,), (two,), (three,) = (_seq_of(settings, f"test.append.{n}") for n in ("one", "two", "three"))
    assert one < two < three and _seq_of(settings, "test.append.rolled_back") == []
    assert verify_database(owner_conn).ok


async def test_concurrent_appends_serialise_on_the_head(
    owner_conn: Connection, app_db: Database, settings: Settings
) -> None:
    t = await make_tenant(app_db)

    async def append(i: int) -> None:
        async with app_db.transaction(tenant_id=t.id) as session:
            audit.record(session, "test.append.concurrent", resource_type="test", details={"i": i})
            await asyncio.sleep(0.01 * (i % 3))  # interleave the flushes

    await asyncio.gather(*(append(i) for i in range(8)))
    seqs = _seq_of(settings, "test.append.concurrent")
    assert len(seqs) >= 8 and len(set(seqs)) == len(seqs)
    assert verify_database(owner_conn).ok
