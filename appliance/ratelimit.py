"""Rate limits and concurrency quotas, kept in Redis so they hold across API processes and restarts.

Rate limits (sliding-window counters in Redis, the `limits` library's algorithm and notation) apply per
API key and per tenant, by route class: every authenticated request passes `enforce()` once, right
after authentication (appliance.auth.deps), so a new route is limited (as `default`) without having to
ask for it. All of a request's limits are checked and counted by one Lua script, in one round trip:
`limits`' own Redis strategy takes two per limit (hit, then the window for the headers), four per
request, which measured 0.6 ms of API time on a 15 ms search. A refused request counts against none.
The same script also reads the keys a route registered with `read_with_limit` (a search: its cache
entries), so a search makes one Redis round trip before its database work instead of two.

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
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import redis.asyncio as aioredis
from fastapi import Request
from limits import RateLimitItem, parse_many
from redis.exceptions import RedisError
from sqlalchemy.ext.asyncio import AsyncSession

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
_SLIDING_WINDOWS = """
-- KEYS: per limit, its current and previous window's counter; then the keys to read (see `hit`).
-- ARGV: now (ms), the number of limits, then per limit: amount, window (ms). Sliding-window counter:
-- the previous window's count weighted by how much of it still overlaps the sliding window, plus the
-- current one's. All limits pass, then all are counted; returns {0, i, reset_ms} when limit i refuses,
-- else {1, remaining_1, reset_1, remaining_2, ..., value of each key to read (false: none)}.
local now = tonumber(ARGV[1])
local n = tonumber(ARGV[2])
local out = {1}
for i = 1, n do
  local amount = tonumber(ARGV[2 * i + 1])
  local window = tonumber(ARGV[2 * i + 2])
  local elapsed = now % window
  local prev = tonumber(redis.call('GET', KEYS[2 * i]) or '0')
  local cur = tonumber(redis.call('GET', KEYS[2 * i - 1]) or '0')
  local used = prev * (window - elapsed) / window + cur
  if used + 1 > amount then return {0, i, window - elapsed} end
  out[2 * i] = math.floor(amount - used - 1)
  out[2 * i + 1] = window - elapsed
end
for i = 1, n do
  redis.call('INCR', KEYS[2 * i - 1])
  redis.call('PEXPIRE', KEYS[2 * i - 1], 2 * tonumber(ARGV[2 * i + 2]))
end
for k = 2 * n + 1, #KEYS do
  out[#out + 1] = redis.call('GET', KEYS[k])
end
return out
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
        self._windows = self.redis.register_script(_SLIDING_WINDOWS)
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
    async def hit(
        self, principal: Principal, cls: RouteClass, read: Sequence[str] = ()
    ) -> tuple[Window | None, list[bytes | None] | None]:
        """Count one request against the key's and the tenant's limits of `cls`.

        Returns the tightest window (for the headers; None when nothing applies or Redis is down) and
        the values of the `read` keys, read in the same round trip when a limit applies (None when
        they were not read: no limit applies, or Redis is down). Raises RateLimited when a limit is
        spent."""
        if not self.enabled or not self._available():
            return None, None
        checks: list[tuple[str, RateLimitItem, str]] = [
            ("key", item, f"key:{principal.key_id}") for item in self.per_key[cls]
        ]
        if principal.tenant_id is not None:
            checks += [("tenant", item, f"tenant:{principal.tenant_id}") for item in self.per_tenant[cls]]
        if not checks:
            return None, None
        now_ms = int(time.time() * 1000)
        keys: list[str] = []
        args: list[int] = [now_ms, len(checks)]
        for _, item, ident in checks:
            window_ms = item.get_expiry() * 1000
            index = now_ms // window_ms
            base = f"{KEY_PREFIX}:{cls}:{ident}:{item.amount}/{window_ms}"
            keys += [f"{base}:{index}", f"{base}:{index - 1}"]
            args += [item.amount, window_ms]
        try:
            reply = await self._windows(keys=[*keys, *read], args=args)
        except (RedisError, OSError) as exc:
            self._storage_failed("rate_limit", exc)
            return None, None
        if not reply[0]:
            scope, item, _ = checks[int(reply[1]) - 1]
            metrics.RATE_LIMITED.labels(cls, scope).inc()
            retry = max(1, math.ceil(int(reply[2]) / 1000))
            raise RateLimited(
                f"The {scope} rate limit for {cls} requests ({item}) is spent; retry in {retry} s.",
                headers={**Window(item.amount, 0, retry).headers(), "Retry-After": str(retry)},
                extra={"limit_scope": scope, "route_class": cls},
            )
        windows = [
            Window(item.amount, max(0, int(reply[1 + 2 * i])), math.ceil(int(reply[2 + 2 * i]) / 1000))
            for i, (_, item, _) in enumerate(checks)
        ]
        values = reply[1 + 2 * len(checks) :]
        return min(windows, key=lambda w: w.remaining), [v if isinstance(v, bytes) else None for v in values]

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


ReadKeys = Callable[[Request, Principal, AsyncSession | None], Awaitable[list[str]]]
_reads: dict[RouteClass, ReadKeys] = {}


def read_with_limit(cls: RouteClass, keys: ReadKeys) -> None:
    """Register `keys(request, principal, session)`: the Redis keys a request of class `cls` will read
    first (a search: its cache entries). `enforce` reads them in the rate limit's round trip and
    leaves them in `request.state.redis_reads` (key -> value); the route reads what is not there."""
    _reads[cls] = keys


async def enforce(request: Request, principal: Principal, session: AsyncSession | None = None) -> None:
    """Called once per authenticated request: count it, and show the window on the response
    (RequestContextMiddleware adds `rate_limit_headers` from the request state). `session`: the
    request's transaction, when it authenticated in it (for `read_with_limit`'s keys)."""
    limiter = limiter_of(request)
    if limiter is None:
        return
    cls = route_class(request.method, request.url.path)
    reads = _reads.get(cls) if limiter.enabled else None
    keys = await reads(request, principal, session) if reads is not None else []
    window, values = await limiter.hit(principal, cls, keys)
    if window is not None:
        request.state.rate_limit_headers = window.headers()
    if keys and values is not None:
        request.state.redis_reads = dict(zip(keys, values, strict=True))
