"""Cross-tenant attack suite (issue 9, item 3).

Part one, through the API: tenant B's admin key, holding tenant A's ids (documents, versions, jobs,
keys, the tenant itself, signed download tokens, search/answer/chat filters, audit filters), gets a 404
(403 where the route is not tenant-scoped, or for a forged download token) or, for a filter, an empty
result, and no byte of A's data: none of A's text, title, file name, label, tenant name or ids that B
did not send itself appears in any response body or header. Afterwards A's data is as it was.

The routes come from the app (app.openapi()["paths"]): every route with an id in its path, query or
body (a path parameter, a parameter or body field named *_id / *_ids or of uuid format) must have at
least one case in ATTACKS, so a new route with an id and no case fails
test_every_route_with_an_id_has_an_attack.

Part two, the catalogue as the owner: every table with a tenant_id column has row-level security
enabled and forced, with a policy; and as the application role with no tenant set (a fresh
connection, and app.tenant_id set to ''), every such table that holds rows returns none.
"""

from __future__ import annotations

import json
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import psycopg
import pytest
from fastapi import FastAPI
from itsdangerous.encoding import base64_decode, base64_encode

from appliance.db.engine import Database
from appliance.documents.signing import DownloadGrant
from appliance.settings import Settings
from tests.factories import TenantWithKey, bearer, ingest_pending, make_key, make_tenant
from tests.security.conftest import add_summary

ID_SUFFIXES = ("_id", "_ids")


# -- The world: tenant A (the victim) and tenant B (the attacker) ----------------------------------


@dataclass
class World:
    a: TenantWithKey
    b: TenantWithKey
    mark: str  # in A's text, title, file name and label: must never reach B
    a_doc: str
    a_version: str
    a_job: str
    a_spare_key: str
    a_token: str
    b_doc: str
    b_token: str
    chat_model: str
    secrets: set[str] = field(default_factory=set)  # A's data and ids
    attacks_run: list[str] = field(default_factory=list)


async def upload(client: httpx.AsyncClient, key: str, text: str, filename: str, meta: dict[str, Any]) -> Any:
    r = await client.post(
        "/api/v1/documents",
        content=text.encode(),
        params={"metadata": json.dumps(meta)},
        headers={"Content-Type": "text/plain", "X-Filename": filename, **bearer(key)},
    )
    assert r.status_code == 201, r.text
    return r.json()


async def download_token(client: httpx.AsyncClient, key: str, doc_id: str) -> str:
    r = await client.post(
        f"/api/v1/documents/{doc_id}/download-url", json={"expires_in": 3600}, headers=bearer(key)
    )
    assert r.status_code == 200, r.text
    return str(r.json()["url"].rsplit("/", 1)[1])


@pytest.fixture(scope="module")
async def world(client: httpx.AsyncClient, app: FastAPI, app_db: Database) -> World:
    a, b = await make_tenant(app_db), await make_tenant(app_db)
    mark = f"zq{uuid.uuid4().hex[:12]}"
    a_text = (
        f"Tenant A payroll ledger {mark}. The chief engineer earns 98765 kroner. "
        "The chiller plant is serviced every March by technicians."
    )
    a_doc = await upload(
        client, a.key, a_text, f"{mark}-ledger.txt", {"title": f"Ledger {mark}", "tags": [f"tag{mark}"]}
    )
    b_doc = await upload(
        client,
        b.key,
        "Tenant B handbook. The chiller plant is inspected every autumn by the facilities team.",
        "handbook.txt",
        {"title": "Handbook"},
    )
    assert set(await ingest_pending(app, a.id)) == {"succeeded"}
    assert set(await ingest_pending(app, b.id)) == {"succeeded"}
    r = await client.put(
        "/api/v1/labels",
        json={"labels": [{"name": f"lbl{mark}", "description": f"Label {mark}"}]},
        headers=bearer(a.key),
    )
    assert r.status_code == 200, r.text
    jobs = (await client.get("/api/v1/jobs", headers=bearer(a.key))).json()["items"]
    spare_id, _ = await make_key(app_db, a.id)
    cards = (await client.get("/v1/models", headers=bearer(a.key))).json()["data"]
    a_keys = (await client.get("/api/v1/keys", headers=bearer(a.key))).json()["items"]
    w = World(
        a=a,
        b=b,
        mark=mark,
        a_doc=a_doc["id"],
        a_version=a_doc["current_version"]["id"],
        a_job=jobs[0]["id"],
        a_spare_key=str(spare_id),
        a_token=await download_token(client, a.key, a_doc["id"]),
        b_doc=b_doc["id"],
        b_token=await download_token(client, b.key, b_doc["id"]),
        chat_model=next(c["id"] for c in cards if c["purpose"] == "chat"),
    )
    w.secrets = {
        mark,
        "payroll ledger",
        "98765 kroner",
        f"lbl{mark}",
        a.name,
        str(a.id),
        str(a.key_id),
        w.a_doc,
        w.a_version,
        w.a_spare_key,
        *(k["prefix"] for k in a_keys),
        *(k["id"] for k in a_keys),
        *(j["id"] for j in jobs),
    }
    return w


# -- The attacks -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Attack:
    method: str
    path: str  # the OpenAPI route template
    name: str
    request: Callable[[World], dict[str, Any]]  # httpx request kwargs: url, params, json, content
    expect: int
    check: Callable[[World, Any], None] | None = None  # for 200s: the result holds nothing of A's


def _no_items(w: World, body: Any) -> None:
    assert body["items"] == [], body


def _audit_own_only(w: World, body: Any) -> None:
    # B's own trail may record B's own attempts (with the ids B sent): never an event of A's.
    assert all(e["tenant_id"] == str(w.b.id) for e in body["items"]), body


def _no_results(w: World, body: Any) -> None:
    assert body["results"] == [], body


def _only_b_results(w: World, body: Any) -> None:
    assert body["results"] and {r["document_id"] for r in body["results"]} == {w.b_doc}, body


def _not_found_answer(w: World, body: Any) -> None:
    assert body["found"] is False and body["citations"] == [], body


def _no_citations(w: World, body: Any) -> None:
    assert body["citations"] == [], body


def _tampered(token: str, **changes: str) -> str:
    """The token's payload with fields changed, its signature kept (what an attacker can do)."""
    payload, sig = token.rsplit(".", 1)
    raw = base64_decode(payload.lstrip("."))
    data = json.loads(zlib.decompress(raw) if payload.startswith(".") else raw)  # "." marks zlib
    data.update(changes)
    return f"{base64_encode(json.dumps(data, separators=(',', ':')).encode()).decode()}.{sig}"


DOCS = "/api/v1/documents/{document_id}"
VERSION = DOCS + "/versions/{version_id}"


def _filters(w: World) -> dict[str, Any]:
    return {"document_ids": [w.a_doc]}


ATTACKS: list[Attack] = [
    # API keys and tenants
    Attack("GET", "/api/v1/keys", "list A's keys", lambda w: {"params": {"tenant_id": str(w.a.id)}}, 404),
    Attack(
        "GET",
        "/api/v1/keys/{key_id}",
        "read A's key",
        lambda w: {"url": f"/api/v1/keys/{w.a_spare_key}"},
        404,
    ),
    Attack(
        "GET",
        "/api/v1/keys/{key_id}",
        "read A's key naming A",
        lambda w: {"url": f"/api/v1/keys/{w.a_spare_key}", "params": {"tenant_id": str(w.a.id)}},
        404,
    ),
    Attack(
        "POST",
        "/api/v1/keys/{key_id}/revoke",
        "revoke A's key",
        lambda w: {"url": f"/api/v1/keys/{w.a_spare_key}/revoke"},
        404,
    ),
    Attack(
        "POST",
        "/api/v1/keys/{key_id}/revoke",
        "revoke A's key naming A",
        lambda w: {"url": f"/api/v1/keys/{w.a_spare_key}/revoke", "params": {"tenant_id": str(w.a.id)}},
        404,
    ),
    Attack(
        "POST",
        "/api/v1/keys",
        "create a key in A",
        lambda w: {"json": {"name": "mine-now", "role": "admin", "tenant_id": str(w.a.id)}},
        404,
    ),
    Attack(
        "GET",
        "/api/v1/tenants/{tenant_id}",
        "read tenant A",
        lambda w: {"url": f"/api/v1/tenants/{w.a.id}"},
        404,
    ),
    # Documents, versions, content
    Attack("GET", DOCS, "read A's document", lambda w: {"url": f"/api/v1/documents/{w.a_doc}"}, 404),
    Attack("DELETE", DOCS, "delete A's document", lambda w: {"url": f"/api/v1/documents/{w.a_doc}"}, 404),
    Attack(
        "POST",
        DOCS + "/versions",
        "add a version to A's document",
        lambda w: {
            "url": f"/api/v1/documents/{w.a_doc}/versions",
            "content": b"overwritten by B",
            "headers": {"Content-Type": "text/plain", "X-Filename": "b.txt"},
        },
        404,
    ),
    Attack(
        "GET",
        DOCS + "/versions",
        "list A's versions",
        lambda w: {"url": f"/api/v1/documents/{w.a_doc}/versions"},
        404,
    ),
    Attack(
        "GET",
        VERSION,
        "read A's version",
        lambda w: {"url": f"/api/v1/documents/{w.a_doc}/versions/{w.a_version}"},
        404,
    ),
    Attack(
        "GET",
        VERSION,
        "A's version under B's document",
        lambda w: {"url": f"/api/v1/documents/{w.b_doc}/versions/{w.a_version}"},
        404,
    ),
    Attack(
        "GET", DOCS + "/content", "A's bytes", lambda w: {"url": f"/api/v1/documents/{w.a_doc}/content"}, 404
    ),
    Attack(
        "GET",
        VERSION + "/content",
        "A's version bytes",
        lambda w: {"url": f"/api/v1/documents/{w.a_doc}/versions/{w.a_version}/content"},
        404,
    ),
    Attack(
        "GET",
        VERSION + "/content",
        "A's version bytes under B's document",
        lambda w: {"url": f"/api/v1/documents/{w.b_doc}/versions/{w.a_version}/content"},
        404,
    ),
    Attack(
        "POST",
        DOCS + "/download-url",
        "sign a URL for A's document",
        lambda w: {"url": f"/api/v1/documents/{w.a_doc}/download-url", "json": {"expires_in": 60}},
        404,
    ),
    Attack(
        "POST",
        DOCS + "/download-url",
        "sign a URL for A's version under B's document",
        lambda w: {
            "url": f"/api/v1/documents/{w.b_doc}/download-url",
            "json": {"expires_in": 60, "version_id": w.a_version},
        },
        404,
    ),
    # Signed download URLs: the token is the credential, so forging one is the attack.
    Attack(
        "GET",
        "/api/v1/downloads/{token}",
        "B's token re-pointed at A's document",
        lambda w: {
            "url": f"/api/v1/downloads/{_tampered(w.b_token, t=str(w.a.id), d=w.a_doc, v=w.a_version)}"
        },
        403,
    ),
    Attack(
        "GET",
        "/api/v1/downloads/{token}",
        "B's token re-pointed at A's version only",
        lambda w: {"url": f"/api/v1/downloads/{_tampered(w.b_token, v=w.a_version)}"},
        403,
    ),
    Attack(
        "GET",
        "/api/v1/downloads/{token}",
        "A's token with another signature",
        lambda w: {"url": f"/api/v1/downloads/{w.a_token.rsplit('.', 1)[0]}.{w.b_token.rsplit('.', 1)[1]}"},
        403,
    ),
    # Jobs
    Attack("GET", "/api/v1/jobs/{job_id}", "read A's job", lambda w: {"url": f"/api/v1/jobs/{w.a_job}"}, 404),
    Attack(
        "GET",
        "/api/v1/jobs",
        "A's jobs by document",
        lambda w: {"params": {"document_id": w.a_doc}},
        200,
        _no_items,
    ),
    # Retrieval with A's document ids as filters: filters narrow within the caller's tenant
    Attack(
        "POST",
        "/api/v1/search",
        "search filtered to A's document",
        lambda w: {
            "json": {"query": f"payroll ledger {w.mark} chiller", "mode": "hybrid", "filters": _filters(w)}
        },
        200,
        _no_results,
    ),
    Attack(
        "POST",
        "/api/v1/search",
        "search for A's words",
        lambda w: {
            "json": {"query": f"payroll ledger {w.mark} chiller plant", "mode": "hybrid", "top_k": 50}
        },
        200,
        _only_b_results,
    ),
    Attack(
        "POST",
        "/api/v1/answers",
        "answer from A's document",
        lambda w: {"json": {"question": "When is the chiller plant serviced?", "filters": _filters(w)}},
        200,
        _not_found_answer,
    ),
    Attack(
        "POST",
        "/v1/chat/completions",
        "grounded chat on A's document",
        lambda w: {
            "json": {
                "model": w.chat_model,
                "messages": [{"role": "user", "content": "When is the chiller plant serviced?"}],
                "max_tokens": 8,
                "grounding": {"enabled": True, "filters": _filters(w)},
            }
        },
        200,
        _no_citations,
    ),
    # Audit
    Attack(
        "GET", "/api/v1/audit", "A's trail by tenant", lambda w: {"params": {"tenant_id": str(w.a.id)}}, 404
    ),
    Attack(
        "GET",
        "/api/v1/audit",
        "A's trail by document",
        lambda w: {"params": {"resource_id": w.a_doc}},
        200,
        _audit_own_only,
    ),
    Attack(
        "GET",
        "/api/v1/audit",
        "A's trail by actor",
        lambda w: {"params": {"actor_id": str(w.a.key_id)}},
        200,
        _audit_own_only,
    ),
    # Routes without ids that must not show A's data to B (tenant-scoped lists, system-only routes)
    Attack("GET", "/api/v1/documents", "list documents", lambda w: {}, 200, lambda w, body: None),
    Attack("GET", "/api/v1/labels", "read labels", lambda w: {}, 200, lambda w, body: None),
    Attack("GET", "/api/v1/keys", "list keys", lambda w: {}, 200, lambda w, body: None),
    Attack("GET", "/api/v1/tenants", "list tenants", lambda w: {}, 403),
    Attack("POST", "/api/v1/tenants", "create a tenant", lambda w: {"json": {"name": f"evil-{w.mark}"}}, 403),
]


def _schema_has_ids(schema: Any, components: dict[str, Any], seen: frozenset[str] = frozenset()) -> bool:
    """Whether a JSON schema (following $refs) has a property named *_id(s) or of uuid format."""
    if isinstance(schema, list):
        return any(_schema_has_ids(s, components, seen) for s in schema)
    if not isinstance(schema, dict):
        return False
    ref = schema.get("$ref")
    if isinstance(ref, str):
        name = ref.rsplit("/", 1)[1]
        return name not in seen and _schema_has_ids(components.get(name), components, seen | {name})
    if schema.get("format") == "uuid":
        return True
    props = schema.get("properties") or {}
    if any(p.endswith(ID_SUFFIXES) for p in props):
        return True
    return any(
        _schema_has_ids(v, components, seen)
        for k, v in schema.items()
        if k in ("properties", "items", "anyOf", "oneOf", "allOf", "additionalProperties")
        for v in ([v] if k != "properties" else list(v.values()))
    )


def id_routes(app: FastAPI) -> set[tuple[str, str]]:
    """Every route that takes an id: in its path, a query/header parameter, or its body."""
    spec = app.openapi()
    components = spec.get("components", {}).get("schemas", {})
    out = set()
    for path, item in spec["paths"].items():
        for method, op in item.items():
            params = op.get("parameters", [])
            takes_id = any(p["in"] == "path" for p in params) or any(
                p["name"].endswith(ID_SUFFIXES) or _schema_has_ids(p.get("schema"), components)
                for p in params
            )
            body = (op.get("requestBody") or {}).get("content", {})
            takes_id = takes_id or any(_schema_has_ids(c.get("schema"), components) for c in body.values())
            if takes_id:
                out.add((method.upper(), path))
    return out


def all_routes(app: FastAPI) -> set[tuple[str, str]]:
    return {(m.upper(), p) for p, item in app.openapi()["paths"].items() for m in item}


def test_every_route_with_an_id_has_an_attack(app: FastAPI) -> None:
    covered = {(a.method, a.path) for a in ATTACKS}
    missing = sorted(id_routes(app) - covered)
    assert not missing, f"routes that take an id and have no cross-tenant case in ATTACKS: {missing}"
    stale = sorted(covered - all_routes(app))
    assert not stale, f"ATTACKS name routes the app does not have: {stale}"


def _leaks(w: World, sent: str, response: httpx.Response) -> list[str]:
    """A's secrets in the response that B did not send itself (an error may echo the id it was given)."""
    seen = (response.text + json.dumps(dict(response.headers))).lower()
    found = []
    for secret in w.secrets:
        s = secret.lower()
        forms = {s, s.replace("-", "")}
        if s not in sent.lower() and any(f in seen for f in forms):
            found.append(secret)
    return found


async def _a_state(client: httpx.AsyncClient, w: World) -> dict[str, Any]:
    key = bearer(w.a.key)
    doc = await client.get(f"/api/v1/documents/{w.a_doc}", headers=key)
    versions = await client.get(f"/api/v1/documents/{w.a_doc}/versions", headers=key)
    content = await client.get(f"/api/v1/documents/{w.a_doc}/content", headers=key)
    keys = await client.get("/api/v1/keys", headers=key)
    labels = await client.get("/api/v1/labels", headers=key)
    spare = await client.get(f"/api/v1/keys/{w.a_spare_key}", headers=key)
    return {
        "doc": (doc.status_code, doc.json().get("current_version", {}).get("id")),
        "versions": [v["id"] for v in versions.json()["items"]],
        "content": content.content,
        "keys": sorted(k["id"] for k in keys.json()["items"]),
        "labels": labels.json(),
        "spare_revoked": spare.json().get("revoked_at"),
    }


@pytest.fixture(scope="module")
def summary(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    out: dict[str, Any] = {}
    yield out
    lines = []
    if "cases" in out:
        lines += [
            f"attack cases: {out['cases']} (tenant B's key, tenant A's ids), "
            f"routes attacked: {out['routes']}, "
            f"routes taking an id covered: {out['id_routes']} of {out['id_routes_total']}",
            f"outcomes (status: count): {out['outcomes']}",
        ]
    if "catalogue" in out:
        lines.append(f"catalogue: {out['catalogue']}")
    if lines:
        add_summary(request.config, "cross-tenant attack summary", lines)


async def test_tenant_b_cannot_reach_tenant_a(
    client: httpx.AsyncClient, app: FastAPI, world: World, summary: dict[str, Any]
) -> None:
    w = world
    before = await _a_state(client, w)
    assert before["doc"][0] == 200 and w.mark.encode() in before["content"]
    failures = []
    outcomes: dict[int, int] = {}
    for attack in ATTACKS:
        spec = attack.request(w)
        spec.setdefault("url", attack.path)
        headers = {**spec.pop("headers", {}), **bearer(w.b.key)}
        r = await client.request(attack.method, headers=headers, **spec)
        outcomes[r.status_code] = outcomes.get(r.status_code, 0) + 1
        label = f"{attack.method} {attack.path} ({attack.name})"
        if r.status_code != attack.expect:
            failures.append(f"{label}: {r.status_code}, expected {attack.expect}: {r.text[:200]}")
            continue
        if r.status_code >= 400:
            assert r.headers["content-type"].startswith("application/problem+json"), label
        elif attack.check is not None:
            try:
                attack.check(w, r.json())
            except AssertionError as exc:
                failures.append(f"{label}: {exc}")
        sent = json.dumps({k: str(v) for k, v in spec.items()}, default=str)
        leaked = _leaks(w, sent, r)
        if leaked:
            failures.append(f"{label}: A's data in B's response: {leaked}")
        w.attacks_run.append(label)
    assert not failures, "\n".join(failures)
    assert await _a_state(client, w) == before, "an attack changed tenant A's data"
    id_covered = {(a.method, a.path) for a in ATTACKS} & id_routes(app)
    summary.update(
        cases=len(ATTACKS),
        routes=len({(a.method, a.path) for a in ATTACKS}),
        id_routes=len(id_covered),
        id_routes_total=len(id_routes(app)),
        outcomes=dict(sorted(outcomes.items())),
    )


async def test_a_validly_signed_grant_for_b_cannot_name_a_document_of_a(
    client: httpx.AsyncClient, app: FastAPI, world: World
) -> None:
    """Defence in depth: even a correctly signed grant (as if the signing key leaked) that names
    tenant B and A's document is served inside B's tenant, where RLS hides A's rows: 404."""
    w = world
    grant = DownloadGrant(w.b.id, uuid.UUID(w.a_doc), uuid.UUID(w.a_version), int(time.time()) + 60)
    token = app.state.url_signer.sign(grant)
    r = await client.get(f"/api/v1/downloads/{token}")
    assert r.status_code == 404, r.text
    assert w.mark not in r.text and b"payroll" not in r.content


# -- Part two: the catalogue -------------------------------------------------------------------


def _conninfo(settings: Settings, *, owner: bool) -> str:
    user, password = (
        (settings.pg_owner_user, settings.pg_owner_password)
        if owner
        else (settings.pg_app_user, settings.pg_app_password)
    )
    return psycopg.conninfo.make_conninfo(
        host=settings.pg_host,
        port=settings.pg_port,
        dbname=settings.pg_database,
        user=user,
        password=password.get_secret_value() if password else None,
    )


def _count(conn: psycopg.Connection, table: str) -> int:
    row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
    assert row is not None
    return int(row[0])


TENANT_TABLES = """
SELECT n.nspname, c.relname, c.relkind, c.relrowsecurity, c.relforcerowsecurity,
       (SELECT count(*) FROM pg_policy p WHERE p.polrelid = c.oid) AS policies,
       (SELECT count(*) FROM pg_policy p WHERE p.polrelid = c.oid
          AND pg_get_expr(p.polqual, p.polrelid) LIKE '%app_current_tenant()%') AS tenant_policies
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'tenant_id' AND NOT a.attisdropped
WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%'
  AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
ORDER BY 1, 2
"""


async def test_every_tenant_table_is_under_forced_rls_and_hides_rows_without_a_tenant(
    settings: Settings, world: World, summary: dict[str, Any]
) -> None:
    with psycopg.connect(_conninfo(settings, owner=True)) as owner:
        rows = owner.execute(TENANT_TABLES).fetchall()
        assert rows, "no table with a tenant_id column: the query is wrong"
        bad = [
            f"{schema}.{name} ({kind}): rls={rls} forced={forced} policies={pol} tenant_policies={tpol}"
            for schema, name, kind, rls, forced, pol, tpol in rows
            if kind in ("v", "m", "f") or not (rls and forced and pol >= 1 and tpol >= 1)
        ]
        assert not bad, f"tables with tenant_id not under forced row-level security: {bad}"
        tables = [f'"{schema}"."{name}"' for schema, name, *_ in rows]
        owner_counts = {t: _count(owner, t) for t in tables}
    populated = [t for t, n in owner_counts.items() if n > 0]
    # The fixtures wrote documents, versions, chunks, jobs, keys, labels and audit events.
    assert len(populated) >= len(tables) // 2, owner_counts
    leaks = []
    with psycopg.connect(_conninfo(settings, owner=False)) as conn:  # fresh: no tenant at all
        for t in tables:
            n = _count(conn, t)
            if n:
                leaks.append(f"{t}: {n} rows with no tenant set")
        conn.execute("SET app.tenant_id = ''")
        for t in tables:
            n = _count(conn, t)
            if n:
                leaks.append(f"{t}: {n} rows with app.tenant_id = ''")
        conn.rollback()
    assert not leaks, leaks
    summary["catalogue"] = (
        f"{len(tables)} tables with tenant_id, all RLS enabled+forced with a tenant policy; "
        f"{len(populated)} hold rows as the owner and return 0 to the app role with no tenant set "
        f"(empty here: {sorted(set(tables) - set(populated)) or 'none'})"
    )
