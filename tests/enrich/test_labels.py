"""PUT/GET /api/v1/labels: replace-all, validation codes, roles, tenant isolation, audit."""

from __future__ import annotations

import httpx
import psycopg
import pytest
from sqlalchemy import select

from appliance.audit.models import AuditEvent
from appliance.db.engine import Database
from appliance.enrich.models import Label
from appliance.settings import Settings
from tests.db.test_rls import app_conninfo
from tests.enrich.conftest import LABELS, put_labels
from tests.factories import bearer, make_key, make_tenant


async def test_replace_and_read_labels(client: httpx.AsyncClient, app_db: Database) -> None:
    t = await make_tenant(app_db, role="admin")
    r = await client.get("/api/v1/labels", headers=bearer(t.key))
    assert r.status_code == 200 and r.json() == {"labels": []}

    r = await put_labels(client, t.key, [{"name": "  facilities  ", "description": " heating "}, *LABELS[1:]])
    assert r.status_code == 200, r.text
    assert r.json()["labels"][0] == {"name": "facilities", "description": "heating"}  # normalised
    # Unchanged labels keep their row (and cached vector); a changed description clears the vector.
    async with app_db.transaction(tenant_id=t.id) as session:
        await session.execute(
            Label.__table__.update().values(embedding=[0.1] * 384, embedding_model="m")  # type: ignore[attr-defined]
        )
        before = {lb.name: lb.id for lb in (await session.execute(select(Label))).scalars()}
    r = await put_labels(client, t.key, [LABELS[0], LABELS[1], {"name": "legal", "description": "contracts"}])
    assert r.status_code == 200, r.text
    got = await client.get("/api/v1/labels", headers=bearer(t.key))
    assert [x["name"] for x in got.json()["labels"]] == ["facilities", "finance", "legal"]
    async with app_db.transaction(tenant_id=t.id) as session:
        after = {lb.name: lb for lb in (await session.execute(select(Label))).scalars()}
        assert after["finance"].id == before["finance"] and after["finance"].embedding_model == "m"
        assert (
            after["facilities"].embedding is None
            and after["facilities"].description == LABELS[0]["description"]
        )
        assert after["legal"].embedding is None and "hr" not in after
        events = (
            (await session.execute(select(AuditEvent).where(AuditEvent.action == "labels.replace")))
            .scalars()
            .all()
        )
    assert len(events) == 2
    assert events[-1].details == {
        "count": 3,
        "added": ["legal"],
        "removed": ["hr"],
        "changed": ["facilities"],
    }


@pytest.mark.parametrize(
    ("labels", "code"),
    [
        ([], "labels_empty"),
        ([{"name": f"l{i}"} for i in range(201)], "labels_too_many"),
        ([{"name": "   "}], "label_name_invalid"),
        ([{"name": "x" * 101}], "label_name_invalid"),
        ([{"name": "bell\x07"}], "label_name_invalid"),
        ([{"name": "zero\u200bwidth"}], "label_name_invalid"),
        ([{"name": "ok", "description": "d" * 501}], "label_description_too_long"),
        ([{"name": "Finance"}, {"name": "finance "}], "label_name_duplicate"),
    ],
)
async def test_validation_errors_have_stable_codes(
    client: httpx.AsyncClient, app_db: Database, labels: list[dict[str, str]], code: str
) -> None:
    t = await make_tenant(app_db, role="admin")
    r = await put_labels(client, t.key, labels)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["code"] == code and body["type"] == f"urn:appliance:problem:{code}", body
    if code.startswith("label_"):
        assert body["index"] == len(labels) - 1
    assert (await client.get("/api/v1/labels", headers=bearer(t.key))).json() == {"labels": []}


async def test_malformed_bodies_are_validation_errors(client: httpx.AsyncClient, app_db: Database) -> None:
    t = await make_tenant(app_db, role="admin")
    for body in ({"labels": [{"name": "a", "colour": "red"}]}, {"labels": "a"}, {}):
        r = await client.put("/api/v1/labels", json=body, headers=bearer(t.key))
        assert r.status_code == 422 and r.json()["code"] == "validation_error", r.text


async def test_roles(client: httpx.AsyncClient, app_db: Database) -> None:
    t = await make_tenant(app_db, role="admin")
    _, viewer = await make_key(app_db, t.id, role="viewer")
    _, editor = await make_key(app_db, t.id, role="editor")
    assert (await put_labels(client, t.key, LABELS)).status_code == 200
    for key in (viewer, editor):
        r = await put_labels(client, key, LABELS[:1])
        assert r.status_code == 403 and r.json()["code"] == "role_required"
        assert len((await client.get("/api/v1/labels", headers=bearer(key))).json()["labels"]) == 3


async def test_tenants_never_see_or_change_each_others_labels(
    client: httpx.AsyncClient, app_db: Database, settings: Settings
) -> None:
    a = await make_tenant(app_db, role="admin")
    b = await make_tenant(app_db, role="admin")
    assert (await put_labels(client, a.key, LABELS)).status_code == 200
    assert (await client.get("/api/v1/labels", headers=bearer(b.key))).json() == {"labels": []}
    # B replacing "its" labels with the same names touches only B's rows.
    assert (await put_labels(client, b.key, [{"name": "finance", "description": "b's"}])).status_code == 200
    got_a = (await client.get("/api/v1/labels", headers=bearer(a.key))).json()["labels"]
    assert got_a == LABELS
    # And Postgres enforces it: as the application role, B's transaction sees only B's rows.
    with psycopg.connect(app_conninfo(settings)) as conn, conn.transaction():
        conn.execute("SELECT set_config('app.tenant_id', %s, true)", (str(b.id),))
        rows = conn.execute("SELECT tenant_id, name FROM labels").fetchall()
        assert rows == [(b.id, "finance")]
        assert conn.execute("SELECT count(*) FROM labels WHERE tenant_id = %s", (a.id,)).fetchone()[0] == 0
