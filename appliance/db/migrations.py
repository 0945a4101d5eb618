"""Run Alembic from code: the one place the schema is upgraded (at `appliance up` / `db upgrade`)."""

from __future__ import annotations

from alembic import command
from alembic.config import Config

from appliance.settings import PROJECT_ROOT, Settings


def alembic_config(settings: Settings) -> Config:
    cfg = Config(str(PROJECT_ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(PROJECT_ROOT / "migrations"))
    cfg.attributes["settings"] = settings
    return cfg


def upgrade_head(settings: Settings) -> None:
    command.upgrade(alembic_config(settings), "head")


def downgrade(settings: Settings, revision: str) -> None:
    command.downgrade(alembic_config(settings), revision)
