"""A small corpus ingested once per module through the real pipeline (real model, real Postgres)."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

import httpx
import pytest
from fastapi import FastAPI

from appliance.db.engine import Database
from tests.factories import TenantWithKey, bearer, ingest_pending, make_tenant

DOCS = {
    "boiler": (
        "Boiler maintenance procedure. The steam boiler in building C must be inspected every six months. "
        "Technicians check the pressure relief valve, drain the sediment and test the low-water cutoff. "
        "A boiler that fails inspection is locked out until the safety officer signs the repair report."
    ),
    "travel": (
        "Travel expense policy. Employees book flights in economy class for trips under six hours. "
        "Hotel costs are reimbursed up to the city limit published by finance. Receipts must be uploaded "
        "within thirty days, and meals are covered by a fixed daily allowance rather than receipts."
    ),
    "vaccine": (
        "Clinic vaccination schedule. Influenza vaccines are offered to all staff every October. "
        "Hepatitis B vaccination is required for laboratory workers, in three doses over six months. "
        "Records of every dose are kept by occupational health for forty years."
    ),
    "privacy": (
        "Data retention rules. Customer records are deleted seven years after the account closes. "
        "Backups that hold personal data are encrypted and kept for ninety days. Requests to erase "
        "personal data are answered within one month by the privacy office."
    ),
}


@dataclass
class Corpus:
    tenant: TenantWithKey
    other: TenantWithKey  # holds near-identical copies of two documents
    ids: dict[str, str]  # name -> document id (tenant)
    other_ids: dict[str, str]


async def upload_text(
    client: httpx.AsyncClient,
    key: str,
    name: str,
    text: str,
    *,
    tags: list[str] | None = None,
    extra: dict | None = None,
) -> str:
    meta = {"title": name, "tags": tags or [], "extra": extra or {}}
    r = await client.post(
        "/api/v1/documents",
        content=text.encode(),
        params={"metadata": json.dumps(meta)},
        headers={**bearer(key), "Content-Type": "text/plain", "X-Filename": f"{name}.txt"},
    )
    assert r.status_code in (200, 201), r.text
    return str(r.json()["id"])


@pytest.fixture(scope="module")
async def corpus(client: httpx.AsyncClient, app: FastAPI, app_db: Database) -> Corpus:
    tenant = await make_tenant(app_db, role="editor")
    other = await make_tenant(app_db, role="editor")
    ids = {}
    for name, text in DOCS.items():
        tags = ["ops"] if name == "boiler" else ["policy"]
        ids[name] = await upload_text(client, tenant.key, name, text, tags=tags, extra={"dept": name})
    # Tenant B: the same passages with one word changed (different bytes, near-identical vectors).
    other_ids = {
        name: await upload_text(client, other.key, name, DOCS[name].replace("must", "shall"))
        for name in ("boiler", "privacy")
    }
    assert set(await ingest_pending(app, tenant.id)) == {"succeeded"}
    assert set(await ingest_pending(app, other.id)) == {"succeeded"}
    return Corpus(tenant, other, ids, other_ids)


def new_id() -> str:
    return str(uuid.uuid4())
