"""Enrichment: the tenant's labels, scheduling the `summarize`/`classify` jobs, and reading results.

Scheduling: an upload records what it asked for on the version (`document_versions.enrich`); the
ingest job creates the follow-up jobs in the transaction that marks the version ready
(`schedule_requested`, called from the pipeline's `_index`), so they are enqueued after that commit
(the outbox, as for ingest). A duplicate upload that asks for enrichment of a version that is already
ready creates them at once (`request_enrichment`). Both paths hold the version's row lock, so a request
racing with the indexing is seen by exactly one of them. Jobs are keyed by (version, kind) (a unique
index): asking again re-drives the existing job instead of adding one.

The job runners are in `appliance.enrich.tasks`.
"""

from __future__ import annotations

import unicodedata
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from sqlalchemy import delete, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from appliance.audit import service as audit
from appliance.documents.models import DocumentVersion
from appliance.enrich.models import DocumentEnrichment, Label
from appliance.enrich.schemas import (
    DESCRIPTION_MAX_CHARS,
    MAX_LABELS,
    NAME_MAX_CHARS,
    AssignedLabel,
    EnrichmentJobOut,
    EnrichRequest,
    LabelIn,
    SummaryOut,
)
from appliance.errors import AppError
from appliance.jobs import service as jobs
from appliance.jobs.models import Job
from appliance.keys.envelope import BlobContext, open_bytes
from appliance.keys.keyring import Keyring
from appliance.keys.service import tenant_dek

KINDS = ("summarize", "classify")
# Ingest's 5 attempts span about a minute of Dramatiq's backoff (4 s, 8 s, …); the LLM server restarting
# (loading its model) or a long queue of generations can take longer, so LLM jobs get 10: roughly a
# quarter of an hour (backoff capped at 5 min) before they are dead-lettered.
MAX_ATTEMPTS = 10
RESULT_KIND = {"summarize": "summary", "classify": "labels"}  # job kind -> document_enrichments.kind
SUMMARY_BLOB_KIND = "summary"  # BlobContext kind of a sealed summary


class LabelsInvalid(AppError):
    """The labels of a `PUT /labels` break a rule; `code` says which, `index` which label."""

    status = 422
    code = "labels_invalid"
    title = "Invalid labels"


# Labels -----------------------------------------------------------------------------------------


def clean_labels(items: Sequence[LabelIn]) -> list[tuple[str, str]]:
    """(name, description) pairs, normalised, or `LabelsInvalid` with a stable code."""
    if not items:
        raise LabelsInvalid("Give at least one label.", code="labels_empty")
    if len(items) > MAX_LABELS:
        raise LabelsInvalid(f"At most {MAX_LABELS} labels; got {len(items)}.", code="labels_too_many")
    out: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        name = " ".join(item.name.split())
        if not name or len(name) > NAME_MAX_CHARS or any(unicodedata.category(c)[0] == "C" for c in name):
            raise LabelsInvalid(
                f"Label {i}: a name is 1-{NAME_MAX_CHARS} characters without control characters.",
                code="label_name_invalid",
                extra={"index": i},
            )
        description = item.description.strip()
        if len(description) > DESCRIPTION_MAX_CHARS:
            raise LabelsInvalid(
                f"Label {i} ({name}): the description is {len(description)} characters; "
                f"at most {DESCRIPTION_MAX_CHARS}.",
                code="label_description_too_long",
                extra={"index": i},
            )
        key = name.casefold()
        if key in seen:
            raise LabelsInvalid(
                f"Label {i}: the name {name!r} is already label {seen[key]}'s (names are unique, "
                "whatever their case).",
                code="label_name_duplicate",
                extra={"index": i},
            )
        seen[key] = i
        out.append((name, description))
    return out


async def list_labels(session: AsyncSession) -> Sequence[Label]:
    return (await session.execute(select(Label).order_by(Label.position))).scalars().all()


async def replace_labels(
    session: AsyncSession, tenant_id: uuid.UUID, items: Sequence[LabelIn]
) -> list[Label]:
    """Make `items` the tenant's labels. A label whose name and description are unchanged keeps its
    cached vector; documents already classified keep their labels until classified again."""
    wanted = clean_labels(items)
    # One replacement at a time per tenant (two concurrent PUTs would race on the unique names).
    await session.execute(
        text("SELECT pg_advisory_xact_lock(hashtextextended('labels:' || :tenant, 0))"),
        {"tenant": str(tenant_id)},
    )
    existing = {label.name: label for label in await list_labels(session)}
    keep = {name for name, _ in wanted}
    removed = [name for name in existing if name not in keep]
    if removed:
        await session.execute(delete(Label).where(Label.name.in_(removed)))
    added: list[str] = []
    changed: list[str] = []
    labels: list[Label] = []
    for position, (name, description) in enumerate(wanted):
        label = existing.get(name)
        if label is None:
            label = Label(tenant_id=tenant_id, name=name, description=description, position=position)
            session.add(label)
            added.append(name)
        else:
            label.position = position
            if label.description != description:
                label.description, label.embedding, label.embedding_model = description, None, None
                changed.append(name)
        labels.append(label)
    await session.flush()
    audit.record(
        session,
        "labels.replace",
        resource_type="labels",
        details={"count": len(wanted), "added": added, "removed": removed, "changed": changed},
    )
    return labels


# Scheduling -------------------------------------------------------------------------------------


async def schedule(
    session: AsyncSession, version: DocumentVersion, wanted: EnrichRequest, *, rerun: Collection[str]
) -> list[Job]:
    """Create the jobs `wanted` for a ready version, or re-drive the existing one of each kind when it
    failed, or finished and its kind is in `rerun` (the content or the method changed). A queued or
    running job is left alone. Call it holding the version's row lock."""
    kinds = wanted.kinds
    if not kinds:
        return []
    existing = {
        job.kind: job
        for job in (
            await session.execute(
                select(Job).where(Job.version_id == version.id, Job.kind.in_(kinds)).with_for_update()
            )
        ).scalars()
    }
    out: list[Job] = []
    for kind in kinds:
        job = existing.get(kind)
        if job is None:
            job = await jobs.create_job(
                session,
                kind=kind,
                tenant_id=version.tenant_id,
                document_id=version.document_id,
                version_id=version.id,
            )
            job.max_attempts = MAX_ATTEMPTS
        elif job.status in ("failed", "dead") or (job.status == "succeeded" and kind in rerun):
            await jobs.requeue(session, job)
        out.append(job)
    return out


async def schedule_requested(session: AsyncSession, version: DocumentVersion) -> list[Job]:
    """The follow-up jobs of a version that is being marked ready (its chunks were just replaced, so a
    finished result is stale and redone too)."""
    return await schedule(session, version, EnrichRequest.from_json(version.enrich), rerun=KINDS)


async def request_enrichment(
    session: AsyncSession, version_id: uuid.UUID, wanted: EnrichRequest
) -> list[Job]:
    """Record a (duplicate) upload's request on its version; schedule it now if the version is ready,
    else the ingest job will. Re-asking re-drives failed jobs, and a finished classify (the labels or
    the method may have changed; it is cheap), but not a finished summary (same chunks, same text)."""
    if not wanted.kinds:
        return []
    version = (
        await session.execute(
            select(DocumentVersion).where(DocumentVersion.id == version_id).with_for_update()
        )
    ).scalar_one_or_none()
    if version is None or version.deleted_at is not None:
        return []
    version.enrich = EnrichRequest.from_json(version.enrich).merge(wanted).to_json()
    scheduled: list[Job] = []
    if version.ingest_status == "ready":
        scheduled = await schedule(session, version, wanted, rerun=["classify"])
    await session.flush()
    audit.record(
        session,
        "document.enrich_requested",
        resource_type="document",
        resource_id=version.document_id,
        details={
            "version_id": str(version.id),
            "requested": wanted.to_json(),
            "jobs": [str(j.id) for j in scheduled],
        },
    )
    return scheduled


# Reading results --------------------------------------------------------------------------------


@dataclass
class EnrichmentView:
    """What a document shows of its current version's enrichment."""

    summary: SummaryOut | None = None
    labels: list[AssignedLabel] = field(default_factory=list)
    jobs: list[EnrichmentJobOut] = field(default_factory=list)


def summary_context(row: DocumentEnrichment) -> BlobContext:
    return BlobContext(row.tenant_id, SUMMARY_BLOB_KIND, row.document_id, row.version_id)


async def views(
    session: AsyncSession, keyring: Keyring, versions: Sequence[DocumentVersion]
) -> dict[uuid.UUID, EnrichmentView]:
    """The enrichment of each version (two queries for any number of versions; summaries decrypted)."""
    ids = [v.id for v in versions]
    out = {v.id: EnrichmentView() for v in versions}
    if not ids:
        return out
    job_rows = (
        await session.execute(
            select(Job).where(Job.version_id.in_(ids), Job.kind.in_(KINDS)).order_by(Job.kind.desc())
        )
    ).scalars()
    for job in job_rows:
        if job.version_id in out:
            kind = "summarize" if job.kind == "summarize" else "classify"
            out[job.version_id].jobs.append(
                EnrichmentJobOut(job_id=job.id, kind=kind, status=job.status, error_code=job.error_code)
            )
    rows = (
        (await session.execute(select(DocumentEnrichment).where(DocumentEnrichment.version_id.in_(ids))))
        .scalars()
        .all()
    )
    dek: bytes | None = None
    for row in rows:
        view = out[row.version_id]
        if row.kind == "summary" and row.content_enc is not None:
            if dek is None:
                dek = await tenant_dek(session, keyring, row.tenant_id, create=False)
            view.summary = SummaryOut(
                text=open_bytes(dek, summary_context(row), bytes(row.content_enc)).decode(),
                model=row.model,
                created_at=row.created_at,
            )
        elif row.kind == "labels" and row.labels is not None:
            view.labels = [AssignedLabel.model_validate(item) for item in row.labels]
    return out
