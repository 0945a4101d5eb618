"""`POST /api/v1/search`: thin route over appliance.search.service."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from starlette.background import BackgroundTask

from appliance.audit import service as audit
from appliance.auth.deps import SessionDep, require
from appliance.auth.principal import Principal
from appliance.errors import AppError, Forbidden, Unauthorized, problem_responses
from appliance.search import service
from appliance.search.schemas import SearchRequest, SearchResponse

router = APIRouter(tags=["search"])
Viewer = Annotated[Principal, Depends(require("viewer"))]


async def search_services(request: Request) -> service.SearchServices:
    svc: service.SearchServices = request.app.state.search
    return svc


SearchSvc = Annotated[service.SearchServices, Depends(search_services)]


@router.post(
    "/search",
    response_model=SearchResponse,
    responses=problem_responses(
        Unauthorized, Forbidden, service.QueryTooLong, service.RerankUnavailable, AppError
    ),
)
async def search(body: SearchRequest, session: SessionDep, principal: Viewer, svc: SearchSvc) -> Response:
    """Search the caller's tenant: `vector`, `fulltext` or `hybrid` (reciprocal-rank fusion), with filters."""
    # The session is listed first: it authenticates inside the request's transaction (auth.deps).
    assert principal.tenant_id is not None  # require("viewer") admits tenant keys only
    with service.deferred_cache_writes() as writes:
        response = await service.search(svc, session, principal.tenant_id, body)
    audit.record(
        session, "search", resource_type="search", details=service.audit_details(body, response.results)
    )
    # Serialized by pydantic-core in one pass: FastAPI would dump, re-validate and dump it again.
    # The cache entries are written after the response has gone (and after the commit).
    return Response(
        response.model_dump_json(),
        media_type="application/json",
        background=BackgroundTask(service.write_cache, svc, writes),
    )
