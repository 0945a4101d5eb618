"""Backups of the session's appliance through the CLI: create, list, verify (and what it detects),
restore refusals, and the retention rule."""

from __future__ import annotations

import os
import secrets
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import httpx
import pytest
from sqlalchemy import create_engine
from typer.testing import CliRunner

from appliance.backup.archive import generate_identity
from appliance.backup.restore import RestoreError, restore_backup
from appliance.backup.retention import BackupInfo, select_kept
from appliance.cli.main import app as cli
from appliance.db.engine import Database
from appliance.settings import Settings, load_settings
from tests.conftest import free_port
from tests.factories import bearer, make_tenant

runner = CliRunner()


def run(*args: str) -> tuple[int, str]:
    result = runner.invoke(cli, list(args))
    return result.exit_code, result.output


@pytest.fixture(scope="module")
async def archive(
    settings: Settings, client: httpx.AsyncClient, app_db: Database, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    # At least one tenant with a data key and a document, whatever ran before.
    tenant = await make_tenant(app_db, role="editor")
    r = await client.post(
        "/api/v1/documents",
        content=b"backup me " * 100,
        headers={**bearer(tenant.key), "Content-Type": "text/plain", "X-Filename": "b.txt"},
    )
    assert r.status_code == 201, r.text
    out = tmp_path_factory.mktemp("backups")
    code, output = await anyio.to_thread.run_sync(lambda: run("backup", "create", "--to", str(out)))
    assert code == 0, output
    (path,) = out.glob("*.tar.age")
    return path


def test_create_lists_and_verifies(archive: Path, settings: Settings) -> None:
    code, output = run("backup", "list", "--dir", str(archive.parent), "--json")
    assert code == 0, output
    assert archive.name in output
    code, output = run("backup", "verify", str(archive))
    assert code == 0, output
    assert "OK" in output and "match the manifest" in output
    engine = create_engine(settings.owner_database_url)
    try:
        with engine.connect() as conn:
            rows = conn.exec_driver_sql(
                "SELECT outcome FROM audit_events WHERE action = 'backup.create' AND resource_id = %s",
                (archive.name,),
            ).all()
    finally:
        engine.dispose()
    assert rows == [("success",)]


def one_error_line(output: str) -> str:
    lines = [ln for ln in output.splitlines() if ln.strip()]
    assert len(lines) == 1, output
    assert lines[0].startswith("error:"), output
    return lines[0]


@pytest.mark.parametrize("damage", ["truncate", "flip", "append"])
def test_verify_detects_damage(archive: Path, tmp_path: Path, damage: str) -> None:
    data = archive.read_bytes()
    bad = tmp_path / archive.name
    if damage == "truncate":
        bad.write_bytes(data[: len(data) * 2 // 3])
    elif damage == "flip":
        pos = len(data) // 2
        bad.write_bytes(data[:pos] + bytes([data[pos] ^ 0x40]) + data[pos + 1 :])
    else:
        bad.write_bytes(data + b"\0" * 1024)
    code, output = run("backup", "verify", str(bad))
    assert code == 1
    line = one_error_line(output)
    assert "corrupted or truncated" in line or "truncated" in line or "end" in line, line


def test_wrong_backup_key_is_one_clear_line(archive: Path, tmp_path: Path) -> None:
    secret, _ = generate_identity()
    other = tmp_path / "other.key"
    other.write_text(secret + "\n")
    code, output = run("backup", "verify", str(archive), "--identity", str(other))
    assert code == 1
    assert "does not open this archive" in one_error_line(output)


def fresh_target(tmp_path: Path) -> Settings:
    home = Path(os.path.join("/var/tmp", f"restore-{secrets.token_hex(4)}"))
    return load_settings(home=home, environment="test", pg_port=free_port(), redis_port=free_port())


def test_restore_refuses_a_running_or_non_empty_target(
    archive: Path, settings: Settings, tmp_path: Path
) -> None:
    args = {"identity_path": settings.backup_identity_path, "master_keys": [settings.master_key_path]}
    with pytest.raises(RestoreError, match="is running"):
        restore_backup(settings, archive, **args)  # the session's own, up
    target = fresh_target(tmp_path)
    try:
        (target.home / "objects").mkdir(parents=True)
        (target.home / "objects" / "left-over").write_bytes(b"x")
        with pytest.raises(RestoreError, match="not empty .*objects.*--force"):
            restore_backup(target, archive, **args)
        assert (target.home / "objects" / "left-over").read_bytes() == b"x"
    finally:
        import shutil

        shutil.rmtree(target.home, ignore_errors=True)


def test_restore_with_force_needs_the_path_retyped(archive: Path, settings: Settings) -> None:
    code, output = run(
        "restore",
        str(archive),
        "--master-key",
        str(settings.master_key_path),
        "--force",
        "--confirm",
        "/wrong",
    )
    assert code == 1
    assert "does not match; nothing was restored" in one_error_line(output)
    assert (settings.pg_data_dir / "PG_VERSION").exists()


def test_restore_refuses_a_master_key_that_does_not_open_the_data_keys(
    archive: Path, settings: Settings, tmp_path: Path
) -> None:
    wrong = tmp_path / "wrong.key"
    wrong.write_bytes(secrets.token_bytes(32))
    wrong.chmod(0o600)
    target = fresh_target(tmp_path)
    try:
        with pytest.raises(RestoreError, match="was not supplied|does not open"):
            restore_backup(target, archive, identity_path=settings.backup_identity_path, master_keys=[wrong])
        assert not (target.pg_data_dir / "PG_VERSION").exists()
        assert not any(target.objects_dir.rglob("*")) if target.objects_dir.exists() else True
    finally:
        import shutil

        shutil.rmtree(target.home, ignore_errors=True)


def test_restore_needs_a_master_key(archive: Path, settings: Settings, tmp_path: Path) -> None:
    target = fresh_target(tmp_path)
    with pytest.raises(RestoreError, match="no master key given"):
        restore_backup(target, archive, identity_path=settings.backup_identity_path, master_keys=[])
    assert not target.home.exists()


def test_retention_keeps_daily_and_weekly_newest() -> None:
    now = datetime(2026, 11, 26, 3, 0, tzinfo=UTC)
    # Two backups a day for 30 days.
    backups = [
        BackupInfo(Path(f"b{i:03d}.tar.age"), now - timedelta(hours=12 * i), 1, None) for i in range(60)
    ]
    kept = select_kept(backups, keep_daily=7, keep_weekly=4)
    kept_times = sorted((b.created_at for b in backups if b.path in kept), reverse=True)
    days = {t.date() for t in kept_times}
    # The newest of each of the last 7 days, plus the newest of 4 ISO weeks (some coincide).
    for d in range(7):
        day = (now - timedelta(days=d)).date()
        newest = max(b.created_at for b in backups if b.created_at.date() == day)
        assert newest in kept_times
    assert len(days) == len(kept_times)  # never two of the same day
    weeks = {t.isocalendar()[:2] for t in kept_times}
    assert len(weeks) == 4
    assert backups[0].path in kept
    assert len(select_kept(backups, keep_daily=0, keep_weekly=0)) == 1  # the newest always stays
    with pytest.raises(ValueError):
        select_kept(backups, keep_daily=-1, keep_weekly=0)
