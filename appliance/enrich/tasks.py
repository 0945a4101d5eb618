"""The `summarize` and `classify` jobs, run by the workers' actors (appliance.workers).

Both follow the ingest job's rules (appliance.ingest.pipeline): claim the job row (a duplicate message
or a job another live worker holds is skipped), heartbeat while working (a long LLM call must not look
like a dead worker to the sweeper), and write the result, the job's success and the audit event in one
transaction. Each job is idempotent, keyed by (version, kind): its result is one row of
`document_enrichments`, upserted, so a re-run overwrites it and never adds a second.

Errors: `PermanentError` (no labels, no text, version superseded or deleted, no chat model) fails the
job at once; anything else, notably LLMUnavailable / LLMSaturated (the LLM server down or busy), marks
it `retrying` and re-raises so Dramatiq retries with backoff, until `max_attempts`, then `dead`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import anyio
from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from appliance import metrics
from appliance.audit import service as audit
from appliance.documents.models import Document, DocumentVersion
from appliance.enrich import classify as cls
from appliance.enrich import service
from appliance.enrich.models import DocumentEnrichment, Label
from appliance.enrich.schemas import EnrichRequest
from appliance.enrich.summarize import ChunkText, Summarizer, even_sample, without_overlap
from appliance.inference.llm import LLMClient, record_usage
from appliance.ingest.models import Chunk
from appliance.ingest.pipeline import (
    PermanentError,
    WorkerServices,
    _update_job,
    mark_succeeded,
    newer_ready_versions,
    run_claimed,
)
from appliance.jobs.models import Job
from appliance.keys.envelope import BlobContext, open_bytes, seal_bytes
from appliance.keys.service import tenant_dek
from appliance.logs import get_logger

log = get_logger("appliance.enrich")
STAGE = {"summarize": "summarizing", "classify": "classifying"}
LLM_CLASSIFY_CHUNKS = 20  # at most this many first chunks go to the LLM when there is no summary


class LabelsChanged(Exception):
    """The tenant's labels changed while the job ran: retried (the next attempt embeds the new ones)."""

    code = "labels_changed"


Work = Callable[[WorkerServices, Job, DocumentVersion], Awaitable[None]]


async def run_summarize(svc: WorkerServices, tenant_id: uuid.UUID, job_id: uuid.UUID) -> str:
    return await _run(svc, tenant_id, job_id, "summarize", _summarize)


async def run_classify(svc: WorkerServices, tenant_id: uuid.UUID, job_id: uuid.UUID) -> str:
    return await _run(svc, tenant_id, job_id, "classify", _classify)


# The job's life ----------------------------------------------------------------------------------


async def _run(svc: WorkerServices, tenant_id: uuid.UUID, job_id: uuid.UUID, kind: str, work: Work) -> str:
    async def run(job: Job, version: DocumentVersion) -> str:
        started = time.perf_counter()
        async with _heartbeat(svc, tenant_id, job_id):
            await _update_job(svc, tenant_id, job_id, stage=STAGE[kind], progress=5)
            await work(svc, job, version)
        metrics.INGEST_STAGE_SECONDS.labels(kind).observe(time.perf_counter() - started)
        log.info(f"{kind} done", version_id=str(version.id), seconds=round(time.perf_counter() - started, 2))
        return "succeeded"

    async def on_failure(job: Job, version: DocumentVersion, code: str, message: str, dead: bool) -> None:
        await _finish_failed(svc, job, version, code, message, dead=dead)

    return await run_claimed(svc, tenant_id, job_id, run, on_failure)


@contextlib.asynccontextmanager
async def _heartbeat(svc: WorkerServices, tenant_id: uuid.UUID, job_id: uuid.UUID) -> AsyncIterator[None]:
    """Refresh the job's heartbeat in the background while the block runs (one LLM call may take
    longer than `job_heartbeat_stale_s`, after which the sweeper would hand the job to another worker)."""
    interval = max(1.0, svc.settings.job_heartbeat_stale_s / 4)

    async def beat() -> None:
        while True:
            await asyncio.sleep(interval)
            with contextlib.suppress(Exception):  # a missed beat is retried at the next interval
                await _update_job(svc, tenant_id, job_id)

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _finish_failed(
    svc: WorkerServices, job: Job, version: DocumentVersion, code: str, message: str, *, dead: bool
) -> None:
    async with svc.db.transaction(tenant_id=job.tenant_id) as session:
        row = await session.get(Job, job.id)
        if row is not None:
            row.status, row.stage, row.finished_at = ("dead" if dead else "failed"), "done", datetime.now(UTC)
            row.error_code, row.error = code, message
        audit.record(
            session,
            "document.enrich_failed",
            outcome="failure",
            resource_type="document",
            resource_id=version.document_id,
            details={
                "job_id": str(job.id),
                "kind": job.kind,
                "version_id": str(version.id),
                "code": code,
                "dead_lettered": dead,
            },
        )


async def _store(
    session: AsyncSession,
    version: DocumentVersion,
    job_id: uuid.UUID,
    *,
    kind: str,
    method: str,
    model: str,
    details: dict[str, Any],
    content_enc: bytes | None = None,
    labels: list[dict[str, Any]] | None = None,
) -> None:
    """Upsert the (version, kind) result and mark the job succeeded, in the caller's transaction."""
    # A share lock: a concurrent deletion waits for this commit (the purge then removes the row too).
    current = (
        await session.execute(
            select(DocumentVersion).where(DocumentVersion.id == version.id).with_for_update(read=True)
        )
    ).scalar_one_or_none()
    if current is None or current.deleted_at is not None:
        raise PermanentError("document_deleted", "The document was deleted while it was being enriched.")
    values = {
        "method": method,
        "model": model,
        "content_enc": content_enc,
        "labels": labels,
        "details": details,
        "job_id": job_id,
    }
    await session.execute(
        pg_insert(DocumentEnrichment)
        .values(
            tenant_id=version.tenant_id,
            document_id=version.document_id,
            version_id=version.id,
            kind=kind,
            **values,
        )
        .on_conflict_do_update(
            index_elements=["version_id", "kind"],
            set_={**values, "created_at": func.now(), "updated_at": func.now()},
        )
    )
    now = datetime.now(UTC)
    await mark_succeeded(session, job_id, now)
    doc = await session.get(Document, version.document_id)
    if doc is not None:
        doc.updated_at = now


# Inputs ------------------------------------------------------------------------------------------


async def _chunk_rows(
    svc: WorkerServices, version: DocumentVersion, *, limit: int | None = None
) -> tuple[list[Any], bytes]:
    """The version's chunks (offsets, sealed text, model), in order (the first `limit`), and the
    tenant's data key; a permanent error when it has none."""
    async with svc.db.transaction(tenant_id=version.tenant_id) as session:
        rows = (
            await session.execute(
                select(Chunk.char_start, Chunk.char_end, Chunk.text_enc, Chunk.embedding_model)
                .where(Chunk.version_id == version.id)
                .order_by(Chunk.ordinal)
                .limit(limit)
            )
        ).all()
        if not rows:
            if await newer_ready_versions(session, version.document_id, version.version):
                raise PermanentError(
                    "version_superseded",
                    f"Version {version.version} was superseded by a newer indexed version, which replaced "
                    "its chunks; enrich the current version instead.",
                )
            raise PermanentError("no_text", "The document has no indexed text.")
        dek = await tenant_dek(session, svc.keyring, version.tenant_id, create=False)
    return list(rows), dek


def _texts(rows: Sequence[Any], dek: bytes, version: DocumentVersion) -> list[ChunkText]:
    ctx = BlobContext(version.tenant_id, "chunk", version.document_id, version.id)
    return [
        ChunkText(r.char_start, r.char_end, open_bytes(dek, ctx, bytes(r.text_enc)).decode()) for r in rows
    ]


def _llm(svc: WorkerServices) -> LLMClient:
    try:
        return LLMClient.from_settings(svc.settings)
    except LookupError as exc:
        raise PermanentError("no_chat_model", f"No chat model is configured: {exc}") from exc


# summarize ---------------------------------------------------------------------------------------


async def _summarize(svc: WorkerServices, job: Job, version: DocumentVersion) -> None:
    rows, dek = await _chunk_rows(svc, version)
    picked = even_sample(rows, svc.settings.summary_max_chunks)
    chunks = _texts(picked, dek, version)

    async def progress(done: int, planned: int) -> None:
        await _update_job(svc, job.tenant_id, job.id, progress=min(95, 10 + 85 * done // max(1, planned)))

    llm = _llm(svc)
    try:
        summary = await Summarizer(
            llm, tenant_id=version.tenant_id, max_tokens=svc.settings.summary_max_tokens, progress=progress
        ).run(chunks)
    finally:
        await llm.aclose()
    sealed = seal_bytes(
        dek,
        BlobContext(version.tenant_id, service.SUMMARY_BLOB_KIND, version.document_id, version.id),
        summary.text.encode(),
    )
    details = {
        "strategy": summary.strategy,
        "calls": summary.calls,
        "levels": summary.levels,
        "chunks": len(picked),
        "sampled": len(picked) < len(rows),
        "prompt_tokens": summary.prompt_tokens,
        "completion_tokens": summary.completion_tokens,
    }
    async with svc.db.transaction(tenant_id=version.tenant_id) as session:
        await _store(
            session,
            version,
            job.id,
            kind="summary",
            method=summary.strategy,
            model=llm.model,
            content_enc=sealed,
            details=details,
        )
        audit.record(
            session,
            "document.summarized",
            resource_type="document",
            resource_id=version.document_id,
            details={"version_id": str(version.id), "job_id": str(job.id), "model": llm.model, **details},
        )


# classify ----------------------------------------------------------------------------------------


async def _classify(svc: WorkerServices, job: Job, version: DocumentVersion) -> None:
    method = EnrichRequest.from_json(version.enrich).classify or "embedding"
    async with svc.db.transaction(tenant_id=version.tenant_id) as session:
        labels = [
            (lb.id, lb.name, lb.description, lb.embedding_model) for lb in await service.list_labels(session)
        ]
    if not labels:
        raise PermanentError(
            "no_labels",
            "The tenant has no labels to assign: define them with PUT /api/v1/labels, then retry this job "
            "(`appliance jobs retry`).",
        )
    rows, dek = await _chunk_rows(svc, version, limit=LLM_CLASSIFY_CHUNKS)  # the model, and the LLM's text
    model = rows[0].embedding_model
    embedder = await anyio.to_thread.run_sync(_embedder, svc, model)
    stale = [lb for lb in labels if lb[3] != embedder.name]
    vectors = await anyio.to_thread.run_sync(
        embedder.embed, [_fit(embedder, cls.label_text(name, desc)) for _, name, desc, _ in stale]
    )
    picked: list[str] | None = None
    fallback: str | None = None
    chat_model: str | None = None
    if method == "llm":
        picked, fallback, chat_model = await _llm_pick(
            svc, version, [(n, d) for _, n, d, _ in labels], rows, dek
        )

    async with svc.db.transaction(tenant_id=version.tenant_id) as session:
        for (label_id, name, desc, _), vector in zip(stale, vectors, strict=True):
            # Guarded by the text it was computed from: a label edited meanwhile keeps no stale vector.
            await session.execute(
                update(Label)
                .where(Label.id == label_id, Label.name == name, Label.description == desc)
                .values(embedding=vector, embedding_model=embedder.name)
            )
        current = await service.list_labels(session)
        if any(lb.embedding_model != embedder.name for lb in current):
            raise LabelsChanged("The tenant's labels changed while the job ran; it is retried.")
        scored = await cls.scores(session, version.id, embedder.name)
        by_name = {x.name: x for x in scored}
        cfg = svc.settings
        if picked:
            chosen = [by_name[n] for n in picked if n in by_name][: max(1, cfg.classify_max_labels)]
            used = "llm"
        else:
            chosen = cls.choose(scored, threshold=cfg.classify_threshold, max_labels=cfg.classify_max_labels)
            used = "embedding"
        assigned = [{"name": c.name, "score": round(c.mean, 4), "method": used} for c in chosen]
        details: dict[str, Any] = {
            "requested": method,
            "embedding_model": embedder.name,
            "threshold": cfg.classify_threshold,
            "labels": len(scored),
            "top": [{"name": x.name, "mean": round(x.mean, 4), "max": round(x.max, 4)} for x in _top(scored)],
        }
        if fallback:
            details["llm_fallback"] = fallback
        await _store(
            session,
            version,
            job.id,
            kind="labels",
            method=used,
            model=chat_model if used == "llm" and chat_model else embedder.name,
            labels=assigned,
            details=details,
        )
        audit.record(
            session,
            "document.classified",
            resource_type="document",
            resource_id=version.document_id,
            details={
                "version_id": str(version.id),
                "job_id": str(job.id),
                "method": used,
                "labels": [a["name"] for a in assigned],
                **({"llm_fallback": fallback} if fallback else {}),
            },
        )


def _top(scored: Sequence[cls.Score], n: int = 5) -> list[cls.Score]:
    return sorted(scored, key=lambda x: -x.mean)[:n]


def _embedder(svc: WorkerServices, model: str) -> Any:
    from appliance.inference.embedding import get_embedder
    from appliance.inference.manifest import ManifestError

    try:
        return get_embedder(svc.settings, model)
    except (LookupError, ManifestError) as exc:
        raise PermanentError(
            "embedding_model_unavailable",
            f"The chunks were embedded by {model!r}, which this appliance cannot load: {exc}",
        ) from exc


def _fit(embedder: Any, text: str) -> str:
    """`text` cut (by characters) to the embedding model's input limit."""
    n = embedder.count_tokens(text)
    while n > embedder.max_tokens and len(text) > 1:
        text = text[: max(1, int(len(text) * embedder.max_tokens / n * 0.9))]
        n = embedder.count_tokens(text)
    return text


async def _llm_pick(
    svc: WorkerServices,
    version: DocumentVersion,
    labels: list[tuple[str, str]],
    rows: Sequence[Any],
    dek: bytes,
) -> tuple[list[str] | None, str | None, str | None]:
    """(label names the chat model chose or None, why it fell back, the chat model's name)."""
    async with svc.db.transaction(tenant_id=version.tenant_id) as session:
        views = await service.views(session, svc.keyring, [version])
    summary = views[version.id].summary
    document = [summary.text] if summary is not None else without_overlap(_texts(rows, dek, version))
    llm = _llm(svc)
    try:
        messages = await cls.llm_messages(llm, labels, document)
        if messages is None:
            return None, "labels_do_not_fit_the_context", llm.model
        async with llm.slot():
            done = await llm.complete(messages, max_tokens=cls.LLM_MAX_TOKENS, temperature=0.0)
        record_usage(version.tenant_id, "classify", done.prompt_tokens, done.completion_tokens)
    finally:
        await llm.aclose()
    picked = cls.parse_choice(done.text, [n for n, _ in labels])
    if picked is None:
        log.info("llm classification unparseable; using embedding", version_id=str(version.id))
        return None, "unparseable_reply", llm.model
    return picked, None, llm.model
