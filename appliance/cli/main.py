"""The `appliance` command: one typer app, one sub-app per area."""

from __future__ import annotations

import typer

from appliance.cli import models as models_cli

app = typer.Typer(
    name="appliance",
    help="Install, run and administer the document-AI appliance.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(models_cli.app, name="models", help="List, verify and build the GGUF models in models/.")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
