"""Document routes: thin wrappers that authorise, call the service and shape the response."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response, status
from fastapi.responses import JSONResponse

from appliance.audit import service as audit
from appliance.auth.deps import SessionDep, UploadSlot, require
from appliance.auth.principal import Principal
from appliance.context import Actor, actor_var
from appliance.documents import service
from appliance.documents.content import RangeNotSatisfiable, content_response
from appliance.documents.schemas import (
    DocumentList,
    DocumentOut,
    DownloadUrl,
    DownloadUrlRequest,
    VersionList,
    VersionOut,
)
from appliance.documents.signing import DownloadGrant, InvalidDownloadUrl, UrlSigner
from appliance.documents.upload import BadUpload, PayloadTooLarge
from appliance.enrich.schemas import CLASSIFY_DOC, SUMMARIZE_DOC, ClassifyParam, EnrichRequest
from appliance.errors import AppError, Forbidden, NotFound, Unauthorized, problem_responses

router = APIRouter(tags=["documents"])

Editor = Annotated[Principal, Depends(require("editor"))]
Viewer = Annotated[Principal, Depends(require("viewer"))]

UPLOAD_DOC = (
    "Send the bytes either as `multipart/form-data` (a `file` part and an optional `metadata` part with "
    "JSON `{title, tags, extra}`) or as the raw body (any content type; `X-Filename` names it, "
    "`metadata` may be given as a query parameter). The content type is sniffed from the bytes. "
    "201 when stored, 200 when the tenant already has these exact bytes (nothing stored twice).\n\n"
    "Enrichment (optional): `summarize=true` asks for an LLM summary and `classify=true` (or `embedding`, "
    "or `llm`) for the tenant's labels (`PUT /api/v1/labels`); both also in the `metadata` JSON. They run "
    "as `summarize` / `classify` jobs once the document is indexed, and show on the document as "
    "`summary`, `labels` and `enrichment_jobs`. Asking again with the same bytes (the 200 case) schedules "
    "them for the stored version: at once when it is already indexed."
)
VERSION_DOC = (
    "A new version of the document (the raw body, or multipart with a `file` part). `summarize` and "
    "`classify` ask for enrichment of this version, as on `POST /api/v1/documents`."
)


async def services(request: Request) -> service.Services:
    svc: service.Services = request.app.state.documents
    return svc


Svc = Annotated[service.Services, Depends(services)]


SummarizeQuery = Annotated[bool, Query(description=SUMMARIZE_DOC)]
ClassifyQuery = Annotated[ClassifyParam | None, Query(description=CLASSIFY_DOC)]


def _metadata_param(metadata: str | None) -> dict[str, Any]:
    if not metadata:
        return {}
    try:
        value = json.loads(metadata)
    except ValueError as exc:
        raise AppError(f"metadata is not valid JSON: {exc}", code="metadata_invalid", status=422) from exc
    if not isinstance(value, dict):
        raise AppError("metadata must be a JSON object.", code="metadata_invalid", status=422)
    return value


@router.post(
    "/documents",
    response_model=DocumentOut,
    status_code=status.HTTP_201_CREATED,
    description=UPLOAD_DOC,
    dependencies=[UploadSlot],
    responses={
        200: {"model": DocumentOut, "description": "Already stored: the existing document"},
        **problem_responses(Unauthorized, Forbidden, PayloadTooLarge, BadUpload, AppError),
    },
)
async def upload_document(
    request: Request,
    principal: Editor,
    svc: Svc,
    x_filename: str | None = Header(default=None),
    metadata: str | None = Query(default=None, description="JSON object (raw uploads)."),
    summarize: SummarizeQuery = False,
    classify: ClassifyQuery = None,
) -> Response:
    assert principal.tenant_id is not None
    out, created = await service.upload_document(
        svc,
        tenant_id=principal.tenant_id,
        actor_key=principal.key_id,
        body=request.stream(),
        content_type=request.headers.get("content-type"),
        filename=x_filename,
        metadata=_metadata_param(metadata),
        enrichment=EnrichRequest.from_params(summarize, classify),
    )
    return JSONResponse(
        out.model_dump(mode="json"),
        status_code=201 if created else 200,
        headers={"Location": f"/api/v1/documents/{out.id}"},
    )


@router.get("/documents", response_model=DocumentList, responses=problem_responses(Unauthorized, Forbidden))
async def list_documents(
    principal: Viewer,
    session: SessionDep,
    svc: Svc,
    tag: str | None = Query(default=None),
    content_type: str | None = Query(default=None),
    created_after: datetime | None = Query(default=None),
    created_before: datetime | None = Query(default=None),
    status_: str | None = Query(
        default=None, alias="status", description="Ingest status of the current version."
    ),
    cursor: str | None = Query(default=None),
    limit: int = Query(default=50, ge=1, le=500),
) -> DocumentList:
    rows, next_cursor = await service.list_documents(
        session,
        tag=tag,
        content_type=content_type,
        created_after=created_after,
        created_before=created_before,
        status=status_,
        cursor=cursor,
        limit=limit,
    )
    audit.record(
        session,
        "document.list",
        resource_type="document",
        details={"returned": len(rows)},
    )
    return DocumentList(
        items=await service.documents_out(session, svc.keyring, rows), next_cursor=next_cursor
    )


@router.get(
    "/documents/{document_id}",
    response_model=DocumentOut,
    responses=problem_responses(Unauthorized, Forbidden, NotFound),
)
async def get_document(
    document_id: uuid.UUID, principal: Viewer, session: SessionDep, svc: Svc
) -> DocumentOut:
    """The document, its current version, and that version's summary, labels and enrichment jobs."""
    doc = await service.get_document(session, document_id)
    current = await service.get_version(session, doc, None)
    audit.record(
        session,
        "document.read",
        resource_type="document",
        resource_id=doc.id,
        details={"version_id": str(current.id)},
    )
    return (await service.documents_out(session, svc.keyring, [(doc, current)]))[0]


@router.delete(
    "/documents/{document_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=problem_responses(Unauthorized, Forbidden, NotFound),
)
async def delete_document(document_id: uuid.UUID, principal: Editor, session: SessionDep) -> Response:
    """Invisible at once; blobs are purged by a worker job."""
    await service.delete_document(session, document_id)
    return Response(status_code=204)


@router.post(
    "/documents/{document_id}/versions",
    response_model=VersionOut,
    status_code=201,
    description=VERSION_DOC,
    dependencies=[UploadSlot],
    responses={
        200: {"model": VersionOut, "description": "These bytes are already stored"},
        **problem_responses(Unauthorized, Forbidden, NotFound, PayloadTooLarge, BadUpload),
    },
)
async def add_version(
    document_id: uuid.UUID,
    request: Request,
    principal: Editor,
    svc: Svc,
    x_filename: str | None = Header(default=None),
    summarize: SummarizeQuery = False,
    classify: ClassifyQuery = None,
) -> Response:
    assert principal.tenant_id is not None
    out, created = await service.add_version(
        svc,
        tenant_id=principal.tenant_id,
        document_id=document_id,
        actor_key=principal.key_id,
        body=request.stream(),
        content_type=request.headers.get("content-type"),
        filename=x_filename,
        enrichment=EnrichRequest.from_params(summarize, classify),
    )
    return JSONResponse(out.model_dump(mode="json"), status_code=201 if created else 200)


@router.get(
    "/documents/{document_id}/versions",
    response_model=VersionList,
    responses=problem_responses(Unauthorized, Forbidden, NotFound),
)
async def list_versions(document_id: uuid.UUID, principal: Viewer, session: SessionDep) -> VersionList:
    doc = await service.get_document(session, document_id)
    versions = await service.list_versions(session, doc)
    audit.record(
        session,
        "document.versions_read",
        resource_type="document",
        resource_id=doc.id,
        details={"returned": len(versions)},
    )
    return VersionList(items=[service.version_out(v) for v in versions])


@router.get(
    "/documents/{document_id}/versions/{version_id}",
    response_model=VersionOut,
    responses=problem_responses(Unauthorized, Forbidden, NotFound),
)
async def get_version(
    document_id: uuid.UUID, version_id: uuid.UUID, principal: Viewer, session: SessionDep
) -> VersionOut:
    doc = await service.get_document(session, document_id)
    version = await service.get_version(session, doc, version_id)
    audit.record(
        session,
        "document.version_read",
        resource_type="document",
        resource_id=doc.id,
        details={"version_id": str(version.id)},
    )
    return service.version_out(version)


async def _content(
    svc: service.Services,
    session: Any,
    document_id: uuid.UUID,
    version_id: uuid.UUID | None,
    range_header: str | None,
    via: str,
) -> Response:
    doc = await service.get_document(session, document_id)
    version = await service.get_version(session, doc, version_id)
    reader = await service.open_reader(svc, session, version)
    response = content_response(reader, version, range_header)
    audit.record(
        session,
        "document.download",
        resource_type="document",
        resource_id=doc.id,
        details={"version_id": str(version.id), "via": via, "range": range_header},
    )
    return response


# The bytes go out with the version's own (sniffed) content type, so any media type may come back.
_BYTES = {"*/*": {"schema": {"type": "string", "format": "binary"}}}
CONTENT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "The bytes", "content": _BYTES},
    206: {"description": "The requested range", "content": _BYTES},
    **problem_responses(Unauthorized, Forbidden, NotFound, RangeNotSatisfiable),
}


@router.get("/documents/{document_id}/content", response_class=Response, responses=CONTENT_RESPONSES)
async def get_content(
    document_id: uuid.UUID,
    principal: Viewer,
    session: SessionDep,
    svc: Svc,
    range_: str | None = Header(default=None, alias="Range"),
) -> Response:
    """The current version's bytes, decrypted as they stream. Supports one `Range: bytes=` range."""
    return await _content(svc, session, document_id, None, range_, "api_key")


@router.get(
    "/documents/{document_id}/versions/{version_id}/content",
    response_class=Response,
    responses=CONTENT_RESPONSES,
)
async def get_version_content(
    document_id: uuid.UUID,
    version_id: uuid.UUID,
    principal: Viewer,
    session: SessionDep,
    svc: Svc,
    range_: str | None = Header(default=None, alias="Range"),
) -> Response:
    return await _content(svc, session, document_id, version_id, range_, "api_key")


@router.post(
    "/documents/{document_id}/download-url",
    response_model=DownloadUrl,
    responses=problem_responses(Unauthorized, Forbidden, NotFound, AppError),
)
async def create_download_url(
    document_id: uuid.UUID,
    body: DownloadUrlRequest,
    request: Request,
    principal: Viewer,
    session: SessionDep,
    svc: Svc,
) -> DownloadUrl:
    """A URL that downloads one version without an API key until it expires."""
    assert principal.tenant_id is not None
    if body.expires_in > svc.settings.download_url_max_seconds:
        raise AppError(
            f"expires_in is at most {svc.settings.download_url_max_seconds} seconds.",
            code="expires_in_too_long",
            status=422,
        )
    doc = await service.get_document(session, document_id)
    version = await service.get_version(session, doc, body.version_id)
    expires = int(time.time()) + body.expires_in
    token = request.app.state.url_signer.sign(DownloadGrant(principal.tenant_id, doc.id, version.id, expires))
    audit.record(
        session,
        "document.download_url",
        resource_type="document",
        resource_id=doc.id,
        details={"version_id": str(version.id), "expires_at": expires},
    )
    return DownloadUrl(
        url=f"/api/v1/downloads/{token}",
        expires_at=datetime.fromtimestamp(expires, UTC),
        version_id=version.id,
    )


@router.get(
    "/downloads/{token}",
    response_class=Response,
    responses={**CONTENT_RESPONSES, **problem_responses(InvalidDownloadUrl)},
)
async def signed_download(
    token: str, request: Request, svc: Svc, range_: str | None = Header(default=None, alias="Range")
) -> Response:
    """No API key: the signature, bound to tenant, document and version, is the credential."""
    signer: UrlSigner = request.app.state.url_signer
    actor_var.set(Actor("signed_url", None, "signed-url"))
    try:
        grant = signer.verify(token)
    except InvalidDownloadUrl as exc:
        async with svc.db.transaction() as session:  # the refusal commits even though the request fails
            audit.record(
                session,
                "document.download_url_refused",
                outcome="denied",
                tenant_id=None,
                details={"reason": exc.code},
            )
        raise
    async with svc.db.transaction(tenant_id=grant.tenant_id) as session:
        try:
            return await _content(svc, session, grant.document_id, grant.version_id, range_, "signed_url")
        except NotFound as exc:
            raise NotFound("This download is no longer available.", code="document_not_found") from exc
