"""Foundation: tenants, API keys, the audit chain; row-level security and grants.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from appliance.db.rls import CURRENT_TENANT_FN, app_role_ident, enable_tenant_rls

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _timestamps() -> list[sa.Column]:
    return [
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    ]


def upgrade() -> None:
    app = app_role_ident()
    op.execute(CURRENT_TENANT_FN)

    op.create_table(
        "tenants",
        sa.Column(
            "id", postgresql.UUID(as_uuid=True), primary_key=True, server_default=sa.text("gen_random_uuid()")
        ),
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("display_name", sa.String(200), nullable=False),
        sa.Column("status", sa.String(16), nullable=False, server_default="active"),
        *_timestamps(),
        sa.CheckConstraint("name ~ '^[a-z0-9][a-z0-9-]{0,62}$'", name="name_slug"),
        sa.CheckConstraint("status IN ('active', 'suspended')", name="status_known"),
        sa.UniqueConstraint("name"),
    )

    op.create_table(
        "api_keys",
        sa.Column(
            "id", postgresql.UUID(as_uuid=True), primary_key=True, server_default=sa.text("gen_random_uuid()")
        ),
        sa.Column(
            "tenant_id", postgresql.UUID(as_uuid=True), sa.ForeignKey("tenants.id", ondelete="CASCADE")
        ),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("prefix", sa.String(32), nullable=False),
        sa.Column("secret_hash", sa.LargeBinary(32), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True)),
        sa.Column("revoked_at", sa.DateTime(timezone=True)),
        sa.Column("last_used_at", sa.DateTime(timezone=True)),
        sa.Column("created_by", postgresql.UUID(as_uuid=True)),
        *_timestamps(),
        sa.CheckConstraint("role IN ('system_admin', 'admin', 'editor', 'viewer')", name="role_known"),
        sa.CheckConstraint(
            "(role = 'system_admin') = (tenant_id IS NULL)", name="system_keys_have_no_tenant"
        ),
        sa.UniqueConstraint("prefix"),
    )
    op.create_index("ix_api_keys_tenant_id", "api_keys", ["tenant_id"])

    op.create_table(
        "audit_events",
        sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("tenant_id", postgresql.UUID(as_uuid=True)),
        sa.Column("actor_type", sa.String(16), nullable=False),
        sa.Column("actor_id", sa.String(64)),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("resource_type", sa.String(64)),
        sa.Column("resource_id", sa.String(128)),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("request_id", sa.String(64)),
        sa.Column("client_addr", sa.String(64)),
        sa.Column("details", postgresql.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("prev_hash", sa.LargeBinary(32), nullable=False),
        sa.Column("hash", sa.LargeBinary(32), nullable=False),
        sa.CheckConstraint("outcome IN ('success', 'failure', 'denied')", name="outcome_known"),
        sa.UniqueConstraint("id"),
    )
    op.create_index("ix_audit_events_occurred_at", "audit_events", ["occurred_at"])
    op.create_index("ix_audit_events_tenant_id", "audit_events", ["tenant_id", "seq"])
    op.create_index("ix_audit_events_action", "audit_events", ["action"])

    op.create_table(
        "audit_chain_head",
        sa.Column("id", sa.SmallInteger, primary_key=True),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("hash", sa.LargeBinary(32), nullable=False),
        sa.CheckConstraint("id = 1", name="single_row"),
    )
    op.execute("INSERT INTO audit_chain_head (id, seq, hash) VALUES (1, 0, decode(repeat('00', 32), 'hex'))")

    # Row-level security on every tenant-owned table.
    for stmt in enable_tenant_rls("api_keys", allow_null_tenant=True):
        op.execute(stmt)
    for stmt in enable_tenant_rls("audit_events", allow_null_tenant=True):
        op.execute(stmt)

    # API-key lookup happens before the tenant is known: a narrow SECURITY DEFINER function returns
    # the one key row matching a public prefix (the caller still checks the secret's hash).
    op.execute(
        """
        CREATE FUNCTION app_auth_lookup(p_prefix text)
        RETURNS TABLE (id uuid, tenant_id uuid, role text, secret_hash bytea, expires_at timestamptz,
                       revoked_at timestamptz, tenant_name text, tenant_status text)
        LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp
        AS $$
          SELECT k.id, k.tenant_id, k.role, k.secret_hash, k.expires_at, k.revoked_at, t.name, t.status
          FROM api_keys k LEFT JOIN tenants t ON t.id = k.tenant_id
          WHERE k.prefix = p_prefix
        $$
        """
    )
    op.execute(
        """
        CREATE FUNCTION app_auth_touch(p_key uuid) RETURNS void
        LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = public, pg_temp
        AS $$
          UPDATE api_keys SET last_used_at = now()
          WHERE id = p_key AND (last_used_at IS NULL OR last_used_at < now() - interval '60 seconds')
        $$
        """
    )
    op.execute(
        """
        CREATE FUNCTION app_system_admin_count() RETURNS bigint
        LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp
        AS $$
          SELECT count(*) FROM api_keys
          WHERE role = 'system_admin' AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now())
        $$
        """
    )
    op.execute("REVOKE ALL ON FUNCTION app_system_admin_count() FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION app_system_admin_count() TO {app}")
    op.execute("REVOKE ALL ON FUNCTION app_auth_lookup(text) FROM PUBLIC")
    op.execute("REVOKE ALL ON FUNCTION app_auth_touch(uuid) FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION app_auth_lookup(text) TO {app}")
    op.execute(f"GRANT EXECUTE ON FUNCTION app_auth_touch(uuid) TO {app}")
    op.execute(f"GRANT EXECUTE ON FUNCTION app_current_tenant() TO {app}")

    # Privileges: the application role never owns anything; the audit trail is insert-only.
    op.execute(f"GRANT SELECT, INSERT, UPDATE ON tenants TO {app}")
    op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON api_keys TO {app}")
    op.execute(f"GRANT SELECT, INSERT ON audit_events TO {app}")
    op.execute(f"GRANT SELECT, UPDATE ON audit_chain_head TO {app}")


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS app_system_admin_count()")
    op.execute("DROP FUNCTION IF EXISTS app_auth_touch(uuid)")
    op.execute("DROP FUNCTION IF EXISTS app_auth_lookup(text)")
    op.drop_table("audit_chain_head")
    op.drop_table("audit_events")
    op.drop_table("api_keys")
    op.drop_table("tenants")
    op.execute("DROP FUNCTION IF EXISTS app_current_tenant()")
