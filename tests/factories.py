"""Factories: real rows through the real services (no fakes), each in its own transaction."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from appliance.auth import service as auth
from appliance.db.engine import Database
from appliance.tenants import service as tenants


@dataclass(frozen=True)
class TenantWithKey:
    id: uuid.UUID
    name: str
    key: str
    key_id: uuid.UUID


def unique_name(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def make_tenant(db: Database, *, role: str = "admin", name: str | None = None) -> TenantWithKey:
    async with db.transaction() as session:
        tenant = await tenants.create_tenant(session, name=name or unique_name())
        row, plaintext = await auth.create_key(session, tenant_id=tenant.id, name="test", role=role)
    return TenantWithKey(id=tenant.id, name=tenant.name, key=plaintext, key_id=row.id)


async def make_key(
    db: Database, tenant_id: uuid.UUID, *, role: str = "viewer", expires_at: datetime | None = None
) -> tuple[uuid.UUID, str]:
    async with db.transaction() as session:
        row, plaintext = await auth.create_key(
            session, tenant_id=tenant_id, name="test", role=role, expires_at=expires_at
        )
    return row.id, plaintext


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def ingest_pending(app: object, tenant_id: uuid.UUID) -> list[str]:
    """Run the real ingest pipeline in this process for the tenant's queued ingest jobs (what a
    Dramatiq worker does; the e2e suite runs the same jobs through real workers). Returns outcomes."""
    from sqlalchemy import select

    from appliance.ingest.pipeline import WorkerServices, run_ingest
    from appliance.jobs.models import Job

    state = app.state  # type: ignore[attr-defined]
    svc = WorkerServices(settings=state.settings, db=state.db, keyring=state.keyring, store=state.store)
    async with state.db.transaction(tenant_id=tenant_id) as session:
        ids = (
            (
                await session.execute(
                    select(Job.id)
                    .where(Job.kind == "ingest", Job.status.in_(("queued", "retrying")))
                    .order_by(Job.created_at)
                )
            )
            .scalars()
            .all()
        )
    return [await run_ingest(svc, tenant_id, job_id) for job_id in ids]


async def enrich_pending(
    app: object, tenant_id: uuid.UUID, *, settings: object | None = None
) -> list[tuple[str, str]]:
    """Run the tenant's queued summarize/classify jobs in this process through the real job functions
    (as ingest_pending does for ingest), oldest first. `settings` overrides the app's (e.g. another
    LLM URL). Returns (kind, outcome) pairs; an error a worker would retry propagates."""
    from sqlalchemy import select

    from appliance.enrich.tasks import run_classify, run_summarize
    from appliance.ingest.pipeline import WorkerServices
    from appliance.jobs.models import Job

    state = app.state  # type: ignore[attr-defined]
    svc = WorkerServices(
        settings=settings or state.settings, db=state.db, keyring=state.keyring, store=state.store
    )
    async with state.db.transaction(tenant_id=tenant_id) as session:
        jobs = (
            await session.execute(
                select(Job.id, Job.kind)
                .where(Job.kind.in_(("summarize", "classify")), Job.status.in_(("queued", "retrying")))
                .order_by(Job.created_at, Job.kind.desc())
            )
        ).all()
    runners = {"summarize": run_summarize, "classify": run_classify}
    return [(kind, await runners[kind](svc, tenant_id, job_id)) for job_id, kind in jobs]
