"""`POST /api/v1/search`: thin route over appliance.search.service."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.background import BackgroundTask

from appliance.audit import service as audit
from appliance.auth.deps import SessionDep, require
from appliance.auth.principal import Principal
from appliance.errors import AppError, Forbidden, Unauthorized, problem_responses
from appliance.ingest.reindex import preread_search_models
from appliance.ratelimit import read_with_limit
from appliance.search import service
from appliance.search.schemas import SearchRequest, SearchResponse

router = APIRouter(tags=["search"])
Viewer = Annotated[Principal, Depends(require("viewer"))]


async def search_services(request: Request) -> service.SearchServices:
    svc: service.SearchServices = request.app.state.search
    return svc


SearchSvc = Annotated[service.SearchServices, Depends(search_services)]


async def cache_reads(request: Request, principal: Principal, session: AsyncSession | None) -> list[str]:
    """The search's cache keys, for the rate limit to read in its round trip (one Redis round trip a
    search instead of two). Nothing when they cannot be known yet: the search reads them itself."""
    svc: service.SearchServices | None = getattr(request.app.state, "search", None)
    if svc is None or svc.redis is None or session is None or principal.tenant_id is None:
        return []
    models = preread_search_models(session, svc.settings)
    if models is None:
        return []
    try:
        req = SearchRequest.model_validate(await request.json())  # parsed by FastAPI already: cached
    except ValueError:  # not JSON, or not a valid request (pydantic's ValidationError is one)
        return []  # the route answers the body's errors
    return [] if req.rerank else service.cache_keys(svc, principal.tenant_id, req, models)


read_with_limit("search", cache_reads)


@router.post(
    "/search",
    response_model=SearchResponse,
    responses=problem_responses(
        Unauthorized, Forbidden, service.QueryTooLong, service.RerankUnavailable, AppError
    ),
)
async def search(
    body: SearchRequest, session: SessionDep, principal: Viewer, svc: SearchSvc, request: Request
) -> Response:
    """Search the caller's tenant: `vector`, `fulltext` or `hybrid` (reciprocal-rank fusion), with filters."""
    # The session is listed first: it authenticates inside the request's transaction (auth.deps).
    assert principal.tenant_id is not None  # require("viewer") admits tenant keys only
    with service.deferred_cache_writes() as writes:
        reads = getattr(request.state, "redis_reads", None)
        response = await service.search(svc, session, principal.tenant_id, body, reads=reads)
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
