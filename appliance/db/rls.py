"""SQL used by migrations to put a table under row-level security.

Kept in one place so every tenant-owned table gets exactly the same policy. The policy shape is the
one measured to behave (SERVICES.md): `nullif(current_setting('app.tenant_id', true), '')::uuid`
yields NULL when no tenant is set, so a query without a tenant sees no rows instead of erroring.
"""

from __future__ import annotations

CURRENT_TENANT_FN = """
CREATE OR REPLACE FUNCTION app_current_tenant() RETURNS uuid
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT nullif(current_setting('app.tenant_id', true), '')::uuid $$;
"""


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def enable_tenant_rls(table: str, *, allow_null_tenant: bool = False) -> list[str]:
    """Statements that enable and force RLS on `table` with the tenant policy.

    The owner keeps full access through its own policy (it runs migrations, audit verification and
    backups); every other role, the application role included, sees only the current tenant's rows.
    `allow_null_tenant` lets rows with a NULL tenant (system-level records) be written while no
    tenant is set; they are never readable by the application role.
    """
    check = (
        "tenant_id IS NOT DISTINCT FROM app_current_tenant()"
        if allow_null_tenant
        else "tenant_id = app_current_tenant()"
    )
    t = quote_ident(table)
    return [
        f"ALTER TABLE {t} ENABLE ROW LEVEL SECURITY",
        f"ALTER TABLE {t} FORCE ROW LEVEL SECURITY",
        f"CREATE POLICY owner_all ON {t} AS PERMISSIVE FOR ALL TO CURRENT_USER "
        "USING (true) WITH CHECK (true)",
        f"CREATE POLICY tenant_isolation ON {t} AS PERMISSIVE FOR ALL TO PUBLIC "
        f"USING (tenant_id = app_current_tenant()) WITH CHECK ({check})",
    ]


def app_role_ident() -> str:
    """The application role's quoted name, for GRANTs in migrations (from the settings Alembic runs with)."""
    from alembic import context

    from appliance.settings import get_settings

    settings = context.config.attributes.get("settings") or get_settings()
    return quote_ident(settings.pg_app_user)
