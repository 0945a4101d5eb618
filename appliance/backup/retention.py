"""`backup list` and `backup prune`: read the sidecars, keep the newest backup of recent days and weeks."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from appliance.backup.create import ARCHIVE_SUFFIX, sidecar_path


@dataclass(frozen=True)
class BackupInfo:
    path: Path
    created_at: datetime
    size: int
    sidecar: dict[str, Any] | None  # None: an archive without its sidecar (copied in by hand)


def list_backups(directory: Path) -> list[BackupInfo]:
    """Archives in `directory`, newest first. The time comes from the sidecar, else the file's mtime."""
    if not directory.is_dir():
        return []
    found: list[BackupInfo] = []
    for path in directory.glob(f"*{ARCHIVE_SUFFIX}"):
        side: dict[str, Any] | None = None
        with contextlib.suppress(OSError, ValueError):
            side = json.loads(sidecar_path(path).read_text())
        created = None
        if side and side.get("created_at"):
            with contextlib.suppress(ValueError):
                created = datetime.fromisoformat(side["created_at"])
        if created is None:
            created = datetime.fromtimestamp(path.stat().st_mtime, UTC)
        found.append(BackupInfo(path, created, path.stat().st_size, side))
    return sorted(found, key=lambda b: b.created_at, reverse=True)


def select_kept(backups: list[BackupInfo], *, keep_daily: int, keep_weekly: int) -> set[Path]:
    """Grandfather-father-son: the newest backup of each of the `keep_daily` most recent days that
    have one, and the newest of each of the `keep_weekly` most recent ISO weeks that have one.
    The newest backup of all is always kept."""
    if keep_daily < 0 or keep_weekly < 0:
        raise ValueError("keep counts must be >= 0")
    ordered = sorted(backups, key=lambda b: b.created_at, reverse=True)
    kept: set[Path] = set()
    if ordered:
        kept.add(ordered[0].path)
    days: list[object] = []
    weeks: list[object] = []
    for b in ordered:
        day = b.created_at.astimezone(UTC).date()
        week = day.isocalendar()[:2]
        if day not in days and len(days) < keep_daily:
            days.append(day)
            kept.add(b.path)
        if week not in weeks and len(weeks) < keep_weekly:
            weeks.append(week)
            kept.add(b.path)
    return kept


def prune(directory: Path, *, keep_daily: int, keep_weekly: int, dry_run: bool = False) -> list[BackupInfo]:
    """Delete the archives (and sidecars) `select_kept` does not keep; return those (to be) removed."""
    backups = list_backups(directory)
    kept = select_kept(backups, keep_daily=keep_daily, keep_weekly=keep_weekly)
    removed = [b for b in backups if b.path not in kept]
    if not dry_run:
        for b in removed:
            b.path.unlink(missing_ok=True)
            sidecar_path(b.path).unlink(missing_ok=True)
    return removed
