"""Liveness and readiness. `/readyz` checks every dependency a request may need."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy import text

from appliance import metrics
from appliance.settings import Settings

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process answers.")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


async def _check_postgres(request: Request) -> dict[str, Any]:
    async with request.app.state.db.engine.connect() as conn:
        version = (
            await conn.execute(text("SELECT extversion FROM pg_extension WHERE extname = 'vector'"))
        ).scalar()
    if not version:
        return {"ok": False, "detail": "pgvector extension missing"}
    return {"ok": True, "detail": f"pgvector {version}"}


async def _check_redis(request: Request) -> dict[str, Any]:
    await request.app.state.redis.ping()
    return {"ok": True}


def _check_objects(request: Request) -> dict[str, Any]:
    store = request.app.state.store
    store.check()
    return {"ok": True, "detail": store.name}


def _check_models(settings: Settings) -> dict[str, Any]:
    from appliance.inference.manifest import load_manifest, verify_model

    problems = []
    for spec in load_manifest(settings.models_dir):
        check = verify_model(spec, settings.models_dir, full=False)
        if not check.ok:
            problems.append(f"{spec.name}: {check.reason}")
    return {"ok": not problems, "detail": "; ".join(problems) or "all present"}


async def _check_llm(request: Request) -> dict[str, Any]:
    llm = getattr(request.app.state, "llm", None)
    if llm is None:
        return {"ok": False, "detail": "no chat model configured"}
    problem = await llm.ready()
    return {"ok": problem is None, "detail": problem or f"{llm.model} at {llm.base_url}"}


# Without the LLM the appliance still ingests, searches and serves documents: its check is reported
# (and marks the status "degraded") but does not take the instance out of a load balancer.
OPTIONAL_CHECKS = ("llm",)


@router.get("/readyz", summary="Readiness: Postgres, Redis, object store and model files (and the LLM).")
async def readyz(request: Request) -> JSONResponse:
    settings: Settings = request.app.state.settings
    checks: dict[str, dict[str, Any]] = {}

    async def run(name: str, coro: Any) -> None:
        try:
            checks[name] = await asyncio.wait_for(coro, timeout=3)
        except Exception as exc:  # readiness reports every failure, it never raises
            checks[name] = {"ok": False, "detail": f"{type(exc).__name__}: {exc}"[:300]}

    await asyncio.gather(
        run("postgres", _check_postgres(request)),
        run("redis", _check_redis(request)),
        run("object_store", asyncio.to_thread(_check_objects, request)),
        run("models", asyncio.to_thread(_check_models, settings)),
        run("llm", _check_llm(request)),
    )
    ready = all(c["ok"] for name, c in checks.items() if name not in OPTIONAL_CHECKS)
    degraded = ready and not all(c["ok"] for c in checks.values())
    status = "degraded" if degraded else "ready" if ready else "not_ready"
    return JSONResponse({"status": status, "checks": checks}, status_code=200 if ready else 503)


@router.get("/metrics", summary="Prometheus metrics.", include_in_schema=False)
async def prometheus_metrics(request: Request) -> Response:
    body, content_type = await asyncio.to_thread(metrics.render, request.app.state.settings.redis_url)
    return Response(body, media_type=content_type, headers={"Cache-Control": "no-store"})
