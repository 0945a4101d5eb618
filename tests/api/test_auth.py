"""Keys and roles through the HTTP API (in-process ASGI app on the real Postgres and Redis)."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime, timedelta

import httpx
import psycopg
import pytest
from sqlalchemy import text

from appliance.auth.keys import parse_prefix
from appliance.auth.service import AuthFailure, authenticate
from appliance.db.engine import Database
from appliance.settings import Settings
from tests.factories import bearer, make_key, make_tenant

PROBLEM = "application/problem+json"


async def test_whoami_and_request_id(client: httpx.AsyncClient, app_db: Database) -> None:
    a = await make_tenant(app_db)
    r = await client.get("/api/v1/whoami", headers={**bearer(a.key), "X-Request-ID": "trace-123"})
    assert r.status_code == 200
    assert r.json()["tenant"] == {"id": str(a.id), "name": a.name}
    assert r.json()["role"] == "admin"
    assert r.headers["x-request-id"] == "trace-123"
    r = await client.get("/api/v1/whoami", headers={**bearer(a.key), "X-Request-ID": "bad id with spaces"})
    assert r.headers["x-request-id"] != "bad id with spaces" and len(r.headers["x-request-id"]) == 32


async def test_missing_malformed_and_unknown_keys_are_401_problems(client: httpx.AsyncClient) -> None:
    for headers in (
        {},
        {"Authorization": "Basic abc"},
        bearer("nope"),
        bearer("apl_000000000000_" + "A" * 43),
    ):
        r = await client.get("/api/v1/whoami", headers=headers)
        assert r.status_code == 401, headers
        assert r.headers["content-type"] == PROBLEM
        body = r.json()
        assert body["status"] == 401 and body["code"] in ("unauthorized", "invalid_api_key")
        assert r.headers["www-authenticate"].startswith("Bearer")


async def test_a_tenant_cannot_see_another_tenants_resources(
    client: httpx.AsyncClient, app_db: Database
) -> None:
    a = await make_tenant(app_db)
    b = await make_tenant(app_db)
    b_key_id, b_key = await make_key(app_db, b.id)
    b_prefix = b_key.split("_")[0] + "_" + b_key.split("_")[1]
    for method, path in [
        ("GET", f"/api/v1/keys/{b_key_id}"),
        ("POST", f"/api/v1/keys/{b_key_id}/revoke"),
        ("GET", f"/api/v1/tenants/{b.id}"),
        ("GET", f"/api/v1/keys?tenant_id={b.id}"),
    ]:
        r = await client.request(method, path, headers=bearer(a.key))
        assert r.status_code == 404, (method, path, r.text)
        assert r.headers["content-type"] == PROBLEM
        # Nothing of B's comes back (the id A asked for is echoed in `instance`, nothing more).
        assert b.name not in r.text and b_prefix not in r.text and '"role"' not in r.text
    listed = (await client.get("/api/v1/keys", headers=bearer(a.key))).json()["items"]
    assert {k["tenant_id"] for k in listed} == {str(a.id)}
    # B's key still works: A's revoke attempt did nothing.
    r = await client.get(f"/api/v1/keys/{b_key_id}", headers=bearer(b.key))
    assert r.status_code == 200 and r.json()["revoked_at"] is None


async def test_revoked_key_gets_401(client: httpx.AsyncClient, app_db: Database) -> None:
    a = await make_tenant(app_db)
    key_id, key = await make_key(app_db, a.id, role="viewer")
    assert (await client.get("/api/v1/whoami", headers=bearer(key))).status_code == 200
    r = await client.post(f"/api/v1/keys/{key_id}/revoke", headers=bearer(a.key))
    assert r.status_code == 200 and r.json()["revoked_at"]
    r = await client.get("/api/v1/whoami", headers=bearer(key))
    assert r.status_code == 401 and r.json()["code"] == "api_key_revoked"


async def test_expired_key_gets_401(client: httpx.AsyncClient, app_db: Database, settings: Settings) -> None:
    a = await make_tenant(app_db)
    key_id, key = await make_key(app_db, a.id, expires_at=datetime.now(UTC) + timedelta(hours=1))
    assert (await client.get("/api/v1/whoami", headers=bearer(key))).status_code == 200
    with psycopg.connect(owner_conninfo(settings)) as conn:  # let an hour pass, as the owner
        conn.execute("UPDATE api_keys SET expires_at = now() - interval '1 second' WHERE id = %s", (key_id,))
    r = await client.get("/api/v1/whoami", headers=bearer(key))
    assert r.status_code == 401 and r.json()["code"] == "api_key_expired"


async def test_roles(client: httpx.AsyncClient, app_db: Database) -> None:
    a = await make_tenant(app_db)
    _, viewer = await make_key(app_db, a.id, role="viewer")
    _, editor = await make_key(app_db, a.id, role="editor")
    for key in (viewer, editor):
        r = await client.post("/api/v1/keys", json={"name": "x", "role": "viewer"}, headers=bearer(key))
        assert r.status_code == 403 and r.json()["code"] == "role_required"
        assert (await client.get("/api/v1/keys", headers=bearer(key))).status_code == 403
        assert (await client.get("/api/v1/tenants", headers=bearer(key))).status_code == 403
    r = await client.post("/api/v1/keys", json={"name": "x", "role": "editor"}, headers=bearer(a.key))
    assert r.status_code == 201
    created = r.json()
    assert created["key"].startswith(created["prefix"] + "_") and created["role"] == "editor"
    # Shown once: listing never returns the secret.
    listed = (await client.get("/api/v1/keys", headers=bearer(a.key))).json()["items"]
    assert created["key"] not in str(listed) and all("key" not in k for k in listed)


async def test_system_admin_manages_tenants(client: httpx.AsyncClient, system_key: str) -> None:
    r = await client.post("/api/v1/tenants", json={"name": "Not A Slug"}, headers=bearer(system_key))
    assert r.status_code == 422 and r.headers["content-type"] == PROBLEM
    name = f"sys-{datetime.now(UTC).strftime('%H%M%S%f')}"
    r = await client.post("/api/v1/tenants", json={"name": name}, headers=bearer(system_key))
    assert r.status_code == 201
    tenant_id = r.json()["id"]
    r = await client.post("/api/v1/tenants", json={"name": name}, headers=bearer(system_key))
    assert r.status_code == 409 and r.json()["code"] == "tenant_exists"
    r = await client.post("/api/v1/keys", json={"name": "adm", "role": "admin"}, headers=bearer(system_key))
    assert r.status_code == 422 and r.json()["code"] == "tenant_id_required"
    r = await client.post(
        "/api/v1/keys",
        json={"name": "adm", "role": "admin", "tenant_id": tenant_id},
        headers=bearer(system_key),
    )
    assert r.status_code == 201
    admin_key = r.json()["key"]
    who = (await client.get("/api/v1/whoami", headers=bearer(admin_key))).json()
    assert who["tenant"]["id"] == tenant_id
    names = []
    cursor = None
    while True:
        page = (
            await client.get(
                "/api/v1/tenants",
                params={"limit": 2, **({"cursor": cursor} if cursor else {})},
                headers=bearer(system_key),
            )
        ).json()
        names += [t["name"] for t in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert name in names and names == sorted(names)


async def test_validation_errors_are_problems(client: httpx.AsyncClient, app_db: Database) -> None:
    a = await make_tenant(app_db)
    r = await client.post("/api/v1/keys", json={"name": "", "role": "root"}, headers=bearer(a.key))
    assert r.status_code == 422 and r.headers["content-type"] == PROBLEM
    assert r.json()["code"] == "validation_error" and r.json()["errors"]
    r = await client.get("/api/v1/keys/not-a-uuid", headers=bearer(a.key))
    assert r.status_code == 422
    r = await client.get("/api/v1/nothing-here")
    assert r.status_code == 404 and r.headers["content-type"] == PROBLEM


async def test_health_ready_and_metrics(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    r = await client.get("/readyz")
    assert r.status_code == 200, r.text
    assert set(r.json()["checks"]) == {"postgres", "redis", "object_store", "models", "llm"}
    assert r.json()["status"] == "ready" and r.json()["checks"]["llm"]["ok"]


async def test_ready_but_degraded_without_the_llm(app, client: httpx.AsyncClient, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    """The LLM down does not take the API out of service (search and ingest still work)."""
    from appliance.inference.llm import LLMClient
    from tests.conftest import free_port

    real = app.state.llm
    app.state.llm = LLMClient(
        settings.model_copy(update={"llm_url": f"http://127.0.0.1:{free_port()}"}), model="m", n_ctx=512
    )
    try:
        r = await client.get("/readyz")
        assert r.status_code == 200 and r.json()["status"] == "degraded"
        assert not r.json()["checks"]["llm"]["ok"]
    finally:
        await app.state.llm.aclose()
        app.state.llm = real


async def test_metrics(client: httpx.AsyncClient) -> None:
    r = await client.get("/metrics")
    assert r.status_code == 200 and "appliance_http_requests_total" in r.text
    assert 'appliance_queue_depth{queue="ingest"}' in r.text


def owner_conninfo(settings: Settings) -> str:
    return psycopg.conninfo.make_conninfo(
        host=settings.pg_host,
        port=settings.pg_port,
        dbname=settings.pg_database,
        user=settings.pg_owner_user,
        password=settings.pg_owner_password.get_secret_value(),
    )


async def test_authentication_scopes_the_transaction_only_for_a_key_that_passes(app_db: Database) -> None:
    """One statement looks the key up and sets the tenant: the scope must follow the checks."""
    a = await make_tenant(app_db)
    _, revoked = await make_key(app_db, a.id)
    async with app_db.transaction(tenant_id=a.id) as session:
        done = await session.execute(
            text("UPDATE api_keys SET revoked_at = now() WHERE prefix = :p"), {"p": parse_prefix(revoked)}
        )
        assert done.rowcount == 1
    wrong_secret = a.key[:-1] + ("x" if a.key[-1] != "x" else "y")

    async def scope_after(token: str) -> str:
        async with app_db.transaction() as session:
            with contextlib.suppress(AuthFailure):
                await authenticate(session, f"Bearer {token}")
            scope = await session.execute(text("SELECT current_setting('app.tenant_id', true)"))
            return str(scope.scalar() or "")

    assert await scope_after(a.key) == str(a.id)
    for token in (wrong_secret, revoked):
        assert await scope_after(token) == ""
    with pytest.raises(AuthFailure):
        async with app_db.transaction() as session:
            await authenticate(session, f"Bearer {revoked}")
