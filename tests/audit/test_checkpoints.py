"""Signed checkpoints: a fixed message, one per head, checked by verify_database against the key."""

from __future__ import annotations

import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import Connection, text

from appliance.audit import signing
from appliance.audit.service import checkpoint_due, checkpoint_if_due, create_checkpoint, verify_database
from appliance.db.engine import Database
from appliance.settings import Settings
from tests.audit.conftest import checkpoint, last_seq, rechain_from
from tests.db.test_rls import app_conninfo
from tests.factories import make_tenant


def test_the_signed_message_is_fixed_and_checkable_with_the_public_key_alone() -> None:
    key = Ed25519PrivateKey.generate()
    at = datetime(2026, 11, 26, 10, 0, 0, 1, tzinfo=UTC)
    cp = signing.sign(key, 5, bytes(range(32)), at)
    expected = (
        b"appliance-audit-checkpoint-v1\n5\n"
        + bytes(range(32)).hex().encode()
        + (b"\n2026-11-26T10:00:00.000001Z\n")
    )
    assert signing.message(5, bytes(range(32)), at) == expected
    key.public_key().verify(cp.signature, expected)  # raises if not
    pub = key.public_key()
    assert signing.check(cp, {signing.key_id(pub): pub}) is None
    assert len(cp.key_id) == 16 and cp.key_id == signing.key_id(pub)
    assert "forged" in (
        signing.check(signing.Checkpoint(6, cp.hash, at, cp.key_id, cp.signature), {cp.key_id: pub}) or ""
    )
    other = Ed25519PrivateKey.generate().public_key()
    assert "not by the key given" in (signing.check(cp, {signing.key_id(other): other}) or "")
    assert signing.parse_time(signing.format_time(at)) == at


def test_first_run_creates_the_key_pair(settings: Settings, public_key: Ed25519PublicKey) -> None:
    private = settings.audit_signing_key_path
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    derived = signing.load_private_key(private).public_key()
    assert signing.public_pem(derived) == signing.public_pem(public_key)
    assert settings.audit_signing_pubkey_path.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")


def test_key_files_of_the_wrong_kind_are_refused_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pub"
    bad.write_bytes(b"not a key")
    with pytest.raises(signing.SigningKeyError, match="not an Ed25519 public key"):
        signing.load_public_key(bad)
    with pytest.raises(signing.SigningKeyError, match="cannot read"):
        signing.load_private_key(tmp_path / "missing.key")


async def test_a_checkpoint_signs_the_head_once(
    app_db: Database, signing_key: Ed25519PrivateKey, owner_conn: Connection
) -> None:
    await make_tenant(app_db)
    cp = await checkpoint(app_db, signing_key)
    head = owner_conn.execute(text("SELECT seq, hash FROM audit_chain_head")).one()
    assert cp.seq == head.seq and cp.hash == bytes(head.hash)
    async with app_db.transaction() as session:
        assert await create_checkpoint(session, signing_key) is None  # nothing new to sign
    await make_tenant(app_db)
    assert (await checkpoint(app_db, signing_key)).seq > cp.seq


async def test_the_sweeper_signs_only_when_the_last_checkpoint_is_old(
    app_db: Database, settings: Settings, signing_key: Ed25519PrivateKey
) -> None:
    await make_tenant(app_db)
    cp = await checkpoint(app_db, signing_key)
    async with app_db.transaction() as session:
        assert not await checkpoint_due(session, 300)
        assert await checkpoint_due(session, 300, now=cp.signed_at + timedelta(seconds=301))
    await make_tenant(app_db)
    assert await checkpoint_if_due(app_db, settings) is None  # interval (300 s) not reached
    due_now = settings.model_copy(update={"audit_checkpoint_interval_s": 0})
    newer = await checkpoint_if_due(app_db, due_now)
    assert newer is not None and newer.seq > cp.seq


async def test_verify_database_checks_every_checkpoint(
    app_db: Database, signing_key: Ed25519PrivateKey, public_key: Ed25519PublicKey, owner_conn: Connection
) -> None:
    await make_tenant(app_db)
    cp = await checkpoint(app_db, signing_key)
    result = verify_database(owner_conn, [public_key])
    assert result.ok and result.checkpoints >= 1 and result.last_anchored_seq >= cp.seq


async def test_a_forged_signature_is_located(
    app_db: Database, signing_key: Ed25519PrivateKey, public_key: Ed25519PublicKey, owner_conn: Connection
) -> None:
    await make_tenant(app_db)
    cp = await checkpoint(app_db, signing_key)
    forged = bytes([cp.signature[0] ^ 1]) + cp.signature[1:]
    owner_conn.execute(
        text("UPDATE audit_checkpoints SET signature = :s WHERE seq = :q"), {"s": forged, "q": cp.seq}
    )
    result = verify_database(owner_conn, [public_key])
    assert not result.ok and result.first_break.seq == cp.seq
    assert "signature does not verify" in result.first_break.problem


async def test_a_checkpoint_signed_with_another_key_is_rejected(
    app_db: Database, signing_key: Ed25519PrivateKey, public_key: Ed25519PublicKey, owner_conn: Connection
) -> None:
    await make_tenant(app_db)
    cp = await checkpoint(app_db, signing_key)
    rogue = signing.sign(Ed25519PrivateKey.generate(), cp.seq, cp.hash, cp.signed_at)
    owner_conn.execute(
        text("UPDATE audit_checkpoints SET key_id = :k, signature = :s WHERE seq = :q"),
        {"k": rogue.key_id, "s": rogue.signature, "q": cp.seq},
    )
    result = verify_database(owner_conn, [public_key])
    assert not result.ok and result.first_break.seq == cp.seq
    assert f"signed by key {rogue.key_id}" in result.first_break.problem


async def test_a_rewrite_with_recomputed_hashes_is_caught_by_the_checkpoint(
    app_db: Database, signing_key: Ed25519PrivateKey, public_key: Ed25519PublicKey, owner_conn: Connection
) -> None:
    await make_tenant(app_db)
    cp = await checkpoint(app_db, signing_key)
    target = cp.seq - 1
    owner_conn.execute(text("UPDATE audit_events SET details = '{}' WHERE seq = :s"), {"s": target})
    rechain_from(owner_conn, target)
    assert verify_database(owner_conn).ok  # the links alone are consistent again...
    result = verify_database(owner_conn, [public_key])  # ...but the signed hash is not
    assert not result.ok and result.first_break.seq == cp.seq
    assert "rewritten" in result.first_break.problem


async def test_deleting_the_newest_rows_and_moving_the_head_is_caught(
    app_db: Database, signing_key: Ed25519PrivateKey, public_key: Ed25519PublicKey, owner_conn: Connection
) -> None:
    await make_tenant(app_db)
    cp = await checkpoint(app_db, signing_key)
    owner_conn.execute(text("DELETE FROM audit_events WHERE seq >= :s"), {"s": cp.seq})
    row = owner_conn.execute(text("SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1")).one()
    owner_conn.execute(text("UPDATE audit_chain_head SET seq = :s, hash = :h"), {"s": row.seq, "h": row.hash})
    assert last_seq(owner_conn) == cp.seq - 1
    result = verify_database(owner_conn, [public_key])
    assert (
        not result.ok
        and result.first_break.seq == cp.seq
        and "past the last event" in result.first_break.problem
    )


async def test_app_role_cannot_rewrite_or_delete_checkpoints(settings: Settings, app_db: Database) -> None:
    with psycopg.connect(app_conninfo(settings)) as conn:
        for stmt in (
            "UPDATE audit_checkpoints SET key_id = 'x'",
            "DELETE FROM audit_checkpoints",
            "TRUNCATE audit_checkpoints",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege), conn.transaction():
                conn.execute(stmt)


def test_the_key_pair_is_created_once_and_checked_after(settings: Settings, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    from appliance.runtime.common import RuntimeFailure
    from appliance.runtime.home import ensure_audit_signing_key
    from appliance.runtime.identity import ServiceIdentity

    ident = ServiceIdentity(user="me", uid=os.getuid(), gid=os.getgid(), drop=False)
    s = settings.model_copy(update={"home": tmp_path})
    key = ensure_audit_signing_key(s, ident)
    pub = s.audit_signing_pubkey_path
    assert key.stat().st_size == 32 and stat.S_IMODE(key.stat().st_mode) == 0o600
    before = (key.read_bytes(), pub.read_bytes())
    ensure_audit_signing_key(s, ident)
    assert (key.read_bytes(), pub.read_bytes()) == before  # never regenerated

    # An operator-supplied PEM key is used as it is; a public key that is not its own is refused.
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    key.write_bytes(pem)
    with pytest.raises(RuntimeFailure, match="does not match"):
        ensure_audit_signing_key(s, ident)
    pub.unlink()
    ensure_audit_signing_key(s, ident)
    assert signing.load_public_key(pub) == signing.load_private_key(key).public_key()
