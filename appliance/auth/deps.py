"""FastAPI dependencies: the request's transaction and the authenticated principal."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Annotated, Any, Literal

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession

from appliance.auth.principal import Principal
from appliance.auth.service import AuthFailure, authenticate, record_auth_failure, record_denial
from appliance.context import Actor, actor_var
from appliance.db.engine import Database
from appliance.errors import Forbidden
from appliance.ratelimit import enforce, limiter_of


def get_db(request: Request) -> Database:
    db: Database = request.app.state.db
    return db


async def _principal(request: Request) -> Principal:
    """Authenticate in a short transaction of its own (it commits the key's last use), unless the
    request's transaction has authenticated already (`_session` listed first)."""
    principal: Principal | None = getattr(request.state, "principal", None)
    if principal is not None:
        return principal
    db = get_db(request)
    try:
        async with db.transaction() as session:
            principal = await authenticate(session, request.headers.get("authorization"))
    except AuthFailure as failure:
        await record_auth_failure(db, failure)
        raise
    await _admit(request, principal)
    return principal


async def _admit(request: Request, principal: Principal, session: AsyncSession | None = None) -> None:
    actor_var.set(Actor("api_key", str(principal.key_id), principal.key_prefix))
    request.state.principal = principal
    # The one place rate limits are applied (appliance.ratelimit).
    await enforce(request, principal, session)


async def _session(request: Request) -> AsyncIterator[AsyncSession]:
    """The request's unit of work: one transaction scoped to the caller's tenant, committed before
    the response is sent (scope="function"). Uploads stream outside it and open their own.

    When it runs before anything else authenticated the request (a route lists its session first), it
    authenticates inside this transaction: one statement instead of a transaction of its own."""
    principal: Principal | None = getattr(request.state, "principal", None)
    db = get_db(request)
    authenticated = principal is not None
    try:
        async with db.transaction(tenant_id=principal.tenant_id if principal else None) as session:
            if principal is None:
                principal = await authenticate(session, request.headers.get("authorization"))
                await _admit(request, principal, session)
                authenticated = True
            yield session
    except AuthFailure as failure:
        if authenticated:
            raise  # raised by the route, not by authentication
        await record_auth_failure(db, failure)
        raise


SessionDep = Annotated[AsyncSession, Depends(_session, scope="function")]


def _concurrency_slot(kind: Literal["uploads", "generations"]) -> Callable[..., AsyncIterator[None]]:
    """Hold one of the tenant's `kind` slots (appliance.ratelimit) until the response has been sent,
    streams included (the default dependency scope ends after the response)."""

    async def dep(
        request: Request, principal: Annotated[Principal, Depends(_principal)]
    ) -> AsyncIterator[None]:
        limiter = limiter_of(request)
        if limiter is None:
            yield
            return
        async with limiter.slot(kind, principal.tenant_id):
            yield

    return dep


UploadSlot: Any = Depends(_concurrency_slot("uploads"))
GenerationSlot: Any = Depends(_concurrency_slot("generations"))


def require(
    minimum_role: str | None = None, *, system_admin: bool = False, allow_system_admin: bool = False
) -> Callable[..., Coroutine[Any, Any, Principal]]:
    """A dependency that authenticates and checks the role.

    `system_admin=True`: only system-admin keys. Otherwise a tenant role of at least `minimum_role`,
    and system admins too when `allow_system_admin` (for routes that take an explicit tenant).
    """

    def check(principal: Principal) -> Forbidden | None:
        if system_admin:
            if not principal.is_system_admin:
                return Forbidden("This operation needs a system-admin key.", code="system_admin_required")
            return None
        if principal.is_system_admin:
            if allow_system_admin:
                return None
            return Forbidden(
                "System-admin keys hold no tenant role; use a tenant key.", code="tenant_key_required"
            )
        if minimum_role and not principal.has_role(minimum_role):
            return Forbidden(
                f"This operation needs the {minimum_role!r} role or higher.", code="role_required"
            )
        return None

    async def dep(request: Request, principal: Annotated[Principal, Depends(_principal)]) -> Principal:
        denied = check(principal)
        if denied is not None:
            await record_denial(get_db(request), principal, denied.code, request.url.path)
            raise denied
        return principal

    return dep


AnyPrincipal = Annotated[Principal, Depends(require(None, allow_system_admin=True))]
SystemAdmin = Annotated[Principal, Depends(require(system_admin=True))]
TenantAdmin = Annotated[Principal, Depends(require("admin"))]
TenantAdminOrSystem = Annotated[Principal, Depends(require("admin", allow_system_admin=True))]
Viewer = Annotated[Principal, Depends(require("viewer"))]
