"""The `appliance` command: one typer app, one sub-app per area."""

from __future__ import annotations

import sys

import typer
from pydantic import ValidationError

from appliance.cli import audit as audit_cli
from appliance.cli import backup as backup_cli
from appliance.cli import bundle as bundle_cli
from appliance.cli import db as db_cli
from appliance.cli import ingest as ingest_cli
from appliance.cli import jobs as jobs_cli
from appliance.cli import keys as keys_cli
from appliance.cli import models as models_cli
from appliance.cli import reindex as reindex_cli
from appliance.cli import server as server_cli
from appliance.cli import tenants as tenants_cli
from appliance.cli._common import err_console
from appliance.settings import Settings, invalid_settings_line

app = typer.Typer(
    name="appliance",
    help="Install, run and administer the document-AI appliance.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(models_cli.app, name="models", help="List, verify and build the GGUF models in models/.")
app.add_typer(tenants_cli.app, name="tenants", help="Create and list tenants.")
app.add_typer(keys_cli.app, name="keys", help="Create, list and revoke API keys.")
app.add_typer(audit_cli.app, name="audit", help="Verify, checkpoint and export the audit trail.")
app.add_typer(db_cli.app, name="db", help="Database schema migrations.")
app.add_typer(jobs_cli.app, name="jobs", help="List, show and retry background jobs.")
app.add_typer(backup_cli.app, name="backup", help="Create, verify, list and prune encrypted backups.")
app.add_typer(bundle_cli.app, name="bundle", help="Build and verify the signed offline bundle.")

app.command("up")(server_cli.up)
app.command("down")(server_cli.down)
app.command("status")(server_cli.status)
app.command("ingest")(ingest_cli.ingest)
app.command("reindex")(reindex_cli.reindex)
app.command("restore")(backup_cli.restore)


def main() -> None:
    """The `appliance` command. A setting that does not validate (environment or appliance.env) is one
    line and exit 1 in every command, wherever the command first reads the settings."""
    try:
        app()
    except ValidationError as exc:
        if exc.title != Settings.__name__:
            raise
        err_console.print(
            f"[bold red]error:[/] {invalid_settings_line(exc)}", highlight=False, soft_wrap=True
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
