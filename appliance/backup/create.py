"""`appliance backup create`: one consistent, encrypted archive while the appliance serves traffic.

1. Take the backup lock (one backup at a time) and the blob guard (see `guard`): purges of blobs
   wait from here until every blob is copied.
2. Open a REPEATABLE READ transaction as the owner role and export its snapshot. `pg_dump` runs on
   that snapshot (in the background, while blobs are copied), and the list of blobs to copy comes
   from the same snapshot: exactly the blobs of the versions the dump holds. Uploads that commit
   later are in neither; nothing in the archive is half-written.
3. Stream backup.json, the wrapped data keys, every blob, the dump and the manifest through age
   into `<name>.tar.age.partial`, fsync, rename. A sidecar `<name>.json` (sizes, counts, time; no
   secrets) lets `backup list` and `prune` work without the key.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from appliance import __version__
from appliance.backup.archive import (
    AUDIT_KEYS_PREFIX,
    DUMP,
    FORMAT,
    KEK_DESCRIPTOR,
    METADATA,
    OBJECTS_PREFIX,
    TENANT_KEYS,
    ArchiveError,
    Member,
    TarWriter,
    load_recipient,
    write_archive,
)
from appliance.backup.guard import BACKUP_RUNNING_LOCK, BLOB_GUARD_LOCK
from appliance.runtime.postgres import find_pg_install
from appliance.settings import Settings
from appliance.storage.base import ObjectNotFound, ObjectStore
from appliance.storage.factory import build_store
from appliance.storage.filesystem import fsync_dir

ARCHIVE_SUFFIX = ".tar.age"
SIDECAR_SUFFIX = ".json"
GUARD_WAIT_S = 60


class BackupError(Exception):
    """A backup that could not be made (one line); nothing half-written is left behind."""


@dataclass
class BackupResult:
    path: Path
    size: int
    objects: int
    object_bytes: int
    dump_bytes: int
    seconds: float
    metadata: dict[str, Any]


def archive_name(now: datetime) -> str:
    return f"appliance-backup-{now.strftime('%Y%m%dT%H%M%S')}Z{ARCHIVE_SUFFIX}"


def resolve_destination(settings: Settings, to: Path | None, now: datetime) -> Path:
    target = to or settings.backups_path
    if target.exists() and target.is_dir() or to is None or str(to).endswith("/"):
        return target / archive_name(now)
    return target


def pg_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PGHOST=settings.pg_host,
        PGPORT=str(settings.pg_port),
        PGUSER=settings.pg_owner_user,
        PGDATABASE=settings.pg_database,
        PGPASSWORD=settings.pg_owner_password.get_secret_value() if settings.pg_owner_password else "",
        PGCONNECT_TIMEOUT="10",
    )
    return env


def owner_connect(settings: Settings, *, autocommit: bool) -> psycopg.Connection:
    try:
        return psycopg.connect(
            host=settings.pg_host,
            port=settings.pg_port,
            user=settings.pg_owner_user,
            password=settings.pg_owner_password.get_secret_value() if settings.pg_owner_password else None,
            dbname=settings.pg_database,
            connect_timeout=10,
            autocommit=autocommit,
        )
    except psycopg.OperationalError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BackupError(
            f"cannot reach Postgres at {settings.pg_host}:{settings.pg_port} (is the appliance up?): {first}"
        ) from None


@dataclass
class Snapshot:
    """What the snapshot holds, read before the blobs are copied."""

    metadata: dict[str, Any]
    tenant_keys: list[dict[str, str]]
    objects: list[tuple[str, int]]  # (key, size)


def _read_snapshot(conn: psycopg.Connection, store: ObjectStore, settings: Settings) -> Snapshot:
    revision = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    keys = conn.execute(
        "SELECT tenant_id::text, kek_id, encode(wrapped_dek, 'hex') FROM tenant_keys ORDER BY tenant_id"
    ).fetchall()
    # Every blob the snapshot's rows reference: originals and extracted texts of live and deleted
    # (not yet purged) versions alike, and archived audit segments: a restore must hold whatever
    # its rows point to.
    rows = conn.execute(
        "SELECT object_key FROM document_versions UNION "
        "SELECT text_object_key FROM document_versions WHERE text_object_key IS NOT NULL UNION "
        "SELECT object_key FROM audit_archives ORDER BY 1"
    ).fetchall()
    objects: list[tuple[str, int]] = []
    for (key,) in rows:
        try:
            objects.append((key, store.stat(key).size))
        except ObjectNotFound:
            raise BackupError(
                f"object {key} is referenced by a document version but missing from the {store.name} store; "
                "the data is already damaged: run `appliance status` and restore the document from a "
                "previous backup"
            ) from None
    counts = conn.execute(
        "SELECT (SELECT count(*) FROM tenants), (SELECT count(*) FROM documents), "
        "(SELECT count(*) FROM document_versions), (SELECT count(*) FROM chunks)"
    ).fetchone()
    head = conn.execute("SELECT seq, encode(hash, 'hex') FROM audit_chain_head WHERE id = 1").fetchone()
    assert counts is not None and head is not None
    metadata = {
        "format": FORMAT,
        "created_at": datetime.now(UTC).isoformat(),
        "appliance_version": __version__,
        "schema_revision": revision[0] if revision else None,
        "postgres_server": conn.info.parameter_status("server_version"),
        "store": store.name,
        "kek_ids": sorted({row[1] for row in keys}),
        "passphrase_kek": (settings.keys_dir / "kek.json").exists(),
        "counts": {
            "tenants": counts[0],
            "documents": counts[1],
            "versions": counts[2],
            "chunks": counts[3],
            "objects": len(objects),
        },
        "object_bytes": sum(size for _, size in objects),
        "audit_head": {"seq": int(head[0]), "hash": head[1]},
    }
    tenant_keys = [{"tenant_id": t, "kek_id": k, "wrapped_dek": w} for t, k, w in keys]
    return Snapshot(metadata, tenant_keys, objects)


def _start_dump(settings: Settings, snapshot_id: str, path: Path) -> subprocess.Popen[bytes]:
    pg_dump = find_pg_install().bin("pg_dump")
    argv = [
        str(pg_dump),
        "--format=custom",
        "--compress=0",  # blobs, chunk texts and vectors are encrypted or random: not worth zlib's time
        f"--snapshot={snapshot_id}",
        "--enable-row-security",  # the tables FORCE RLS; the owner's policy lets it read every row
        "--no-password",
        f"--file={path}",
    ]
    return subprocess.Popen(argv, env=pg_env(settings), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _audit_public_keys(settings: Settings) -> list[Path]:
    """This host's audit public key and those it trusts from earlier hosts: a restore trusts them all,
    so checkpoints signed before the restore keep verifying."""
    from appliance.audit.signing import PREVIOUS_PUBKEY_GLOB

    own = settings.audit_signing_pubkey_path
    return [p for p in [own, *sorted(settings.keys_dir.glob(PREVIOUS_PUBKEY_GLOB))] if p.is_file()]


def _object_member(store: ObjectStore, key: str, size: int) -> Member:
    def chunks() -> Iterator[bytes]:
        try:
            with store.iter_chunks(key, 1 << 20) as it:
                yield from it
        except ObjectNotFound:
            raise BackupError(f"object {key} vanished from the store while it was copied") from None

    return Member(OBJECTS_PREFIX + key, size, chunks)


def create_backup(
    settings: Settings,
    dest: Path,
    *,
    on_start: Callable[[dict[str, Any]], None] | None = None,
    on_bytes: Callable[[int], None] | None = None,
    store: ObjectStore | None = None,
) -> BackupResult:
    """Write one archive to `dest` (a file path; its directory is created 0700)."""
    started = time.monotonic()
    recipient = load_recipient(settings.backup_recipient_path)
    store = store or build_store(settings)
    dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if dest.exists():
        raise BackupError(f"{dest} exists; choose another name")
    partial = dest.with_name(dest.name + ".partial")
    lock_conn = owner_connect(settings, autocommit=True)
    snap_conn = owner_connect(settings, autocommit=False)
    dump_dir = Path(
        tempfile.mkdtemp(prefix="backup-dump-", dir=settings.tmp_dir if settings.tmp_dir.is_dir() else None)
    )
    dump_path = dump_dir / DUMP
    dump_proc: subprocess.Popen[bytes] | None = None
    guard_held = False
    try:
        if not lock_conn.execute("SELECT pg_try_advisory_lock(%s)", (BACKUP_RUNNING_LOCK,)).fetchone()[0]:  # type: ignore[index]
            raise BackupError("another backup is running; wait for it to finish")
        # Wait for purges in flight (they hold the guard shared for their transaction), then keep
        # new ones out until the last blob is copied.
        lock_conn.execute(f"SET lock_timeout = '{GUARD_WAIT_S}s'")
        try:
            lock_conn.execute("SELECT pg_advisory_lock(%s)", (BLOB_GUARD_LOCK,))
        except psycopg.errors.LockNotAvailable:
            raise BackupError(f"object deletions did not finish within {GUARD_WAIT_S} s; try again") from None
        guard_held = True
        snap_conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        snapshot_id = snap_conn.execute("SELECT pg_export_snapshot()").fetchone()[0]  # type: ignore[index]
        dump_proc = _start_dump(settings, snapshot_id, dump_path)
        snap = _read_snapshot(snap_conn, store, settings)
        if on_start is not None:
            on_start(snap.metadata)

        def members() -> Iterator[Member]:
            nonlocal guard_held
            yield Member.from_bytes(METADATA, json.dumps(snap.metadata, indent=1).encode())
            yield Member.from_bytes(TENANT_KEYS, json.dumps(snap.tenant_keys, indent=1).encode())
            kek_json = settings.keys_dir / "kek.json"
            if kek_json.exists():  # passphrase mode: the KDF salt and costs (not secret)
                yield Member.from_bytes(KEK_DESCRIPTOR, kek_json.read_bytes())
            for pub in _audit_public_keys(settings):
                yield Member.from_bytes(AUDIT_KEYS_PREFIX + pub.name, pub.read_bytes())
            for key, size in snap.objects:
                yield _object_member(store, key, size)
            # Every blob is in: deletions may go on.
            lock_conn.execute("SELECT pg_advisory_unlock(%s)", (BLOB_GUARD_LOCK,))
            guard_held = False
            assert dump_proc is not None
            _, err = dump_proc.communicate()
            if dump_proc.returncode != 0:
                msg = err.decode(errors="replace").strip().splitlines()
                raise BackupError(f"pg_dump failed: {msg[-1] if msg else f'exit {dump_proc.returncode}'}")
            yield Member.from_file(DUMP, dump_path)

        archive_size = write_archive(partial, recipient, TarWriter(members(), on_bytes=on_bytes))
        os.replace(partial, dest)
        fsync_dir(dest.parent)
        dump_bytes = dump_path.stat().st_size
        result = BackupResult(
            path=dest,
            size=archive_size,
            objects=len(snap.objects),
            object_bytes=int(snap.metadata["object_bytes"]),
            dump_bytes=dump_bytes,
            seconds=time.monotonic() - started,
            metadata=snap.metadata,
        )
        write_sidecar(result)
        return result
    except ArchiveError as exc:
        raise BackupError(str(exc)) from None
    finally:
        if dump_proc is not None and dump_proc.poll() is None:
            dump_proc.kill()
            dump_proc.wait()
        with contextlib.suppress(Exception):
            snap_conn.rollback()
        snap_conn.close()
        if guard_held:
            with contextlib.suppress(Exception):
                lock_conn.execute("SELECT pg_advisory_unlock(%s)", (BLOB_GUARD_LOCK,))
        lock_conn.close()  # releases the backup lock
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
        with contextlib.suppress(OSError):
            dump_path.unlink(missing_ok=True)
            dump_dir.rmdir()


def sidecar_path(archive: Path) -> Path:
    name = archive.name.removesuffix(ARCHIVE_SUFFIX)
    return archive.with_name(name + SIDECAR_SUFFIX)


def summary(result: BackupResult) -> dict[str, Any]:
    """What the sidecar holds and `backup create --json` prints (nothing secret)."""
    return {
        "archive": result.path.name,
        "created_at": result.metadata["created_at"],
        "size": result.size,
        "objects": result.objects,
        "object_bytes": result.object_bytes,
        "dump_bytes": result.dump_bytes,
        "seconds": round(result.seconds, 3),
        "counts": result.metadata["counts"],
        "schema_revision": result.metadata["schema_revision"],
        "kek_ids": result.metadata["kek_ids"],
    }


def write_sidecar(result: BackupResult) -> None:
    body = summary(result)
    path = sidecar_path(result.path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(body, fh, indent=1)
