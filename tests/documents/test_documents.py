"""Documents through the HTTP API on the real Postgres, the filesystem store and real crypto."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import AsyncIterator

import httpx
import psycopg
import pytest
from fastapi import FastAPI

from appliance.db.engine import Database
from appliance.documents import service
from appliance.settings import Settings
from tests.api.test_auth import owner_conninfo
from tests.factories import bearer, make_key, make_tenant

PDF = b"%PDF-1.4\n1 0 obj<</Type/Catalog>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n"


async def upload(
    client: httpx.AsyncClient,
    key: str,
    data: bytes,
    *,
    filename: str = "f.bin",
    metadata: dict | None = None,
    content_type: str = "application/octet-stream",
) -> httpx.Response:
    files = {"file": (filename, data, content_type)}
    form = {"metadata": json.dumps(metadata)} if metadata is not None else None
    return await client.post("/api/v1/documents", files=files, data=form, headers=bearer(key))


@pytest.fixture
async def tenant(app_db: Database):  # type: ignore[no-untyped-def]
    return await make_tenant(app_db, role="editor")


def leftovers(settings: Settings) -> list[str]:
    return sorted(os.listdir(settings.tmp_dir))


async def test_upload_download_round_trip_at_segment_edges(
    client: httpx.AsyncClient, tenant, settings
) -> None:
    seg = settings.blob_segment_bytes
    for size in (0, 1, seg - 1, seg, seg + 1, 3 * seg + 17):
        data = os.urandom(size)
        r = await upload(client, tenant.key, data, filename=f"blob-{size}.bin")
        assert r.status_code == 201, r.text
        doc = r.json()
        assert doc["current_version"]["size"] == size
        assert doc["current_version"]["sha256"] == hashlib.sha256(data).hexdigest()
        got = await client.get(f"/api/v1/documents/{doc['id']}/content", headers=bearer(tenant.key))
        assert got.status_code == 200
        assert got.content == data
        assert got.headers["content-length"] == str(size)
        assert got.headers["accept-ranges"] == "bytes"
        assert got.headers["etag"] == f'"{hashlib.sha256(data).hexdigest()}"'
        assert f"blob-{size}.bin" in got.headers["content-disposition"]
    assert leftovers(settings) == []


async def test_ranges(client: httpx.AsyncClient, tenant, settings) -> None:
    seg = settings.blob_segment_bytes
    data = os.urandom(2 * seg + 1000)
    doc = (await upload(client, tenant.key, data)).json()
    url = f"/api/v1/documents/{doc['id']}/content"
    for header, expect in [
        ("bytes=0-0", data[0:1]),
        ("bytes=10-99", data[10:100]),
        (f"bytes={seg - 5}-{seg + 5}", data[seg - 5 : seg + 6]),
        ("bytes=-100", data[-100:]),
        (f"bytes={len(data) - 1}-", data[-1:]),
        (f"bytes=5-{10 * len(data)}", data[5:]),
    ]:
        r = await client.get(url, headers={**bearer(tenant.key), "Range": header})
        assert r.status_code == 206, header
        assert r.content == expect, header
        start = r.headers["content-range"].split()[1].split("-")[0]
        assert r.headers["content-range"].endswith(f"/{len(data)}") and int(start) == len(data) - len(
            data[int(start) :]
        ), header
    r = await client.get(url, headers={**bearer(tenant.key), "Range": f"bytes={len(data)}-"})
    assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{len(data)}"
    r = await client.get(url, headers={**bearer(tenant.key), "Range": "bytes=0-1,5-6"})
    assert r.status_code == 200 and r.content == data  # multiple ranges: the whole body


async def test_dedup_metadata_and_sniffing(client: httpx.AsyncClient, tenant, settings) -> None:
    r = await upload(
        client,
        tenant.key,
        PDF,
        filename="report.txt",
        content_type="text/plain",
        metadata={"title": "Q3 report", "tags": ["finance", "q3"], "extra": {"owner": "ops"}},
    )
    assert r.status_code == 201, r.text
    doc = r.json()
    assert (
        doc["title"] == "Q3 report"
        and doc["tags"] == ["finance", "q3"]
        and doc["metadata"] == {"owner": "ops"}
    )
    assert doc["current_version"]["content_type"] == "application/pdf"  # the bytes, not the client's claim
    again = await upload(client, tenant.key, PDF, filename="copy.pdf")
    assert again.status_code == 200 and again.json()["id"] == doc["id"]
    # Raw body upload of the same bytes: also deduplicated.
    raw = await client.post(
        "/api/v1/documents", content=PDF, headers={**bearer(tenant.key), "X-Filename": "x.pdf"}
    )
    assert raw.status_code == 200 and raw.json()["id"] == doc["id"]
    with psycopg.connect(owner_conninfo(settings)) as conn:
        count = conn.execute(
            "SELECT count(*) FROM document_versions WHERE tenant_id = %s AND content_sha256 = %s",
            (tenant.id, hashlib.sha256(PDF).digest()),
        ).fetchone()[0]
        assert count == 1
    # Another tenant uploading the same bytes gets its own document.
    other = await make_tenant_via(client, settings)
    r = await upload(client, other, PDF)
    assert r.status_code == 201 and r.json()["id"] != doc["id"]
    md = await client.post(
        "/api/v1/documents",
        content=b"# Title\n\nSome *markdown* text.\n",
        headers={**bearer(tenant.key), "X-Filename": "notes.md"},
    )
    assert md.json()["current_version"]["content_type"] == "text/markdown"


async def make_tenant_via(client: httpx.AsyncClient, settings: Settings) -> str:
    from appliance.db.engine import Database as Db

    db = Db(settings.app_database_url, pool_size=1)
    try:
        return (await make_tenant(db, role="editor")).key
    finally:
        await db.dispose()


async def test_bad_uploads(client: httpx.AsyncClient, tenant, settings) -> None:
    r = await client.post("/api/v1/documents", files={"other": ("a", b"x")}, headers=bearer(tenant.key))
    assert r.status_code == 400 and r.json()["code"] == "file_part_missing"
    r = await upload(client, tenant.key, b"abc", metadata=None)
    assert r.status_code == 201
    r = await client.post(
        "/api/v1/documents",
        files={"file": ("a", b"unique-1")},
        data={"metadata": "{not json"},
        headers=bearer(tenant.key),
    )
    assert r.status_code == 400 and r.json()["code"] == "metadata_invalid"
    r = await upload(client, tenant.key, b"unique-2", metadata={"tags": "not-a-list"})
    assert r.status_code == 422 and r.json()["code"] == "metadata_invalid"
    _, viewer = await make_key_for(tenant)
    r = await upload(client, viewer, b"unique-3")
    assert r.status_code == 403
    assert leftovers(settings) == []


async def make_key_for(tenant):  # type: ignore[no-untyped-def]
    from tests.conftest import _SESSION_DB

    return await make_key(_SESSION_DB[0], tenant.id, role="viewer")


async def test_size_limit_is_enforced_while_streaming(
    client: httpx.AsyncClient, app: FastAPI, tenant, settings: Settings
) -> None:
    svc: service.Services = app.state.documents
    original = svc.settings
    svc.settings = original.model_copy(update={"max_upload_bytes": 100_000})
    try:

        async def body() -> AsyncIterator[bytes]:
            for _ in range(50):
                yield os.urandom(10_000)

        r = await client.post("/api/v1/documents", content=body(), headers=bearer(tenant.key))
        assert r.status_code == 413 and r.json()["code"] == "payload_too_large"
        assert r.headers["content-type"] == "application/problem+json"
    finally:
        svc.settings = original
    assert leftovers(settings) == []
    listed = (await client.get("/api/v1/documents", headers=bearer(tenant.key))).json()["items"]
    assert listed == []


async def test_versions(client: httpx.AsyncClient, tenant) -> None:
    v1 = b"version one " * 1000
    v2 = b"version two " * 1000
    doc = (await upload(client, tenant.key, v1, filename="doc.txt")).json()
    r = await client.post(
        f"/api/v1/documents/{doc['id']}/versions",
        content=v2,
        headers={**bearer(tenant.key), "X-Filename": "doc-v2.txt"},
    )
    assert r.status_code == 201, r.text
    ver2 = r.json()
    assert ver2["version"] == 2 and ver2["document_id"] == doc["id"]
    versions = (
        await client.get(f"/api/v1/documents/{doc['id']}/versions", headers=bearer(tenant.key))
    ).json()
    assert [v["version"] for v in versions["items"]] == [1, 2]
    v1_id = versions["items"][0]["id"]
    assert (
        await client.get(f"/api/v1/documents/{doc['id']}/content", headers=bearer(tenant.key))
    ).content == v2
    r = await client.get(
        f"/api/v1/documents/{doc['id']}/versions/{v1_id}/content", headers=bearer(tenant.key)
    )
    assert r.content == v1
    got = (await client.get(f"/api/v1/documents/{doc['id']}", headers=bearer(tenant.key))).json()
    assert got["current_version"]["version"] == 2
    r = await client.post(f"/api/v1/documents/{doc['id']}/versions", content=v1, headers=bearer(tenant.key))
    assert r.status_code == 200 and r.json()["id"] == v1_id  # those bytes are stored already


async def test_list_filters_and_pagination(client: httpx.AsyncClient, app_db: Database) -> None:
    t = await make_tenant(app_db, role="editor")
    ids = []
    for i in range(5):
        tags = ["even"] if i % 2 == 0 else ["odd"]
        data = PDF + str(i).encode() if i == 4 else f"text {i}\n".encode()
        ids.append((await upload(client, t.key, data, metadata={"tags": tags})).json()["id"])
    seen, cursor = [], None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = (await client.get("/api/v1/documents", params=params, headers=bearer(t.key))).json()
        seen += [d["id"] for d in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == list(reversed(ids))
    evens = (await client.get("/api/v1/documents", params={"tag": "even"}, headers=bearer(t.key))).json()[
        "items"
    ]
    assert {d["id"] for d in evens} == {ids[0], ids[2], ids[4]}
    pdfs = (
        await client.get(
            "/api/v1/documents", params={"content_type": "application/pdf"}, headers=bearer(t.key)
        )
    ).json()["items"]
    assert [d["id"] for d in pdfs] == [ids[4]]
    r = await client.get("/api/v1/documents", params={"cursor": "garbage!"}, headers=bearer(t.key))
    assert r.status_code == 422


async def test_other_tenant_gets_404_everywhere(client: httpx.AsyncClient, app_db: Database, tenant) -> None:
    doc = (await upload(client, tenant.key, b"secret of A " * 100)).json()
    b = await make_tenant(app_db, role="editor")
    vid = doc["current_version"]["id"]
    for method, path in [
        ("GET", f"/api/v1/documents/{doc['id']}"),
        ("GET", f"/api/v1/documents/{doc['id']}/content"),
        ("GET", f"/api/v1/documents/{doc['id']}/versions"),
        ("GET", f"/api/v1/documents/{doc['id']}/versions/{vid}"),
        ("GET", f"/api/v1/documents/{doc['id']}/versions/{vid}/content"),
        ("POST", f"/api/v1/documents/{doc['id']}/download-url"),
        ("POST", f"/api/v1/documents/{doc['id']}/versions"),
        ("DELETE", f"/api/v1/documents/{doc['id']}"),
    ]:
        kwargs = {"json": {}} if path.endswith("download-url") else {}
        if path.endswith("/versions") and method == "POST":
            kwargs = {"content": b"x"}
        r = await client.request(method, path, headers=bearer(b.key), **kwargs)
        assert r.status_code == 404, (method, path, r.status_code)
        assert b"secret of A" not in r.content
    assert (await client.get(f"/api/v1/documents/{doc['id']}", headers=bearer(tenant.key))).status_code == 200


async def test_signed_urls(client: httpx.AsyncClient, tenant) -> None:
    data = b"signed content " * 50
    doc = (await upload(client, tenant.key, data)).json()
    r = await client.post(
        f"/api/v1/documents/{doc['id']}/download-url", json={"expires_in": 60}, headers=bearer(tenant.key)
    )
    assert r.status_code == 200
    url = r.json()["url"]
    got = await client.get(url)  # no API key
    assert got.status_code == 200 and got.content == data
    got = await client.get(url, headers={"Range": "bytes=0-5"})
    assert got.status_code == 206 and got.content == data[:6]
    token = url.rsplit("/", 1)[1]
    payload, sig = token.rsplit(".", 1)
    tampered = f"{url.rsplit('/', 1)[0]}/{payload}.{sig[:-2]}{'AA' if sig[-2:] != 'AA' else 'BB'}"
    r = await client.get(tampered)
    assert r.status_code == 403 and r.json()["code"] == "download_url_invalid"
    short = (
        await client.post(
            f"/api/v1/documents/{doc['id']}/download-url", json={"expires_in": 1}, headers=bearer(tenant.key)
        )
    ).json()["url"]
    await asyncio.sleep(1.1)
    r = await client.get(short)
    assert r.status_code == 403 and r.json()["code"] == "download_url_expired"
    r = await client.post(
        f"/api/v1/documents/{doc['id']}/download-url", json={"expires_in": 10**9}, headers=bearer(tenant.key)
    )
    assert r.status_code == 422


async def test_delete_hides_at_once_and_purge_removes_blobs(
    client: httpx.AsyncClient, app: FastAPI, tenant, settings: Settings
) -> None:
    data = b"to be deleted " * 100
    doc = (await upload(client, tenant.key, data)).json()
    url = (
        await client.post(f"/api/v1/documents/{doc['id']}/download-url", json={}, headers=bearer(tenant.key))
    ).json()["url"]
    with psycopg.connect(owner_conninfo(settings)) as conn:
        key = conn.execute(
            "SELECT object_key FROM document_versions WHERE document_id = %s", (doc["id"],)
        ).fetchone()[0]
    svc: service.Services = app.state.documents
    assert svc.store.exists(key)
    assert (
        await client.delete(f"/api/v1/documents/{doc['id']}", headers=bearer(tenant.key))
    ).status_code == 204
    for path in (f"/api/v1/documents/{doc['id']}", f"/api/v1/documents/{doc['id']}/content"):
        assert (await client.get(path, headers=bearer(tenant.key))).status_code == 404
    assert (await client.get(url)).status_code == 404
    listed = (await client.get("/api/v1/documents", headers=bearer(tenant.key))).json()["items"]
    assert doc["id"] not in [d["id"] for d in listed]
    # The worker's purge (called directly here; the e2e suite runs it through Dramatiq).
    import uuid

    assert await service.purge_document(svc, tenant.id, uuid.UUID(doc["id"])) == 1
    assert not svc.store.exists(key)
    assert await service.purge_document(svc, tenant.id, uuid.UUID(doc["id"])) == 0
    # The same bytes can be uploaded again as a new document.
    again = await upload(client, tenant.key, data)
    assert again.status_code == 201 and again.json()["id"] != doc["id"]


async def test_tampered_blob_is_refused(client: httpx.AsyncClient, app: FastAPI, tenant, settings) -> None:
    data = os.urandom(settings.blob_segment_bytes + 10)
    doc = (await upload(client, tenant.key, data)).json()
    with psycopg.connect(owner_conninfo(settings)) as conn:
        key = conn.execute(
            "SELECT object_key FROM document_versions WHERE document_id = %s", (doc["id"],)
        ).fetchone()[0]
    svc: service.Services = app.state.documents
    blob = bytearray(svc.store.read_at(key, 0, svc.store.stat(key).size))
    blob[-20] ^= 0x01  # inside the authenticated index record
    svc.store.put_bytes(key, bytes(blob))
    r = await client.get(f"/api/v1/documents/{doc['id']}/content", headers=bearer(tenant.key))
    assert r.status_code == 500 and r.json()["code"] == "blob_integrity_error"
    assert data[:100] not in r.content


async def test_fifty_mib_round_trip(client: httpx.AsyncClient, tenant) -> None:
    digest = hashlib.sha256()
    piece = os.urandom(1 << 20)

    async def body() -> AsyncIterator[bytes]:
        for i in range(50):
            chunk = bytes([i]) + piece[1:]
            digest.update(chunk)
            yield chunk

    r = await client.post(
        "/api/v1/documents", content=body(), headers={**bearer(tenant.key), "X-Filename": "big.bin"}
    )
    assert r.status_code == 201, r.text
    doc = r.json()
    assert doc["current_version"]["size"] == 50 << 20
    assert doc["current_version"]["sha256"] == digest.hexdigest()
    got = hashlib.sha256()
    async with client.stream(
        "GET", f"/api/v1/documents/{doc['id']}/content", headers=bearer(tenant.key)
    ) as resp:
        assert resp.status_code == 200
        async for chunk in resp.aiter_bytes():
            got.update(chunk)
    assert got.hexdigest() == digest.hexdigest()
