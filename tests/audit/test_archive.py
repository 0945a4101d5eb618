"""Archived audit segments in the object store: contiguous, anchored, verifiable offline, and a
segment changed in the store is found and named. The rows stay in Postgres."""

from __future__ import annotations

import re
from pathlib import Path

from sqlalchemy import create_engine, text
from typer.testing import CliRunner

from appliance.cli.main import app as cli
from appliance.settings import Settings
from appliance.storage.factory import build_store
from tests.audit.conftest import make_events_sync

runner = CliRunner()


def audit(*args: str) -> tuple[int, str]:
    out = runner.invoke(cli, ["audit", *args])
    return out.exit_code, out.output


def segment_rows(settings: Settings) -> list[tuple[int, int, str]]:
    engine = create_engine(settings.owner_database_url)
    try:
        with engine.connect() as conn:
            return [
                (int(r[0]), int(r[1]), r[2])
                for r in conn.execute(
                    text("SELECT first_seq, last_seq, object_key FROM audit_archives ORDER BY 1")
                )
            ]
    finally:
        engine.dispose()


def test_segments_are_contiguous_verifiable_and_tamper_evident(settings: Settings, tmp_path: Path) -> None:
    make_events_sync(settings)
    code, out = audit("archive")
    assert code == 0, out
    first = re.search(r"archived seq (\d+)\.\.(\d+)", out)
    assert first, out
    make_events_sync(settings)
    code, out = audit("archive")
    assert code == 0, out
    second = re.search(r"archived seq (\d+)\.\.(\d+)", out)
    assert second and int(second.group(1)) == int(first.group(2)) + 1  # no gap, no overlap
    rows = segment_rows(settings)
    assert rows[0][0] == 1
    assert all(a[1] + 1 == b[0] for a, b in zip(rows, rows[1:], strict=False))

    code, out = audit("verify-archive")
    assert code == 0, out
    assert f"{len(rows)} archived segment(s) intact" in out

    # A segment verifies offline with the public key alone, like any export.
    store = build_store(settings)
    key = rows[-1][2]
    original = b"".join(store.iter_chunks(key))
    segment = tmp_path / "segment.jsonl"
    segment.write_bytes(original)
    code, out = audit("verify", str(segment), "--pubkey", str(settings.audit_signing_pubkey_path))
    assert code == 0, out

    # The rows are still in Postgres: archiving never deletes.
    engine = create_engine(settings.owner_database_url)
    try:
        with engine.connect() as conn:
            count = conn.execute(
                text("SELECT count(*) FROM audit_events WHERE seq <= :s"), {"s": rows[-1][1]}
            )
            assert count.scalar_one() == rows[-1][1]
    finally:
        engine.dispose()

    # Edit one event inside the stored segment: found, and the segment named.
    tampered = original.replace(b'"outcome":"success"', b'"outcome":"failure"', 1)
    assert tampered != original
    store.put_bytes(key, tampered)
    try:
        code, out = audit("verify-archive")
        assert code == 1
        assert f"seq {rows[-1][0]}..{rows[-1][1]}" in out and "modified in the store" in out
    finally:
        store.put_bytes(key, original)
    assert audit("verify-archive")[0] == 0


def test_nothing_to_archive_before_any_new_checkpoint(settings: Settings) -> None:
    code, out = audit("archive", "--before", "2000-01-01T00:00:00Z")
    assert code == 0, out
    assert "nothing to archive" in out
