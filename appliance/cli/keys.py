from __future__ import annotations

from datetime import UTC, datetime, timedelta

import typer
from rich.table import Table
from sqlalchemy.ext.asyncio import AsyncSession

from appliance.auth import service
from appliance.auth.schemas import KeyCreated, KeyOut
from appliance.cli import keys_admin
from appliance.cli._common import console, err_console, fail, print_json
from appliance.cli._db import run_in_transaction
from appliance.tenants import service as tenants

app = typer.Typer(no_args_is_help=True)
app.command("rotate-master")(keys_admin.rotate_master)
app.command("status")(keys_admin.status)
ROLES = ("admin", "editor", "viewer")


@app.command("create")
def create(
    tenant: str | None = typer.Option(None, "--tenant", help="Tenant name."),
    role: str = typer.Option("viewer", "--role", help="admin, editor or viewer."),
    name: str = typer.Option("cli", "--name", help="A label for the key."),
    expires_in_days: int | None = typer.Option(None, "--expires-in-days", min=1),
    system_admin: bool = typer.Option(False, "--system-admin", help="A system-admin key (no tenant)."),
    as_json: bool = typer.Option(False, "--json", help="Print the key and its record as JSON."),
) -> None:
    """Create an API key and print it once."""
    if system_admin == (tenant is not None):
        fail("pass either --tenant NAME or --system-admin")
    if not system_admin and role not in ROLES:
        fail(f"unknown role {role!r}: use one of {', '.join(ROLES)}")
    expires_at = datetime.now(UTC) + timedelta(days=expires_in_days) if expires_in_days else None

    async def work(session: AsyncSession) -> KeyCreated:
        tenant_id = (await tenants.get_tenant_by_name(session, tenant)).id if tenant else None
        row, plaintext = await service.create_key(
            session,
            tenant_id=tenant_id,
            name=name,
            role="system_admin" if system_admin else role,
            expires_at=expires_at,
        )
        return KeyCreated(**KeyOut.model_validate(row).model_dump(), key=plaintext)

    # System-admin keys have no tenant, which row-level security keeps from the application role.
    created = run_in_transaction(work, owner=system_admin)
    if as_json:
        print_json(created.model_dump(mode="json"))
        return
    console.print(f"created {created.role} key [bold]{created.prefix}[/] for {tenant or 'the system'}")
    console.print(created.key, highlight=False, soft_wrap=True)
    err_console.print("store this key now: it is not shown again")


@app.command("list")
def list_(tenant: str = typer.Option(..., "--tenant"), as_json: bool = typer.Option(False, "--json")) -> None:
    """List a tenant's keys (never their secrets)."""

    async def work(session: AsyncSession) -> list[KeyOut]:
        t = await tenants.get_tenant_by_name(session, tenant)
        return [KeyOut.model_validate(k) for k in await service.list_keys(session, tenant_id=t.id)]

    rows = run_in_transaction(work)
    if as_json:
        print_json([r.model_dump(mode="json") for r in rows])
        return
    table = Table("prefix", "name", "role", "created", "expires", "revoked")
    for r in rows:
        table.add_row(
            r.prefix,
            r.name,
            r.role,
            r.created_at.isoformat(timespec="seconds"),
            r.expires_at.isoformat(timespec="seconds") if r.expires_at else "-",
            r.revoked_at.isoformat(timespec="seconds") if r.revoked_at else "-",
        )
    console.print(table)


@app.command("revoke")
def revoke(
    prefix: str = typer.Argument(..., help="The key's prefix (apl_…)."),
    tenant: str = typer.Option(..., "--tenant"),
) -> None:
    """Revoke a key at once."""

    async def work(session: AsyncSession) -> KeyOut:
        t = await tenants.get_tenant_by_name(session, tenant)
        key = await service.find_key_by_prefix(session, tenant_id=t.id, prefix=prefix)
        return KeyOut.model_validate(await service.revoke_key(session, tenant_id=t.id, key_id=key.id))

    row = run_in_transaction(work)
    console.print(f"revoked {row.prefix}")
