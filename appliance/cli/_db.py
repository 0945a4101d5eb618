"""Run service code from the CLI: one transaction, the CLI as the audited actor, readable errors."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncSession

from appliance.bootstrap import cli_actor
from appliance.cli._common import fail
from appliance.context import actor_var
from appliance.db.engine import Database
from appliance.errors import AppError
from appliance.settings import Settings, get_settings

T = TypeVar("T")


def run_in_transaction(
    fn: Callable[[AsyncSession], Awaitable[T]], *, owner: bool = False, settings: Settings | None = None
) -> T:
    """Run `fn(session)` in one transaction as the application role (or the owner for system work)."""
    settings = settings or get_settings()

    async def main() -> T:
        db = Database(settings.owner_database_url if owner else settings.app_database_url, pool_size=1)
        token = actor_var.set(cli_actor())
        try:
            async with db.transaction() as session:
                return await fn(session)
        finally:
            actor_var.reset(token)
            await db.dispose()

    try:
        return asyncio.run(main())
    except AppError as exc:
        fail(exc.detail)
    except OperationalError as exc:
        fail(
            f"cannot reach Postgres at {settings.pg_host}:{settings.pg_port} (is the appliance up? "
            f"`appliance status`): {str(exc.orig).strip().splitlines()[0] if exc.orig else exc}"
        )
