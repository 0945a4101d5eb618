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
