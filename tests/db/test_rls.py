"""Tenant isolation is enforced by Postgres: raw SQL as the application role, no app code in between."""

from __future__ import annotations

import psycopg
import pytest
from sqlalchemy import text

from appliance.db.engine import Database
from appliance.settings import Settings
from tests.factories import make_key, make_tenant


def app_conninfo(settings: Settings) -> str:
    return psycopg.conninfo.make_conninfo(
        host=settings.pg_host,
        port=settings.pg_port,
        dbname=settings.pg_database,
        user=settings.pg_app_user,
        password=settings.pg_app_password.get_secret_value(),
    )


def tenant_tables(conn: psycopg.Connection) -> list[str]:
    rows = conn.execute(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'tenant_id' AND NOT a.attisdropped "
        "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') ORDER BY 1"
    ).fetchall()
    return [r[0] for r in rows]


async def test_app_role_sees_only_the_tenant_of_the_transaction(settings: Settings, app_db: Database) -> None:
    a = await make_tenant(app_db)
    b = await make_tenant(app_db)
    await make_key(app_db, b.id)
    with psycopg.connect(app_conninfo(settings)) as conn:
        with conn.transaction():
            conn.execute("SELECT set_config('app.tenant_id', %s, true)", (str(a.id),))
            tenants = {r[0] for r in conn.execute("SELECT DISTINCT tenant_id FROM api_keys").fetchall()}
            assert tenants == {a.id}
            # Even an explicit filter for B's rows finds nothing.
            assert (
                conn.execute("SELECT count(*) FROM api_keys WHERE tenant_id = %s", (b.id,)).fetchone()[0] == 0
            )
            audit_tenants = {r[0] for r in conn.execute("SELECT DISTINCT tenant_id FROM audit_events")}
            assert audit_tenants == {a.id}
        with conn.transaction():
            conn.execute("SELECT set_config('app.tenant_id', %s, true)", (str(b.id),))
            assert conn.execute("SELECT count(*) FROM api_keys").fetchone()[0] == 2


async def test_no_tenant_set_means_no_rows_in_any_tenant_table(settings: Settings, app_db: Database) -> None:
    await make_tenant(app_db)
    with psycopg.connect(app_conninfo(settings)) as conn:
        tables = tenant_tables(conn)
        assert {"api_keys", "audit_events"} <= set(tables)
        for table in tables:
            assert conn.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0] == 0, table


async def test_tenant_does_not_leak_to_the_next_transaction_on_a_pooled_connection(
    settings: Settings, app_db: Database
) -> None:
    a = await make_tenant(app_db)
    with psycopg.connect(app_conninfo(settings)) as conn:
        with conn.transaction():
            conn.execute("SELECT set_config('app.tenant_id', %s, true)", (str(a.id),))
            assert conn.execute("SELECT count(*) FROM api_keys").fetchone()[0] == 1
            with conn.transaction():  # a savepoint inside: the tenant must still end with the outer one
                conn.execute("SELECT 1")
        with conn.transaction():
            assert conn.execute("SELECT count(*) FROM api_keys").fetchone()[0] == 0
    # The same through the application's own pool: one engine, sequential transactions.
    pool = Database(settings.app_database_url, pool_size=1)
    try:
        async with pool.transaction(tenant_id=a.id) as session:
            assert (await session.execute(text("SELECT count(*) FROM api_keys"))).scalar_one() == 1
        async with pool.transaction() as session:
            assert (await session.execute(text("SELECT count(*) FROM api_keys"))).scalar_one() == 0
    finally:
        await pool.dispose()


def test_every_tenant_table_has_forced_rls_with_a_policy(settings: Settings) -> None:
    with psycopg.connect(app_conninfo(settings)) as conn:
        for table in tenant_tables(conn):
            enabled, forced = conn.execute(
                "SELECT relrowsecurity, relforcerowsecurity FROM pg_class WHERE relname = %s", (table,)
            ).fetchone()
            policies = conn.execute(
                "SELECT count(*) FROM pg_policies WHERE tablename = %s", (table,)
            ).fetchone()[0]
            assert enabled and forced and policies >= 1, table


def test_application_role_is_not_privileged(settings: Settings) -> None:
    with psycopg.connect(app_conninfo(settings)) as conn:
        superuser, bypass = conn.execute(
            "SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = current_user"
        ).fetchone()
        assert not superuser and not bypass
        owns = conn.execute(
            "SELECT count(*) FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner "
            "WHERE r.rolname = current_user"
        ).fetchone()[0]
        assert owns == 0
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("CREATE TABLE sneaky (id int)")
