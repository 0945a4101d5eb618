"""Alembic environment: migrations run as the owner role, never as the application role."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

from appliance.db import models  # noqa: F401  (fills Base.metadata)
from appliance.db.base import Base
from appliance.settings import Settings, get_settings

config = context.config
settings: Settings = config.attributes.get("settings") or get_settings()
target_metadata = Base.metadata


def run_migrations_offline() -> None:
    context.configure(url=settings.owner_database_url, target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_engine(settings.owner_database_url, poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            transaction_per_migration=True,
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
