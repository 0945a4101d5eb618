"""Crashes during ingestion: `kill -9` of the Dramatiq worker mid-embedding, and a Redis restart with
jobs queued. Afterwards every job completes, with exactly the expected chunks and no duplicates."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from sqlalchemy import create_engine, text

from tests.e2e.test_up import appliance, appliance_with_tenant, home_settings

pytestmark = pytest.mark.slow

SENTENCES = [
    "The committee reviewed the quarterly liquidity report and approved the revised funding plan.",
    "Each branch reconciles its cash position before the close of business on Friday.",
    "Patients admitted through the emergency department are triaged within fifteen minutes.",
    "The auditor found that two vendor contracts lacked a signed data processing agreement.",
    "Backups are encrypted at rest and tested by a full restore every month.",
]


def long_text(paragraphs: int, seed: int) -> str:
    out = []
    for i in range(paragraphs):
        body = " ".join(SENTENCES[(i + j + seed) % len(SENTENCES)] for j in range(6))
        out.append(f"Section {seed}.{i}\n\n{body} Reference number {seed * 1000 + i}.")
    return "\n\n".join(out) + "\n"


@pytest.fixture
def running() -> Iterator[tuple[Path, str, dict[str, str]]]:
    fast_sweeps = (
        "APPLIANCE_JOB_HEARTBEAT_STALE_S=5\nAPPLIANCE_SWEEP_INTERVAL_S=2\nAPPLIANCE_JOB_QUEUED_STALE_S=5\n"
    )
    with appliance_with_tenant("appliance-crash-", "crash", env_file=fast_sweeps) as (home, api, editor):
        yield home, api, {"Authorization": f"Bearer {editor}"}


def job_of(c: httpx.Client, h: dict[str, str], doc_id: str) -> dict:
    return c.get("/api/v1/jobs", params={"document_id": doc_id}, headers=h).json()["items"][0]


def expected_chunks(home: Path, body: str) -> int:
    from appliance.inference.embedding import get_embedder
    from appliance.ingest.chunking import chunk_text

    embedder = get_embedder(home_settings(home))
    return len(chunk_text(body, [], tokenizer=embedder, max_tokens=min(256, embedder.max_tokens)))


def chunk_ordinals(home: Path, doc_id: str) -> list[int]:
    engine = create_engine(home_settings(home).owner_database_url)
    try:
        with engine.connect() as conn:
            return [
                r[0]
                for r in conn.execute(
                    text("SELECT ordinal FROM chunks WHERE document_id = :d ORDER BY ordinal"), {"d": doc_id}
                )
            ]
    finally:
        engine.dispose()


def wait_job(c: httpx.Client, h: dict[str, str], doc_id: str, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    job: dict = {}
    while time.monotonic() < deadline:
        job = job_of(c, h, doc_id)
        if job["status"] in ("succeeded", "failed", "dead"):
            return job
        time.sleep(0.5)
    raise AssertionError(f"job not finished: {json.dumps(job)}")


def test_kill_worker_during_embedding(running: tuple[Path, str, dict[str, str]]) -> None:
    home, api, h = running
    body = long_text(120, seed=1)
    # The workers' supervisor is looked up before the upload: `appliance status` takes a second or two
    # here, long enough for the embedding to finish between "mid-embedding" and the kill.
    status = json.loads(appliance(home, "status", "--json").stdout)
    master = psutil.Process(status["components"]["workers"]["pid"])
    with httpx.Client(base_url=api, timeout=30) as c:
        doc = c.post(
            "/api/v1/documents", content=body.encode(), headers={**h, "X-Filename": "long.txt"}
        ).json()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            job = job_of(c, h, doc["id"])
            if job["stage"] == "embedding" and job["progress"] > 40:
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"never reached embedding: {job}")
        victims = master.children(recursive=True) or [master]
        for proc in victims:
            os.kill(proc.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        job = wait_job(c, h, doc["id"])
        recovery = time.monotonic() - killed_at
        print(f"worker killed mid-embedding; job done {recovery:.1f}s later, {job['attempts']} attempts")
        assert job["status"] == "succeeded", job
        assert job["attempts"] >= 2, job
    ordinals = chunk_ordinals(home, doc["id"])
    assert ordinals == list(range(expected_chunks(home, body)))


def test_redis_restart_with_jobs_queued(running: tuple[Path, str, dict[str, str]]) -> None:
    home, api, h = running
    status = json.loads(appliance(home, "status", "--json").stdout)
    with httpx.Client(base_url=api, timeout=30) as c:
        docs = []
        for i in range(4):
            r = c.post(
                "/api/v1/documents",
                content=long_text(8, seed=10 + i).encode(),
                headers={**h, "X-Filename": f"q{i}.txt"},
            )
            docs.append(r.json()["id"])
        # Redis dies with the messages in it (and the supervisor restarts it from its AOF).
        os.kill(status["components"]["redis"]["pid"], signal.SIGKILL)
        for doc_id in docs:
            job = wait_job(c, h, doc_id)
            assert job["status"] == "succeeded", job
    for i, doc_id in enumerate(docs):
        assert chunk_ordinals(home, doc_id) == list(range(expected_chunks(home, long_text(8, seed=10 + i))))
