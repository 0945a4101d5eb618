"""The audit trail: written with the change, append-only for the app role, tamper-evident for all."""

from __future__ import annotations

import httpx
import psycopg
import pytest
from sqlalchemy import Connection, text

from appliance.audit.chain import GENESIS, canonical, link_hash, verify_chain
from appliance.audit.service import verify_database
from appliance.db.engine import Database
from appliance.settings import Settings
from tests.api.test_auth import owner_conninfo
from tests.audit.conftest import last_seq
from tests.db.test_rls import app_conninfo
from tests.factories import bearer, make_tenant, unique_name


async def test_operations_are_recorded_with_actor_and_request(
    client: httpx.AsyncClient, app_db: Database, settings: Settings
) -> None:
    a = await make_tenant(app_db)
    r = await client.post(
        "/api/v1/keys",
        json={"name": "k", "role": "viewer"},
        headers={**bearer(a.key), "X-Request-ID": "audit-req-1"},
    )
    assert r.status_code == 201
    await client.get("/api/v1/whoami", headers=bearer(r.json()["key"][:-1] + "x"))  # a wrong secret
    with psycopg.connect(owner_conninfo(settings)) as conn:
        row = conn.execute(
            "SELECT action, tenant_id, actor_type, actor_id, resource_id, request_id, outcome, details "
            "FROM audit_events WHERE request_id = 'audit-req-1'"
        ).fetchone()
        assert row[0] == "api_key.create" and row[1] == a.id and row[2] == "api_key"
        assert row[3] == str(a.key_id) and row[4] == r.json()["id"] and row[6] == "success"
        assert row[7]["role"] == "viewer" and r.json()["key"] not in str(row)
        failure = conn.execute(
            "SELECT outcome, actor_id, tenant_id, details FROM audit_events WHERE action = 'auth.failure' "
            "ORDER BY seq DESC LIMIT 1"
        ).fetchone()
        assert failure[0] == "denied" and failure[1] == r.json()["id"] and failure[2] == a.id
        assert failure[3] == {"reason": "bad_secret"}
        for action in ("tenant.create", "api_key.create"):
            assert (
                conn.execute(
                    "SELECT count(*) FROM audit_events WHERE tenant_id = %s AND action = %s", (a.id, action)
                ).fetchone()[0]
                >= 1
            )


async def test_app_role_cannot_update_or_delete_audit_rows(settings: Settings, app_db: Database) -> None:
    a = await make_tenant(app_db)
    with psycopg.connect(app_conninfo(settings)) as conn:
        for stmt in (
            "UPDATE audit_events SET action = 'x'",
            "DELETE FROM audit_events",
            "TRUNCATE audit_events",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege), conn.transaction():
                conn.execute("SELECT set_config('app.tenant_id', %s, true)", (str(a.id),))
                conn.execute(stmt)


async def test_audit_write_failure_fails_the_request(
    client: httpx.AsyncClient, system_key: str, settings: Settings
) -> None:
    name = unique_name("nowrite")
    with psycopg.connect(owner_conninfo(settings), autocommit=True) as conn:
        conn.execute(f'REVOKE INSERT ON audit_events FROM "{settings.pg_app_user}"')
        try:
            r = await client.post("/api/v1/tenants", json={"name": name}, headers=bearer(system_key))
        finally:
            conn.execute(f'GRANT INSERT ON audit_events TO "{settings.pg_app_user}"')
        assert r.status_code == 500 and r.json()["code"] == "internal_error"
        assert conn.execute("SELECT count(*) FROM tenants WHERE name = %s", (name,)).fetchone()[0] == 0


async def test_verify_passes_then_locates_an_owner_edit(owner_conn: Connection, app_db: Database) -> None:
    await make_tenant(app_db)
    assert verify_database(owner_conn).ok
    target = last_seq(owner_conn) - 1
    owner_conn.execute(text("UPDATE audit_events SET outcome = 'failure' WHERE seq = :s"), {"s": target})
    result = verify_database(owner_conn)
    assert not result.ok and result.first_break.seq == target and "edited" in result.first_break.problem


async def test_verify_locates_a_deleted_row(owner_conn: Connection, app_db: Database) -> None:
    await make_tenant(app_db)
    target = last_seq(owner_conn) - 1
    owner_conn.execute(text("DELETE FROM audit_events WHERE seq = :s"), {"s": target})
    result = verify_database(owner_conn)
    assert not result.ok and result.first_break.seq == target and "deleted" in result.first_break.problem


async def test_verify_detects_deleted_newest_rows(owner_conn: Connection, app_db: Database) -> None:
    await make_tenant(app_db)
    target = last_seq(owner_conn)
    owner_conn.execute(text("DELETE FROM audit_events WHERE seq = :s"), {"s": target})
    result = verify_database(owner_conn)
    assert not result.ok and result.first_break.seq == target


async def test_verify_detects_reordering(owner_conn: Connection, app_db: Database) -> None:
    await make_tenant(app_db)
    s = last_seq(owner_conn)
    # Swap the contents of two rows by swapping their sequence numbers.
    owner_conn.execute(text("UPDATE audit_events SET seq = -1 WHERE seq = :a"), {"a": s - 1})
    owner_conn.execute(text("UPDATE audit_events SET seq = :a WHERE seq = :b"), {"a": s - 1, "b": s})
    owner_conn.execute(text("UPDATE audit_events SET seq = :b WHERE seq = -1"), {"b": s})
    result = verify_database(owner_conn)
    assert not result.ok and result.first_break.seq == s - 1


def test_chain_is_pure_and_order_sensitive() -> None:
    rows = []
    prev = GENESIS
    for i in range(1, 4):
        row = {"seq": i, "action": f"a{i}", "details": {"b": 1, "a": [1, 2]}, "outcome": "success"}
        row["prev_hash"] = prev
        row["hash"] = prev = link_hash(prev, row)
        rows.append(row)
    assert verify_chain(rows).ok and verify_chain(rows).checked == 3
    assert canonical({"details": {"b": 1, "a": 2}}) == canonical({"details": {"a": 2, "b": 1}})
    assert verify_chain([rows[0], rows[2]]).first_break.seq == 2
    tampered = [dict(r) for r in rows]
    tampered[1]["details"] = {"b": 2, "a": [1, 2]}
    assert verify_chain(tampered).first_break.seq == 2
