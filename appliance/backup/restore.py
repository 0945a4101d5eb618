"""`appliance restore ARCHIVE`: rebuild an appliance from one archive onto a new data directory.

Order, so that a bad archive or a wrong key never leaves a half-restored appliance behind:

1. The target is checked: an empty (or new) data directory, or `force` (its data is then moved
   aside to `pre-restore-<time>/`, never deleted). A running appliance on it is refused.
2. The master key(s), supplied separately (the archive never holds one), must open every wrapped
   data key in the archive: checked as soon as `keys/tenant-keys.json` is read, before the blobs.
3. The whole archive is decrypted once, members are staged under `restore-staging/` and checked
   against the manifest (age authenticates every chunk). Nothing else is touched before this passes.
4. Keys are installed, Postgres and Redis started (a new cluster, new passwords), the dump restored
   in one transaction, migrations run if the archive is older than this code, the blobs moved into
   the object store, and `backup.restore` written to the audit trail, which is then verified.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from appliance.backup.archive import (
    AUDIT_KEYS_PREFIX,
    DUMP,
    KEK_DESCRIPTOR,
    METADATA,
    OBJECTS_PREFIX,
    TENANT_KEYS,
    ArchiveError,
    Entry,
    load_identity,
    read_archive,
)
from appliance.backup.create import pg_env
from appliance.keys.kek import FileKeyProvider, KeyProvider, KeyProviderError
from appliance.keys.keyring import RETIRED_PREFIX
from appliance.keys.service import dek_aad
from appliance.runtime.common import RuntimeFailure, write_private
from appliance.runtime.home import identity_for, prepare_home
from appliance.runtime.postgres import find_pg_install
from appliance.settings import Settings
from appliance.storage.base import is_key
from appliance.storage.factory import build_store
from appliance.storage.filesystem import FilesystemStore

STAGING = "restore-staging"
# What may already be in a target data directory: the configuration an administrator wrote first.
ALLOWED_IN_EMPTY_TARGET = {"appliance.env"}
# What `force` moves aside (everything the appliance writes; the configuration stays).
MOVED_ASIDE = ("postgres", "objects", "redis", "keys", "run", "logs", "tmp", "runtime", "backups")


class RestoreError(Exception):
    """A restore that was refused or failed (one line)."""


@dataclass
class RestoreResult:
    archive: Path
    metadata: dict[str, Any]
    objects: int
    object_bytes: int
    moved_aside: Path | None
    audit_events: int
    audit_checkpoints: int
    seconds: float
    phases: dict[str, float] = field(default_factory=dict)


# Target --------------------------------------------------------------------------------------------
def target_contents(settings: Settings) -> list[str]:
    """What is in the target that a restore would replace (empty: a fresh target)."""
    home = settings.home
    found = (
        sorted(p.name for p in home.iterdir() if p.name not in ALLOWED_IN_EMPTY_TARGET)
        if home.is_dir()
        else []
    )
    if settings.s3_endpoint:
        store = build_store(settings)
        if next(iter(store.iter_keys()), None) is not None:
            found.append(f"s3 bucket {settings.s3_bucket}")
    return found


def _move_aside(settings: Settings) -> Path:
    aside = settings.home / f"pre-restore-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}"
    aside.mkdir(mode=0o700)
    for name in MOVED_ASIDE:
        path = settings.home / name
        if path.exists():
            os.replace(path, aside / name)
    return aside


# Keys ----------------------------------------------------------------------------------------------
def load_master_keys(paths: list[Path]) -> list[FileKeyProvider]:
    providers = []
    for path in paths:
        try:
            providers.append(FileKeyProvider.load(path))
        except KeyProviderError as exc:
            raise RestoreError(str(exc)) from None
    return providers


def check_tenant_keys(tenant_keys: list[dict[str, str]], providers: dict[str, KeyProvider]) -> None:
    """Every wrapped data key must unwrap with a supplied master key (named by its kek_id)."""
    for row in tenant_keys:
        provider = providers.get(row["kek_id"])
        if provider is None:
            raise RestoreError(
                f"the archive's data keys are wrapped by master key {row['kek_id']}, which was not supplied "
                f"(supplied: {', '.join(sorted(providers)) or 'none'}); pass it with --master-key"
            )
        try:
            provider.unwrap(bytes.fromhex(row["wrapped_dek"]), aad=dek_aad(uuid.UUID(row["tenant_id"])))
        except Exception:  # noqa: BLE001 - an unwrap failure says nothing more useful
            raise RestoreError(
                f"master key {row['kek_id']} does not open tenant {row['tenant_id']}'s data key "
                "(the archive or the key file is not the right one)"
            ) from None


# Staging -------------------------------------------------------------------------------------------
class _Stager:
    """Writes members to the staging directory and checks metadata and keys as they arrive."""

    def __init__(
        self,
        staging: Path,
        check_metadata: Callable[[dict[str, Any]], None],
        check_keys: Callable[[list[dict[str, str]], bytes | None], None],
    ) -> None:
        self.staging = staging
        self.objects_dir = staging / "objects"
        self.objects_dir.mkdir(parents=True, mode=0o700)
        self._check_metadata = check_metadata
        self._check_keys = check_keys
        self._fh: BinaryIO | None = None
        self._buf: bytearray | None = None
        self._name = ""
        self.small: dict[str, bytes] = {}
        self.objects: list[tuple[str, int]] = []
        self.seen_metadata = False

    def start(self, name: str, size: int) -> None:
        self._name = name
        if name in (METADATA, TENANT_KEYS, KEK_DESCRIPTOR) or name.startswith(AUDIT_KEYS_PREFIX):
            self._buf = bytearray()
            return
        if name == DUMP:
            path = self.staging / DUMP
        elif name.startswith(OBJECTS_PREFIX) and is_key(name[len(OBJECTS_PREFIX) :]):
            path = self.objects_dir / name[len(OBJECTS_PREFIX) :]
        else:
            raise ArchiveError(f"unexpected member {name!r} in the archive")
        if not self.seen_metadata:
            raise ArchiveError("the archive does not start with backup.json")
        self._fh = open(path, "xb")  # noqa: SIM115 - closed in end()

    def data(self, chunk: bytes) -> None:
        if self._buf is not None:
            self._buf += chunk
        elif self._fh is not None:
            self._fh.write(chunk)

    def end(self, entry: Entry) -> None:
        if self._buf is not None:
            body, self._buf = bytes(self._buf), None
            self.small[entry.name] = body
            if entry.name == METADATA:
                self.seen_metadata = True
                self._check_metadata(json.loads(body))
            elif entry.name == TENANT_KEYS:
                self._check_keys(json.loads(body), self.small.get(KEK_DESCRIPTOR))
            return
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if entry.name.startswith(OBJECTS_PREFIX):
            self.objects.append((entry.name[len(OBJECTS_PREFIX) :], entry.size))

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()


def _known_revisions(settings: Settings) -> tuple[set[str], str]:
    from alembic.script import ScriptDirectory

    from appliance.db.migrations import alembic_config

    script = ScriptDirectory.from_config(alembic_config(settings))
    return {rev.revision for rev in script.walk_revisions()}, str(script.get_current_head())


# Postgres ------------------------------------------------------------------------------------------
def _pg_restore(settings: Settings, dump: Path) -> None:
    """Restore into the freshly bootstrapped database, in one transaction, as the owner role.

    Extensions are created by the bootstrap (as the superuser), so their entries are left out of
    the dump's table of contents; everything else must restore without a single error."""
    pg_restore = str(find_pg_install().bin("pg_restore"))
    env = pg_env(settings)
    toc = subprocess.run([pg_restore, "--list", str(dump)], capture_output=True, text=True, env=env)
    if toc.returncode != 0:
        raise RestoreError(f"pg_restore cannot read the dump: {toc.stderr.strip().splitlines()[-1:]}")
    kept = [
        line
        for line in toc.stdout.splitlines()
        if not (" EXTENSION " in line or (" SCHEMA " in line and line.rstrip().endswith(" public")))
    ]
    listing = dump.with_name("toc.list")
    listing.write_text("\n".join(kept) + "\n")
    proc = subprocess.run(
        [
            pg_restore,
            f"--dbname={settings.pg_database}",
            "--no-owner",  # objects belong to the restoring owner role
            "--single-transaction",
            "--exit-on-error",
            "--no-password",
            f"--use-list={listing}",
            str(dump),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        raise RestoreError(f"pg_restore failed: {lines[0] if lines else f'exit {proc.returncode}'}")


def _record_restore(settings: Settings, details: dict[str, Any]) -> None:
    import asyncio

    from appliance.audit import service as audit
    from appliance.bootstrap import cli_actor
    from appliance.context import actor_var
    from appliance.db.engine import Database

    async def main() -> None:
        db = Database(settings.app_database_url, pool_size=1)
        token = actor_var.set(cli_actor())
        try:
            async with db.transaction() as session:
                audit.record(
                    session,
                    "backup.restore",
                    tenant_id=None,
                    resource_type="backup",
                    resource_id=details["archive"],
                    details=details,
                )
        finally:
            actor_var.reset(token)
            await db.dispose()

    asyncio.run(main())


def _install_audit_keys(settings: Settings, ident: Any, members: dict[str, bytes]) -> None:
    """Trust the source host's audit public keys (its checkpoints were signed with them)."""
    from appliance.audit import signing

    for name, body in members.items():
        if not name.startswith(AUDIT_KEYS_PREFIX):
            continue
        staged = settings.home / STAGING / "audit-key.pub"
        staged.write_bytes(body)
        try:
            public = signing.load_public_key(staged)
        except signing.SigningKeyError:
            raise RestoreError(f"{name} in the archive is not an Ed25519 public key") from None
        write_private(signing.previous_public_key_path(settings.keys_dir, public), body, ident, mode=0o644)


def _verify_audit(settings: Settings) -> tuple[int, int]:
    """Verify the chain and every checkpoint with this host's key and the source's; (events, checkpoints)."""
    from sqlalchemy import create_engine

    from appliance.audit import signing
    from appliance.audit.service import verify_database

    keys = [signing.load_public_key(settings.audit_signing_pubkey_path)]
    keys += signing.previous_public_keys(settings.keys_dir)
    engine = create_engine(settings.owner_database_url)
    try:
        with engine.connect() as conn:
            result = verify_database(conn, keys)
    finally:
        engine.dispose()
    if not result.ok:
        raise RestoreError(f"the restored audit trail does not verify: {result.first_break}")
    return result.checked, result.checkpoints


# The restore ---------------------------------------------------------------------------------------
def restore_backup(
    settings: Settings,
    archive: Path,
    *,
    identity_path: Path,
    master_keys: list[Path],
    force: bool = False,
    on_bytes: Callable[[int], None] | None = None,
    on_phase: Callable[[str], None] | None = None,
) -> RestoreResult:
    from appliance.runtime import running_supervisor, start_datastores

    started = time.monotonic()
    phases: dict[str, float] = {}
    phase = on_phase or (lambda name: None)
    if not archive.is_file():
        raise RestoreError(f"no archive at {archive}")
    load_identity_or_fail(identity_path)
    if running_supervisor(settings) is not None:
        raise RestoreError(f"an appliance is running on {settings.home}; stop it first (`appliance down`)")
    contents = target_contents(settings)
    if contents and not force:
        raise RestoreError(
            f"the data directory {settings.home} is not empty ({', '.join(contents[:4])}); "
            "restore into a new "
            "directory (APPLIANCE_HOME) or pass --force to move its data aside"
        )
    passphrase = settings.master_key_passphrase
    providers: dict[str, KeyProvider] = {p.key_id: p for p in load_master_keys(master_keys)}
    if not providers and passphrase is None:
        raise RestoreError("no master key given: pass --master-key FILE (the archive never holds one)")
    known, head = _known_revisions(settings)

    def check_metadata(meta: dict[str, Any]) -> None:
        rev = meta.get("schema_revision")
        if rev not in known:
            raise RestoreError(
                f"the archive's schema revision {rev} is unknown to this appliance version "
                f"(head {head}); restore with the version that made it ({meta.get('appliance_version')})"
            )
        if meta.get("passphrase_kek") and passphrase is None:
            raise RestoreError(
                "the archive's master key is derived from a passphrase: set APPLIANCE_MASTER_KEY_PASSPHRASE"
            )

    def check_keys(rows: list[dict[str, str]], kek_json: bytes | None) -> None:
        if passphrase is not None and kek_json is not None:
            from appliance.keys.kek import PassphraseKeyProvider, PassphraseParams

            params = PassphraseParams.from_json(json.loads(kek_json))
            derived = PassphraseKeyProvider.derive(passphrase.get_secret_value(), params)
            providers.setdefault(derived.key_id, derived)
        check_tenant_keys(rows, providers)

    ident = identity_for(settings)
    moved = _move_aside(settings) if contents and force else None
    prepare_home(settings, ident)
    staging = settings.home / STAGING
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(mode=0o700)
    stager = _Stager(staging, check_metadata, check_keys)
    try:
        phase("verify")
        t0 = time.monotonic()
        try:
            result = read_archive(archive, identity_path, stager, on_bytes=on_bytes)
        except ArchiveError as exc:
            raise RestoreError(f"{archive.name}: {exc}") from None
        finally:
            stager.close()
        phases["read_and_stage"] = time.monotonic() - t0
        meta = result.metadata or {}

        phase("keys")
        _install_audit_keys(settings, ident, stager.small)
        _install_keys(
            settings,
            ident,
            [p for p in providers.values() if isinstance(p, FileKeyProvider)],
            stager.small.get(KEK_DESCRIPTOR),
        )
        phase("postgres")
        t0 = time.monotonic()
        datastores = start_datastores(settings)
        try:
            live = datastores.settings
            _pg_restore(live, staging / DUMP)
            if meta.get("schema_revision") != head:
                from appliance.db.migrations import upgrade_head

                upgrade_head(live)
            phases["postgres"] = time.monotonic() - t0
            phase("objects")
            t0 = time.monotonic()
            store = build_store(live)
            for key, _size in stager.objects:
                path = stager.objects_dir / key
                if isinstance(store, FilesystemStore):
                    ident.chown(path)  # the servers run as the service user, the restore maybe as root
                    store.adopt_file(key, path)
                else:
                    store.put_file(key, path)
            if isinstance(store, FilesystemStore):
                ident.chown_tree(store.root)  # the fan-out directories adopt_file created
            phases["objects"] = time.monotonic() - t0
            phase("audit")
            _record_restore(
                live,
                {
                    "archive": archive.name,
                    "created_at": meta.get("created_at"),
                    "objects": len(stager.objects),
                    "counts": meta.get("counts"),
                    "source_audit_head": meta.get("audit_head"),
                },
            )
            audited, checkpoints = _verify_audit(live)
        finally:
            datastores.stop()
    except RuntimeFailure as exc:
        raise RestoreError(str(exc)) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return RestoreResult(
        archive=archive,
        metadata=meta,
        objects=len(stager.objects),
        object_bytes=sum(size for _, size in stager.objects),
        moved_aside=moved,
        audit_events=audited,
        audit_checkpoints=checkpoints,
        seconds=time.monotonic() - started,
        phases=phases,
    )


def load_identity_or_fail(path: Path) -> Any:
    try:
        return load_identity(path)
    except ArchiveError as exc:
        raise RestoreError(str(exc)) from None


def _install_keys(
    settings: Settings, ident: Any, providers: list[FileKeyProvider], kek_json: bytes | None
) -> None:
    keys_dir = settings.keys_dir
    for i, provider in enumerate(providers):
        target = settings.master_key_path if i == 0 else keys_dir / f"{RETIRED_PREFIX}{provider.key_id}"
        with open(provider.path, "rb") as fh:
            write_private(target, fh.read(), ident)
    if kek_json is not None:
        write_private(keys_dir / "kek.json", kek_json, ident)
