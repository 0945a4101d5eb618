"""Prometheus metrics. Under gunicorn (several processes) the multiprocess collector aggregates
the per-process files in $PROMETHEUS_MULTIPROC_DIR, which `appliance up` sets and wipes at start."""

from __future__ import annotations

import os
from collections.abc import Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily

HTTP_REQUESTS = Counter(
    "appliance_http_requests_total",
    "HTTP requests by route, method and status.",
    ["method", "route", "status"],
)
HTTP_LATENCY = Histogram(
    "appliance_http_request_duration_seconds",
    "HTTP request latency by route.",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
INGEST_STAGE_SECONDS = Histogram(
    "appliance_ingest_stage_seconds",
    "Time per ingest stage.",
    ["stage"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900),
)
INGEST_FAILURES = Counter(
    "appliance_ingest_failures_total", "Failed ingest attempts by error code.", ["code"]
)
EMBEDDING_TOKENS = Counter("appliance_embedding_tokens_total", "Tokens embedded by the workers.")
LLM_TOKENS = Counter(
    "appliance_llm_tokens_total",
    "Tokens the chat model read (prompt) and wrote (completion), per tenant and route class.",
    ["tenant", "kind", "route"],
)
LLM_SECONDS = Histogram(
    "appliance_llm_generation_seconds",
    "Time per generation, from the LLM slot being granted to the last token.",
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
LLM_REJECTED = Counter(
    "appliance_llm_rejected_total",
    "Generations refused with 503 (queue full, wait too long, LLM down).",
    ["reason"],
)
SEARCH_CACHE = Counter(
    "appliance_search_cache_total", "Search cache lookups by outcome.", ["kind", "outcome"]
)
AUTH_FAILURES = Counter("appliance_auth_failures_total", "Rejected API keys by reason.", ["reason"])
RATE_LIMITED = Counter(
    "appliance_rate_limited_total",
    "Requests refused by a rate limit (scope key/tenant) or a concurrency quota (scope concurrency).",
    ["route_class", "scope"],
)
RATE_LIMIT_STORAGE_ERRORS = Counter(
    "appliance_rate_limit_storage_errors_total",
    "Redis errors met by rate limits and quotas (each one let a request through: fail open).",
    ["what"],
)


QUEUES = ("ingest", "enrich", "maintenance", "system")


class QueueDepthCollector:
    """Messages waiting in each Dramatiq queue (ready + delayed), read from Redis at scrape time."""

    def __init__(self, redis_url: str, namespace: str = "appliance") -> None:
        self.redis_url = redis_url
        self.namespace = namespace

    def collect(self) -> Iterator[GaugeMetricFamily]:
        import redis

        depth = GaugeMetricFamily(
            "appliance_queue_depth", "Messages waiting per queue (ready + delayed).", labels=["queue"]
        )
        client = redis.Redis.from_url(self.redis_url, socket_timeout=2)
        try:
            for queue in QUEUES:
                total = 0
                for key in (f"{self.namespace}:{queue}", f"{self.namespace}:{queue}.DQ"):
                    total += int(client.llen(key) or 0)
                depth.add_metric([queue], total)
        except redis.RedisError:
            return
        finally:
            client.close()
        yield depth


_single_process_queue_collector: QueueDepthCollector | None = None


def render(redis_url: str | None = None) -> tuple[bytes, str]:
    """The exposition text: every process's metrics under gunicorn, plus live queue depths."""
    global _single_process_queue_collector
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        if redis_url:
            registry.register(QueueDepthCollector(redis_url))  # type: ignore[arg-type]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY

    if redis_url and _single_process_queue_collector is None:
        _single_process_queue_collector = QueueDepthCollector(redis_url)
        REGISTRY.register(_single_process_queue_collector)  # type: ignore[arg-type]
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
