"""Jobs: created with their subject (outbox), enqueued after commit, re-driven by the sweeper."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

from sqlalchemy import and_, or_, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from appliance.audit import service as audit
from appliance.db.engine import after_commit, set_tenant
from appliance.errors import AppError, Conflict, NotFound
from appliance.jobs.models import Job
from appliance.logs import get_logger

log = get_logger("appliance.jobs")
TERMINAL = ("succeeded", "failed", "dead")


def enqueue(kind: str, tenant_id: uuid.UUID, job_id: uuid.UUID) -> None:
    """Send the message for a committed job. A broker outage is not the caller's failure: the job row
    exists, and the sweeper sends it again."""
    try:
        from appliance import workers

        actor = {
            "ingest": workers.ingest_version,
            "reindex": workers.reindex_version,
            "summarize": workers.summarize_version,
            "classify": workers.classify_version,
        }[kind]
        actor.send(str(tenant_id), str(job_id))
    except Exception as exc:  # the row is the source of truth
        log.warning("enqueue failed; the sweeper will retry", job_id=str(job_id), error=str(exc)[:200])


async def create_job(
    session: AsyncSession,
    *,
    kind: str,
    tenant_id: uuid.UUID,
    document_id: uuid.UUID | None = None,
    version_id: uuid.UUID | None = None,
) -> Job:
    job = Job(
        tenant_id=tenant_id,
        kind=kind,
        document_id=document_id,
        version_id=version_id,
        status="queued",
        stage="queued",
        enqueued_at=datetime.now(UTC),
    )
    session.add(job)
    await session.flush()
    job_id = job.id
    after_commit(session, lambda: enqueue(kind, tenant_id, job_id))
    return job


async def get_job(session: AsyncSession, job_id: uuid.UUID) -> Job:
    job = (await session.execute(select(Job).where(Job.id == job_id))).scalar_one_or_none()
    if job is None:
        raise NotFound(f"No job {job_id}.", code="job_not_found")
    return job


def _cursor(job: Job) -> str:
    return base64.urlsafe_b64encode(json.dumps([job.created_at.isoformat(), str(job.id)]).encode()).decode()


async def list_jobs(
    session: AsyncSession,
    *,
    status: str | None = None,
    kind: str | None = None,
    document_id: uuid.UUID | None = None,
    cursor: str | None = None,
    limit: int = 50,
) -> tuple[Sequence[Job], str | None]:
    stmt = select(Job).order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
    if status:
        stmt = stmt.where(Job.status == status)
    if kind:
        stmt = stmt.where(Job.kind == kind)
    if document_id:
        stmt = stmt.where(Job.document_id == document_id)
    if cursor:
        try:
            at, last = json.loads(base64.urlsafe_b64decode(cursor.encode()))
            at_dt, last_id = datetime.fromisoformat(at), uuid.UUID(last)
        except (ValueError, TypeError) as exc:
            raise AppError("The cursor is not valid.", code="invalid_cursor", status=422) from exc
        stmt = stmt.where(or_(Job.created_at < at_dt, and_(Job.created_at == at_dt, Job.id < last_id)))
    rows = (await session.execute(stmt)).scalars().all()
    return rows[:limit], (_cursor(rows[limit - 1]) if len(rows) > limit else None)


async def retry_job(session: AsyncSession, job_id: uuid.UUID) -> Job:
    """Re-drive a failed or dead-lettered job from the start of its failed stage."""
    job = (await session.execute(select(Job).where(Job.id == job_id).with_for_update())).scalar_one_or_none()
    if job is None:
        raise NotFound(f"No job {job_id}.", code="job_not_found")
    if job.status not in ("failed", "dead"):
        raise Conflict(
            f"Job {job_id} is {job.status}; only failed or dead jobs are retried.", code="job_not_retryable"
        )
    job.status, job.attempts, job.error, job.error_code = "queued", 0, None, None
    job.enqueued_at, job.finished_at = datetime.now(UTC), None
    await session.flush()
    audit.record(session, "job.retry", tenant_id=job.tenant_id, resource_type="job", resource_id=job.id)
    tenant_id, kind = job.tenant_id, job.kind
    after_commit(session, lambda: enqueue(kind, tenant_id, job_id))
    return job


async def requeue(session: AsyncSession, job: Job) -> None:
    """Run a finished job again from the start (its subject changed, or it was asked for again), sent
    after commit. The caller holds the job's row lock."""
    job.status, job.stage, job.progress, job.attempts = "queued", "queued", 0, 0
    job.error, job.error_code, job.finished_at, job.enqueued_at = None, None, None, datetime.now(UTC)
    await session.flush()
    tenant_id, kind, job_id = job.tenant_id, job.kind, job.id
    after_commit(session, lambda: enqueue(kind, tenant_id, job_id))


async def stale_jobs(
    session: AsyncSession, *, queued_after_s: int, heartbeat_after_s: int, limit: int = 100
) -> list[tuple[uuid.UUID, uuid.UUID, str]]:
    rows = await session.execute(
        text(
            "SELECT id, tenant_id, kind FROM app_stale_jobs(make_interval(secs => :q), "
            "make_interval(secs => :h), :n)"
        ),
        {"q": queued_after_s, "h": heartbeat_after_s, "n": limit},
    )
    return [(r.id, r.tenant_id, r.kind) for r in rows]


async def redrive(session: AsyncSession, job_id: uuid.UUID, tenant_id: uuid.UUID, kind: str) -> None:
    """Mark a stale job queued again and send it after commit (the claim makes duplicates harmless)."""
    await set_tenant(session, tenant_id)
    job = (await session.execute(select(Job).where(Job.id == job_id).with_for_update())).scalar_one_or_none()
    if job is None or job.status in TERMINAL:
        return
    job.status, job.enqueued_at = ("queued" if job.status == "running" else job.status), datetime.now(UTC)
    await session.flush()
    log.info("re-driving stale job", job_id=str(job_id), kind=kind)
    after_commit(session, lambda: enqueue(kind, tenant_id, job_id))
