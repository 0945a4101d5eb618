"""The restore drill: a whole appliance (its own Postgres, Redis, object store and keys) is filled in
two tenants, backed up while a third tenant keeps uploading and deleting, destroyed, and restored
into a new data directory from the archive, the master key and the backup key alone.

Checked: every restored document's bytes (sha256), the same search results for a fixed query set,
documents committed after the backup's snapshot absent (and none half-present), a purge during the
copy deferred rather than breaking the archive, and the audit trail (with `backup.restore`) intact.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import shutil
import tempfile
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import create_engine

from appliance.api import create_app
from appliance.audit import signing
from appliance.audit.service import create_checkpoint, verify_database
from appliance.backup.create import create_backup
from appliance.backup.guard import BackupInProgress
from appliance.backup.restore import restore_backup
from appliance.db.migrations import upgrade_head
from appliance.documents.service import Services, purge_document
from appliance.runtime import start_datastores
from appliance.runtime.home import identity_for
from appliance.settings import Settings, load_settings
from tests.conftest import free_port
from tests.factories import bearer, ingest_pending, make_tenant
from tests.search.conftest import DOCS

pytestmark = pytest.mark.slow

QUERIES = [
    ("how often is the boiler inspected", "hybrid"),
    ("hotel reimbursement limit", "vector"),
    ("hepatitis vaccination doses", "fulltext"),
    ("how long are backups with personal data kept", "hybrid"),
]


@dataclass
class Instance:
    settings: Settings
    app: FastAPI
    client: httpx.AsyncClient


def instance_settings(home: Path, ports: tuple[int, int]) -> Settings:
    return load_settings(
        home=home,
        environment="test",
        pg_port=ports[0],
        redis_port=ports[1],
        log_json=False,
        log_level="WARNING",
    )


@contextlib.asynccontextmanager
async def running(settings: Settings, *, migrate: bool) -> AsyncIterator[Instance]:
    datastores = await anyio.to_thread.run_sync(start_datastores, settings)
    try:
        live = datastores.settings
        if migrate:
            await anyio.to_thread.run_sync(upgrade_head, live)
        application = create_app(live)
        async with application.router.lifespan_context(application):
            transport = httpx.ASGITransport(app=application, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://drill.test", timeout=120) as c:
                yield Instance(live, application, c)
    finally:
        await anyio.to_thread.run_sync(datastores.stop)


async def upload(client: httpx.AsyncClient, key: str, name: str, body: bytes) -> str:
    r = await client.post(
        "/api/v1/documents",
        content=body,
        params={"metadata": json.dumps({"title": name})},
        headers={**bearer(key), "Content-Type": "text/plain", "X-Filename": f"{name}.txt"},
    )
    assert r.status_code in (200, 201), r.text
    return str(r.json()["id"])


async def content_sha(client: httpx.AsyncClient, key: str, doc_id: str) -> str | None:
    r = await client.get(f"/api/v1/documents/{doc_id}/content", headers=bearer(key))
    if r.status_code == 404:
        return None
    assert r.status_code == 200, r.text
    return hashlib.sha256(r.content).hexdigest()


async def search(client: httpx.AsyncClient, key: str) -> list[list[tuple[str, str, float]]]:
    out = []
    for query, mode in QUERIES:
        r = await client.post(
            "/api/v1/search", json={"query": query, "mode": mode, "top_k": 5}, headers=bearer(key)
        )
        assert r.status_code == 200, r.text
        out.append([(h["document_id"], h["chunk_id"], round(h["score"], 5)) for h in r.json()["results"]])
    return out


async def test_backup_while_uploading_destroy_and_restore(tmp_path: Path, settings: Settings) -> None:
    # `settings` (the session's): the process-wide Dramatiq broker needs a live Redis to enqueue to.
    src_home = Path(tempfile.mkdtemp(prefix="drill-src-", dir="/var/tmp"))
    dst_home = Path(tempfile.mkdtemp(prefix="drill-dst-", dir="/var/tmp"))
    for home in (src_home, dst_home):
        home.chmod(0o755)
    vault = tmp_path / "vault"  # what an administrator keeps off the host
    vault.mkdir()
    try:
        src = instance_settings(src_home, (free_port(), free_port()))
        del settings
        expected: dict[str, dict[str, str]] = {}  # tenant key -> {doc id: sha256}
        async with running(src, migrate=True) as inst:
            settings, client = inst.settings, inst.client
            from appliance.db.engine import Database

            db = Database(settings.app_database_url, pool_size=1)
            try:
                a = await make_tenant(db, role="admin")
                b = await make_tenant(db, role="admin")
                c = await make_tenant(db, role="admin")
            finally:
                await db.dispose()
            for tenant, names in (
                (a, ["boiler", "travel", "vaccine", "privacy"]),
                (b, ["boiler", "privacy"]),
            ):
                expected[tenant.key] = {}
                for name in names:
                    body = (
                        DOCS[name].encode() if tenant is a else DOCS[name].replace("must", "shall").encode()
                    )
                    doc_id = await upload(client, tenant.key, name, body)
                    expected[tenant.key][doc_id] = hashlib.sha256(body).hexdigest()
                assert set(await ingest_pending(inst.app, tenant.id)) == {"succeeded"}
            # Tenant C: two documents before the backup, one of them deleted (its purge pending).
            c_before = {}
            for i in range(2):
                body = f"tenant c document {i} ".encode() * 50
                c_before[await upload(client, c.key, f"c{i}", body)] = hashlib.sha256(body).hexdigest()
            doomed = next(iter(c_before))
            assert (
                await client.delete(f"/api/v1/documents/{doomed}", headers=bearer(c.key))
            ).status_code in (200, 204)
            results_before = {t.key: await search(client, t.key) for t in (a, b)}
            # A signed checkpoint by this host's audit key: it must still verify on the new host.
            async with inst.app.state.db.transaction() as session:
                checkpoint = await create_checkpoint(
                    session, signing.load_private_key(settings.audit_signing_key_path)
                )
            assert checkpoint is not None

            # The backup, in a thread; at its snapshot it waits while tenant C uploads more and a
            # purge is attempted (it must be refused while blobs are copied, not break the archive).
            snapshot_taken, go_on = threading.Event(), threading.Event()

            def at_snapshot(meta: dict[str, Any]) -> None:
                snapshot_taken.set()
                assert go_on.wait(60), "the test did not release the backup"

            archive = settings.backups_path / "drill.tar.age"
            job = asyncio.get_running_loop().run_in_executor(
                None, lambda: create_backup(settings, archive, on_start=at_snapshot)
            )
            assert await anyio.to_thread.run_sync(snapshot_taken.wait, 60)
            c_after = []
            for i in range(3):
                c_after.append(await upload(client, c.key, f"late{i}", f"late document {i} ".encode() * 40))
            docs = Services(
                settings=settings,
                db=inst.app.state.db,
                keyring=inst.app.state.keyring,
                store=inst.app.state.store,
            )
            with pytest.raises(BackupInProgress):
                await purge_document(docs, c.id, __import__("uuid").UUID(doomed))
            go_on.set()
            result = await job
            assert result.objects >= 6 + 2  # A's and B's originals (+ texts), C's two
            # After the copy, the purge goes through.
            assert await purge_document(docs, c.id, __import__("uuid").UUID(doomed)) == 1

            shutil.copy(settings.master_key_path, vault / "master.key")
            (vault / "master.key").chmod(0o600)
            shutil.copy(settings.backup_identity_path, vault / "backup.key")
            shutil.copy(archive, vault / archive.name)
        # Destroy the whole data directory.
        shutil.rmtree(src_home)
        assert not await anyio.Path(src_home).exists()

        dst_ports = (free_port(), free_port())
        dst = instance_settings(dst_home, dst_ports)
        restored = await anyio.to_thread.run_sync(
            lambda: restore_backup(
                dst,
                vault / "drill.tar.age",
                identity_path=vault / "backup.key",
                master_keys=[vault / "master.key"],
            )
        )
        assert restored.objects == result.objects
        # Everything restored belongs to the service user the servers run as (the restore ran as root).
        ident = identity_for(dst)
        owners = {(p.stat().st_uid, p.stat().st_gid) for p in [dst.objects_dir, *dst.objects_dir.rglob("*")]}
        assert owners == {(ident.uid, ident.gid)}
        async with running(instance_settings(dst_home, dst_ports), migrate=False) as inst:
            client = inst.client
            for key, docs_sha in expected.items():
                for doc_id, sha in docs_sha.items():
                    assert await content_sha(client, key, doc_id) == sha
            for key, before in results_before.items():
                assert await search(client, key) == before
            # C: what committed before the snapshot is back byte for byte; later uploads are absent.
            kept = next(d for d in c_before if d != doomed)
            assert await content_sha(client, c.key, kept) == c_before[kept]
            listed = (await client.get("/api/v1/documents", headers=bearer(c.key))).json()
            listed_ids = {d["id"] for d in listed["items"]}
            assert kept in listed_ids and not listed_ids.intersection(c_after)
            # The deleted document comes back deleted (its purge runs again on the restored host).
            assert await content_sha(client, c.key, doomed) is None
            engine = create_engine(inst.settings.owner_database_url)
            try:
                with engine.connect() as conn:
                    keys = [signing.load_public_key(inst.settings.audit_signing_pubkey_path)]
                    keys += signing.previous_public_keys(inst.settings.keys_dir)
                    verified = verify_database(conn, keys)
                    last = conn.exec_driver_sql(
                        "SELECT details->>'archive', actor_type FROM audit_events "
                        "WHERE action = 'backup.restore'"
                    ).all()
            finally:
                engine.dispose()
            assert verified.ok, verified.first_break
            assert verified.checkpoints >= 1 and verified.last_anchored_seq >= checkpoint.seq
            assert len(keys) == 2  # the new host's own key and the source's, installed by the restore
            assert [tuple(r) for r in last] == [("drill.tar.age", "cli")]
    finally:
        shutil.rmtree(src_home, ignore_errors=True)
        shutil.rmtree(dst_home, ignore_errors=True)
