"""First-run bootstrap: the system-admin key, created once and shown once."""

from __future__ import annotations

import asyncio
import getpass

from appliance.auth import service as auth
from appliance.context import Actor, actor_var
from appliance.db.engine import Database
from appliance.settings import Settings


async def _ensure(settings: Settings) -> str | None:
    # System-admin keys have no tenant, so row-level security hides them from the application role:
    # they are created as the owner, which only the CLI and `appliance up` hold credentials for.
    db = Database(settings.owner_database_url, pool_size=1)
    token = actor_var.set(Actor("system", "bootstrap"))
    try:
        async with db.transaction() as session:
            if await auth.system_admin_exists(session):
                return None
            _, plaintext = await auth.create_key(
                session, tenant_id=None, name="bootstrap", role="system_admin"
            )
            return plaintext
    finally:
        actor_var.reset(token)
        await db.dispose()


def ensure_bootstrap(settings: Settings) -> str | None:
    """Create a system-admin key if no valid one exists; return its plaintext (once) or None."""
    return asyncio.run(_ensure(settings))


def cli_actor() -> Actor:
    try:
        user = getpass.getuser()
    except Exception:
        user = "unknown"
    return Actor("cli", user, f"cli:{user}")
