from __future__ import annotations

import typer

from appliance.cli._common import console, fail
from appliance.db.migrations import upgrade_head
from appliance.settings import get_settings

app = typer.Typer(no_args_is_help=True)


@app.command("upgrade")
def upgrade(
    bootstrap: bool = typer.Option(
        False,
        "--bootstrap",
        help="First create the roles, database and extensions as the Postgres superuser "
        "(external Postgres, e.g. the compose stack). `appliance up` does this itself.",
    ),
) -> None:
    """Run the migrations to the newest schema, as the owner role."""
    from sqlalchemy.exc import OperationalError

    from appliance.runtime import RuntimeFailure, bootstrap_database

    settings = get_settings()
    try:
        if bootstrap:
            bootstrap_database(settings)
        upgrade_head(settings)
    except RuntimeFailure as exc:
        fail(str(exc))
    except OperationalError as exc:
        first = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        fail(f"cannot reach Postgres at {settings.pg_host}:{settings.pg_port}: {first}")
    console.print("database schema is up to date")
