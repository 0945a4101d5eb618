"""End to end: a real `appliance up` (Dramatiq workers, the LLM server component) runs the summarize
and classify jobs of an upload through the `enrich` queue, as in production."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_up import appliance, appliance_with_tenant
from tests.enrich.conftest import BOILER, LABELS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def running() -> Iterator[tuple[Path, str, dict[str, str], dict[str, str]]]:
    with appliance_with_tenant("appliance-enrich-", "enrich-e2e") as (home, api, editor):
        out = appliance(home, "keys", "create", "--tenant", "enrich-e2e", "--role", "admin", "--json")
        assert out.returncode == 0, out.stdout + out.stderr
        admin = json.loads(out.stdout)["key"]
        yield home, api, {"Authorization": f"Bearer {editor}"}, {"Authorization": f"Bearer {admin}"}


def test_workers_summarize_and_classify(running: tuple[Path, str, dict[str, str], dict[str, str]]) -> None:
    _, api, editor, admin = running
    with httpx.Client(base_url=api, timeout=30) as c:
        assert c.put("/api/v1/labels", json={"labels": LABELS}, headers=admin).status_code == 200
        r = c.post(
            "/api/v1/documents",
            params={"summarize": "true", "classify": "true"},
            content=BOILER.encode(),
            headers={**editor, "X-Filename": "boiler.txt", "Content-Type": "text/plain"},
        )
        assert r.status_code == 201, r.text
        doc_id = r.json()["id"]
        deadline = time.monotonic() + 300
        doc: dict = {}
        while time.monotonic() < deadline:
            doc = c.get(f"/api/v1/documents/{doc_id}", headers=editor).json()
            statuses = {j["kind"]: j["status"] for j in doc["enrichment_jobs"]}
            if len(statuses) == 2 and set(statuses.values()) <= {"succeeded", "failed", "dead"}:
                break
            time.sleep(0.5)
        assert {j["kind"]: j["status"] for j in doc["enrichment_jobs"]} == {
            "summarize": "succeeded",
            "classify": "succeeded",
        }, json.dumps(doc)
        assert doc["summary"]["text"].strip() and doc["labels"][0]["name"] == "facilities"
        jobs = c.get("/api/v1/jobs", params={"document_id": doc_id}, headers=editor).json()["items"]
        assert sorted(j["kind"] for j in jobs) == ["classify", "ingest", "summarize"]
