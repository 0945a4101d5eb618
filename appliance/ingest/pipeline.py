"""The ingest job: extract → chunk → embed → index, each stage keyed by (document version, stage).

Re-running a job is always safe: extraction is skipped when the version already has its text blob,
and chunks are replaced in one transaction (DELETE + INSERT), so a retry after a crash neither loses
nor duplicates chunks. Permanent errors (corrupt file, unsupported type, needs OCR) fail the job at
once; transient ones are retried with backoff until `max_attempts`, then dead-lettered.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
from sqlalchemy import delete, func, insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from appliance import metrics
from appliance.audit import service as audit
from appliance.context import Actor, actor_var
from appliance.db.engine import Database
from appliance.documents.models import Document, DocumentVersion
from appliance.ingest.models import EMBEDDING_DIMENSIONS, Chunk
from appliance.jobs.models import Job
from appliance.keys.envelope import BlobContext, BlobReader, seal_bytes
from appliance.keys.keyring import Keyring
from appliance.keys.service import tenant_dek
from appliance.logs import get_logger
from appliance.search.service import invalidate_after_commit
from appliance.settings import Settings
from appliance.storage.base import ObjectStore

log = get_logger("appliance.ingest")
TERMINAL = ("succeeded", "failed", "dead")


@dataclass
class WorkerServices:
    settings: Settings
    db: Database
    keyring: Keyring
    store: ObjectStore


class PermanentError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


async def _update_job(svc: WorkerServices, tenant_id: uuid.UUID, job_id: uuid.UUID, **values: Any) -> None:
    async with svc.db.transaction(tenant_id=tenant_id) as session:
        job = await session.get(Job, job_id)
        if job is not None:
            for k, v in values.items():
                setattr(job, k, v)
            job.heartbeat_at = datetime.now(UTC)


async def _set_stage(
    svc: WorkerServices,
    tenant_id: uuid.UUID,
    job_id: uuid.UUID,
    version_id: uuid.UUID,
    stage: str,
    progress: int,
) -> None:
    async with svc.db.transaction(tenant_id=tenant_id) as session:
        job = await session.get(Job, job_id)
        version = await session.get(DocumentVersion, version_id)
        if job is not None:
            job.stage, job.progress, job.heartbeat_at = stage, progress, datetime.now(UTC)
        if version is not None and stage in ("extracting", "chunking", "embedding"):
            version.ingest_status = stage


async def mark_succeeded(session: AsyncSession, job_id: uuid.UUID, now: datetime) -> None:
    """Record the job's success in the transaction that writes its result."""
    job = await session.get(Job, job_id)
    if job is not None:
        job.status, job.stage, job.progress, job.finished_at = "succeeded", "done", 100, now
        job.error, job.error_code, job.heartbeat_at = None, None, now


async def _claim(
    svc: WorkerServices, tenant_id: uuid.UUID, job_id: uuid.UUID
) -> tuple[Job, DocumentVersion] | None:
    async with svc.db.transaction(tenant_id=tenant_id) as session:
        job = (
            await session.execute(select(Job).where(Job.id == job_id).with_for_update())
        ).scalar_one_or_none()
        if job is None or job.status in TERMINAL:
            return None
        now = datetime.now(UTC)
        stale = timedelta(seconds=svc.settings.job_heartbeat_stale_s)
        if job.status == "running" and job.heartbeat_at and now - job.heartbeat_at < stale:
            return None  # another worker holds it; the sweeper re-drives it if that worker dies
        version = (
            await session.execute(select(DocumentVersion).where(DocumentVersion.id == job.version_id))
        ).scalar_one_or_none()
        if version is None or version.deleted_at is not None:
            job.status, job.stage, job.finished_at = "failed", "done", now
            job.error_code, job.error = "document_deleted", "The document was deleted before it was ingested."
            return None
        job.status, job.attempts = "running", job.attempts + 1
        job.started_at, job.heartbeat_at = job.started_at or now, now
        await session.flush()
        session.expunge(job)
        session.expunge(version)
        return job, version


async def _extract(svc: WorkerServices, dek: bytes, version: DocumentVersion) -> dict[str, Any]:
    """The version's text and pages, from its text blob if a previous attempt made it."""
    text_ctx = BlobContext(version.tenant_id, "text", version.document_id, version.id)
    text_key = version.text_object_key
    has_text = False
    if text_key is not None:
        has_text = await anyio.to_thread.run_sync(svc.store.exists, text_key)
    if text_key is not None and has_text:
        source = await anyio.to_thread.run_sync(svc.store.open_source, text_key)
        data = b"".join(BlobReader(dek, text_ctx, source).iter_range(0))
        return dict(json.loads(data))
    from appliance.extract import ExtractionError, Limits

    if version.size == 0:
        raise PermanentError("empty", "The document is empty: there is no text to index.")
    if version.size > Limits().max_bytes:
        # Refused before decrypting: the plaintext would otherwise fill /dev/shm (RAM) first.
        raise PermanentError(
            "too_large", f"The document is {version.size} bytes; extraction's limit is {Limits().max_bytes}."
        )

    original = BlobReader(
        dek,
        BlobContext(version.tenant_id, "original", version.document_id, version.id),
        await anyio.to_thread.run_sync(svc.store.open_source, version.object_key),
    )
    try:
        result = await anyio.to_thread.run_sync(
            _extract_file, original, version.content_type, svc.settings.tmp_dir
        )
    except ExtractionError as exc:
        if exc.permanent:
            raise PermanentError(exc.code, str(exc)) from exc
        raise
    payload = {
        "text": result.text,
        "pages": [[p.number, p.start, p.end] for p in result.pages],
        "backend": result.backend,
        "ocr_used": result.ocr_used,
    }
    key = svc.store.new_key()
    blob = seal_bytes(dek, text_ctx, json.dumps(payload).encode())
    await anyio.to_thread.run_sync(svc.store.put_bytes, key, blob)
    async with svc.db.transaction(tenant_id=version.tenant_id) as session:
        row = await session.get(DocumentVersion, version.id)
        if row is not None:
            row.text_object_key, row.text_chars, row.page_count = key, len(result.text), len(result.pages)
    return payload


def _extract_file(original: BlobReader, content_type: str, fallback_dir: Path) -> Any:
    """Decrypt to a private temp file and run the sandboxed parser on it.

    The parser needs a file: plaintext goes to memory-backed /dev/shm when available (0600) and is
    removed as soon as the parser returns."""
    from appliance.extract import extract

    shm = Path("/dev/shm")
    fd, name = tempfile.mkstemp(prefix="extract-", dir=shm if shm.is_dir() else fallback_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            for piece in original.iter_range(0):
                f.write(piece)
        return extract(Path(name), content_type)
    finally:
        os.unlink(name)


async def newer_ready_versions(session: AsyncSession, document_id: uuid.UUID, version: int) -> int:
    """How many live versions of the document newer than `version` are indexed (their chunks won)."""
    count: int = (
        await session.execute(
            select(func.count())
            .select_from(DocumentVersion)
            .where(
                DocumentVersion.document_id == document_id,
                DocumentVersion.version > version,
                DocumentVersion.ingest_status == "ready",
                DocumentVersion.deleted_at.is_(None),
            )
        )
    ).scalar_one()
    return count


JobWork = Callable[[Job, DocumentVersion], Awaitable[str]]
FailureHook = Callable[[Job, DocumentVersion, str, str, bool], Awaitable[None]]


async def run_claimed(
    svc: WorkerServices, tenant_id: uuid.UUID, job_id: uuid.UUID, work: JobWork, on_failure: FailureHook
) -> str:
    """The life every job shares (ingest, reindex, summarize, classify): claim it (a duplicate message,
    or a job another live worker holds, is "skipped"), run `work` as the worker actor, and on error:
    a `PermanentError` fails the job at once; anything else marks it `retrying` and re-raises, so
    Dramatiq retries with backoff, until `max_attempts`, then it is dead-lettered. `on_failure(job,
    version, code, message, dead)` records a failed or dead job in the job's own way."""
    claimed = await _claim(svc, tenant_id, job_id)
    if claimed is None:
        return "skipped"
    job, version = claimed
    token = actor_var.set(Actor("system", "worker", "worker"))
    try:
        return await work(job, version)
    except PermanentError as exc:
        metrics.INGEST_FAILURES.labels(exc.code).inc()
        await on_failure(job, version, exc.code, str(exc), False)
        return "failed"
    except Exception as exc:
        code = str(getattr(exc, "code", None) or type(exc).__name__)
        metrics.INGEST_FAILURES.labels(code).inc()
        if job.attempts >= job.max_attempts:
            await on_failure(job, version, code, str(exc)[:2000], True)
            return "dead"
        await _update_job(svc, tenant_id, job_id, status="retrying", error_code=code, error=str(exc)[:2000])
        raise
    finally:
        actor_var.reset(token)


async def run_ingest(svc: WorkerServices, tenant_id: uuid.UUID, job_id: uuid.UUID) -> str:
    async def work(job: Job, version: DocumentVersion) -> str:
        started = time.perf_counter()
        async with svc.db.transaction(tenant_id=tenant_id) as session:
            dek = await tenant_dek(session, svc.keyring, tenant_id, create=False)
        await _set_stage(svc, tenant_id, job_id, version.id, "extracting", 5)
        t0 = time.perf_counter()
        extracted = await _extract(svc, dek, version)
        metrics.INGEST_STAGE_SECONDS.labels("extract").observe(time.perf_counter() - t0)
        await _set_stage(svc, tenant_id, job_id, version.id, "chunking", 30)
        t0 = time.perf_counter()
        count = await _chunk_embed_index(svc, dek, job_id, version, extracted)
        metrics.INGEST_STAGE_SECONDS.labels("chunk_embed_index").observe(time.perf_counter() - t0)
        log.info(
            "ingested",
            version_id=str(version.id),
            chunks=count,
            seconds=round(time.perf_counter() - started, 2),
        )
        return "succeeded"

    async def on_failure(job: Job, version: DocumentVersion, code: str, message: str, dead: bool) -> None:
        await _finish_failed(svc, tenant_id, job_id, version.id, code, message, dead=dead)

    return await run_claimed(svc, tenant_id, job_id, work, on_failure)


async def _finish_failed(
    svc: WorkerServices,
    tenant_id: uuid.UUID,
    job_id: uuid.UUID,
    version_id: uuid.UUID,
    code: str,
    message: str,
    *,
    dead: bool,
) -> None:
    async with svc.db.transaction(tenant_id=tenant_id) as session:
        job = await session.get(Job, job_id)
        version = await session.get(DocumentVersion, version_id)
        now = datetime.now(UTC)
        if job is not None:
            job.status, job.stage, job.finished_at = ("dead" if dead else "failed"), "done", now
            job.error_code, job.error = code, message
        if version is not None:
            version.ingest_status = "needs_ocr" if code == "needs_ocr" else "failed"
            version.ingest_error = f"{code}: {message}"[:2000]
        audit.record(
            session,
            "document.ingest_failed",
            outcome="failure",
            resource_type="document",
            resource_id=version.document_id if version else None,
            details={"job_id": str(job_id), "code": code, "dead_lettered": dead},
        )


async def _chunk_embed_index(
    svc: WorkerServices, dek: bytes, job_id: uuid.UUID, version: DocumentVersion, extracted: dict[str, Any]
) -> int:
    from appliance.inference.embedding import get_embedder
    from appliance.ingest.chunking import chunk_text
    from appliance.ingest.reindex import ingest_model

    async with svc.db.transaction() as session:
        model = await ingest_model(session, svc.settings)  # the re-index target while one runs
    embedder = await anyio.to_thread.run_sync(lambda: get_embedder(svc.settings, model))
    if embedder.dimensions != EMBEDDING_DIMENSIONS:
        raise PermanentError(
            "model_dimension_mismatch",
            f"{embedder.name} gives {embedder.dimensions} dimensions; the index holds {EMBEDDING_DIMENSIONS}",
        )
    text: str = extracted["text"]
    pages = [tuple(p) for p in extracted["pages"]]
    chunks = await anyio.to_thread.run_sync(
        lambda: chunk_text(text, pages, tokenizer=embedder, max_tokens=min(256, embedder.max_tokens))
    )
    await _set_stage(svc, version.tenant_id, job_id, version.id, "embedding", 40)
    vectors: list[list[float]] = []
    last_beat = time.monotonic()
    for i, chunk in enumerate(chunks):
        vectors.append((await anyio.to_thread.run_sync(embedder.embed, [chunk.text]))[0])
        metrics.EMBEDDING_TOKENS.inc(chunk.token_count)
        if time.monotonic() - last_beat > 2:
            last_beat = time.monotonic()
            await _update_job(svc, version.tenant_id, job_id, progress=40 + int(55 * (i + 1) / len(chunks)))
    chunk_ctx = BlobContext(version.tenant_id, "chunk", version.document_id, version.id)
    rows = [
        {
            "tenant_id": version.tenant_id,
            "document_id": version.document_id,
            "version_id": version.id,
            "ordinal": c.ordinal,
            "text_enc": seal_bytes(dek, chunk_ctx, c.text.encode()),
            "char_start": c.char_start,
            "char_end": c.char_end,
            "page_start": c.page_start,
            "page_end": c.page_end,
            "token_count": c.token_count,
            "embedding": v,
            "embedding_model": embedder.name,
            "tsv": func.to_tsvector("english", c.text),
        }
        for c, v in zip(chunks, vectors, strict=True)
    ]
    async with svc.db.transaction(tenant_id=version.tenant_id) as session:
        await _index(session, version, rows, job_id)
    await _follow_reindex(svc, version, embedder.name)
    return len(rows)


async def _follow_reindex(svc: WorkerServices, version: DocumentVersion, used: str) -> None:
    """A re-index started while this version was embedding with the old model: queue its re-embedding
    too, or the switch-over would wait for it forever."""
    from appliance.ingest.reindex import ingest_model
    from appliance.jobs import service as jobs

    async with svc.db.transaction(tenant_id=version.tenant_id) as session:
        if await ingest_model(session, svc.settings) == used:
            return
        existing = (
            await session.execute(select(Job).where(Job.version_id == version.id, Job.kind == "reindex"))
        ).scalar_one_or_none()
        if existing is None:
            await jobs.create_job(
                session,
                kind="reindex",
                tenant_id=version.tenant_id,
                document_id=version.document_id,
                version_id=version.id,
            )


async def _index(
    session: AsyncSession, version: DocumentVersion, rows: list[dict[str, Any]], job_id: uuid.UUID
) -> None:
    """Replace the version's chunks and mark it ready, in one transaction (idempotent)."""
    current = (
        await session.execute(
            select(DocumentVersion).where(DocumentVersion.id == version.id).with_for_update()
        )
    ).scalar_one_or_none()
    if current is None or current.deleted_at is not None:
        raise PermanentError("document_deleted", "The document was deleted while it was being ingested.")
    # One document, one searchable version: the newest indexed one. Indexing this version removes the
    # chunks of older ones in the same transaction (search never sees a gap or a mix); an older version
    # finishing after a newer one was indexed is superseded and indexes nothing.
    newer_ready = await newer_ready_versions(session, version.document_id, current.version)
    if newer_ready:
        rows = []
    older = select(DocumentVersion.id).where(
        DocumentVersion.document_id == version.document_id, DocumentVersion.version < current.version
    )
    await session.execute(delete(Chunk).where(Chunk.version_id == version.id))
    await session.execute(
        delete(Chunk).where(Chunk.document_id == version.document_id, Chunk.version_id.in_(older))
    )
    for start in range(0, len(rows), 500):  # batched: one INSERT per 500 chunks (each tsvector from its text)
        await session.execute(insert(Chunk).values(rows[start : start + 500]))
    invalidate_after_commit(session, version.tenant_id)
    now = datetime.now(UTC)
    current.ingest_status, current.ingest_error = "ready", None
    await mark_succeeded(session, job_id, now)
    doc = await session.get(Document, version.document_id)
    if doc is not None:
        doc.updated_at = now
    if not newer_ready:
        # The follow-up jobs its uploads asked for (summary, labels): created with the index, sent after
        # the commit (the outbox); finished ones are redone, since the chunks were just replaced.
        from appliance.enrich.service import schedule_requested

        await schedule_requested(session, current)
    audit.record(
        session,
        "document.ingested",
        resource_type="document",
        resource_id=version.document_id,
        details={
            "version_id": str(version.id),
            "chunks": len(rows),
            "job_id": str(job_id),
            **({"superseded": True} if newer_ready else {}),
        },
    )
