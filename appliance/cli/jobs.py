"""`appliance jobs list | show | retry`: background work, per tenant."""

from __future__ import annotations

import uuid

import typer
from rich.table import Table
from sqlalchemy.ext.asyncio import AsyncSession

from appliance.cli._common import console, print_json
from appliance.cli._db import run_in_transaction
from appliance.db.engine import set_tenant
from appliance.jobs import service
from appliance.jobs.schemas import JobOut
from appliance.tenants import service as tenants

app = typer.Typer(no_args_is_help=True)


def _scoped(tenant: str, fn):  # type: ignore[no-untyped-def]
    async def work(session: AsyncSession):  # type: ignore[no-untyped-def]
        t = await tenants.get_tenant_by_name(session, tenant)
        await set_tenant(session, t.id)
        return await fn(session)

    return work


@app.command("list")
def list_(
    tenant: str = typer.Option(..., "--tenant"),
    status: str | None = typer.Option(
        None, "--status", help="queued, running, retrying, succeeded, failed, dead"
    ),
    limit: int = typer.Option(50, "--limit", min=1, max=500),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """List a tenant's jobs, newest first."""

    async def fn(session: AsyncSession) -> list[JobOut]:
        rows, _ = await service.list_jobs(session, status=status, limit=limit)
        return [JobOut.model_validate(j) for j in rows]

    jobs = run_in_transaction(_scoped(tenant, fn))
    if as_json:
        print_json([j.model_dump(mode="json") for j in jobs])
        return
    table = Table("id", "kind", "status", "stage", "progress", "attempts", "error")
    for j in jobs:
        table.add_row(
            str(j.id),
            j.kind,
            j.status,
            j.stage,
            f"{j.progress}%",
            f"{j.attempts}/{j.max_attempts}",
            (j.error_code or "")[:40],
        )
    console.print(table)


@app.command("show")
def show(job_id: uuid.UUID, tenant: str = typer.Option(..., "--tenant")) -> None:
    """Show one job as JSON."""

    async def fn(session: AsyncSession) -> JobOut:
        return JobOut.model_validate(await service.get_job(session, job_id))

    print_json(run_in_transaction(_scoped(tenant, fn)).model_dump(mode="json"))


@app.command("retry")
def retry(job_id: uuid.UUID, tenant: str = typer.Option(..., "--tenant")) -> None:
    """Re-drive a failed or dead-lettered job."""

    async def fn(session: AsyncSession) -> JobOut:
        return JobOut.model_validate(await service.retry_job(session, job_id))

    job = run_in_transaction(_scoped(tenant, fn))
    console.print(f"job {job.id} queued again")
