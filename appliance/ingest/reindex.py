"""Re-embedding every chunk with another embedding model, while search keeps serving.

`appliance reindex --model NEW` records NEW as the *target* model (table `embedding_state`) and
creates one `reindex` job per document version that has chunks embedded by another model. From that
moment:

- **ingest** embeds new documents with the target model (nothing new needs re-indexing later);
- **search** embeds the query with *both* models and searches each model's chunks with its own vector
  (vectors of two models are never compared), fusing the two ranked lists by reciprocal rank. Every
  chunk stays findable through the switch: there is no window where a document is missing;
- each **job** decrypts one version's chunks, embeds them with the target model and replaces their
  vectors in one transaction (idempotent: a re-run re-embeds the same chunks to the same vectors);
- when no chunk is left on another model, the job that finished last makes the target the *active*
  model, and search goes back to one query embedding.

The new model must have the index's dimension (384 today: `appliance models add` refuses others).
The chunk text is never re-extracted: extraction and chunking are the old model's tokenizer's, which is
fine within a model family; a model whose token limit is lower than a chunk re-chunks by re-ingest
(`POST /documents/{id}/versions` with the same bytes) instead.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import anyio
from sqlalchemy import select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from appliance import metrics
from appliance.audit import service as audit
from appliance.documents.models import DocumentVersion
from appliance.ingest.models import EMBEDDING_DIMENSIONS, Chunk
from appliance.jobs.models import Job
from appliance.keys.envelope import BlobContext, open_bytes
from appliance.keys.service import tenant_dek
from appliance.logs import get_logger
from appliance.settings import Settings

log = get_logger("appliance.reindex")


class ReindexError(ValueError):
    """One line for the CLI."""


def default_model(settings: Settings) -> str:
    from appliance.inference.manifest import get_model

    return get_model(settings.models_dir, name=settings.embedding_model, purpose="embedding").name


async def state(session: AsyncSession, settings: Settings) -> tuple[str, str | None]:
    """(active model, target model or None). Before any reindex, active is the settings' default.

    The first call in an API request's transaction takes what authentication read with the key (one
    round trip fewer for every search); later calls read the table."""
    preread = session.info.pop("embedding_state", None)
    if preread is not None:
        active, target = preread
    else:
        row = (
            await session.execute(text("SELECT active_model, target_model FROM embedding_state WHERE id = 1"))
        ).first()
        active, target = (row.active_model, row.target_model) if row else (None, None)
    return active or default_model(settings), target


async def ingest_model(session: AsyncSession, settings: Settings) -> str:
    active, target = await state(session, settings)
    return target or active


async def search_models(session: AsyncSession, settings: Settings) -> list[str]:
    """The models whose vectors search must query: the active one, and the target while re-indexing."""
    active, target = await state(session, settings)
    return _models(active, target)


def preread_search_models(session: AsyncSession, settings: Settings) -> list[str] | None:
    """`search_models` from what authentication read with the key (no round trip, nothing consumed);
    None when it read nothing."""
    preread = session.info.get("embedding_state")
    if preread is None:
        return None
    active, target = preread
    return _models(active or default_model(settings), target)


def _models(active: str, target: str | None) -> list[str]:
    return [active] if target is None or target == active else [target, active]


# Start (CLI, owner connection for the cross-tenant listing) ---------------------------------------


async def start(session: AsyncSession, settings: Settings, model: str) -> dict[str, Any]:
    """Set the target model and create a reindex job for every version with chunks on another model.

    `session` is the application role's; it visits each tenant in turn (RLS shows one tenant at a
    time). Jobs are enqueued after commit."""
    from appliance.db.engine import after_commit, set_tenant
    from appliance.inference.manifest import ModelNotFoundError, get_model
    from appliance.jobs import service as jobs

    try:
        spec = get_model(settings.models_dir, name=model, purpose="embedding")
    except ModelNotFoundError as exc:
        raise ReindexError(str(exc)) from exc
    if int(spec.params.get("dimensions", 0)) != EMBEDDING_DIMENSIONS:
        raise ReindexError(
            f"{model} gives {spec.params.get('dimensions')} dimensions; "
            f"the index holds {EMBEDDING_DIMENSIONS}"
        )
    active, target = await state(session, settings)
    if target is not None and target != model:
        raise ReindexError(
            f"a re-index to {target} is in progress; let it finish first (`appliance reindex --status`)"
        )
    await session.execute(
        text(
            "UPDATE embedding_state SET target_model = :m, started_at = now(), finished_at = NULL"
            " WHERE id = 1"
        ),
        {"m": model},
    )
    tenant_ids = (await session.execute(text("SELECT id FROM tenants ORDER BY created_at"))).scalars().all()
    created = 0
    for tenant_id in tenant_ids:
        await set_tenant(session, tenant_id)
        versions = (
            await session.execute(
                select(Chunk.document_id, Chunk.version_id)
                .join(DocumentVersion, DocumentVersion.id == Chunk.version_id)
                .where(Chunk.embedding_model != model, DocumentVersion.deleted_at.is_(None))
                .distinct()
            )
        ).all()
        for document_id, version_id in versions:
            existing = (
                await session.execute(select(Job).where(Job.version_id == version_id, Job.kind == "reindex"))
            ).scalar_one_or_none()
            if existing is None:
                await jobs.create_job(
                    session,
                    kind="reindex",
                    tenant_id=tenant_id,
                    document_id=document_id,
                    version_id=version_id,
                )
            else:  # a job from an earlier reindex (one row per version and kind): run it again
                existing.status, existing.stage, existing.progress, existing.attempts = (
                    "queued",
                    "queued",
                    0,
                    0,
                )
                existing.error, existing.error_code, existing.finished_at = None, None, None
                existing.enqueued_at = datetime.now(UTC)
                after_commit(session, _enqueue_later(tenant_id, existing.id))
            created += 1
        await session.flush()
    audit.record(
        session,
        "embedding.reindex_started",
        tenant_id=None,
        resource_type="model",
        resource_id=model,
        details={"from": active, "versions": created},
    )
    finished = created == 0 and await _finish(session, model)
    return {"from": active, "to": model, "versions": created, "finished": finished}


def _enqueue_later(tenant_id: uuid.UUID, job_id: uuid.UUID) -> Callable[[], None]:
    from appliance.jobs import service as jobs

    return lambda: jobs.enqueue("reindex", tenant_id, job_id)


async def _finish(session: AsyncSession, model: str) -> bool:
    remaining = (
        await session.execute(text("SELECT app_chunks_not_embedded_by(:m)"), {"m": model})
    ).scalar_one()
    if remaining:
        return False
    done = await session.execute(
        text(
            "UPDATE embedding_state SET active_model = :m, target_model = NULL, finished_at = now()"
            " WHERE id = 1 AND target_model = :m"
        ),
        {"m": model},
    )
    if done.rowcount:  # type: ignore[attr-defined]
        log.info("reindex finished: every chunk is embedded by the new model", model=model)
        audit.record(
            session, "embedding.reindex_finished", tenant_id=None, resource_type="model", resource_id=model
        )
    return True


async def progress(session: AsyncSession, settings: Settings) -> dict[str, Any]:
    active, target = await state(session, settings)
    out: dict[str, Any] = {"active_model": active, "target_model": target}
    if target:
        out["chunks_remaining"] = (
            await session.execute(text("SELECT app_chunks_not_embedded_by(:m)"), {"m": target})
        ).scalar_one()
    return out


# The job ------------------------------------------------------------------------------------------


async def run_reindex(svc: Any, tenant_id: uuid.UUID, job_id: uuid.UUID) -> str:
    """Re-embed one version's chunks with the target model (a worker's `reindex` job)."""
    from appliance.inference.embedding import get_embedder
    from appliance.ingest.pipeline import _update_job, mark_succeeded, run_claimed

    async def work(job: Job, version: DocumentVersion) -> str:
        started = time.perf_counter()
        async with svc.db.transaction(tenant_id=tenant_id) as session:
            _active, target = await state(session, svc.settings)
            rows = (
                await session.execute(
                    select(Chunk.id, Chunk.text_enc, Chunk.embedding_model).where(
                        Chunk.version_id == version.id
                    )
                )
            ).all()
            dek = await tenant_dek(session, svc.keyring, tenant_id, create=False)
        if target is None:
            await _update_job(svc, tenant_id, job_id, status="succeeded", stage="done", progress=100)
            return "succeeded"  # the reindex finished (or was never started): nothing to do
        todo = [r for r in rows if r.embedding_model != target]
        embedder = await anyio.to_thread.run_sync(lambda: get_embedder(svc.settings, target))
        ctx = BlobContext(tenant_id, "chunk", version.document_id, version.id)
        vectors = []
        for r in todo:
            chunk_text = open_bytes(dek, ctx, bytes(r.text_enc)).decode()
            vectors.append((r.id, (await anyio.to_thread.run_sync(embedder.embed, [chunk_text]))[0]))
        async with svc.db.transaction(tenant_id=tenant_id) as session:
            for chunk_id, vector in vectors:
                await session.execute(
                    update(Chunk)
                    .where(Chunk.id == chunk_id, Chunk.embedding_model != target)
                    .values(embedding=vector, embedding_model=target)
                )
            await mark_succeeded(session, job_id, datetime.now(UTC))
            audit.record(
                session,
                "document.reindexed",
                resource_type="document",
                resource_id=version.document_id,
                details={"version_id": str(version.id), "model": target, "chunks": len(vectors)},
            )
            from appliance.search.service import invalidate_after_commit

            invalidate_after_commit(session, tenant_id)
        async with svc.db.transaction() as session:
            await _finish(session, target)
        metrics.INGEST_STAGE_SECONDS.labels("reindex").observe(time.perf_counter() - started)
        return "succeeded"

    async def on_failure(job: Job, version: DocumentVersion, code: str, message: str, dead: bool) -> None:
        # The version stays searchable with its old vectors: only the job records the failure.
        await _update_job(
            svc,
            tenant_id,
            job_id,
            status="dead" if dead else "failed",
            stage="done",
            error_code=code,
            error=message,
            finished_at=datetime.now(UTC),
        )

    return await run_claimed(svc, tenant_id, job_id, work, on_failure)
