"""Prometheus metrics. Under gunicorn (several processes) the multiprocess collector aggregates
the per-process files in $PROMETHEUS_MULTIPROC_DIR, which `appliance up` sets and wipes at start."""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)

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
AUTH_FAILURES = Counter("appliance_auth_failures_total", "Rejected API keys by reason.", ["reason"])


def render() -> tuple[bytes, str]:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
