"""Audit coverage: every route in the OpenAPI schema either writes an audit event for a real, successful
request or is listed in EXEMPT with the reason it touches no tenant data. A new route that is in
neither fails here: give it a request below (and an audit event) or an exemption."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import Connection, text

from appliance.db.engine import Database
from tests.factories import TenantWithKey, bearer, ingest_pending, make_key, make_tenant, unique_name

EXEMPT: dict[tuple[str, str], str] = {
    ("GET", "/healthz"): "liveness probe: no data at all",
    ("GET", "/readyz"): "readiness probe: dependency status, no tenant data",
    ("GET", "/api/v1/whoami"): "echoes the caller's own, just-authenticated key; reads no tenant data",
    ("GET", "/v1/models"): "the models manifest, the same for every tenant",
}

DOC_TEXT = "Coverage boiler inspection. The pressure relief valve is tested every six months by technicians."


@dataclass
class Ctx:
    tenant: TenantWithKey
    system_key: str
    path_ids: dict[str, str]
    doomed_document: str
    spare_key: str
    models: dict[str, str]


def upload_args(text: str) -> dict[str, Any]:
    return {
        "content": text.encode(),
        "headers": {"Content-Type": "text/plain", "X-Filename": "coverage.txt"},
    }


def request_for(ctx: Ctx, method: str, path: str) -> dict[str, Any]:
    """Keyword arguments for client.request: path ids, a minimal valid body where the route takes one."""
    fresh = uuid.uuid4().hex
    specs: dict[tuple[str, str], dict[str, Any]] = {
        ("POST", "/api/v1/keys"): {"json": {"name": "coverage", "role": "viewer"}},
        ("POST", "/api/v1/keys/{key_id}/revoke"): {"ids": {"key_id": ctx.spare_key}},
        ("POST", "/api/v1/tenants"): {"json": {"name": unique_name("cov")}},
        ("POST", "/api/v1/documents"): upload_args(f"{DOC_TEXT} {fresh}"),
        ("DELETE", "/api/v1/documents/{document_id}"): {"ids": {"document_id": ctx.doomed_document}},
        ("POST", "/api/v1/documents/{document_id}/versions"): upload_args(f"{DOC_TEXT} v2 {fresh}"),
        ("POST", "/api/v1/documents/{document_id}/download-url"): {"json": {"expires_in": 60}},
        ("PUT", "/api/v1/labels"): {"json": {"labels": [{"name": "ops", "description": "Operations"}]}},
        ("POST", "/api/v1/search"): {"json": {"query": "boiler pressure valve", "mode": "hybrid"}},
        ("POST", "/api/v1/answers"): {
            "json": {"question": "How often is the valve tested?", "max_tokens": 16}
        },
        ("POST", "/v1/embeddings"): {"json": {"model": ctx.models["embedding"], "input": "boiler"}},
        ("POST", "/v1/chat/completions"): {
            "json": {
                "model": ctx.models["chat"],
                "messages": [{"role": "user", "content": "How often is the valve tested?"}],
                "max_tokens": 4,
                "grounding": {"enabled": True},
            }
        },
    }
    spec = dict(specs.get((method, path), {}))
    ids = {**ctx.path_ids, **spec.pop("ids", {})}
    try:
        url = path.format(**ids)
    except KeyError as exc:
        raise AssertionError(
            f"{method} {path}: no id for path parameter {exc}; add one to path_ids"
        ) from None
    return {"method": method, "url": url, **spec}


@pytest.fixture(scope="module")
async def ctx(client: httpx.AsyncClient, app: FastAPI, app_db: Database, system_key: str) -> Ctx:
    tenant = await make_tenant(app_db)
    docs = []
    for label in ("kept", "doomed"):
        r = await send(
            client,
            {"method": "POST", "url": "/api/v1/documents", **upload_args(f"{DOC_TEXT} {label}")},
            tenant.key,
        )
        assert r.status_code == 201, r.text
        docs.append(r.json())
    assert set(await ingest_pending(app, tenant.id)) == {"succeeded"}
    doc = docs[0]
    jobs = (await client.get("/api/v1/jobs", headers=bearer(tenant.key))).json()["items"]
    r = await client.post(
        f"/api/v1/documents/{doc['id']}/download-url", json={"expires_in": 600}, headers=bearer(tenant.key)
    )
    token = r.json()["url"].rsplit("/", 1)[1]
    key_id, _ = await make_key(app_db, tenant.id)
    spare_key, _ = await make_key(app_db, tenant.id)
    cards = (await client.get("/v1/models", headers=bearer(tenant.key))).json()["data"]
    models = {c["purpose"]: c["id"] for c in cards}
    return Ctx(
        tenant=tenant,
        system_key=system_key,
        path_ids={
            "document_id": doc["id"],
            "version_id": doc["current_version"]["id"],
            "job_id": jobs[0]["id"],
            "key_id": str(key_id),
            "tenant_id": str(tenant.id),
            "token": token,
        },
        doomed_document=docs[1]["id"],
        spare_key=str(spare_key),
        models=models,
    )


async def send(
    client: httpx.AsyncClient, spec: dict[str, Any], key: str, request_id: str | None = None
) -> httpx.Response:
    headers = {**spec.get("headers", {}), **bearer(key)}
    if request_id:
        headers["X-Request-ID"] = request_id
    return await client.request(**{**spec, "headers": headers})


def routes(app: FastAPI) -> list[tuple[str, str]]:
    return [(m.upper(), p) for p, item in app.openapi()["paths"].items() for m in item]


def audit_rows(conn: Connection, request_id: str) -> list[Any]:
    return list(
        conn.execute(
            text(
                "SELECT action, outcome, tenant_id, details FROM audit_events "
                "WHERE request_id = :r ORDER BY seq"
            ),
            {"r": request_id},
        )
    )


def test_exemptions_name_real_routes(app: FastAPI) -> None:
    assert set(EXEMPT) <= set(routes(app)), set(EXEMPT) - set(routes(app))


async def test_every_route_that_touches_tenant_data_is_audited(
    client: httpx.AsyncClient, app: FastAPI, ctx: Ctx, owner_conn: Connection
) -> None:
    unaudited = []
    for method, path in routes(app):
        if (method, path) in EXEMPT:
            continue
        spec = request_for(ctx, method, path)
        request_id = f"cov-{uuid.uuid4().hex[:12]}"
        r = await send(client, spec, ctx.tenant.key, request_id)
        if r.status_code == 403 and r.json().get("code") == "system_admin_required":
            request_id = f"cov-{uuid.uuid4().hex[:12]}"
            r = await send(client, spec, ctx.system_key, request_id)
        assert r.status_code < 300, f"{method} {path}: {r.status_code} {r.text[:300]}"
        assert r.headers["x-request-id"] == request_id
        rows = [row for row in audit_rows(owner_conn, request_id) if not row.action.startswith("auth.")]
        if not rows:
            unaudited.append(f"{method} {path}")
        for row in rows:  # compact: ids and hashes, never text
            assert DOC_TEXT[:20] not in json.dumps(row.details), f"{method} {path} puts text in the trail"
    assert not unaudited, f"routes that wrote no audit event (audit them or add to EXEMPT): {unaudited}"


async def test_reads_record_which_documents_and_chunks_went_out(
    client: httpx.AsyncClient, ctx: Ctx, owner_conn: Connection
) -> None:
    doc_id = ctx.path_ids["document_id"]
    calls = {
        "search": (
            "/api/v1/search",
            {"query": "boiler pressure relief valve", "mode": "fulltext"},
            "results",
        ),
        "answer": (
            "/api/v1/answers",
            {"question": "How often is the relief valve tested?", "max_tokens": 16},
            "passages",
        ),
        "openai.chat": (
            "/v1/chat/completions",
            {
                "model": ctx.models["chat"],
                "messages": [{"role": "user", "content": "How often is the relief valve tested?"}],
                "max_tokens": 4,
                "grounding": {"enabled": True},
            },
            "passages",
        ),
    }
    for action, (url, body, field) in calls.items():
        request_id = f"cov-{uuid.uuid4().hex[:12]}"
        r = await client.post(url, json=body, headers={**bearer(ctx.tenant.key), "X-Request-ID": request_id})
        assert r.status_code == 200, r.text
        (row,) = audit_rows(owner_conn, request_id)
        assert row.action == action and row.tenant_id == ctx.tenant.id
        returned = row.details[field]
        assert returned and {"document_id", "chunk_id"} == set(returned[0]), row.details
        assert doc_id in {p["document_id"] for p in returned}
        assert "valve" not in json.dumps(row.details)  # the query as its sha256, never the text


async def test_authentication_failures_are_audited(client: httpx.AsyncClient, owner_conn: Connection) -> None:
    for headers, reason in (
        ({"Authorization": "Bearer apl_nosuchkey_" + "x" * 40}, None),
        ({}, "missing"),
    ):
        request_id = f"cov-{uuid.uuid4().hex[:12]}"
        r = await client.get("/api/v1/documents", headers={**headers, "X-Request-ID": request_id})
        assert r.status_code == 401
        (row,) = audit_rows(owner_conn, request_id)
        assert row.action == "auth.failure" and row.outcome == "denied"
        if reason:
            assert reason in row.details["reason"]
