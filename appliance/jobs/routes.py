from __future__ import annotations

import uuid
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query

from appliance.audit import service as audit
from appliance.auth.deps import SessionDep, require
from appliance.auth.principal import Principal
from appliance.errors import Forbidden, NotFound, Unauthorized, problem_responses
from appliance.jobs import service
from appliance.jobs.schemas import JobList, JobOut

router = APIRouter(tags=["jobs"])
Viewer = Annotated[Principal, Depends(require("viewer"))]
Status = Literal["queued", "running", "retrying", "succeeded", "failed", "dead"]


@router.get(
    "/jobs/{job_id}", response_model=JobOut, responses=problem_responses(Unauthorized, Forbidden, NotFound)
)
async def get_job(job_id: uuid.UUID, principal: Viewer, session: SessionDep) -> JobOut:
    job = await service.get_job(session, job_id)
    audit.record(session, "job.read", resource_type="job", resource_id=job.id)
    return JobOut.model_validate(job)


@router.get("/jobs", response_model=JobList, responses=problem_responses(Unauthorized, Forbidden))
async def list_jobs(
    principal: Viewer,
    session: SessionDep,
    status: Status | None = Query(default=None),
    kind: str | None = Query(default=None),
    document_id: uuid.UUID | None = Query(default=None),
    cursor: str | None = Query(default=None),
    limit: int = Query(default=50, ge=1, le=500),
) -> JobList:
    rows, next_cursor = await service.list_jobs(
        session, status=status, kind=kind, document_id=document_id, cursor=cursor, limit=limit
    )
    audit.record(session, "job.list", resource_type="job", details={"returned": len(rows)})
    return JobList(items=[JobOut.model_validate(j) for j in rows], next_cursor=next_cursor)
