"""`GET /api/v1/audit`: the tenant's own trail, for its admins; filters, cursor pages, itself audited."""

from __future__ import annotations

import httpx
from sqlalchemy import Connection, text

from appliance.db.engine import Database
from tests.factories import bearer, make_key, make_tenant


async def test_admins_read_their_tenants_trail_newest_first(
    client: httpx.AsyncClient, app_db: Database, owner_conn: Connection
) -> None:
    a = await make_tenant(app_db)
    b = await make_tenant(app_db)
    await make_key(app_db, a.id, role="viewer")
    r = await client.get("/api/v1/audit", headers={**bearer(a.key), "X-Request-ID": "audit-api-1"})
    assert r.status_code == 200, r.text
    items = r.json()["items"]
    assert {i["tenant_id"] for i in items} == {str(a.id)}
    assert [i["seq"] for i in items] == sorted((i["seq"] for i in items), reverse=True)
    assert {"tenant.create", "api_key.create"} <= {i["action"] for i in items}
    assert all(len(i["hash"]) == 64 for i in items)

    row = owner_conn.execute(
        text("SELECT action, tenant_id, details FROM audit_events WHERE request_id = 'audit-api-1'")
    ).one()
    assert row.action == "audit.read" and row.tenant_id == a.id and row.details["returned"] == len(items)

    # B's admin never sees A's rows; naming A's tenant is a 404.
    r = await client.get("/api/v1/audit", headers=bearer(b.key))
    assert {i["tenant_id"] for i in r.json()["items"]} == {str(b.id)}
    r = await client.get("/api/v1/audit", params={"tenant_id": str(a.id)}, headers=bearer(b.key))
    assert r.status_code == 404 and r.headers["content-type"].startswith("application/problem+json")


async def test_filters_and_cursor_pages(client: httpx.AsyncClient, app_db: Database) -> None:
    a = await make_tenant(app_db)
    for _ in range(3):
        await make_key(app_db, a.id)
    params = {"action": "api_key.create", "limit": 2}
    first = (await client.get("/api/v1/audit", params=params, headers=bearer(a.key))).json()
    assert len(first["items"]) == 2 and first["next_cursor"]
    second = (
        await client.get(
            "/api/v1/audit", params={**params, "cursor": first["next_cursor"]}, headers=bearer(a.key)
        )
    ).json()
    seqs = [i["seq"] for i in first["items"] + second["items"]]
    assert len(seqs) == 4 and seqs == sorted(seqs, reverse=True) and len(set(seqs)) == 4
    assert second["next_cursor"] is None
    assert {i["action"] for i in first["items"] + second["items"]} == {"api_key.create"}

    newest = first["items"][0]
    r = await client.get(
        "/api/v1/audit",
        params={"resource_id": newest["resource_id"], "outcome": "success", "since": newest["occurred_at"]},
        headers=bearer(a.key),
    )
    assert [i["seq"] for i in r.json()["items"]] == [newest["seq"]]
    r = await client.get("/api/v1/audit", params={"until": "2000-01-01T00:00:00Z"}, headers=bearer(a.key))
    assert r.json()["items"] == []

    r = await client.get("/api/v1/audit", params={"cursor": "garbage!"}, headers=bearer(a.key))
    assert r.status_code == 422 and r.json()["code"] == "invalid_cursor"
    r = await client.get("/api/v1/audit", params={"limit": 1001}, headers=bearer(a.key))
    assert r.status_code == 422 and r.json()["code"] == "validation_error"


async def test_roles(
    client: httpx.AsyncClient, app_db: Database, system_key: str, owner_conn: Connection
) -> None:
    a = await make_tenant(app_db)
    _, viewer = await make_key(app_db, a.id, role="viewer")
    r = await client.get("/api/v1/audit", headers={**bearer(viewer), "X-Request-ID": "audit-api-denied"})
    assert r.status_code == 403 and r.json()["code"] == "role_required"
    denied = owner_conn.execute(
        text("SELECT action, outcome, tenant_id FROM audit_events WHERE request_id = 'audit-api-denied'")
    ).one()
    assert denied == ("auth.denied", "denied", a.id)

    r = await client.get("/api/v1/audit", headers=bearer(system_key))
    assert r.status_code == 422 and r.json()["code"] == "tenant_id_required"
    r = await client.get(
        "/api/v1/audit",
        params={"tenant_id": str(a.id)},
        headers={**bearer(system_key), "X-Request-ID": "audit-api-sys"},
    )
    assert r.status_code == 200 and {i["tenant_id"] for i in r.json()["items"]} == {str(a.id)}
    # The tenant's admins see that a system admin read their trail.
    read = owner_conn.execute(
        text("SELECT tenant_id, actor_type FROM audit_events WHERE request_id = 'audit-api-sys'")
    ).one()
    assert read == (a.id, "api_key")
