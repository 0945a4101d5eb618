"""`appliance keys rotate-master | status`: the master key (KEK) and the tenants' data keys."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from appliance.cli._common import console, fail, print_json
from appliance.cli._db import run_in_transaction
from appliance.keys.kek import KeyProviderError
from appliance.keys.keyring import NEXT, Keyring, UnknownKek
from appliance.keys.rotation import rotate_master_key
from appliance.settings import get_settings


def _keyring() -> Keyring:
    settings = get_settings()
    try:
        return Keyring.from_settings(settings)
    except (UnknownKek, KeyProviderError, OSError) as exc:
        fail(f"cannot load the master key: {exc}")


def rotate_master(batch_size: int = typer.Option(100, "--batch-size", min=1)) -> None:
    """Rewrap every tenant data key under a new master key (resumable; data is not re-encrypted)."""
    from appliance.audit import service as audit
    from appliance.runtime.home import identity_for

    settings = get_settings()
    keyring = _keyring()
    if keyring.passphrase_mode:
        fail("the master key comes from a passphrase: rotating it to a new passphrase is not supported yet")
    ident = identity_for(settings)
    engine = create_engine(settings.owner_database_url, pool_size=1)
    try:
        with Progress(
            TextColumn("rewrapping data keys"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        ) as bar:
            task = bar.add_task("rewrap", total=None)

            def progress(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            result = rotate_master_key(
                engine.connect, keyring, chown=ident.chown, progress=progress, batch_size=batch_size
            )
    except OperationalError as exc:
        fail(
            f"cannot reach Postgres at {settings.pg_host}:{settings.pg_port}: {str(exc.orig).splitlines()[0]}"
        )
    except (KeyProviderError, UnknownKek, RuntimeError) as exc:
        fail(f"rotation stopped (run it again to resume): {exc}")
    finally:
        engine.dispose()

    async def record(session):  # type: ignore[no-untyped-def]
        audit.record(
            session,
            "key.rotate_master",
            tenant_id=None,
            resource_type="master_key",
            resource_id=result.new_kek_id,
            details={
                "old_kek_id": result.old_kek_id,
                "rewrapped": result.rewrapped,
                "already_done": result.already_done,
            },
        )

    run_in_transaction(record, owner=True)
    console.print(
        f"master key rotated: {result.old_kek_id} → {result.new_kek_id} "
        f"({result.rewrapped} data keys rewrapped, {result.already_done} already done). "
        f"The old key is kept as master.key.retired-{result.old_kek_id}: delete it once no "
        "backup made before now needs restoring."
    )


def status(as_json: bool = typer.Option(False, "--json")) -> None:
    """The current master key id, the key files present and how many data keys each wraps."""
    settings = get_settings()
    keyring = _keyring()
    engine = create_engine(settings.owner_database_url, pool_size=1)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT kek_id, count(*) FROM tenant_keys GROUP BY kek_id")).all()
    except OperationalError as exc:
        fail(
            f"cannot reach Postgres at {settings.pg_host}:{settings.pg_port}: {str(exc.orig).splitlines()[0]}"
        )
    finally:
        engine.dispose()
    by_kek = {k: int(n) for k, n in rows}
    report = {
        "current_kek_id": keyring.current.key_id,
        "key_files": sorted(p.name for p in Path(keyring.directory).glob("master.key*")),
        "known_kek_ids": keyring.key_ids(),
        "data_keys_by_kek": by_kek,
        "rotation_in_progress": (keyring.directory / NEXT).exists(),
        "unreadable_data_keys": sum(n for k, n in by_kek.items() if k not in keyring.key_ids()),
    }
    if as_json:
        print_json(report)
    else:
        for name, value in report.items():
            console.print(f"{name}: {value}", highlight=False)
    if report["unreadable_data_keys"]:
        raise typer.Exit(1)
