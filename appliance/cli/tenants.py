from __future__ import annotations

import typer
from rich.table import Table
from sqlalchemy.ext.asyncio import AsyncSession

from appliance.cli._common import console, print_json
from appliance.cli._db import run_in_transaction
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
