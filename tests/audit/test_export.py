"""Exports for auditors: JSONL out of the database, verified with the public key alone (no database)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import Connection, create_engine
from typer.testing import CliRunner

from appliance.audit import signing
from appliance.audit.chain import canonical
from appliance.audit.export import _parse_event, event_line, write_export
from appliance.audit.service import iter_rows, verify_database
from appliance.cli.main import app as cli
from appliance.db.engine import Database
from appliance.settings import Settings
from tests.audit.conftest import checkpoint, last_seq, make_events_sync, tamper
from tests.factories import make_tenant

runner = CliRunner()


def verify_cli(*args: str | Path) -> tuple[int, str]:
    out = runner.invoke(cli, ["audit", "verify", *map(str, args)])
    return out.exit_code, out.output


def events(path: Path) -> list[dict]:
    return [o for o in map(json.loads, path.read_text().splitlines()) if o["type"] == "event"]


async def test_exported_events_recompute_exactly(app_db: Database, owner_conn: Connection) -> None:
    await make_tenant(app_db)
    row = next(iter_rows(owner_conn, first=last_seq(owner_conn)))
    line = json.loads(json.dumps(event_line(row)))
    assert line["occurred_at"].endswith("Z") and len(line["occurred_at"]) == len(
        "2026-11-26T10:00:00.000000Z"
    )
    parsed = _parse_event(1, line)
    assert parsed["occurred_at"] == row["occurred_at"]
    assert canonical(parsed) == canonical(row)


def test_export_and_verify_round_trip_through_the_cli(settings: Settings, tmp_path: Path) -> None:
    since = datetime.now(UTC)
    make_events_sync(settings)
    make_events_sync(settings)
    out = tmp_path / "audit.jsonl"
    r = runner.invoke(cli, ["audit", "export", "--since", since.isoformat(), "--out", str(out)])
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    header, evs = lines[0], [x for x in lines if x["type"] == "event"]
    assert header["type"] == "header" and header["format"] == "appliance-audit-export-v1"
    assert [e["seq"] for e in evs] == list(range(header["first_seq"], header["last_seq"] + 1))
    assert {"tenant.create", "api_key.create"} <= {e["action"] for e in evs}
    assert lines[-1]["type"] == "checkpoint" and lines[-1]["seq"] == header["last_seq"]  # anchored to its end

    pub = tmp_path / "appliance.pub"
    r = runner.invoke(cli, ["audit", "pubkey"])
    assert r.exit_code == 0
    pub.write_text(r.stdout)
    code, text = verify_cli("--pubkey", pub, out)
    assert code == 0, text
    assert f"{len(evs)} events" in text and "1 checkpoints verified" in text
    assert f"anchored up to seq {header['last_seq']}" in text and "0 events after the last checkpoint" in text

    # --until: a contiguous range that stops earlier
    r = runner.invoke(
        cli,
        [
            "audit",
            "export",
            "--since",
            since.isoformat(),
            "--until",
            evs[0]["occurred_at"],
            "--out",
            str(out),
        ],
    )
    assert r.exit_code == 0 and events(out)[0]["seq"] == evs[0]["seq"]
    assert len(events(out)) < len(evs)


def test_an_export_without_a_valid_checkpoint_is_not_verified(settings: Settings, tmp_path: Path) -> None:
    since = datetime.now(UTC)
    make_events_sync(settings)
    out = tmp_path / "audit.jsonl"
    r = runner.invoke(
        cli, ["audit", "export", "--since", since.isoformat(), "--no-checkpoint", "--out", str(out)]
    )
    assert r.exit_code == 0, r.output
    code, text = verify_cli("--pubkey", settings.audit_signing_pubkey_path, out)
    assert code == 1 and "not verified" in text and "no checkpoint" in text

    # Signed, but with a key the auditor does not trust.
    r = runner.invoke(cli, ["audit", "export", "--since", since.isoformat(), "--out", str(out)])
    other = tmp_path / "other.pub"
    other.write_bytes(signing.public_pem(Ed25519PrivateKey.generate().public_key()))
    code, text = verify_cli("--pubkey", other, out)
    assert code == 1 and "not by the key given" in text
    assert verify_cli(out)[0] != 0  # no key: refused, never "verified" against the file's own key


@pytest.mark.parametrize("kind", ["edit", "delete", "swap"])
async def test_owner_tampering_is_located_in_the_database_and_in_an_export(
    kind: str,
    app_db: Database,
    signing_key: Ed25519PrivateKey,
    public_key: Ed25519PublicKey,
    owner_conn: Connection,
    settings: Settings,
    tmp_path: Path,
) -> None:
    since = datetime.now(UTC)
    await make_tenant(app_db)
    await make_tenant(app_db)
    cp = await checkpoint(app_db, signing_key)
    await make_tenant(app_db)
    target = cp.seq - 2
    tamper(owner_conn, kind, target)

    result = verify_database(owner_conn, [public_key])
    assert not result.ok and result.first_break.seq == target, result.first_break

    out = tmp_path / "tampered.jsonl"
    with out.open("w") as fh:
        write_export(owner_conn, fh, since=since)
    code, text = verify_cli("--pubkey", settings.audit_signing_pubkey_path, out)
    assert code == 1 and f"broken at seq {target}" in text, text


async def test_tampering_with_the_file_itself_is_located(
    app_db: Database, signing_key: Ed25519PrivateKey, settings: Settings, tmp_path: Path
) -> None:
    since = datetime.now(UTC)
    await make_tenant(app_db)
    await checkpoint(app_db, signing_key)
    out = tmp_path / "audit.jsonl"
    engine = create_engine(settings.owner_database_url)
    with engine.connect() as conn, out.open("w") as fh:
        write_export(conn, fh, since=since)
    engine.dispose()
    lines = out.read_text().splitlines()
    pub = settings.audit_signing_pubkey_path
    assert verify_cli("--pubkey", pub, out)[0] == 0

    first = json.loads(lines[1])
    first["outcome"] = "failure"
    out.write_text("\n".join([lines[0], json.dumps(first), *lines[2:]]) + "\n")
    code, text = verify_cli("--pubkey", pub, out)
    assert code == 1 and f"broken at seq {first['seq']}" in text and "edited" in text

    out.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])  # truncated mid-line
    code, text = verify_cli("--pubkey", pub, out)
    assert code == 1 and f"line {len(lines)}" in text

    out.write_text("\n".join(lines[:-2]) + "\n")  # cut at a line boundary: the header's range says so
    code, text = verify_cli("--pubkey", pub, out)
    assert code == 1 and "truncated" in text
