"""Rate limits and concurrency quotas (appliance.ratelimit) on the session's real Redis.

Each test builds its own app instances with low limits (create_app(settings), lifespan run), so the
counters are shared through Redis exactly as between gunicorn workers or across a restart.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from appliance.api import create_app
from appliance.auth.deps import GenerationSlot
from appliance.db.engine import Database
from appliance.ratelimit import (
    QUOTA_KEY_PREFIX,
    ConcurrencyQuotaExceeded,
    Limiter,
    route_class,
)
from appliance.settings import Settings
from tests.conftest import free_port
from tests.factories import bearer, make_key, make_tenant

PROBLEM = "application/problem+json"


def limited(settings: Settings, **overrides: Any) -> Settings:
    return settings.model_copy(update=overrides)


@asynccontextmanager
async def running(*apps: FastAPI) -> AsyncIterator[list[httpx.AsyncClient]]:
    async with AsyncExitStack() as stack:
        clients = []
        for app in apps:
            await stack.enter_async_context(app.router.lifespan_context(app))
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            clients.append(
                await stack.enter_async_context(
                    httpx.AsyncClient(transport=transport, base_url="http://appliance.test", timeout=60)
                )
            )
        yield clients


async def test_limit_is_shared_by_processes_and_survives_a_restart(
    settings: Settings, app_db: Database
) -> None:
    s = limited(settings, rate_limit_default="3/minute")
    t = await make_tenant(app_db)
    async with running(create_app(s), create_app(s)) as (one, two):
        seen = []
        for c in (one, two, one):
            r = await c.get("/api/v1/whoami", headers=bearer(t.key))
            assert r.status_code == 200, r.text
            seen.append((r.headers["ratelimit-limit"], r.headers["ratelimit-remaining"]))
            assert int(r.headers["ratelimit-reset"]) >= 0
        assert seen == [("3", "2"), ("3", "1"), ("3", "0")]
        r = await two.get("/api/v1/whoami", headers=bearer(t.key))
        assert r.status_code == 429
        assert r.headers["content-type"] == PROBLEM
        body = r.json()
        assert body["code"] == "rate_limited" and body["limit_scope"] == "key"
        assert body["route_class"] == "default"
        assert int(r.headers["retry-after"]) >= 1
        assert r.headers["ratelimit-limit"] == "3" and r.headers["ratelimit-remaining"] == "0"
        assert "x-request-id" in r.headers
    # "Restart": a fresh app (new process state, new Redis connections) still refuses.
    async with running(create_app(s)) as (again,):
        r = await again.get("/api/v1/whoami", headers=bearer(t.key))
        assert r.status_code == 429 and r.json()["code"] == "rate_limited"
        # Another key of the same tenant has its own key budget.
        _, other = await make_key(app_db, t.id)
        r = await again.get("/api/v1/whoami", headers=bearer(other))
        assert r.status_code == 200 and r.headers["ratelimit-remaining"] == "2"


async def test_tenant_limit_spans_its_keys_and_spares_other_tenants(
    settings: Settings, app_db: Database
) -> None:
    s = limited(settings, rate_limit_default="100/minute", tenant_rate_limit_default="4/minute")
    a = await make_tenant(app_db)
    b = await make_tenant(app_db)
    _, a2 = await make_key(app_db, a.id)
    async with running(create_app(s)) as (c,):
        for key in (a.key, a2, a.key, a2):
            assert (await c.get("/api/v1/whoami", headers=bearer(key))).status_code == 200
        r = await c.get("/api/v1/whoami", headers=bearer(a2))
        assert r.status_code == 429 and r.json()["limit_scope"] == "tenant"
        r = await c.get("/api/v1/whoami", headers=bearer(b.key))
        assert r.status_code == 200 and r.headers["ratelimit-limit"] == "4"


async def test_route_classes_have_their_own_budgets(settings: Settings, app_db: Database) -> None:
    s = limited(settings, rate_limit_search="2/minute", rate_limit_default="50/minute")
    t = await make_tenant(app_db, role="viewer")
    search = {"query": "anything", "mode": "fulltext"}
    async with running(create_app(s)) as (c,):
        for _ in range(2):
            r = await c.post("/api/v1/search", json=search, headers=bearer(t.key))
            assert r.status_code == 200, r.text
            assert r.headers["ratelimit-limit"] == "2"
        r = await c.post("/api/v1/search", json=search, headers=bearer(t.key))
        assert r.status_code == 429 and r.json()["route_class"] == "search"
        r = await c.get("/api/v1/documents", headers=bearer(t.key))
        assert r.status_code == 200 and r.headers["ratelimit-limit"] == "50"


def test_route_class_table_names_real_routes(settings: Settings) -> None:
    app = create_app(settings)
    doc = app.openapi()["paths"]
    classes: dict[str, set[str]] = {}
    for path, item in doc.items():
        concrete = path.replace("{", "").replace(
            "}", ""
        )  # /documents/{document_id} -> /documents/document_id
        for method in item:
            classes.setdefault(route_class(method, concrete), set()).add(f"{method.upper()} {path}")
    assert classes["upload"] == {"POST /api/v1/documents", "POST /api/v1/documents/{document_id}/versions"}
    assert classes["search"] == {"POST /api/v1/search"}
    assert classes["answers"] == {"POST /api/v1/answers"}
    assert {"POST /v1/chat/completions", "POST /v1/embeddings", "GET /v1/models"} <= classes["openai"]
    assert "GET /api/v1/documents" in classes["default"]
    assert "429" in doc["/api/v1/search"]["post"]["responses"]
    assert "413" in doc["/api/v1/search"]["post"]["responses"]
    assert "429" not in doc["/healthz"]["get"]["responses"]


async def test_concurrent_uploads_over_quota_get_429(settings: Settings, app_db: Database) -> None:
    s = limited(settings, tenant_max_concurrent_uploads=1)
    t = await make_tenant(app_db, role="editor")
    release = asyncio.Event()
    started = asyncio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        yield b"first half of a slow upload, "
        started.set()
        await release.wait()
        yield b"and the rest."

    async with running(create_app(s)) as (c,):
        headers = {**bearer(t.key), "X-Filename": "slow.txt", "Content-Type": "text/plain"}
        first = asyncio.create_task(c.post("/api/v1/documents", content=slow_body(), headers=headers))
        await asyncio.wait_for(started.wait(), 30)
        r = await c.post("/api/v1/documents", content=b"another upload", headers=headers)
        assert r.status_code == 429, r.text
        assert r.json()["code"] == "concurrency_quota_exceeded" and r.json()["quota"] == "uploads"
        assert r.headers["retry-after"]
        release.set()
        assert (await first).status_code == 201
        r = await c.post("/api/v1/documents", content=b"a third upload", headers=headers)
        assert r.status_code == 201, r.text  # the slot was given back


async def test_generation_quota_holds_through_a_stream_and_refuses_answers(
    settings: Settings, app_db: Database
) -> None:
    s = limited(settings, tenant_max_concurrent_generations=1)
    t = await make_tenant(app_db, role="viewer")
    key = f"{QUOTA_KEY_PREFIX}:generations:{t.id}"
    app = create_app(s)
    held: list[int] = []

    async def stream() -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            for i in range(3):
                held.append(await app.state.limiter.redis.zcard(key))
                yield f"token {i}\n".encode()

        return StreamingResponse(body(), media_type="text/plain")

    app.add_api_route("/api/v1/test-stream", stream, methods=["GET"], dependencies=[GenerationSlot])
    async with running(app) as (c,):
        r = await c.get("/api/v1/test-stream", headers=bearer(t.key))
        assert r.status_code == 200 and r.text.count("token") == 3
        assert held == [1, 1, 1]  # the slot is held while the stream runs ...
        assert await app.state.limiter.redis.zcard(key) == 0  # ... and given back after it
        # With the tenant's one slot taken (another process, say), answers and chat are refused.
        async with app.state.limiter.slot("generations", t.id):
            r = await c.post("/api/v1/answers", json={"question": "why?"}, headers=bearer(t.key))
            assert r.status_code == 429 and r.json()["code"] == "concurrency_quota_exceeded"
            r = await c.post(
                "/v1/chat/completions",
                json={"model": "default", "messages": [{"role": "user", "content": "hi"}]},
                headers=bearer(t.key),
            )
            assert r.status_code == 429 and r.json()["quota"] == "generations"


async def test_slot_of_a_dead_process_expires_and_a_live_one_is_renewed(settings: Settings) -> None:
    s = limited(settings, tenant_max_concurrent_uploads=1, quota_lease_s=0.6)
    tenant = uuid.uuid4()
    live, other = Limiter(s), Limiter(s)
    try:
        # A live holder renews its lease: still refused to others well past one lease.
        async with live.slot("uploads", tenant):
            await asyncio.sleep(1.5)
            with pytest.raises(ConcurrencyQuotaExceeded):
                async with other.slot("uploads", tenant):
                    pass
        # A "killed" holder: the slot is taken and nobody renews or releases it.
        key = f"{QUOTA_KEY_PREFIX}:uploads:{tenant}"
        assert await live._acquire(keys=[key], args=["dead-process", 1, 600]) == 1
        with pytest.raises(ConcurrencyQuotaExceeded):
            async with other.slot("uploads", tenant):
                pass
        await asyncio.sleep(0.7)
        async with other.slot("uploads", tenant):
            pass
    finally:
        await live.aclose()
        await other.aclose()


async def test_redis_down_fails_open(settings: Settings, app_db: Database) -> None:
    s = limited(settings, redis_port=free_port(), rate_limit_default="1/minute")
    t = await make_tenant(app_db)
    async with running(create_app(s)) as (c,):
        for _ in range(3):
            r = await c.get("/api/v1/whoami", headers=bearer(t.key))
            assert r.status_code == 200, r.text
            assert "ratelimit-limit" not in r.headers
    down = Limiter(limited(s, tenant_max_concurrent_uploads=1))
    try:
        async with down.slot("uploads", t.id), down.slot("uploads", t.id):
            pass  # both "granted": no store to count in
    finally:
        await down.aclose()


async def test_default_limits_leave_the_suite_alone(client: httpx.AsyncClient, app_db: Database) -> None:
    t = await make_tenant(app_db)
    r = await client.get("/api/v1/whoami", headers=bearer(t.key))
    assert r.status_code == 200 and int(r.headers["ratelimit-limit"]) >= 1000


async def test_counters_are_in_redis(settings: Settings, app_db: Database) -> None:
    s = limited(settings, rate_limit_default="10/minute")
    t = await make_tenant(app_db)
    async with running(create_app(s)) as (c,):
        await c.get("/api/v1/whoami", headers=bearer(t.key))
    r = aioredis.from_url(settings.redis_url)
    try:
        keys = [k async for k in r.scan_iter(match=f"*{t.key_id}*")]
        assert keys, "no rate-limit counter for the key in Redis"
    finally:
        await r.aclose()


async def test_hit_reads_keys_in_its_round_trip_and_none_when_refused(settings: Settings) -> None:
    from appliance.auth.principal import Principal
    from appliance.ratelimit import RateLimited

    limiter = Limiter(
        limited(
            settings,
            rate_limit_search="2/minute",
            tenant_rate_limit_search="none",
            rate_limit_default="none",
            tenant_rate_limit_default="none",
        )
    )
    principal = Principal(uuid.uuid4(), "apl_test", "viewer", uuid.uuid4(), "t")
    present, missing = f"appliance:test:read:{uuid.uuid4()}", f"appliance:test:read:{uuid.uuid4()}"
    try:
        await limiter.redis.set(present, b"\x00value", ex=60)
        window, values = await limiter.hit(principal, "search", [present, missing])
        assert window is not None and window.limit == 2 and window.remaining == 1
        assert values == [b"\x00value", None]
        window, values = await limiter.hit(principal, "search")
        assert window is not None and window.remaining == 0 and values == []
        with pytest.raises(RateLimited):
            await limiter.hit(principal, "search", [present])
        # No limit for the class: no round trip, nothing read (the route reads for itself).
        assert await limiter.hit(principal, "default", [present]) == (None, None)
    finally:
        await limiter.redis.delete(present)
        await limiter.aclose()
