"""Documents: upload with dedup, versions, reads, signed downloads and deletion.

Order of effects on upload: stage (encrypted temp file) → dedup check → blob into the object store
→ rows committed. A crash between the last two leaves an unreferenced blob (swept later), never a
row without its blob.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import anyio
from pydantic import ValidationError
from sqlalchemy import and_, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from appliance.audit import service as audit
from appliance.backup.guard import allow_blob_deletion
from appliance.db.engine import Database, after_commit, set_tenant
from appliance.documents.models import Document, DocumentVersion
from appliance.documents.schemas import DocumentMetadata, DocumentOut, VersionOut
from appliance.documents.upload import StagedBlob, new_ids, stage_upload
from appliance.enrich import service as enrich
from appliance.enrich.schemas import EnrichRequest
from appliance.errors import AppError, NotFound
from appliance.jobs.service import create_job
from appliance.keys.envelope import BlobContext, BlobReader
from appliance.keys.keyring import Keyring
from appliance.keys.service import tenant_dek
from appliance.logs import get_logger
from appliance.search.service import invalidate_after_commit
from appliance.settings import Settings
from appliance.storage.base import ObjectStore


@dataclass
class Services:
    """What document operations need besides a session; built once per process."""

    settings: Settings
    db: Database
    keyring: Keyring
    store: ObjectStore


def version_out(v: DocumentVersion) -> VersionOut:
    return VersionOut(
        id=v.id,
        document_id=v.document_id,
        version=v.version,
        sha256=v.content_sha256.hex(),
        size=v.size,
        content_type=v.content_type,
        source_filename=v.source_filename,
        ingest_status=v.ingest_status,
        created_at=v.created_at,
    )


def document_out(
    d: Document, current: DocumentVersion, enrichment: enrich.EnrichmentView | None = None
) -> DocumentOut:
    view = enrichment or enrich.EnrichmentView()
    return DocumentOut(
        id=d.id,
        title=d.title,
        tags=list(d.tags),
        metadata=dict(d.meta),
        status=d.status,
        created_at=d.created_at,
        updated_at=d.updated_at,
        current_version=version_out(current),
        summary=view.summary,
        labels=view.labels,
        enrichment_jobs=view.jobs,
    )


async def documents_out(
    session: AsyncSession, keyring: Keyring, rows: Sequence[tuple[Document, DocumentVersion]]
) -> list[DocumentOut]:
    """Documents with their current version's enrichment (summary, labels, job statuses), batched."""
    views = await enrich.views(session, keyring, [v for _, v in rows])
    return [document_out(d, v, views.get(v.id)) for d, v in rows]


def _parse_metadata(raw: dict[str, Any]) -> DocumentMetadata:
    try:
        return DocumentMetadata.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise AppError(
            f"Invalid metadata: {where}: {first.get('msg')}", code="metadata_invalid", status=422
        ) from exc


# Reads ----------------------------------------------------------------------------------------


async def get_document(session: AsyncSession, document_id: uuid.UUID) -> Document:
    doc = (
        await session.execute(select(Document).where(Document.id == document_id, Document.status == "active"))
    ).scalar_one_or_none()
    if doc is None:
        raise NotFound(f"No document {document_id}.", code="document_not_found")
    return doc


async def get_version(
    session: AsyncSession, document: Document, version_id: uuid.UUID | None
) -> DocumentVersion:
    stmt = select(DocumentVersion).where(
        DocumentVersion.document_id == document.id, DocumentVersion.deleted_at.is_(None)
    )
    stmt = (
        stmt.where(DocumentVersion.id == version_id)
        if version_id
        else stmt.where(DocumentVersion.version == document.current_version)
    )
    version = (await session.execute(stmt)).scalar_one_or_none()
    if version is None:
        raise NotFound(f"No version {version_id} of document {document.id}.", code="version_not_found")
    return version


async def list_versions(session: AsyncSession, document: Document) -> Sequence[DocumentVersion]:
    return (
        (
            await session.execute(
                select(DocumentVersion)
                .where(DocumentVersion.document_id == document.id, DocumentVersion.deleted_at.is_(None))
                .order_by(DocumentVersion.version)
            )
        )
        .scalars()
        .all()
    )


def _encode_cursor(created_at: datetime, doc_id: uuid.UUID) -> str:
    raw = json.dumps([created_at.isoformat(), str(doc_id)]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, doc_id = json.loads(raw)
        return datetime.fromisoformat(created), uuid.UUID(doc_id)
    except (ValueError, TypeError) as exc:
        raise AppError("The cursor is not valid.", code="invalid_cursor", status=422) from exc


async def list_documents(
    session: AsyncSession,
    *,
    tag: str | None = None,
    content_type: str | None = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
    status: str | None = None,
    cursor: str | None = None,
    limit: int = 50,
) -> tuple[list[tuple[Document, DocumentVersion]], str | None]:
    stmt = (
        select(Document, DocumentVersion)
        .join(
            DocumentVersion,
            and_(
                DocumentVersion.document_id == Document.id,
                DocumentVersion.version == Document.current_version,
            ),
        )
        .where(Document.status == "active")
        .order_by(Document.created_at.desc(), Document.id.desc())
        .limit(limit + 1)
    )
    if tag:
        stmt = stmt.where(Document.tags.contains([tag]))
    if content_type:
        stmt = stmt.where(DocumentVersion.content_type == content_type)
    if created_after:
        stmt = stmt.where(Document.created_at >= created_after)
    if created_before:
        stmt = stmt.where(Document.created_at < created_before)
    if status:
        stmt = stmt.where(DocumentVersion.ingest_status == status)
    if cursor:
        at, last_id = _decode_cursor(cursor)
        stmt = stmt.where(
            or_(Document.created_at < at, and_(Document.created_at == at, Document.id < last_id))
        )
    rows = [(d, v) for d, v in (await session.execute(stmt)).all()]
    next_cursor = (
        _encode_cursor(rows[limit - 1][0].created_at, rows[limit - 1][0].id) if len(rows) > limit else None
    )
    return rows[:limit], next_cursor


# Upload ---------------------------------------------------------------------------------------


async def _find_duplicate(session: AsyncSession, sha256: bytes) -> DocumentVersion | None:
    return (
        await session.execute(
            select(DocumentVersion).where(
                DocumentVersion.content_sha256 == sha256, DocumentVersion.deleted_at.is_(None)
            )
        )
    ).scalar_one_or_none()


async def _stage(
    svc: Services,
    tenant_id: uuid.UUID,
    document_id: uuid.UUID,
    version_id: uuid.UUID,
    body: AsyncIterator[bytes],
    content_type: str | None,
    filename: str | None,
) -> StagedBlob:
    async with svc.db.transaction(tenant_id=tenant_id) as session:
        dek = await tenant_dek(session, svc.keyring, tenant_id, create=True)
    return await stage_upload(
        body,
        content_type,
        dek=dek,
        context=BlobContext(tenant_id, "original", document_id, version_id),
        tmp_dir=svc.settings.tmp_dir,
        limit=svc.settings.max_upload_bytes,
        segment_size=svc.settings.blob_segment_bytes,
        raw_filename=filename,
    )


async def _store_blob(svc: Services, staged: StagedBlob) -> str:
    key = svc.store.new_key()
    await anyio.to_thread.run_sync(svc.store.put_file, key, staged.path)
    return key


async def _existing(
    svc: Services, tenant_id: uuid.UUID, dup: DocumentVersion, wanted: EnrichRequest
) -> tuple[DocumentOut, bool]:
    async with svc.db.transaction(tenant_id=tenant_id) as session:
        doc = await get_document(session, dup.document_id)
        audit.record(
            session,
            "document.upload",
            resource_type="document",
            resource_id=doc.id,
            details={"deduplicated": True, "version_id": str(dup.id), "sha256": dup.content_sha256.hex()},
        )
        await enrich.request_enrichment(session, dup.id, wanted)
        current = await get_version(session, doc, None)
        return (await documents_out(session, svc.keyring, [(doc, current)]))[0], False


T = TypeVar("T")
log = get_logger("appliance.documents")


async def _add_version_row(
    session: AsyncSession,
    staged: StagedBlob,
    key: str,
    tenant_id: uuid.UUID,
    document_id: uuid.UUID,
    version_id: uuid.UUID,
    number: int,
    actor_key: uuid.UUID | None,
    wanted: EnrichRequest,
) -> DocumentVersion:
    """Insert a version and, in the same transaction, the job that will ingest it (the outbox). The
    enrichment it asks for is recorded on it: its ingest job creates those jobs when it succeeds."""
    version = DocumentVersion(
        id=version_id,
        tenant_id=tenant_id,
        document_id=document_id,
        version=number,
        content_sha256=staged.sha256,
        size=staged.size,
        content_type=staged.content_type,
        source_filename=staged.filename,
        object_key=key,
        stored_size=staged.stored_size,
        enrich=wanted.to_json(),
        created_by=actor_key,
        created_at=datetime.now(UTC),
    )
    session.add(version)
    await session.flush()
    await create_job(
        session, kind="ingest", tenant_id=tenant_id, document_id=document_id, version_id=version_id
    )
    return version


async def _commit_blob(
    svc: Services,
    staged: StagedBlob,
    tenant_id: uuid.UUID,
    write: Callable[[AsyncSession, str], Awaitable[T]],
    on_duplicate: Callable[[DocumentVersion], Awaitable[tuple[T, bool]]],
) -> tuple[T, bool]:
    """Store the staged blob, then commit its rows (`write`). If the same bytes were committed
    concurrently (the dedup index refuses ours), drop our blob and answer with theirs."""
    key = await _store_blob(svc, staged)
    try:
        async with svc.db.transaction(tenant_id=tenant_id) as session:
            result = await write(session, key)
        return result, True
    except IntegrityError:
        await anyio.to_thread.run_sync(svc.store.delete, key)
        async with svc.db.transaction(tenant_id=tenant_id) as session:
            dup = await _find_duplicate(session, staged.sha256)
        if dup is None:
            raise
        return await on_duplicate(dup)
    except BaseException:
        await anyio.to_thread.run_sync(svc.store.delete, key)
        raise


async def upload_document(
    svc: Services,
    *,
    tenant_id: uuid.UUID,
    actor_key: uuid.UUID | None,
    body: AsyncIterator[bytes],
    content_type: str | None,
    filename: str | None,
    metadata: dict[str, Any] | None = None,
    enrichment: EnrichRequest | None = None,
) -> tuple[DocumentOut, bool]:
    """Store a new document, or return the tenant's existing one with the same bytes (created=False).

    `enrichment` (and the metadata's `summarize`/`classify`) asks for a summary and labels: recorded
    on the version and scheduled when it is indexed, or at once when the duplicate is already ready."""
    document_id, version_id = new_ids()
    staged = await _stage(svc, tenant_id, document_id, version_id, body, content_type, filename)
    try:
        meta = _parse_metadata({**(metadata or {}), **staged.metadata})
        wanted = (enrichment or EnrichRequest()).merge(
            EnrichRequest.from_params(meta.summarize, meta.classify)
        )
        async with svc.db.transaction(tenant_id=tenant_id) as session:
            dup = await _find_duplicate(session, staged.sha256)
        if dup is not None:
            return await _existing(svc, tenant_id, dup, wanted)

        async def write(session: AsyncSession, key: str) -> DocumentOut:
            doc = Document(
                id=document_id,
                tenant_id=tenant_id,
                title=meta.title or staged.filename,
                tags=meta.tags,
                meta=meta.extra,
                created_by=actor_key,
                current_version=1,
            )
            session.add(doc)
            await session.flush()
            version = await _add_version_row(
                session, staged, key, tenant_id, document_id, version_id, 1, actor_key, wanted
            )
            await session.refresh(doc)
            audit.record(
                session,
                "document.upload",
                resource_type="document",
                resource_id=document_id,
                details={
                    "version_id": str(version_id),
                    "size": staged.size,
                    "content_type": staged.content_type,
                    "sha256": staged.sha256.hex(),
                    **({"enrich": wanted.to_json()} if wanted.kinds else {}),
                },
            )
            return document_out(doc, version)

        return await _commit_blob(
            svc, staged, tenant_id, write, lambda dup: _existing(svc, tenant_id, dup, wanted)
        )
    finally:
        staged.discard()


async def add_version(
    svc: Services,
    *,
    tenant_id: uuid.UUID,
    document_id: uuid.UUID,
    actor_key: uuid.UUID | None,
    body: AsyncIterator[bytes],
    content_type: str | None,
    filename: str | None,
    enrichment: EnrichRequest | None = None,
) -> tuple[VersionOut, bool]:
    wanted = enrichment or EnrichRequest()
    async with svc.db.transaction(tenant_id=tenant_id) as session:
        await get_document(session, document_id)
    version_id = uuid.uuid4()
    staged = await _stage(svc, tenant_id, document_id, version_id, body, content_type, filename)
    try:
        async with svc.db.transaction(tenant_id=tenant_id) as session:
            dup = await _find_duplicate(session, staged.sha256)
            if dup is not None:
                audit.record(
                    session,
                    "document.version_upload",
                    resource_type="document",
                    resource_id=document_id,
                    details={"deduplicated": True, "version_id": str(dup.id)},
                )
                await enrich.request_enrichment(session, dup.id, wanted)
                return version_out(dup), False

        async def write(session: AsyncSession, key: str) -> VersionOut:
            doc = (
                await session.execute(
                    select(Document)
                    .where(Document.id == document_id, Document.status == "active")
                    .with_for_update()
                )
            ).scalar_one_or_none()
            if doc is None:
                raise NotFound(f"No document {document_id}.", code="document_not_found")
            number = doc.current_version + 1
            version = await _add_version_row(
                session, staged, key, tenant_id, document_id, version_id, number, actor_key, wanted
            )
            doc.current_version = number
            audit.record(
                session,
                "document.version_upload",
                resource_type="document",
                resource_id=document_id,
                details={
                    "version_id": str(version_id),
                    "version": number,
                    "size": staged.size,
                    "sha256": staged.sha256.hex(),
                    **({"enrich": wanted.to_json()} if wanted.kinds else {}),
                },
            )
            return version_out(version)

        async def duplicate(dup: DocumentVersion) -> tuple[VersionOut, bool]:
            async with svc.db.transaction(tenant_id=tenant_id) as session:
                await enrich.request_enrichment(session, dup.id, wanted)
            return version_out(dup), False

        return await _commit_blob(svc, staged, tenant_id, write, duplicate)
    finally:
        staged.discard()


# Content --------------------------------------------------------------------------------------


async def open_reader(svc: Services, session: AsyncSession, version: DocumentVersion) -> BlobReader:
    dek = await tenant_dek(session, svc.keyring, version.tenant_id, create=False)
    source = await anyio.to_thread.run_sync(svc.store.open_source, version.object_key)
    context = BlobContext(version.tenant_id, "original", version.document_id, version.id)
    return await anyio.to_thread.run_sync(BlobReader, dek, context, source)


# Deletion -------------------------------------------------------------------------------------


async def delete_document(session: AsyncSession, document_id: uuid.UUID) -> None:
    doc = await get_document(session, document_id)
    now = datetime.now(UTC)
    doc.status, doc.deleted_at = "deleted", now
    await session.execute(
        update(DocumentVersion)
        .where(DocumentVersion.document_id == doc.id, DocumentVersion.deleted_at.is_(None))
        .values(deleted_at=now)
    )
    await session.flush()
    audit.record(session, "document.delete", resource_type="document", resource_id=doc.id)
    tenant_id = doc.tenant_id
    invalidate_after_commit(session, tenant_id)

    def enqueue() -> None:
        from appliance.workers import purge_document

        # The deletion has committed: a broker outage must not turn it into a 500. The document is
        # already unreadable; the workers' sweeper re-sends purges left pending (pending_purges).
        try:
            purge_document.send(str(tenant_id), str(document_id))
        except Exception as exc:  # noqa: BLE001 - redis errors of any kind
            log.warning("purge enqueue failed", document_id=str(document_id), error=str(exc)[:200])

    after_commit(session, enqueue)


async def pending_purges(
    db: Database, *, older_than_s: int, limit: int = 100
) -> list[tuple[uuid.UUID, uuid.UUID]]:
    """(tenant, document) of deleted documents still unpurged `older_than_s` after their deletion: the
    enqueue failed, the purge job ran out of retries (a long backup), or a restore brought them back.
    Deleted tenants are left to their own purge (`appliance tenants delete`)."""
    from appliance.tenants.models import Tenant

    async with db.transaction() as session:
        tenant_ids = (
            (await session.execute(select(Tenant.id).where(Tenant.status != "deleted"))).scalars().all()
        )
    cutoff = datetime.now(UTC).timestamp() - older_than_s
    found: list[tuple[uuid.UUID, uuid.UUID]] = []
    for tenant_id in tenant_ids:
        async with db.transaction(tenant_id=tenant_id) as session:
            rows = (
                (
                    await session.execute(
                        select(Document.id)
                        .where(
                            Document.status == "deleted",
                            Document.purged_at.is_(None),
                            Document.deleted_at < datetime.fromtimestamp(cutoff, UTC),
                        )
                        .limit(limit - len(found))
                    )
                )
                .scalars()
                .all()
            )
        found.extend((tenant_id, doc_id) for doc_id in rows)
        if len(found) >= limit:
            break
    return found


async def purge_document(svc: Services, tenant_id: uuid.UUID, document_id: uuid.UUID) -> int:
    """Remove a deleted document's blobs and version rows; keep a tombstone. Idempotent."""
    async with svc.db.transaction(tenant_id=tenant_id) as session:
        doc = (await session.execute(select(Document).where(Document.id == document_id))).scalar_one_or_none()
        if doc is None or doc.status != "deleted" or doc.purged_at is not None:
            return 0
        versions = (
            (await session.execute(select(DocumentVersion).where(DocumentVersion.document_id == document_id)))
            .scalars()
            .all()
        )
        if versions:
            await allow_blob_deletion(session)  # not while a backup still copies blobs
        for v in versions:
            await anyio.to_thread.run_sync(svc.store.delete, v.object_key)
            if v.text_object_key:
                await anyio.to_thread.run_sync(svc.store.delete, v.text_object_key)
            await session.delete(v)
        doc.purged_at = datetime.now(UTC)
        invalidate_after_commit(session, tenant_id)
        doc.meta, doc.tags, doc.title = {}, [], None
        await session.flush()
        await set_tenant(session, tenant_id)
        audit.record(
            session,
            "document.purge",
            resource_type="document",
            resource_id=document_id,
            details={"versions": len(versions)},
        )
        return len(versions)
