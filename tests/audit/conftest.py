"""Audit test helpers: an owner connection that never commits, the appliance's signing key,
checkpoints made through the real service, and owner-side tampering."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import Connection, create_engine, text

from appliance.audit import signing
from appliance.audit.chain import link_hash
from appliance.audit.service import _COLUMNS, create_checkpoint
from appliance.db.engine import Database
from appliance.settings import Settings
from tests.factories import make_tenant


@pytest.fixture
def owner_conn(settings: Settings) -> Iterator[Connection]:
    """An owner connection inside a transaction that is always rolled back: tampering never persists."""
    engine = create_engine(settings.owner_database_url)
    with engine.connect() as conn:
        trans = conn.begin()
        try:
            yield conn
        finally:
            trans.rollback()
    engine.dispose()


@pytest.fixture(scope="session")
def signing_key(settings: Settings) -> Ed25519PrivateKey:
    return signing.load_private_key(settings.audit_signing_key_path)


@pytest.fixture(scope="session")
def public_key(settings: Settings) -> Ed25519PublicKey:
    return signing.load_public_key(settings.audit_signing_pubkey_path)


async def checkpoint(db: Database, key: Ed25519PrivateKey) -> signing.Checkpoint:
    """Sign the head now (committed); the chain must have moved since the last checkpoint."""
    async with db.transaction() as session:
        cp = await create_checkpoint(session, key)
    assert cp is not None
    return cp


def make_events_sync(settings: Settings) -> None:
    """A tenant (and so audit events) from a sync test, whose CLI calls run their own event loops."""

    async def go() -> None:
        db = Database(settings.app_database_url, pool_size=1)
        try:
            await make_tenant(db)
        finally:
            await db.dispose()

    asyncio.run(go())


def last_seq(conn: Connection) -> int:
    return int(conn.execute(text("SELECT max(seq) FROM audit_events")).scalar_one())


def tamper(conn: Connection, kind: str, seq: int) -> None:
    """What an owner with SQL access might do to hide something."""
    if kind == "edit":
        conn.execute(
            text("UPDATE audit_events SET details = details || '{\"hidden\": true}' WHERE seq = :s"),
            {"s": seq},
        )
    elif kind == "delete":
        conn.execute(text("DELETE FROM audit_events WHERE seq = :s"), {"s": seq})
    elif kind == "swap":
        conn.execute(text("UPDATE audit_events SET seq = -1 WHERE seq = :a"), {"a": seq})
        conn.execute(text("UPDATE audit_events SET seq = :a WHERE seq = :b"), {"a": seq, "b": seq + 1})
        conn.execute(text("UPDATE audit_events SET seq = :b WHERE seq = -1"), {"b": seq + 1})
    else:
        raise ValueError(kind)


def rechain_from(conn: Connection, seq: int) -> None:
    """Recompute every hash from `seq` on and move the head: a rewrite the links alone cannot reveal."""
    prev = bytes(
        conn.execute(text("SELECT prev_hash FROM audit_events WHERE seq = :s"), {"s": seq}).scalar_one()
    )
    rows = conn.execute(
        text(f"SELECT {_COLUMNS} FROM audit_events WHERE seq >= :s ORDER BY seq"), {"s": seq}
    ).mappings()
    last = seq
    for row in list(rows):
        new = link_hash(prev, row)
        conn.execute(
            text("UPDATE audit_events SET prev_hash = :p, hash = :h WHERE seq = :s"),
            {"p": prev, "h": new, "s": row["seq"]},
        )
        prev, last = new, int(row["seq"])
    conn.execute(text("UPDATE audit_chain_head SET seq = :s, hash = :h WHERE id = 1"), {"s": last, "h": prev})
