"""End to end ingestion: real `appliance up`, real Dramatiq workers, the real GGUF embedding model.

Upload → job → extract → chunk → embed → index → `ready`, visible on the document and the job;
permanent failures end in a clear status without crash loops; a duplicate upload is processed once.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text

from tests.e2e.test_up import appliance_with_tenant, home_settings

pytestmark = pytest.mark.slow

MARKDOWN = """# Incident response policy

## Scope

This policy covers every production system of the bank. Incidents are classified by severity.

## Reporting

Employees report suspected incidents to the security operations centre within one hour.
The on-call engineer acknowledges the report and opens a ticket.

## Retention

Incident records are kept for seven years and then destroyed.
"""


@pytest.fixture(scope="module")
def running() -> Iterator[tuple[Path, str, dict[str, str]]]:
    with appliance_with_tenant("appliance-ingest-", "ingest-e2e") as (home, api, editor):
        yield home, api, {"Authorization": f"Bearer {editor}"}


def wait_for(client: httpx.Client, headers: dict[str, str], doc_id: str, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    doc: dict = {}
    while time.monotonic() < deadline:
        doc = client.get(f"/api/v1/documents/{doc_id}", headers=headers).json()
        if doc["current_version"]["ingest_status"] in ("ready", "failed", "needs_ocr"):
            return doc
        time.sleep(0.3)
    raise AssertionError(f"not ingested in {timeout}s: {json.dumps(doc)}")


def chunk_rows(home: Path, version_id: str) -> list[tuple]:
    settings = home_settings(home)
    engine = create_engine(settings.owner_database_url)
    try:
        with engine.connect() as conn:
            return list(
                conn.execute(
                    text(
                        "SELECT ordinal, char_start, char_end, token_count, embedding_model, "
                        "vector_dims(embedding), length(tsv::text) > 0 "
                        "FROM chunks WHERE version_id = :v ORDER BY ordinal"
                    ),
                    {"v": version_id},
                )
            )
    finally:
        engine.dispose()


def test_upload_becomes_ready_with_chunks(running: tuple[Path, str, dict[str, str]]) -> None:
    home, api, h = running
    with httpx.Client(base_url=api, timeout=30) as c:
        r = c.post("/api/v1/documents", content=MARKDOWN.encode(), headers={**h, "X-Filename": "policy.md"})
        assert r.status_code == 201, r.text
        doc = wait_for(c, h, r.json()["id"])
        assert doc["current_version"]["ingest_status"] == "ready", doc
        jobs = c.get("/api/v1/jobs", params={"document_id": doc["id"]}, headers=h).json()["items"]
        assert len(jobs) == 1 and jobs[0]["status"] == "succeeded" and jobs[0]["progress"] == 100
        assert c.get(f"/api/v1/jobs/{jobs[0]['id']}", headers=h).json()["stage"] == "done"
        rows = chunk_rows(home, doc["current_version"]["id"])
        assert rows and [r[0] for r in rows] == list(range(len(rows)))
        assert all(r[4] == "all-minilm-l6-v2" and r[5] == 384 and r[6] for r in rows)
        # The same bytes again: the existing document, no second job.
        again = c.post("/api/v1/documents", content=MARKDOWN.encode(), headers=h)
        assert again.status_code == 200 and again.json()["id"] == doc["id"]
        assert len(c.get("/api/v1/jobs", params={"document_id": doc["id"]}, headers=h).json()["items"]) == 1


@pytest.mark.parametrize(
    ("name", "data", "code"),
    [
        (
            "broken.pdf",
            b"%PDF-1.7\n1 0 obj << /Type /Catalog /Pages 2 0 R >>\nendobj\n" + os.urandom(300),
            None,
        ),
        ("empty.txt", b"", "empty"),
        ("program.bin", b"\x7fELF\x02\x01\x01" + b"\x00" * 9 + os.urandom(500), "unsupported_type"),
    ],
)
def test_bad_files_fail_clearly(
    running: tuple[Path, str, dict[str, str]], name: str, data: bytes, code: str | None
) -> None:
    _, api, h = running
    with httpx.Client(base_url=api, timeout=30) as c:
        r = c.post("/api/v1/documents", content=data, headers={**h, "X-Filename": name})
        assert r.status_code in (200, 201), r.text
        doc = wait_for(c, h, r.json()["id"])
        assert doc["current_version"]["ingest_status"] in ("failed", "needs_ocr"), doc
        job = c.get("/api/v1/jobs", params={"document_id": doc["id"]}, headers=h).json()["items"][0]
        assert job["status"] == "failed" and job["attempts"] == 1, job  # permanent: no retry loop
        if code:
            assert job["error_code"] == code, job
        assert job["error"]
