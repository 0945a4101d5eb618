"""Data keys over their life: per-tenant isolation, master-key rotation under load, crypto-shredding."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import uuid

import httpx
import psycopg
import pytest
from fastapi import FastAPI
from sqlalchemy import create_engine

from appliance.db.engine import Database
from appliance.documents import service
from appliance.keys import service as keys_service
from appliance.keys.envelope import BlobContext, BlobIntegrityError, BlobReader
from appliance.keys.keyring import Keyring
from appliance.keys.rotation import rotate_master_key
from appliance.settings import Settings
from tests.api.test_auth import owner_conninfo
from tests.cli.test_cli import run_cli
from tests.documents.test_documents import upload
from tests.factories import bearer, make_tenant
from tests.search.test_search import assert_fulltext_statistics_exact


def object_key(settings: Settings, document_id: str) -> tuple[str, str]:
    with psycopg.connect(owner_conninfo(settings)) as conn:
        key, vid = conn.execute(
            "SELECT object_key, id FROM document_versions WHERE document_id = %s", (document_id,)
        ).fetchone()
    return key, str(vid)


async def test_one_tenants_key_never_decrypts_anothers_blob(
    client: httpx.AsyncClient, app: FastAPI, app_db: Database, settings: Settings
) -> None:
    a = await make_tenant(app_db, role="editor")
    b = await make_tenant(app_db, role="editor")
    doc_a = (await upload(client, a.key, b"tenant A only " * 500)).json()
    await upload(client, b.key, b"tenant B " * 10)  # gives B a data key
    svc: service.Services = app.state.documents
    key, vid = object_key(settings, doc_a["id"])
    async with app_db.transaction() as session:
        dek_a = await keys_service.tenant_dek(session, svc.keyring, a.id, create=False)
        dek_b = await keys_service.tenant_dek(session, svc.keyring, b.id, create=False)
    assert dek_a != dek_b
    source = svc.store.open_source(key)
    ctx_a = BlobContext(a.id, "original", uuid.UUID(doc_a["id"]), uuid.UUID(vid))
    assert b"".join(BlobReader(dek_a, ctx_a, source).iter_range(0)) == b"tenant A only " * 500
    with pytest.raises(BlobIntegrityError):  # B's key on A's blob, even with A's context
        BlobReader(dek_b, ctx_a, source)
    with pytest.raises(BlobIntegrityError):  # A's key but the blob claimed for B
        BlobReader(dek_a, BlobContext(b.id, "original", uuid.UUID(doc_a["id"]), uuid.UUID(vid)), source)
    # And the wrapped keys are bound to their tenant: A's wrapped DEK does not unwrap as B's.
    with psycopg.connect(owner_conninfo(settings)) as conn:
        wrapped_a, kek = conn.execute(
            "SELECT wrapped_dek, kek_id FROM tenant_keys WHERE tenant_id = %s", (a.id,)
        ).fetchone()
    from appliance.keys.kek import KeyUnwrapError

    with pytest.raises(KeyUnwrapError):
        svc.keyring.get(kek).unwrap(bytes(wrapped_a), aad=keys_service.dek_aad(b.id))


async def test_master_key_rotation_while_downloads_run(
    client: httpx.AsyncClient, app: FastAPI, app_db: Database, settings: Settings
) -> None:
    tenants = [await make_tenant(app_db, role="editor") for _ in range(3)]
    docs = []
    for t in tenants:
        data = os.urandom(300_000)
        docs.append((t, (await upload(client, t.key, data)).json()["id"], hashlib.sha256(data).hexdigest()))
    old_id = Keyring(settings.master_key_path).current.key_id
    failures: list[str] = []
    reads = 0
    stop = asyncio.Event()

    async def downloader() -> None:
        nonlocal reads
        while not stop.is_set():
            for t, doc_id, digest in docs:
                keys_service._cache._items.clear()  # force an unwrap on every read
                r = await client.get(f"/api/v1/documents/{doc_id}/content", headers=bearer(t.key))
                if r.status_code != 200 or hashlib.sha256(r.content).hexdigest() != digest:
                    failures.append(f"{r.status_code} {r.text[:200]}")
                reads += 1
            await asyncio.sleep(0)

    engine = create_engine(settings.owner_database_url)
    try:
        task = asyncio.create_task(downloader())
        await asyncio.sleep(0.2)
        keyring = Keyring(settings.master_key_path)
        result = await asyncio.to_thread(rotate_master_key, engine.connect, keyring, batch_size=1)
        await asyncio.sleep(0.3)
        stop.set()
        await task
    finally:
        engine.dispose()
    assert failures == [] and reads > 3
    assert result.old_kek_id == old_id and result.new_kek_id != old_id and result.rewrapped >= 3
    assert Keyring(settings.master_key_path).current.key_id == result.new_kek_id
    assert (settings.keys_dir / f"master.key.retired-{old_id}").exists()
    with psycopg.connect(owner_conninfo(settings)) as conn:
        keks = {r[0] for r in conn.execute("SELECT DISTINCT kek_id FROM tenant_keys")}
    assert keks == {result.new_kek_id}
    out = run_cli(settings, "keys", "status", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["current_kek_id"] == result.new_kek_id and not report["rotation_in_progress"]
    assert report["unreadable_data_keys"] == 0


def test_rotation_from_the_cli_is_resumable(settings: Settings) -> None:
    # A rotation interrupted after creating the next key: the next run reuses it and finishes.
    from appliance.keys.kek import FileKeyProvider

    next_path = settings.keys_dir / "master.key.next"
    pending = FileKeyProvider.create_key_file(next_path)
    out = run_cli(settings, "keys", "status", "--json")
    assert json.loads(out.stdout)["rotation_in_progress"] is True
    out = run_cli(settings, "keys", "rotate-master")
    assert out.returncode == 0, out.stdout + out.stderr
    assert Keyring(settings.master_key_path).current.key_id == pending.key_id
    assert not next_path.exists()


async def test_tenant_deletion_shreds_the_key_then_purges(
    client: httpx.AsyncClient, app: FastAPI, app_db: Database, settings: Settings
) -> None:
    t = await make_tenant(app_db, role="editor")
    doc = (await upload(client, t.key, b"to be shredded " * 200)).json()
    key, _ = object_key(settings, doc["id"])
    svc: service.Services = app.state.documents
    assert svc.store.exists(key)
    with psycopg.connect(owner_conninfo(settings)) as conn:
        conn.execute(
            "INSERT INTO labels (id, tenant_id, name, description, position) "
            "VALUES (gen_random_uuid(), %s, 'claims', 'insurance claims', 0)",
            (t.id,),
        )
    out = run_cli(settings, "tenants", "delete", t.name, "--confirm", "wrong-name")
    assert out.returncode != 0 and "does not match" in out.stderr
    assert svc.store.exists(key)
    out = run_cli(settings, "tenants", "delete", t.name, "--confirm", t.name)
    assert out.returncode == 0, out.stdout + out.stderr
    assert not svc.store.exists(key)
    r = await client.get(f"/api/v1/documents/{doc['id']}", headers=bearer(t.key))
    assert r.status_code == 401  # its keys are revoked with it
    with psycopg.connect(owner_conninfo(settings)) as conn:
        assert (
            conn.execute("SELECT count(*) FROM tenant_keys WHERE tenant_id = %s", (t.id,)).fetchone()[0] == 0
        )
        assert conn.execute("SELECT count(*) FROM documents WHERE tenant_id = %s", (t.id,)).fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM labels WHERE tenant_id = %s", (t.id,)).fetchone()[0] == 0
        actions = [
            r[0]
            for r in conn.execute(
                "SELECT action FROM audit_events WHERE tenant_id = %s ORDER BY seq", (t.id,)
            )
        ]
    assert actions.index("key.dek_destroy") < actions.index("tenant.delete") < actions.index("tenant.purge")
    assert_fulltext_statistics_exact(settings)  # the purge's cascaded chunk deletes kept BM25's counts
    # Re-running finishes (nothing left) and succeeds; the tenant takes no new keys.
    assert run_cli(settings, "tenants", "delete", t.name, "--confirm", t.name).returncode == 0
    out = run_cli(settings, "keys", "create", "--tenant", t.name, "--role", "admin")
    assert out.returncode != 0 and "No tenant" in out.stderr
