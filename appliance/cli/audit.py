from __future__ import annotations

import typer
from sqlalchemy import create_engine
from sqlalchemy.exc import OperationalError

from appliance.audit.service import verify_database
from appliance.cli._common import console, fail, print_json
from appliance.settings import get_settings

app = typer.Typer(no_args_is_help=True)


@app.command("verify")
def verify(as_json: bool = typer.Option(False, "--json")) -> None:
    """Recompute the audit hash chain and report the first broken link."""
    settings = get_settings()
    engine = create_engine(settings.owner_database_url)
    try:
        with engine.connect() as conn:
            result = verify_database(conn)
    except OperationalError as exc:
        fail(f"cannot reach Postgres at {settings.pg_host}:{settings.pg_port}: {exc.orig}")
    finally:
        engine.dispose()
    if as_json:
        print_json(
            {
                "ok": result.ok,
                "checked": result.checked,
                "last_seq": result.last_seq,
                "first_break": {"seq": result.first_break.seq, "problem": result.first_break.problem}
                if result.first_break
                else None,
            }
        )
        raise typer.Exit(0 if result.ok else 1)
    if result.first_break:
        fail(
            f"audit chain broken at seq {result.first_break.seq}: {result.first_break.problem} "
            f"({result.checked} events verified before it)"
        )
    console.print(f"audit chain intact: {result.checked} events, head seq {result.last_seq}")
