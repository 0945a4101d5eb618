from __future__ import annotations

import uuid

import typer
from rich.table import Table
from sqlalchemy.ext.asyncio import AsyncSession

from appliance.cli._common import console, err_console, fail, print_json
from appliance.cli._db import run_in_transaction
from appliance.settings import get_settings
from appliance.storage.factory import build_store
from appliance.tenants import service
from appliance.tenants.schemas import TenantOut

app = typer.Typer(no_args_is_help=True)


@app.command("create")
def create(
    name: str = typer.Argument(..., help="Tenant name: lowercase letters, digits and '-'."),
    display_name: str | None = typer.Option(None, "--display-name"),
    as_json: bool = typer.Option(False, "--json", help="Print the tenant as JSON."),
) -> None:
    """Create a tenant."""

    async def work(session: AsyncSession) -> TenantOut:
        return TenantOut.model_validate(
            await service.create_tenant(session, name=name, display_name=display_name)
        )

    tenant = run_in_transaction(work)
    if as_json:
        print_json(tenant.model_dump(mode="json"))
    else:
        console.print(f"created tenant [bold]{tenant.name}[/] ({tenant.id})")


@app.command("list")
def list_(as_json: bool = typer.Option(False, "--json")) -> None:
    """List tenants."""

    async def work(session: AsyncSession) -> list[TenantOut]:
        return [TenantOut.model_validate(t) for t in await service.list_tenants(session, limit=10_000)]

    tenants = run_in_transaction(work)
    if as_json:
        print_json([t.model_dump(mode="json") for t in tenants])
        return
    table = Table("name", "id", "status", "created")
    for t in tenants:
        table.add_row(t.name, str(t.id), t.status, t.created_at.isoformat(timespec="seconds"))
    console.print(table)


@app.command("delete")
def delete(
    name: str = typer.Argument(..., help="The tenant to delete."),
    confirm: str | None = typer.Option(None, "--confirm", help="The tenant name again (for scripts)."),
) -> None:
    """Delete a tenant: destroy its data key first (crypto-shredding), then purge its blobs.

    Re-running it on a deleted tenant finishes an interrupted purge."""
    if confirm is None:
        err_console.print(
            f"This destroys tenant [bold]{name}[/]'s data key: its documents become unreadable "
            "at once and are then removed. It cannot be undone."
        )
        confirm = typer.prompt("Type the tenant name to confirm")
    if confirm != name:
        fail("the name typed does not match; nothing was deleted")

    async def shred(session: AsyncSession) -> tuple[uuid.UUID, bool]:
        tenant = await service.get_tenant_by_name(session, name, include_deleted=True)
        return tenant.id, await service.mark_deleted(session, tenant)

    tenant_id, destroyed = run_in_transaction(shred)
    console.print(
        f"tenant {name}: data key {'destroyed' if destroyed else 'already destroyed'}; purging blobs"
    )
    store = build_store(get_settings())

    async def purge(session: AsyncSession) -> int:
        return await service.purge_deleted(session, store, tenant_id)

    removed = run_in_transaction(purge)
    console.print(f"tenant {name} deleted: {removed} blobs removed; its audit trail is kept")
