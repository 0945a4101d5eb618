"""Dramatiq broker and actors. Run with `dramatiq appliance.workers` (as `appliance up` does).

Jobs carry ids only; each actor opens its own transactions through the domain services. Each
worker thread keeps one event loop and one database pool for its whole life (`run_async`), and each
process loads the embedding model once. A sweeper thread per process (one active at a time, by a
Redis lock) re-drives jobs whose message was lost or whose worker died.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import Middleware

from appliance.logs import configure_logging, get_logger
from appliance.settings import get_settings

settings = get_settings()
configure_logging(settings.log_level, json=settings.log_json)
log = get_logger("appliance.workers")
T = TypeVar("T")

PING_KEY = "appliance:ping:{token}"
SWEEP_LOCK = "appliance:sweeper"

_local = threading.local()


def run_async(fn: Callable[[Any], Awaitable[T]]) -> T:
    """Run `fn(services)` on this thread's long-lived loop with this thread's services."""
    runner = getattr(_local, "runner", None)
    if runner is None:
        runner = _local.runner = asyncio.Runner()
    return runner.run(_with_services(fn))


async def _with_services(fn: Callable[[Any], Awaitable[T]]) -> T:
    from appliance.db.engine import Database
    from appliance.ingest.pipeline import WorkerServices
    from appliance.keys.keyring import Keyring
    from appliance.storage.factory import build_store

    services = getattr(_local, "services", None)
    if services is None:
        services = _local.services = WorkerServices(
            settings=settings,
            db=Database(settings.app_database_url, pool_size=2),
            keyring=Keyring.from_settings(settings),
            store=build_store(settings),
        )
    return await fn(services)


class Sweeper(Middleware):
    """After boot, every `sweep_interval_s`: re-enqueue jobs queued for too long or running with a stale
    heartbeat (their worker was killed). A Redis lock keeps one sweep at a time across processes."""

    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        threading.Thread(target=self._loop, name="appliance-sweeper", daemon=True).start()

    def _loop(self) -> None:
        client = redis.Redis.from_url(settings.redis_url)
        while True:
            try:
                if client.set(SWEEP_LOCK, "1", nx=True, ex=max(1, settings.sweep_interval_s - 1)):
                    redriven = run_async(sweep_once)
                    if redriven:
                        log.info("sweeper re-drove jobs", count=redriven)
                    checkpoint = run_async(checkpoint_once)
                    if checkpoint is not None:
                        log.info("audit checkpoint signed", seq=checkpoint.seq, key_id=checkpoint.key_id)
            except Exception as exc:  # never let the sweeper die
                log.warning("sweep failed", error=str(exc)[:300])
            time.sleep(settings.sweep_interval_s)


async def sweep_once(svc: Any) -> int:
    from appliance.jobs import service as jobs

    async with svc.db.transaction() as session:
        stale = await jobs.stale_jobs(
            session,
            queued_after_s=settings.job_queued_stale_s,
            heartbeat_after_s=settings.job_heartbeat_stale_s,
        )
    for job_id, tenant_id, kind in stale:
        async with svc.db.transaction(tenant_id=tenant_id) as session:
            await jobs.redrive(session, job_id, tenant_id, kind)
    # Deleted documents whose purge never ran (enqueue failed, retries ran out during a long backup,
    # or a restore brought them back): send the purge again (it is idempotent).
    from appliance.documents.service import pending_purges

    purges = await pending_purges(svc.db, older_than_s=settings.job_queued_stale_s)
    for tenant_id, document_id in purges:
        purge_document.send(str(tenant_id), str(document_id))
    return len(stale) + len(purges)


async def checkpoint_once(svc: Any) -> Any:
    """Sign the audit chain head when the last checkpoint is older than audit_checkpoint_interval_s."""
    from appliance.audit.service import checkpoint_if_due

    return await checkpoint_if_due(svc.db, svc.settings)


broker = RedisBroker(url=settings.redis_url, namespace="appliance")
broker.add_middleware(Sweeper())
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name="system", max_retries=0, time_limit=10_000)
def system_ping(token: str) -> None:
    """Write a short-lived reply under `token`, so a caller can see a worker took the job."""
    client = redis.Redis.from_url(settings.redis_url)
    try:
        client.set(PING_KEY.format(token=token), str(time.time()), ex=300)
    finally:
        client.close()
    log.info("ping", token=token)


# A job's retries: exponential backoff with jitter (Dramatiq's), 2 s to 5 min; the job row's own
# max_attempts ends them first (then the job is recorded dead-lettered).
JOB_RETRIES: dict[str, Any] = {
    "max_retries": 50,
    "min_backoff": 2_000,
    "max_backoff": 300_000,
    "time_limit": 3_600_000,
}


def _run_job(
    kind: str, run: Callable[[Any, uuid.UUID, uuid.UUID], Awaitable[str]], tenant_id: str, job_id: str
) -> None:
    outcome = run_async(lambda svc: run(svc, uuid.UUID(tenant_id), uuid.UUID(job_id)))
    log.info(f"{kind} job", job_id=job_id, outcome=outcome)


@dramatiq.actor(queue_name="ingest", **JOB_RETRIES)
def ingest_version(tenant_id: str, job_id: str) -> None:
    """Extract, chunk, embed and index one document version (see appliance.ingest.pipeline).

    Retries (exponential backoff with jitter, Dramatiq's) are bounded by the job's own max_attempts,
    after which the job is recorded as dead-lettered with its error."""
    from appliance.ingest.pipeline import run_ingest

    _run_job("ingest", run_ingest, tenant_id, job_id)


@dramatiq.actor(queue_name="maintenance", **JOB_RETRIES)
def reindex_version(tenant_id: str, job_id: str) -> None:
    """Re-embed one version's chunks with the target embedding model (appliance.ingest.reindex)."""
    from appliance.ingest.reindex import run_reindex

    _run_job("reindex", run_reindex, tenant_id, job_id)


# Up to ~4 h of retries: a purge waits (BackupInProgress) while a backup copies blobs.
@dramatiq.actor(queue_name="maintenance", max_retries=50, min_backoff=2_000, max_backoff=300_000)
def purge_document(tenant_id: str, document_id: str) -> None:
    """Remove a deleted document's blobs and rows (idempotent: a retry finds nothing left to do)."""
    from appliance.documents.service import Services
    from appliance.documents.service import purge_document as purge

    async def run(svc: Any) -> int:
        docs = Services(settings=svc.settings, db=svc.db, keyring=svc.keyring, store=svc.store)
        return await purge(docs, uuid.UUID(tenant_id), uuid.UUID(document_id))

    removed = run_async(run)
    log.info("purged document", document_id=document_id, versions=removed)


# Enrichment: LLM work can take minutes, so it has its own queue (ingest messages are not stuck behind
# it in Redis); the retry policy is every job's (JOB_RETRIES).
@dramatiq.actor(queue_name="enrich", **JOB_RETRIES)
def summarize_version(tenant_id: str, job_id: str) -> None:
    """Summarise one indexed version with the chat model (appliance.enrich.tasks)."""
    from appliance.enrich.tasks import run_summarize

    _run_job("summarize", run_summarize, tenant_id, job_id)


@dramatiq.actor(queue_name="enrich", **JOB_RETRIES)
def classify_version(tenant_id: str, job_id: str) -> None:
    """Assign the tenant's labels to one indexed version (appliance.enrich.tasks)."""
    from appliance.enrich.tasks import run_classify

    _run_job("classify", run_classify, tenant_id, job_id)
