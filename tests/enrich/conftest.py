"""Helpers for the enrichment tests: uploads with the enrichment flags, labels, and reading rows."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
from sqlalchemy import func, select

from appliance.db.engine import Database
from appliance.enrich.models import DocumentEnrichment
from appliance.jobs.models import Job
from tests.factories import bearer

LABELS = [
    {"name": "facilities", "description": "buildings, heating, maintenance"},
    {"name": "finance", "description": "invoices, budgets"},
    {"name": "hr", "description": "hiring, leave, payroll"},
]
BOILER = (
    "Boiler maintenance procedure. The steam boiler in building C must be inspected every six months. "
    "Technicians check the pressure relief valve, drain the sediment and test the low-water cutoff. "
    "A boiler that fails inspection is locked out until the safety officer signs the repair report."
)
INVOICE = (
    "Invoice 2231 from Acme Supplies: 40 units of printer paper, total 1,240 EUR, due in 30 days. "
    "Charge it to the Q3 office budget. Finance approves invoices above 1,000 EUR before payment."
)


async def upload(
    client: httpx.AsyncClient, key: str, text: str, *, name: str = "doc", **params: Any
) -> httpx.Response:
    return await client.post(
        "/api/v1/documents",
        content=text.encode(),
        params={k: str(v).lower() if isinstance(v, bool) else v for k, v in params.items()},
        headers={**bearer(key), "Content-Type": "text/plain", "X-Filename": f"{name}.txt"},
    )


async def put_labels(client: httpx.AsyncClient, key: str, labels: list[dict[str, Any]]) -> httpx.Response:
    return await client.put("/api/v1/labels", json={"labels": labels}, headers=bearer(key))


async def get_doc(client: httpx.AsyncClient, key: str, doc_id: str) -> dict[str, Any]:
    r = await client.get(f"/api/v1/documents/{doc_id}", headers=bearer(key))
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def jobs_of(db: Database, tenant_id: uuid.UUID, doc_id: str) -> dict[str, list[Job]]:
    async with db.transaction(tenant_id=tenant_id) as session:
        rows = (
            (await session.execute(select(Job).where(Job.document_id == uuid.UUID(doc_id)))).scalars().all()
        )
    out: dict[str, list[Job]] = {}
    for job in rows:
        out.setdefault(job.kind, []).append(job)
    return out


async def enrichment_rows(db: Database, tenant_id: uuid.UUID, doc_id: str) -> dict[str, int]:
    async with db.transaction(tenant_id=tenant_id) as session:
        rows = await session.execute(
            select(DocumentEnrichment.kind, func.count())
            .where(DocumentEnrichment.document_id == uuid.UUID(doc_id))
            .group_by(DocumentEnrichment.kind)
        )
        return {kind: int(n) for kind, n in rows}
