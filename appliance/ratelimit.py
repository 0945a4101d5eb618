"""Rate limits and concurrency quotas, kept in Redis so they hold across API processes and restarts.

Rate limits (the `limits` library, sliding-window counters in Redis) apply per API key and per tenant,
by route class: every authenticated request passes `enforce()` once, right after authentication
(appliance.auth.deps), so a new route is limited (as `default`) without having to ask for it.

Concurrency quotas bound how many uploads and generations (answers, chat completions) one tenant has
in flight. A slot is a member of a Redis sorted set scored by its lease's expiry; the holder renews it
while the request runs, so a slot of a process that died (kill -9) frees itself within `quota_lease_s`.

Redis unreachable: both fail **open** (docs/security.md says why): the request goes on without
limit headers, a warning is logged at most every 30 s per process, and a metric counts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

import redis.asyncio as aioredis
from fastapi import Request
from limits import RateLimitItem, parse_many
from limits.aio.storage import RedisStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.errors import StorageError
from redis.exceptions import RedisError

from appliance import metrics
from appliance.auth.principal import Principal
from appliance.errors import AppError
from appliance.logs import get_logger
from appliance.settings import Settings

log = get_logger("appliance.ratelimit")

RouteClass = Literal["upload", "search", "answers", "openai", "default"]
ROUTE_CLASSES: tuple[RouteClass, ...] = ("upload", "search", "answers", "openai", "default")

# The request paths of the classes other than `default` (the request's path, not the route template:
# FastAPI's included routes do not carry their prefix). tests/api/test_rate_limits.py checks that each
# class matches routes of the app.
UPLOAD_PATH_RE = re.compile(r"^/api/v1/documents(/[^/]+/versions)?/?$")
CLASSIFIED_PATHS: tuple[tuple[str | None, re.Pattern[str], RouteClass], ...] = (
    ("POST", UPLOAD_PATH_RE, "upload"),
    ("POST", re.compile(r"^/api/v1/search/?$"), "search"),
    ("POST", re.compile(r"^/api/v1/answers/?$"), "answers"),
    (None, re.compile(r"^/v1/"), "openai"),  # every method
)

KEY_PREFIX = "appliance:rl"
QUOTA_KEY_PREFIX = "appliance:quota"
FAIL_OPEN_S = 5.0  # after a Redis error, skip it for this long instead of timing out on every request
_WARN_EVERY_S = 30.0


def route_class(method: str, path: str) -> RouteClass:
    for wanted, pattern, cls in CLASSIFIED_PATHS:
        if (wanted is None or wanted == method.upper()) and pattern.match(path):
            return cls
    return "default"


def parse_limit(value: str) -> list[RateLimitItem]:
    """`limits` notation ("600/minute", "10/second;1000/hour"); empty or "none": no limit."""
    value = value.strip()
    if not value or value.lower() in ("none", "off", "0"):
        return []
    return parse_many(value)


class RateLimited(AppError):
    status = 429
    code = "rate_limited"
    title = "Too many requests"


class ConcurrencyQuotaExceeded(AppError):
    status = 429
    code = "concurrency_quota_exceeded"
    title = "Too many requests in flight"


@dataclass(frozen=True)
class Window:
    """The tightest of the limits a request was counted against: what the RateLimit-* headers show."""

    limit: int
    remaining: int
    reset_s: int

    def headers(self) -> dict[str, str]:
        return {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(self.reset_s),
        }


_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""


class Limiter:
    """One per API process (app.state.limiter). Stateless but for the fail-open timer: the counts
    live in Redis."""

    def __init__(self, settings: Settings) -> None:
        self.enabled = settings.rate_limits_enabled
        self.lease_ms = int(settings.quota_lease_s * 1000)
        self.per_key = {c: parse_limit(getattr(settings, f"rate_limit_{c}")) for c in ROUTE_CLASSES}
        self.per_tenant = {c: parse_limit(getattr(settings, f"tenant_rate_limit_{c}")) for c in ROUTE_CLASSES}
        self.quotas = {
            "uploads": settings.tenant_max_concurrent_uploads,
            "generations": settings.tenant_max_concurrent_generations,
        }
        self.redis = aioredis.from_url(
            settings.redis_url, socket_timeout=0.5, socket_connect_timeout=0.5, health_check_interval=30
        )
        storage = RedisStorage(
            f"async+{settings.redis_url}",
            implementation="redispy",
            wrap_exceptions=True,
            key_prefix=KEY_PREFIX,
            connection_pool=self.redis.connection_pool,  # type: ignore[arg-type]
        )
        self.strategy = SlidingWindowCounterRateLimiter(storage)
        self._acquire = self.redis.register_script(_ACQUIRE)
        self._renew = self.redis.register_script(_RENEW)
        self._down_until = 0.0
        self._warned_at = 0.0

    async def aclose(self) -> None:
        await self.redis.aclose()

    # Fail open ---------------------------------------------------------------------------------
    def _available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _storage_failed(self, what: str, exc: BaseException) -> None:
        now = time.monotonic()
        self._down_until = now + FAIL_OPEN_S
        metrics.RATE_LIMIT_STORAGE_ERRORS.labels(what).inc()
        if now - self._warned_at >= _WARN_EVERY_S:
            self._warned_at = now
            log.warning("rate-limit store unreachable: failing open", what=what, error=type(exc).__name__)

    # Rate limits -------------------------------------------------------------------------------
    async def hit(self, principal: Principal, cls: RouteClass) -> Window | None:
        """Count one request against the key's and the tenant's limits of `cls`.

        Returns the tightest window (for the headers), None when nothing applies or Redis is down;
        raises RateLimited when a limit is spent."""
        if not self.enabled or not self._available():
            return None
        checks: list[tuple[str, RateLimitItem, str]] = [
            ("key", item, f"key:{principal.key_id}") for item in self.per_key[cls]
        ]
        if principal.tenant_id is not None:
            checks += [("tenant", item, f"tenant:{principal.tenant_id}") for item in self.per_tenant[cls]]
        tightest: Window | None = None
        try:
            for scope, item, ident in checks:
                allowed = await self.strategy.hit(item, ident, cls)
                stats = await self.strategy.get_window_stats(item, ident, cls)
                reset_s = max(0, math.ceil(stats.reset_time - time.time()))
                window = Window(item.amount, stats.remaining, reset_s)
                if not allowed:
                    metrics.RATE_LIMITED.labels(cls, scope).inc()
                    retry = max(1, reset_s)
                    raise RateLimited(
                        f"The {scope} rate limit for {cls} requests ({item}) is spent; retry in {retry} s.",
                        headers={**Window(item.amount, 0, retry).headers(), "Retry-After": str(retry)},
                        extra={"limit_scope": scope, "route_class": cls},
                    )
                if tightest is None or window.remaining < tightest.remaining:
                    tightest = window
        except (StorageError, RedisError, OSError) as exc:
            self._storage_failed("rate_limit", exc)
            return None
        return tightest

    # Concurrency quotas ------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def slot(
        self, kind: Literal["uploads", "generations"], tenant_id: uuid.UUID | None
    ) -> AsyncIterator[None]:
        """Hold one of the tenant's `kind` slots for the body of the block; 429 when all are taken."""
        limit = self.quotas[kind]
        if not self.enabled or limit <= 0 or tenant_id is None or not self._available():
            yield
            return
        key, token = f"{QUOTA_KEY_PREFIX}:{kind}:{tenant_id}", uuid.uuid4().hex
        try:
            got = await self._acquire(keys=[key], args=[token, limit, self.lease_ms])
        except (RedisError, OSError) as exc:
            self._storage_failed("quota", exc)
            got = None
        if got is None:  # fail open
            yield
            return
        if not got:
            metrics.RATE_LIMITED.labels(kind, "concurrency").inc()
            raise ConcurrencyQuotaExceeded(
                f"This tenant already has {limit} {kind} in flight; retry when one has finished.",
                headers={"Retry-After": "5"},
                extra={"quota": kind, "limit": limit},
            )
        renewer = asyncio.create_task(self._keep(key, token))
        try:
            yield
        finally:
            renewer.cancel()
            with contextlib.suppress(RedisError, OSError):
                await self.redis.zrem(key, token)

    async def _keep(self, key: str, token: str) -> None:
        while True:
            await asyncio.sleep(self.lease_ms / 3000)
            with contextlib.suppress(RedisError, OSError):
                await self._renew(keys=[key], args=[token, self.lease_ms])


def limiter_of(request: Request) -> Limiter | None:
    limiter: Limiter | None = getattr(request.app.state, "limiter", None)
    return limiter


async def enforce(request: Request, principal: Principal) -> None:
    """Called once per authenticated request: count it, and show the window on the response
    (RequestContextMiddleware adds `rate_limit_headers` from the request state)."""
    limiter = limiter_of(request)
    if limiter is None:
        return
    cls = route_class(request.method, request.url.path)
    window = await limiter.hit(principal, cls)
    if window is not None:
        request.state.rate_limit_headers = window.headers()
