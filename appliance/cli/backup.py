"""`appliance backup create|verify|list|prune|keygen` and `appliance restore` (docs/backup.md)."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from sqlalchemy.ext.asyncio import AsyncSession

from appliance.backup.archive import ArchiveError, generate_identity, read_archive
from appliance.backup.create import BackupError, create_backup, resolve_destination, summary
from appliance.backup.restore import RestoreError, restore_backup, target_contents
from appliance.backup.retention import list_backups, prune
from appliance.cli._common import console, err_console, fail, print_json
from appliance.cli._db import run_in_transaction
from appliance.settings import get_settings
from appliance.storage.base import StorageError

app = typer.Typer(no_args_is_help=True)


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
    )


def _audit(action: str, resource_id: str, details: dict[str, Any]) -> None:
    from appliance.audit import service as audit

    async def work(session: AsyncSession) -> None:
        audit.record(
            session, action, tenant_id=None, resource_type="backup", resource_id=resource_id, details=details
        )

    run_in_transaction(work)


@app.command("create")
def create(
    to: Path | None = typer.Option(
        None, "--to", help="A directory (or file name) for the archive; default $home/backups."
    ),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Write one encrypted archive of the database, every blob and the wrapped data keys (while serving)."""
    settings = get_settings()
    dest = resolve_destination(settings, to, datetime.now(UTC))
    with _progress() as progress:
        task = progress.add_task("backup", total=None)

        def started(meta: dict[str, Any]) -> None:
            progress.update(task, total=meta["object_bytes"])

        try:
            result = create_backup(
                settings, dest, on_start=started, on_bytes=lambda n: progress.advance(task, n)
            )
        except (BackupError, ArchiveError, StorageError) as exc:
            fail(f"backup failed: {exc}")
        except (psycopg.Error, OSError) as exc:  # the database or the disk gave out mid-way
            fail(f"backup failed (nothing kept): {' '.join(str(exc).split())[:300]}")
    _audit(
        "backup.create",
        result.path.name,
        {"size": result.size, "objects": result.objects, "counts": result.metadata["counts"]},
    )
    mb = result.size / 1e6
    if as_json:
        print_json({"path": str(result.path), **summary(result)})
        return
    console.print(
        f"backup written: {result.path} ({mb:.1f} MB, {result.objects} objects, "
        f"{result.metadata['counts']['documents']} documents, {result.seconds:.1f} s, "
        f"{mb / max(result.seconds, 1e-9):.0f} MB/s)"
    )


@app.command("verify")
def verify(
    archive: Path = typer.Argument(..., help="The archive (.tar.age)."),
    identity: Path | None = typer.Option(
        None, "--identity", "-i", help="The backup key; default $home/keys/backup.key."
    ),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Decrypt the archive and check every member against its manifest, without restoring anything."""
    settings = get_settings()
    if not archive.is_file():
        fail(f"no archive at {archive}")
    try:
        with _progress() as progress:
            task = progress.add_task("verify", total=None)
            result = read_archive(
                archive,
                identity or settings.backup_identity_path,
                on_bytes=lambda n: progress.advance(task, n),
            )
    except ArchiveError as exc:
        fail(f"{archive.name}: {exc}")
    meta = result.metadata or {}
    objects = sum(1 for e in result.entries if e.name.startswith("objects/"))
    if as_json:
        print_json({"ok": True, "members": len(result.entries), "objects": objects, "metadata": meta})
        return
    console.print(
        f"{archive.name}: OK: {len(result.entries)} members match the manifest ({objects} objects, "
        f"{meta.get('counts', {}).get('documents')} documents, made {meta.get('created_at')})"
    )


@app.command("list")
def list_(
    directory: Path | None = typer.Option(None, "--dir", help="Default $home/backups."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """List the archives in the backup directory, newest first."""
    backups = list_backups(directory or get_settings().backups_path)
    if as_json:
        print_json(
            [
                {
                    "path": str(b.path),
                    "created_at": b.created_at.isoformat(),
                    "size": b.size,
                    "sidecar": b.sidecar,
                }
                for b in backups
            ]
        )
        return
    table = Table("archive", "created", "size", "documents", "objects")
    for b in backups:
        side = b.sidecar or {}
        table.add_row(
            b.path.name,
            b.created_at.isoformat(timespec="seconds"),
            f"{b.size / 1e6:.1f} MB",
            str(side.get("counts", {}).get("documents", "?")),
            str(side.get("objects", "?")),
        )
    console.print(table)


@app.command("prune")
def prune_(
    keep_daily: int = typer.Option(
        ..., "--keep-daily", min=0, help="Keep the newest backup of this many recent days."
    ),
    keep_weekly: int = typer.Option(
        ..., "--keep-weekly", min=0, help="Keep the newest backup of this many recent weeks."
    ),
    directory: Path | None = typer.Option(None, "--dir"),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only say what would be deleted."),
) -> None:
    """Delete older archives, keeping daily and weekly ones (the newest is always kept)."""
    removed = prune(
        directory or get_settings().backups_path,
        keep_daily=keep_daily,
        keep_weekly=keep_weekly,
        dry_run=dry_run,
    )
    verb = "would delete" if dry_run else "deleted"
    for b in removed:
        console.print(f"{verb} {b.path.name}")
    console.print(f"{verb} {len(removed)} archive(s)")


@app.command("keygen")
def keygen(
    out: Path = typer.Option(..., "--out", help="Where to write the new secret key (must not exist)."),
) -> None:
    """Make a new backup key pair: the secret key to --out, the public key to $home/keys/backup.pub.

    Archives made before keep needing the old secret key."""
    settings = get_settings()
    if out.exists():
        fail(f"{out} exists; choose a new file for the secret key")
    secret, public = generate_identity()
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(f"# appliance backup key (age); public key: {public}\n{secret}\n")
    pub = settings.backup_recipient_path
    pub.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = pub.with_name(pub.name + ".tmp")
    tmp.write_text(public + "\n")
    os.replace(tmp, pub)
    console.print(f"new backup key: secret {out} (keep it offline), public {pub}: {public}")


def restore(
    archive: Path = typer.Argument(..., help="The archive (.tar.age) to restore."),
    master_key: list[Path] = typer.Option(
        [], "--master-key", help="The master key file (repeat for retired keys still wrapping data keys)."
    ),
    identity: Path | None = typer.Option(
        None, "--identity", "-i", help="The backup key; default $home/keys/backup.key."
    ),
    force: bool = typer.Option(
        False, "--force", help="Restore onto a non-empty data directory (its data is moved aside)."
    ),
    confirm: str | None = typer.Option(
        None, "--confirm", help="With --force: the data directory path, retyped."
    ),
) -> None:
    """Restore an archive onto a new data directory ($APPLIANCE_HOME), then `appliance up`."""
    settings = get_settings()
    try:
        contents = target_contents(settings)
    except Exception as exc:  # noqa: BLE001 - an unreachable S3 target: one line
        fail(f"cannot inspect the target: {exc}")
    if contents and force:
        if confirm is None:
            err_console.print(
                f"{settings.home} holds {', '.join(contents[:6])}. Restoring moves it to a pre-restore-* "
                "folder inside it (nothing is deleted)."
            )
            confirm = typer.prompt("Type the data directory path to confirm")
        if confirm.rstrip("/") != str(settings.home).rstrip("/"):
            fail("the path typed does not match; nothing was restored")
    identity_path = identity or settings.backup_identity_path
    with _progress() as progress:
        task = progress.add_task("read", total=archive.stat().st_size if archive.is_file() else None)
        try:
            result = restore_backup(
                settings,
                archive,
                identity_path=identity_path,
                master_keys=master_key,
                force=force,
                on_bytes=lambda n: progress.advance(task, n),
                on_phase=lambda name: progress.update(task, description=name),
            )
        except (RestoreError, StorageError) as exc:
            fail(f"restore failed: {exc}")
        except (psycopg.Error, OSError) as exc:
            fail(f"restore failed: {' '.join(str(exc).split())[:300]}")
    meta = result.metadata
    aside = f"; the previous data is in {result.moved_aside}" if result.moved_aside else ""
    console.print(
        f"restored {archive.name} (made {meta.get('created_at')}): "
        f"{meta.get('counts', {}).get('documents')} documents, "
        f"{result.objects} objects, in {result.seconds:.1f} s; "
        f"audit trail verified ({result.audit_events} events, {result.audit_checkpoints} signed checkpoints)"
        f"{aside}. Start it with `appliance up`."
    )
