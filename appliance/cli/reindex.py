"""`appliance reindex --model NAME | --status`: re-embed every chunk with another embedding model while
search keeps serving (see appliance.ingest.reindex)."""

from __future__ import annotations

from typing import Annotated

import typer
from sqlalchemy.ext.asyncio import AsyncSession

from appliance.cli._common import console, fail, print_json
from appliance.cli._db import run_in_transaction
from appliance.settings import get_settings


def reindex(
    model: Annotated[
        str | None, typer.Option("--model", help="The embedding model to re-index with.")
    ] = None,
    status: Annotated[
        bool, typer.Option("--status", help="Show the active/target model and what is left.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Re-embed every document with another embedding model, without downtime for search.

    Jobs run on the workers (queue "maintenance"); search queries both models until the last chunk is
    done, then switches. Running it again picks up anything left (it is idempotent)."""
    from appliance.ingest import reindex as rx

    settings = get_settings()
    if (model is None) == (not status):
        fail("give either --model NAME or --status")
    if status:

        async def show(session: AsyncSession) -> dict[str, object]:
            return await rx.progress(session, settings)

        info = run_in_transaction(show)
        if as_json:
            print_json(info)
        elif info.get("target_model"):
            console.print(
                f"re-indexing {info['active_model']} → {info['target_model']}: "
                f"{info['chunks_remaining']} chunk(s) left",
                highlight=False,
            )
        else:
            console.print(f"every chunk is embedded by {info['active_model']}", highlight=False)
        return

    async def go(session: AsyncSession) -> dict[str, object]:
        try:
            return await rx.start(session, settings, str(model))
        except rx.ReindexError as exc:
            fail(str(exc))

    result = run_in_transaction(go)
    if as_json:
        print_json(result)
    elif result["finished"]:
        console.print(f"nothing to re-index: every chunk is embedded by {model}", highlight=False)
    else:
        console.print(
            f"re-indexing {result['from']} → {result['to']}: "
            f"{result['versions']} document version(s) queued; search stays up and "
            "switches when the last one is done (`appliance reindex --status`)",
            highlight=False,
        )
