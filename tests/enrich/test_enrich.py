"""summarize / classify jobs end to end: real Postgres, Redis, embedding model and LLM server.

The chat model is SmolLM2-135M: fluent and often wrong, so summaries are checked for shape and
storage, not wording. Classification by embedding is checked on clear-cut texts."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

import httpx
import psycopg
import pytest
from fastapi import FastAPI
from sqlalchemy import select

from appliance.audit.models import AuditEvent
from appliance.db.engine import Database
from appliance.documents.models import DocumentVersion
from appliance.enrich.models import DocumentEnrichment
from appliance.enrich.tasks import run_summarize
from appliance.inference.llm import LLMUnavailable
from appliance.ingest.pipeline import WorkerServices
from appliance.jobs import service as jobs
from appliance.jobs.models import Job
from appliance.settings import Settings
from tests.conftest import free_port
from tests.db.test_rls import app_conninfo
from tests.enrich.conftest import (
    BOILER,
    INVOICE,
    LABELS,
    enrichment_rows,
    get_doc,
    jobs_of,
    put_labels,
    upload,
)
from tests.factories import TenantWithKey, bearer, enrich_pending, ingest_pending, make_tenant

CHAT_MODEL = "smollm2-135m-instruct"


@dataclass
class Summarized:
    tenant: TenantWithKey
    doc_id: str


@pytest.fixture(scope="module")
async def summarized(client: httpx.AsyncClient, app: FastAPI, app_db: Database) -> Summarized:
    """One document uploaded with summarize=true&classify=true, ingested and enriched."""
    t = await make_tenant(app_db, role="admin")
    assert (await put_labels(client, t.key, LABELS)).status_code == 200
    r = await upload(client, t.key, BOILER, name="boiler", summarize=True, classify=True)
    assert r.status_code == 201, r.text
    doc_id = r.json()["id"]
    assert r.json()["summary"] is None and r.json()["labels"] == [] and r.json()["enrichment_jobs"] == []
    # Nothing is enriched before the version is indexed: the ingest job creates the follow-ups.
    assert set(await jobs_of(app_db, t.id, doc_id)) == {"ingest"}
    assert await ingest_pending(app, t.id) == ["succeeded"]
    queued = await jobs_of(app_db, t.id, doc_id)
    assert {k: [j.status for j in v] for k, v in queued.items()} == {
        "ingest": ["succeeded"],
        "summarize": ["queued"],
        "classify": ["queued"],
    }
    before = await get_doc(client, t.key, doc_id)
    assert {(j["kind"], j["status"]) for j in before["enrichment_jobs"]} == {
        ("summarize", "queued"),
        ("classify", "queued"),
    }
    assert sorted(await enrich_pending(app, t.id)) == [("classify", "succeeded"), ("summarize", "succeeded")]
    return Summarized(t, doc_id)


async def test_summary_and_labels_are_returned_with_the_document(
    client: httpx.AsyncClient, app_db: Database, summarized: Summarized
) -> None:
    t = summarized.tenant
    doc = await get_doc(client, t.key, summarized.doc_id)
    summary = doc["summary"]
    assert summary is not None and summary["text"].strip() and summary["model"] == CHAT_MODEL
    assert summary["created_at"]
    assert doc["labels"][0]["name"] == "facilities" and doc["labels"][0]["method"] == "embedding"
    assert doc["labels"][0]["score"] >= 0.3
    assert "finance" not in {x["name"] for x in doc["labels"]}
    assert {(j["kind"], j["status"], j["error_code"]) for j in doc["enrichment_jobs"]} == {
        ("summarize", "succeeded", None),
        ("classify", "succeeded", None),
    }
    # The list shows the same enrichment.
    listed = await client.get("/api/v1/documents", headers=bearer(t.key))
    item = next(d for d in listed.json()["items"] if d["id"] == summarized.doc_id)
    assert item["summary"] == summary and item["labels"] == doc["labels"]
    # The summary rests encrypted; the audit chain records both results.
    async with app_db.transaction(tenant_id=t.id) as session:
        row = (
            await session.execute(
                select(DocumentEnrichment).where(
                    DocumentEnrichment.document_id == uuid.UUID(summarized.doc_id),
                    DocumentEnrichment.kind == "summary",
                )
            )
        ).scalar_one()
        assert row.content_enc is not None and summary["text"].encode()[:20] not in row.content_enc
        assert row.details["strategy"] == "single" and row.details["calls"] == 1
        actions = {
            e.action: e.details
            for e in (
                await session.execute(select(AuditEvent).where(AuditEvent.resource_id == summarized.doc_id))
            ).scalars()
        }
    assert actions["document.summarized"]["model"] == CHAT_MODEL
    assert actions["document.classified"]["labels"][0] == "facilities"


async def test_rerunning_a_job_overwrites_and_never_duplicates(
    client: httpx.AsyncClient, app: FastAPI, app_db: Database, summarized: Summarized
) -> None:
    t = summarized.tenant
    first = await get_doc(client, t.key, summarized.doc_id)
    found = await jobs_of(app_db, t.id, summarized.doc_id)
    async with app_db.transaction(tenant_id=t.id) as session:
        for kind in ("summarize", "classify"):
            job = await session.get(Job, found[kind][0].id, with_for_update=True)
            assert job is not None
            await jobs.requeue(session, job)
    assert sorted(await enrich_pending(app, t.id)) == [("classify", "succeeded"), ("summarize", "succeeded")]
    again = await get_doc(client, t.key, summarized.doc_id)
    assert await enrichment_rows(app_db, t.id, summarized.doc_id) == {"summary": 1, "labels": 1}
    assert {k: len(v) for k, v in (await jobs_of(app_db, t.id, summarized.doc_id)).items()} == {
        "ingest": 1,
        "summarize": 1,
        "classify": 1,
    }
    assert again["summary"]["created_at"] > first["summary"]["created_at"]
    assert again["summary"]["text"].strip() and again["labels"] == first["labels"]
    # A duplicate message for a finished job is skipped (the claim sees it is done).
    assert await run_summarize(_svc(app), t.id, found["summarize"][0].id) == "skipped"


async def test_other_tenant_sees_no_summary_or_labels(
    client: httpx.AsyncClient, app_db: Database, settings: Settings, summarized: Summarized
) -> None:
    b = await make_tenant(app_db, role="admin")
    r = await client.get(f"/api/v1/documents/{summarized.doc_id}", headers=bearer(b.key))
    assert r.status_code == 404 and r.json()["code"] == "document_not_found"
    listed = await client.get("/api/v1/documents", headers=bearer(b.key))
    assert listed.json()["items"] == []
    with psycopg.connect(app_conninfo(settings)) as conn, conn.transaction():
        conn.execute("SELECT set_config('app.tenant_id', %s, true)", (str(b.id),))
        assert conn.execute("SELECT count(*) FROM document_enrichments").fetchone()[0] == 0
        conn.execute("SELECT set_config('app.tenant_id', %s, true)", (str(summarized.tenant.id),))
        assert conn.execute("SELECT count(*) FROM document_enrichments").fetchone()[0] == 2


async def test_clear_cut_invoice_is_finance(
    client: httpx.AsyncClient, app: FastAPI, app_db: Database
) -> None:
    t = await make_tenant(app_db, role="admin")
    assert (await put_labels(client, t.key, LABELS)).status_code == 200
    r = await upload(client, t.key, INVOICE, name="invoice", classify=True)
    doc_id = r.json()["id"]
    await ingest_pending(app, t.id)
    assert set(await jobs_of(app_db, t.id, doc_id)) == {"ingest", "classify"}  # no summary asked
    assert await enrich_pending(app, t.id) == [("classify", "succeeded")]
    doc = await get_doc(client, t.key, doc_id)
    assert [x["name"] for x in doc["labels"]] == ["finance"] and doc["summary"] is None
    # The labels change; asking again with the same bytes re-classifies (the same job, run again).
    more = [*LABELS, {"name": "procurement", "description": "suppliers, purchase orders, office supplies"}]
    assert (await put_labels(client, t.key, more)).status_code == 200
    r = await upload(client, t.key, INVOICE, name="invoice", classify=True)
    assert r.status_code == 200 and r.json()["enrichment_jobs"][0]["status"] == "queued"
    assert await enrich_pending(app, t.id) == [("classify", "succeeded")]
    again = await get_doc(client, t.key, doc_id)
    assert len((await jobs_of(app_db, t.id, doc_id))["classify"]) == 1
    assert {x["name"] for x in again["labels"]} <= {x["name"] for x in more}
    assert await enrichment_rows(app_db, t.id, doc_id) == {"labels": 1}


async def test_no_flags_no_jobs(client: httpx.AsyncClient, app: FastAPI, app_db: Database) -> None:
    t = await make_tenant(app_db, role="admin")
    assert (await put_labels(client, t.key, LABELS)).status_code == 200
    doc_id = (await upload(client, t.key, BOILER + " Plain.")).json()["id"]
    assert await ingest_pending(app, t.id) == ["succeeded"]
    assert set(await jobs_of(app_db, t.id, doc_id)) == {"ingest"}
    doc = await get_doc(client, t.key, doc_id)
    assert doc["summary"] is None and doc["labels"] == [] and doc["enrichment_jobs"] == []


async def test_no_labels_fails_clearly_and_retry_works_once_they_exist(
    client: httpx.AsyncClient, app: FastAPI, app_db: Database
) -> None:
    t = await make_tenant(app_db, role="admin")
    doc_id = (await upload(client, t.key, INVOICE + " No labels yet.", classify=True)).json()["id"]
    await ingest_pending(app, t.id)
    assert await enrich_pending(app, t.id) == [("classify", "failed")]
    job = (await jobs_of(app_db, t.id, doc_id))["classify"][0]
    assert job.status == "failed" and job.error_code == "no_labels" and job.attempts == 1
    assert "PUT /api/v1/labels" in (job.error or "")
    doc = await get_doc(client, t.key, doc_id)
    assert doc["enrichment_jobs"] == [
        {"job_id": str(job.id), "kind": "classify", "status": "failed", "error_code": "no_labels"}
    ]
    r = await client.get(f"/api/v1/jobs/{job.id}", headers=bearer(t.key))
    assert r.json()["error_code"] == "no_labels"
    # Labels defined, the job re-driven (what `appliance jobs retry` does): it succeeds.
    assert (await put_labels(client, t.key, LABELS)).status_code == 200
    async with app_db.transaction(tenant_id=t.id) as session:
        await jobs.retry_job(session, job.id)
    assert await enrich_pending(app, t.id) == [("classify", "succeeded")]
    assert (await get_doc(client, t.key, doc_id))["labels"][0]["name"] == "finance"


async def test_duplicate_upload_asks_for_enrichment(
    client: httpx.AsyncClient, app: FastAPI, app_db: Database
) -> None:
    t = await make_tenant(app_db, role="admin")
    assert (await put_labels(client, t.key, LABELS)).status_code == 200
    text = BOILER + " Duplicate."
    doc_id = (await upload(client, t.key, text)).json()["id"]
    # Not indexed yet: the request is recorded on the version, and the ingest job acts on it.
    r = await upload(client, t.key, text, classify=True)
    assert r.status_code == 200 and r.json()["id"] == doc_id
    assert set(await jobs_of(app_db, t.id, doc_id)) == {"ingest"}
    assert await ingest_pending(app, t.id) == ["succeeded"]
    assert set(await jobs_of(app_db, t.id, doc_id)) == {"ingest", "classify"}
    # Indexed already: asking creates the job at once; asking twice does not add a second.
    for _ in range(2):
        r = await upload(client, t.key, text, summarize=True)
        assert r.status_code == 200, r.text
        assert {j["kind"] for j in r.json()["enrichment_jobs"]} == {"summarize", "classify"}
    found = await jobs_of(app_db, t.id, doc_id)
    assert len(found["summarize"]) == 1 and found["summarize"][0].status == "queued"
    async with app_db.transaction(tenant_id=t.id) as session:
        version = (
            await session.execute(
                select(DocumentVersion).where(DocumentVersion.document_id == uuid.UUID(doc_id))
            )
        ).scalar_one()
        assert version.enrich == {"summarize": True, "classify": "embedding"}
        requested = (
            (
                await session.execute(
                    select(AuditEvent).where(AuditEvent.action == "document.enrich_requested")
                )
            )
            .scalars()
            .all()
        )
    assert len(requested) == 3


async def test_new_version_and_metadata_flags(
    client: httpx.AsyncClient, app: FastAPI, app_db: Database
) -> None:
    t = await make_tenant(app_db, role="admin")
    assert (await put_labels(client, t.key, LABELS)).status_code == 200
    # The flags inside the multipart metadata JSON work too.
    r = await client.post(
        "/api/v1/documents",
        files={"file": ("b.txt", BOILER.encode() + b" Metadata.", "text/plain")},
        data={"metadata": json.dumps({"title": "b", "classify": "embedding"})},
        headers=bearer(t.key),
    )
    assert r.status_code == 201, r.text
    doc_id = r.json()["id"]
    assert r.json()["metadata"] == {}  # the flags are not stored as document metadata
    await ingest_pending(app, t.id)
    assert await enrich_pending(app, t.id) == [("classify", "succeeded")]
    assert (await get_doc(client, t.key, doc_id))["labels"][0]["name"] == "facilities"
    # A new version asks again: its labels replace the old version's on the document.
    r = await client.post(
        f"/api/v1/documents/{doc_id}/versions",
        params={"classify": "true"},
        content=INVOICE.encode(),
        headers={**bearer(t.key), "Content-Type": "text/plain"},
    )
    assert r.status_code == 201, r.text
    doc = await get_doc(client, t.key, doc_id)
    assert doc["current_version"]["version"] == 2 and doc["labels"] == []  # not classified yet
    await ingest_pending(app, t.id)
    assert await enrich_pending(app, t.id) == [("classify", "succeeded")]
    doc = await get_doc(client, t.key, doc_id)
    assert [x["name"] for x in doc["labels"]] == ["finance"]
    # An unknown classify value is a validation error.
    r = await upload(client, t.key, "x", classify="maybe")
    assert r.status_code == 422 and r.json()["code"] == "validation_error"


async def test_deleted_document_fails_its_job(
    client: httpx.AsyncClient, app: FastAPI, app_db: Database
) -> None:
    t = await make_tenant(app_db, role="admin")
    assert (await put_labels(client, t.key, LABELS)).status_code == 200
    doc_id = (await upload(client, t.key, INVOICE + " Deleted.", classify=True)).json()["id"]
    await ingest_pending(app, t.id)
    assert (await client.delete(f"/api/v1/documents/{doc_id}", headers=bearer(t.key))).status_code == 204
    # The claim finds the version deleted: the job ends failed at once, the work is skipped.
    assert await enrich_pending(app, t.id) == [("classify", "skipped")]
    job = (await jobs_of(app_db, t.id, doc_id))["classify"][0]
    assert job.status == "failed" and job.error_code == "document_deleted"


async def test_llm_unreachable_is_retried_not_failed(
    client: httpx.AsyncClient, app: FastAPI, app_db: Database, settings: Settings
) -> None:
    t = await make_tenant(app_db, role="admin")
    doc_id = (await upload(client, t.key, INVOICE + " Retry.", summarize=True)).json()["id"]
    await ingest_pending(app, t.id)
    down = settings.model_copy(update={"llm_url": f"http://127.0.0.1:{free_port()}"})
    with pytest.raises(LLMUnavailable):
        await enrich_pending(app, t.id, settings=down)
    job = (await jobs_of(app_db, t.id, doc_id))["summarize"][0]
    assert job.status == "retrying" and job.error_code == "llm_unavailable"
    assert job.attempts == 1 and job.max_attempts == 10
    assert await enrichment_rows(app_db, t.id, doc_id) == {}
    # The LLM back: the retry (Dramatiq's, here run by hand) succeeds; nothing was lost.
    assert await enrich_pending(app, t.id) == [("summarize", "succeeded")]
    job = (await jobs_of(app_db, t.id, doc_id))["summarize"][0]
    assert job.status == "succeeded" and job.attempts == 2 and job.error_code is None
    assert (await get_doc(client, t.key, doc_id))["summary"]["text"].strip()


async def test_llm_down_through_every_attempt_is_dead_lettered_and_redrivable(
    client: httpx.AsyncClient, app: FastAPI, app_db: Database, settings: Settings
) -> None:
    t = await make_tenant(app_db, role="admin")
    doc_id = (await upload(client, t.key, INVOICE + " Dead.", summarize=True)).json()["id"]
    await ingest_pending(app, t.id)
    job_id = (await jobs_of(app_db, t.id, doc_id))["summarize"][0].id
    async with app_db.transaction(tenant_id=t.id) as session:  # the 9 earlier attempts failed alike
        job = await session.get(Job, job_id)
        assert job is not None
        job.status, job.attempts = "retrying", 9
    down = settings.model_copy(update={"llm_url": f"http://127.0.0.1:{free_port()}"})
    assert await enrich_pending(app, t.id, settings=down) == [("summarize", "dead")]
    job = (await jobs_of(app_db, t.id, doc_id))["summarize"][0]
    assert job.status == "dead" and job.error_code == "llm_unavailable" and job.error
    async with app_db.transaction(tenant_id=t.id) as session:
        event = (
            await session.execute(
                select(AuditEvent).where(
                    AuditEvent.action == "document.enrich_failed", AuditEvent.resource_id == doc_id
                )
            )
        ).scalar_one()
        assert event.details["dead_lettered"] is True and event.outcome == "failure"
        await jobs.retry_job(session, job_id)  # `appliance jobs retry`
    assert await enrich_pending(app, t.id) == [("summarize", "succeeded")]


async def test_classify_by_llm(client: httpx.AsyncClient, app: FastAPI, app_db: Database) -> None:
    t = await make_tenant(app_db, role="admin")
    assert (await put_labels(client, t.key, LABELS)).status_code == 200
    doc_id = (await upload(client, t.key, BOILER + " By LLM.", classify="llm")).json()["id"]
    await ingest_pending(app, t.id)
    assert await enrich_pending(app, t.id) == [("classify", "succeeded")]
    labels = (await get_doc(client, t.key, doc_id))["labels"]
    assert labels and {x["name"] for x in labels} <= {x["name"] for x in LABELS}
    async with app_db.transaction(tenant_id=t.id) as session:
        row = (
            await session.execute(
                select(DocumentEnrichment).where(DocumentEnrichment.document_id == uuid.UUID(doc_id))
            )
        ).scalar_one()
    assert row.details["requested"] == "llm"
    if row.method == "llm":  # the tiny model named labels from the list
        assert row.model == CHAT_MODEL and {x["method"] for x in labels} == {"llm"}
    else:  # it did not: the embedding method decided, and the row says why
        assert row.details["llm_fallback"] and labels[0]["name"] == "facilities"


def _svc(app: FastAPI) -> WorkerServices:
    s = app.state
    return WorkerServices(settings=s.settings, db=s.db, keyring=s.keyring, store=s.store)


async def test_jobs_are_enqueued_on_the_enrich_queue(
    client: httpx.AsyncClient, app: FastAPI, app_db: Database
) -> None:
    """The follow-up jobs are sent to Redis after the indexing commits (what the sweeper and
    `appliance jobs retry` use too: one actor per kind)."""
    t = await make_tenant(app_db, role="admin")
    doc_id = (await upload(client, t.key, INVOICE + " Queue.", summarize=True, classify=True)).json()["id"]
    await ingest_pending(app, t.id)
    found = await jobs_of(app_db, t.id, doc_id)
    messages = b"".join((await app.state.redis.hgetall("appliance:enrich.msgs")).values())
    for kind, actor in (("summarize", b"summarize_version"), ("classify", b"classify_version")):
        job_id = str(found[kind][0].id).encode()
        assert job_id in messages and actor in messages, kind


async def test_openapi_documents_enrichment(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    upload_params = {p["name"]: p for p in spec["paths"]["/api/v1/documents"]["post"]["parameters"]}
    assert upload_params["summarize"]["description"] and upload_params["classify"]["schema"]
    version_params = {
        p["name"] for p in spec["paths"]["/api/v1/documents/{document_id}/versions"]["post"]["parameters"]
    }
    assert {"summarize", "classify"} <= version_params
    assert {"get", "put"} <= set(spec["paths"]["/api/v1/labels"])
    assert "422" in spec["paths"]["/api/v1/labels"]["put"]["responses"]
    doc = spec["components"]["schemas"]["DocumentOut"]
    assert {"summary", "labels", "enrichment_jobs"} <= set(doc["properties"])
    assert not {"summary", "labels", "enrichment_jobs"} & set(doc.get("required", []))
