"""The API: app factory, middleware (request id, access log, metrics), errors as problem+json."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import redis.asyncio as aioredis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from appliance import __version__, metrics
from appliance.answers.routes import router as answers_router
from appliance.audit.routes import router as audit_router
from appliance.auth.routes import router as auth_router
from appliance.auth.service import AuthFailure
from appliance.context import actor_var, client_addr_var, request_id_var
from appliance.db.engine import Database
from appliance.documents.routes import router as documents_router
from appliance.documents.service import Services
from appliance.documents.signing import UrlSigner
from appliance.edges import EdgeLimitsMiddleware
from appliance.enrich.routes import router as enrich_router
from appliance.errors import PROBLEM_MEDIA_TYPE, AppError, problem_body
from appliance.health.routes import router as health_router
from appliance.inference.llm import LLMClient
from appliance.jobs.routes import router as jobs_router
from appliance.keys.envelope import BlobIntegrityError
from appliance.keys.keyring import Keyring
from appliance.keys.service import TenantKeyDestroyed
from appliance.logs import configure_logging, get_logger
from appliance.openai_compat import router as openai_router
from appliance.ratelimit import Limiter
from appliance.search.routes import router as search_router
from appliance.search.service import SearchServices, search_server_settings
from appliance.settings import Settings, get_settings
from appliance.storage.base import ObjectNotFound, StorageError
from appliance.storage.factory import build_store
from appliance.tenants.routes import router as tenants_router

log = get_logger("appliance.api")
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class RequestContextMiddleware:
    """Pure ASGI (streams pass through untouched): request id in and out, access log, metrics."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        incoming = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if REQUEST_ID_RE.match(incoming) else uuid.uuid4().hex
        client = scope.get("client")
        tokens = (
            request_id_var.set(request_id),
            client_addr_var.set(client[0] if client else None),
            actor_var.set(None),
        )
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status_code = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status_code
            if message["type"] == "http.response.start":
                status_code = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
                # RateLimit-* of a limited route's successful response (appliance.ratelimit.enforce)
                for name, value in (scope["state"].get("rate_limit_headers") or {}).items():
                    message["headers"].append((name.lower().encode(), value.encode()))
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            route_path = getattr(route, "path", "unmatched")
            metrics.HTTP_REQUESTS.labels(scope["method"], route_path, str(status_code)).inc()
            metrics.HTTP_LATENCY.labels(scope["method"], route_path).observe(elapsed)
            if route_path not in ("/healthz", "/metrics"):
                log.info(
                    "request",
                    method=scope["method"],
                    path=scope["path"],
                    status=status_code,
                    duration_ms=round(elapsed * 1000, 1),
                    request_id=request_id,
                )
            request_id_var.reset(tokens[0])
            client_addr_var.reset(tokens[1])
            actor_var.reset(tokens[2])


def _problem(
    request: Request,
    status: int,
    code: str,
    title: str,
    detail: str,
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> JSONResponse:
    body = problem_body(
        status=status,
        code=code,
        title=title,
        detail=detail,
        instance=request.url.path,
        request_id=request_id_var.get(),
        extra=extra,
    )
    return JSONResponse(body, status_code=status, media_type=PROBLEM_MEDIA_TYPE, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(AppError)
    async def app_error(request: Request, exc: AppError) -> JSONResponse:
        if isinstance(exc, AuthFailure):
            metrics.AUTH_FAILURES.labels(exc.reason).inc()
        return _problem(request, exc.status, exc.code, exc.title, exc.detail, exc.headers, exc.extra)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in exc.errors()
        ]
        return _problem(
            request,
            422,
            "validation_error",
            "Invalid request",
            "The request did not match the schema.",
            extra={"errors": errors},
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = getattr(exc, "code", None) or {404: "not_found", 405: "method_not_allowed"}.get(
            exc.status_code, f"http_{exc.status_code}"
        )
        return _problem(
            request, exc.status_code, code, str(exc.detail), str(exc.detail), headers=dict(exc.headers or {})
        )

    @app.exception_handler(BlobIntegrityError)
    async def integrity_error(request: Request, exc: BlobIntegrityError) -> JSONResponse:
        log.error("stored blob failed authentication", path=request.url.path, error=str(exc))
        return _problem(
            request,
            500,
            "blob_integrity_error",
            "Stored data failed its integrity check",
            "The stored copy of this content did not authenticate; no bytes of it were sent. "
            "Quote the request id to the administrator.",
        )

    @app.exception_handler(TenantKeyDestroyed)
    async def key_destroyed(request: Request, exc: TenantKeyDestroyed) -> JSONResponse:
        return _problem(
            request,
            410,
            "tenant_key_destroyed",
            "Data key destroyed",
            "This tenant's data key has been destroyed; its content cannot be read.",
        )

    @app.exception_handler(StorageError)
    async def storage_error(request: Request, exc: StorageError) -> JSONResponse:
        if isinstance(exc, ObjectNotFound):
            log.error("catalogued object missing from the store", path=request.url.path, error=str(exc))
        else:
            log.error("object store error", path=request.url.path, error=str(exc))
        return _problem(
            request,
            503,
            "object_store_unavailable",
            "Object store unavailable",
            "The object store could not serve this request; try again later.",
            headers={"Retry-After": "5"},
        )

    @app.exception_handler(DBAPIError)
    async def database_error(request: Request, exc: DBAPIError) -> JSONResponse:
        # Postgres restarting or unreachable (connection refused, closed, invalidated): the request
        # changed nothing (its transaction did not commit), so the client may retry.
        if isinstance(exc, OperationalError | InterfaceError) or exc.connection_invalidated:
            log.error("database unavailable", path=request.url.path, error=str(exc.orig)[:200])
            return _problem(
                request,
                503,
                "database_unavailable",
                "Database unavailable",
                "The database could not serve this request; try again shortly.",
                headers={"Retry-After": "5"},
            )
        return await unhandled(request, exc)

    @app.exception_handler(Exception)
    async def unhandled(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", path=request.url.path)
        return _problem(
            request,
            500,
            "internal_error",
            "Internal error",
            "An unexpected error occurred; quote the request id to the administrator.",
        )


def _openapi_problem_schema(app: FastAPI) -> None:
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = original()
        schema.setdefault("components", {}).setdefault("schemas", {})["Problem"] = {
            "type": "object",
            "required": ["type", "title", "status", "detail", "code"],
            "properties": {
                "type": {"type": "string"},
                "title": {"type": "string"},
                "status": {"type": "integer"},
                "detail": {"type": "string"},
                "code": {"type": "string"},
                "instance": {"type": "string"},
                "request_id": {"type": "string"},
            },
        }
        schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        _document_edge_errors(schema)
        _document_request_errors(schema)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _document_edge_errors(schema: dict[str, Any]) -> None:
    """Errors any route may answer without declaring them: 429 on every authenticated route (rate
    limits, appliance.ratelimit) and 413 on every route with a body (appliance.edges)."""
    problem = {
        PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}},
    }
    for item in schema.get("paths", {}).values():
        for op in item.values():
            if not isinstance(op, dict) or "responses" not in op:
                continue
            responses = op["responses"]
            if "401" in responses:
                responses.setdefault("429", {"description": "Rate limit or quota spent", "content": problem})
            if "requestBody" in op:
                responses.setdefault("413", {"description": "Request body too large", "content": problem})


def _document_request_errors(schema: dict[str, Any]) -> None:
    """What the error handlers really send for a request FastAPI rejects before the route runs
    (tests/security/test_fuzz.py holds every response to the schema): 422 as problem+json with the
    validation `errors` (FastAPI declares its own application/json body), and 400 on every route
    with a body, for bytes that cannot be parsed at all (e.g. a JSON body that is not UTF-8)."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components["ValidationProblem"] = {
        "allOf": [
            {"$ref": "#/components/schemas/Problem"},
            {
                "type": "object",
                "properties": {
                    "errors": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "loc": {"type": "array", "items": {}},
                                "msg": {"type": ["string", "null"]},
                                "type": {"type": ["string", "null"]},
                            },
                        },
                    }
                },
            },
        ]
    }
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    for item in schema.get("paths", {}).values():
        for op in item.values():
            if not isinstance(op, dict) or "responses" not in op:
                continue
            responses = op["responses"]
            if "422" in responses:
                responses["422"] = {
                    "description": "The request did not match the schema (or a value was refused)",
                    "content": {
                        PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/ValidationProblem"}}
                    },
                }
            if "requestBody" in op:
                responses.setdefault(
                    "400",
                    {
                        "description": "The body could not be parsed",
                        "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
                    },
                )


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings.log_level, json=settings.log_json)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.db = Database(
            settings.app_database_url,
            pool_size=settings.db_pool_size,
            server_settings=search_server_settings(settings),
        )
        app.state.redis = aioredis.from_url(settings.redis_url, socket_timeout=5, health_check_interval=30)
        app.state.store = build_store(settings)
        app.state.keyring = Keyring.from_settings(settings)
        app.state.url_signer = UrlSigner.from_file(settings.url_signing_key_path)
        app.state.documents = Services(
            settings=settings, db=app.state.db, keyring=app.state.keyring, store=app.state.store
        )
        app.state.search = SearchServices(settings=settings, keyring=app.state.keyring, redis=app.state.redis)
        app.state.limiter = Limiter(settings)
        try:
            app.state.llm = LLMClient.from_settings(settings)
        except LookupError:  # no chat model in the manifest: answers and chat report llm_unavailable
            app.state.llm = None
        try:
            yield
        finally:
            if app.state.llm is not None:
                await app.state.llm.aclose()
            await app.state.limiter.aclose()
            await app.state.redis.aclose()
            await app.state.db.dispose()

    app = FastAPI(
        title="Document-AI appliance",
        version=__version__,
        lifespan=lifespan,
        docs_url="/docs",
        openapi_url="/openapi.json",
    )
    app.state.settings = settings
    install_error_handlers(app)
    app.include_router(health_router)
    api_prefix = "/api/v1"
    app.include_router(auth_router, prefix=api_prefix)
    app.include_router(tenants_router, prefix=api_prefix)
    app.include_router(documents_router, prefix=api_prefix)
    app.include_router(jobs_router, prefix=api_prefix)
    app.include_router(enrich_router, prefix=api_prefix)
    app.include_router(search_router, prefix=api_prefix)
    app.include_router(answers_router, prefix=api_prefix)
    app.include_router(audit_router, prefix=api_prefix)
    app.include_router(openai_router, prefix="/v1")
    _openapi_problem_schema(app)
    # Outermost last: request id and access log, then CORS (so error responses carry it too), then edges.
    app.add_middleware(
        EdgeLimitsMiddleware,
        max_json_body_bytes=settings.max_json_body_bytes,
        max_header_bytes=settings.max_header_bytes,
        body_timeout_s=settings.request_body_timeout_s,
    )
    if settings.cors_origins:  # off unless configured: no CORS header at all
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "X-Request-Id", "X-Filename"],
            expose_headers=[
                "X-Request-Id",
                "Retry-After",
                "RateLimit-Limit",
                "RateLimit-Remaining",
                "RateLimit-Reset",
                "Location",
            ],
            max_age=600,
        )
    app.add_middleware(RequestContextMiddleware)
    return app
