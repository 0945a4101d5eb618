"""`appliance audit verify | checkpoint | export | pubkey`: the tamper-evident trail (docs/audit.md)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import typer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import create_engine
from sqlalchemy.exc import OperationalError

from appliance.audit import signing
from appliance.audit.chain import VerifyResult
from appliance.cli._common import console, err_console, fail, print_json

app = typer.Typer(no_args_is_help=True)

PubkeyOption = typer.Option(
    None, "--pubkey", help="Ed25519 public key file (PEM); repeat for keys used before a rotation."
)


@app.command("verify")
def verify(
    export: Path | None = typer.Argument(None, help="An export to check offline (needs --pubkey)."),
    pubkeys: list[Path] | None = PubkeyOption,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Recompute the audit hash chain and check the signed checkpoints; report the first break.

    With EXPORT: no database and no settings, only the file and the public key(s) you were given."""
    keys = [_public_key(p) for p in pubkeys or []]
    if export is not None:
        if not keys:
            fail("verifying an export needs --pubkey FILE: the key you trust, not the one in the file")
        result = _verify_export(export, keys)
    else:
        result = _verify_database(keys)
    _report(result, as_json, offline=export is not None)


def _verify_export(path: Path, keys: list[Ed25519PublicKey]) -> VerifyResult:
    from appliance.audit.export import ExportFormatError, verify_export

    try:
        return verify_export(path, keys)
    except ExportFormatError as exc:
        fail(f"{path}: {exc}")
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror}")


def _verify_database(extra_keys: list[Ed25519PublicKey]) -> VerifyResult:
    from appliance.audit.service import verify_database
    from appliance.settings import get_settings

    try:  # a restored host also trusts the keys of the host its backup came from (docs/backup.md)
        previous = signing.previous_public_keys(get_settings().keys_dir)
    except signing.SigningKeyError as exc:
        fail(str(exc))
    keys = [_appliance_public_key(), *previous, *extra_keys]
    with _owner_connection() as conn:
        result = verify_database(conn, keys)
    return result


def _report(result: VerifyResult, as_json: bool, *, offline: bool) -> None:
    unanchored_fail = offline and result.ok and result.checkpoints == 0
    if as_json:
        print_json(
            {
                "ok": result.ok and not unanchored_fail,
                "checked": result.checked,
                "last_seq": result.last_seq,
                "checkpoints": result.checkpoints,
                "last_anchored_seq": result.last_anchored_seq or None,
                "unanchored": result.unanchored,
                "first_break": {"seq": result.first_break.seq, "problem": result.first_break.problem}
                if result.first_break
                else None,
            }
        )
        raise typer.Exit(0 if result.ok and not unanchored_fail else 1)
    if result.first_break:
        fail(
            f"audit chain broken at seq {result.first_break.seq}: {result.first_break.problem} "
            f"({result.checked} events verified before it)"
        )
    if unanchored_fail:
        fail(
            f"not verified: {result.checked} events recompute, but no checkpoint in the export is signed "
            "by the key given, so nothing ties them to the appliance"
        )
    anchored = (
        f"{result.checkpoints} checkpoints verified, anchored up to seq {result.last_anchored_seq}"
        if result.checkpoints
        else "no checkpoint yet"
    )
    console.print(
        f"audit chain intact: {result.checked} events (seq {result.last_seq - result.checked + 1}.."
        f"{result.last_seq}), {anchored}, {result.unanchored} events after the last checkpoint",
        highlight=False,
        soft_wrap=True,
    )


@app.command("checkpoint")
def checkpoint(as_json: bool = typer.Option(False, "--json")) -> None:
    """Sign the chain head now (if it moved since the last checkpoint)."""
    cp = _checkpoint_now()
    if as_json:
        print_json({"seq": cp.seq, "key_id": cp.key_id, "signed_at": cp.signed_at} if cp else None)
    elif cp is None:
        console.print("the chain head is already covered by a checkpoint")
    else:
        console.print(f"checkpoint signed at seq {cp.seq} with key {cp.key_id}", highlight=False)


def _checkpoint_now() -> signing.Checkpoint | None:
    from sqlalchemy.ext.asyncio import AsyncSession

    from appliance.audit.service import create_checkpoint
    from appliance.cli._db import run_in_transaction

    key = _private_key()

    async def sign(session: AsyncSession) -> signing.Checkpoint | None:
        return await create_checkpoint(session, key)

    return run_in_transaction(sign)


@app.command("export")
def export(
    since: str | None = typer.Option(None, "--since", help="ISO-8601 time (UTC when no offset)."),
    until: str | None = typer.Option(None, "--until", help="ISO-8601 time (UTC when no offset)."),
    out: Path | None = typer.Option(None, "--out", help="File to write (default: stdout)."),
    no_checkpoint: bool = typer.Option(
        False, "--no-checkpoint", help="Do not sign the current head first (the tail stays unanchored)."
    ),
) -> None:
    """Write the events of [--since, --until] (one contiguous seq range) and their checkpoints as JSONL."""
    from appliance.audit.export import write_export

    start, end = _parse_time("--since", since), _parse_time("--until", until)
    if not no_checkpoint:
        _checkpoint_now()
    public = _appliance_public_key()
    with _owner_connection() as conn, _output(out) as fh:
        summary = write_export(conn, fh, since=start, until=end, public_key=public)
    where = str(out) if out else "stdout"
    span = f"seq {summary.first_seq}..{summary.last_seq}" if summary.events else "no events in range"
    err_console.print(
        f"exported {summary.events} events ({span}) and {summary.checkpoints} checkpoints to {where}",
        highlight=False,
        soft_wrap=True,
    )


@app.command("archive")
def archive(
    before: str | None = typer.Option(
        None, "--before", help="Only up to the newest checkpoint signed before this ISO-8601 time."
    ),
) -> None:
    """Copy the events after the last archived segment, up to the newest signed checkpoint, to the
    object store as a verifiable segment. Audit rows are never deleted."""
    from appliance.audit.archive import SegmentError, archive_segment
    from appliance.settings import get_settings
    from appliance.storage.base import StorageError
    from appliance.storage.factory import build_store

    cutoff = _parse_time("--before", before)
    if cutoff is None:
        _checkpoint_now()  # archive up to now: anchor the head first
    try:
        store = build_store(get_settings())
        with _owner_connection() as conn:
            segment = archive_segment(conn, store, _appliance_public_key(), before=cutoff)
    except (SegmentError, StorageError) as exc:
        fail(f"nothing archived: {exc}")
    if segment is None:
        console.print("nothing to archive: no signed checkpoint after the last archived segment")
        return
    _record_archive(segment.first_seq, segment.last_seq, segment.object_key, segment.sha256.hex())
    console.print(
        f"archived seq {segment.first_seq}..{segment.last_seq} "
        f"({segment.events} events, {segment.size} bytes) as object {segment.object_key}, "
        f"sha256 {segment.sha256.hex()[:16]}…"
    )


@app.command("verify-archive")
def verify_archive(pubkeys: list[Path] | None = PubkeyOption) -> None:
    """Re-read every archived segment from the object store and check it (hash, chain, checkpoints,
    continuity with the previous segment and with the rows in Postgres)."""
    from appliance.audit.archive import verify_segments
    from appliance.settings import get_settings
    from appliance.storage.base import StorageError
    from appliance.storage.factory import build_store

    settings = get_settings()
    keys = [_appliance_public_key(), *signing.previous_public_keys(settings.keys_dir)]
    keys += [_public_key(p) for p in pubkeys or []]
    try:
        with _owner_connection() as conn:
            checks = verify_segments(conn, build_store(settings), keys)
    except StorageError as exc:
        fail(f"cannot read the archived segments: {exc}")
    bad = [c for c in checks if c.problem is not None]
    if bad:
        first = bad[0]
        fail(f"archived segment seq {first.segment.first_seq}..{first.segment.last_seq}: {first.problem}")
    last = checks[-1].segment.last_seq if checks else 0
    console.print(f"{len(checks)} archived segment(s) intact, covering seq 1..{last}")


def _record_archive(first: int, last: int, key: str, sha256: str) -> None:
    from sqlalchemy.ext.asyncio import AsyncSession

    from appliance.audit.service import record
    from appliance.cli._db import run_in_transaction

    async def work(session: AsyncSession) -> None:
        record(
            session,
            "audit.archive",
            tenant_id=None,
            resource_type="audit_segment",
            resource_id=f"{first}-{last}",
            details={"object_key": key, "sha256": sha256},
        )

    run_in_transaction(work)


@app.command("pubkey")
def pubkey() -> None:
    """Print the public key auditors verify exports with (PEM); its key id goes to stderr."""
    public = _appliance_public_key()
    sys.stdout.write(signing.public_pem(public).decode())
    err_console.print(f"key id {signing.key_id(public)}", highlight=False)


# Helpers ---------------------------------------------------------------------------------------


def _parse_time(option: str, value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        fail(f"{option}: {value!r} is not an ISO-8601 time (e.g. 2026-11-26T10:00:00Z)")
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _public_key(path: Path) -> Ed25519PublicKey:
    try:
        return signing.load_public_key(path)
    except signing.SigningKeyError as exc:
        fail(str(exc))


def _private_key() -> Ed25519PrivateKey:
    from appliance.settings import get_settings

    try:
        return signing.load_private_key(get_settings().audit_signing_key_path)
    except signing.SigningKeyError as exc:
        fail(f"{exc} (`appliance up` creates it)")


def _appliance_public_key() -> Ed25519PublicKey:
    """The appliance's own public key: its .pub file, else derived from the private key."""
    from appliance.settings import get_settings

    settings = get_settings()
    if settings.audit_signing_pubkey_path.exists():
        return _public_key(settings.audit_signing_pubkey_path)
    return _private_key().public_key()


@contextlib.contextmanager
def _owner_connection() -> Iterator[Any]:
    from appliance.settings import get_settings

    settings = get_settings()
    engine = create_engine(settings.owner_database_url, pool_size=1)
    try:
        with engine.connect() as conn:
            yield conn
    except OperationalError as exc:
        fail(f"cannot reach Postgres at {settings.pg_host}:{settings.pg_port}: {exc.orig}")
    finally:
        engine.dispose()


@contextlib.contextmanager
def _output(path: Path | None) -> Iterator[TextIO]:
    if path is None:
        yield sys.stdout
        sys.stdout.flush()
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # the trail is sensitive
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        yield fh
