"""Dramatiq broker and actors. Run with `dramatiq appliance.workers` (as `appliance up` does).

Jobs carry ids only; each actor opens its own transaction through the domain services. Later
issues add the ingest stages here; `system_ping` proves a worker is consuming the queue.
"""

from __future__ import annotations

import time

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker

from appliance.logs import configure_logging, get_logger
from appliance.settings import get_settings

settings = get_settings()
configure_logging(settings.log_level, json=settings.log_json)
log = get_logger("appliance.workers")

broker = RedisBroker(url=settings.redis_url, namespace="appliance")
dramatiq.set_broker(broker)

PING_KEY = "appliance:ping:{token}"


@dramatiq.actor(queue_name="system", max_retries=0, time_limit=10_000)
def system_ping(token: str) -> None:
    """Write a short-lived reply under `token`, so a caller can see a worker took the job."""
    client = redis.Redis.from_url(settings.redis_url)
    try:
        client.set(PING_KEY.format(token=token), str(time.time()), ex=300)
    finally:
        client.close()
    log.info("ping", token=token)


@dramatiq.actor(queue_name="maintenance", max_retries=10, min_backoff=2_000, max_backoff=300_000)
def purge_document(tenant_id: str, document_id: str) -> None:
    """Remove a deleted document's blobs and rows (idempotent: a retry finds nothing left to do)."""
    import asyncio
    import uuid

    from appliance.db.engine import Database
    from appliance.documents.service import Services
    from appliance.documents.service import purge_document as purge
    from appliance.keys.keyring import Keyring
    from appliance.storage.factory import build_store

    async def run() -> int:
        db = Database(settings.app_database_url, pool_size=1)
        try:
            svc = Services(
                settings=settings,
                db=db,
                keyring=Keyring(settings.master_key_path),
                store=build_store(settings),
            )
            return await purge(svc, uuid.UUID(tenant_id), uuid.UUID(document_id))
        finally:
            await db.dispose()

    removed = asyncio.run(run())
    log.info("purged document", document_id=document_id, versions=removed)
