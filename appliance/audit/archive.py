"""Archive old audit segments to the object store, keeping the chain verifiable (docs/audit.md).

`archive_segment` copies the events after the last archived segment, up to the newest signed
checkpoint (older than `before`), as an export (appliance.audit.export) into the object store and
records it in `audit_archives`. Segments are contiguous: each one's first `prev_hash` is the
previous one's last hash, and each ends at a signed checkpoint, so every segment verifies offline
with the public key alone (`appliance audit verify --pubkey KEY SEGMENT`). The rows stay in
Postgres: archiving never deletes; it lets an operator keep the trail beyond the database.

Segments hold audit events as recorded (ids, actions, outcomes, never document text), in clear like
the audit table itself: they are system records with no tenant data key to encrypt them with.

Runs as the owner role (every tenant's rows; only the owner may write `audit_archives`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import Connection, text

from appliance.audit.chain import GENESIS, VerifyResult
from appliance.audit.export import verify_export, write_export
from appliance.storage.base import ObjectNotFound, ObjectStore


class SegmentError(Exception):
    """A segment that cannot be archived as it stands (one line); nothing is recorded."""


@dataclass(frozen=True)
class Segment:
    first_seq: int
    last_seq: int
    object_key: str
    sha256: bytes
    size: int
    events: int


def segments(conn: Connection) -> list[Segment]:
    rows = conn.execute(
        text(
            "SELECT first_seq, last_seq, object_key, sha256, size, events "
            "FROM audit_archives ORDER BY first_seq"
        )
    ).all()
    return [Segment(int(r[0]), int(r[1]), r[2], bytes(r[3]), int(r[4]), int(r[5])) for r in rows]


def archive_segment(
    conn: Connection, store: ObjectStore, public_key: Ed25519PublicKey, *, before: datetime | None = None
) -> Segment | None:
    """Archive the next segment; None when no signed checkpoint lies beyond the last archived seq."""
    done = conn.execute(text("SELECT coalesce(max(last_seq), 0) FROM audit_archives")).scalar_one()
    end = conn.execute(
        text(
            "SELECT max(seq) FROM audit_checkpoints WHERE seq > :done "
            "AND (CAST(:before AS timestamptz) IS NULL OR signed_at < :before)"
        ),
        {"done": done, "before": before},
    ).scalar_one()
    if end is None:
        return None
    first, last = int(done) + 1, int(end)
    with tempfile.NamedTemporaryFile("w+b", suffix=".jsonl", delete=False) as tmp:
        path = Path(tmp.name)
    try:
        with open(path, "w", encoding="utf-8") as fh:
            summary = write_export(conn, fh, public_key=public_key, seqs=(first, last))
        if summary.events != last - first + 1:
            raise SegmentError(f"audit rows {first}..{last} are not all present ({summary.events} found)")
        # The segment must verify before it is recorded as the trail's copy.
        result = verify_export(path, [public_key])
        if not result.ok or result.last_anchored_seq != last:
            raise SegmentError(f"the segment {first}..{last} does not verify: {result.first_break}")
        digest = _sha256(path)
        key = store.new_key()
        store.put_file(key, path)
        size = path.stat().st_size
    finally:
        os.unlink(path)
    conn.execute(
        text(
            "INSERT INTO audit_archives (first_seq, last_seq, object_key, sha256, size, events) "
            "VALUES (:f, :l, :k, :h, :s, :e)"
        ),
        {"f": first, "l": last, "k": key, "h": digest, "s": size, "e": summary.events},
    )
    conn.commit()
    return Segment(first, last, key, digest, size, summary.events)


@dataclass(frozen=True)
class SegmentCheck:
    segment: Segment
    problem: str | None  # None: intact and continuous with the chain in Postgres


def verify_segments(conn: Connection, store: ObjectStore, keys: list[Ed25519PublicKey]) -> list[SegmentCheck]:
    """Re-read every archived segment: its sha256, its own chain and checkpoints, continuity with the
    previous segment, and agreement with the rows still in Postgres at both ends."""
    checks: list[SegmentCheck] = []
    expected_first = 1
    expected_prev: bytes | None = GENESIS
    for seg in segments(conn):
        problem, result, first_prev = _check_segment(conn, store, keys, seg, expected_first)
        if problem is None and expected_prev is not None and first_prev != expected_prev:
            # Segments chain: this one's first prev_hash is the previous one's last hash.
            problem = f"the segment does not continue the previous one (prev_hash at seq {seg.first_seq})"
        checks.append(SegmentCheck(seg, problem))
        expected_first = seg.last_seq + 1
        expected_prev = result.last_hash if result is not None else None
    return checks


def _check_segment(
    conn: Connection, store: ObjectStore, keys: list[Ed25519PublicKey], seg: Segment, expected_first: int
) -> tuple[str | None, VerifyResult | None, bytes | None]:
    """(problem, the segment's own verification, its first prev_hash)."""
    if seg.first_seq != expected_first:
        return (
            f"segment starts at seq {seg.first_seq}, expected {expected_first} (a segment is missing)",
            None,
            None,
        )
    try:
        data = b"".join(store.iter_chunks(seg.object_key))
    except ObjectNotFound:
        return f"object {seg.object_key} is missing from the store", None, None
    if hashlib.sha256(data).digest() != seg.sha256:
        return "the stored segment does not match its recorded sha256 (modified in the store)", None, None
    with tempfile.NamedTemporaryFile("wb", suffix=".jsonl") as tmp:
        tmp.write(data)
        tmp.flush()
        result: VerifyResult = verify_export(Path(tmp.name), keys)
    if not result.ok:
        return f"the segment does not verify: {result.first_break}", None, None
    if result.last_anchored_seq != seg.last_seq:
        return f"the segment is not anchored by a checkpoint at its end (seq {seg.last_seq})", None, None
    row = conn.execute(
        text("SELECT hash FROM audit_events WHERE seq = :s"), {"s": seg.last_seq}
    ).one_or_none()
    if row is not None and bytes(row[0]) != result.last_hash:
        return f"the segment's hash at seq {seg.last_seq} differs from the database's", result, None
    first = _first_prev_hash(data)
    prev = conn.execute(
        text("SELECT prev_hash FROM audit_events WHERE seq = :s"), {"s": seg.first_seq}
    ).one_or_none()
    if prev is not None and bytes(prev[0]) != first:
        return (
            f"the segment's first prev_hash differs from the database's at seq {seg.first_seq}",
            result,
            first,
        )
    return None, result, first


def _first_prev_hash(data: bytes) -> bytes:
    for line in io.BytesIO(data):
        obj = json.loads(line)
        if obj.get("type") == "event":
            return bytes.fromhex(obj["prev_hash"])
    return b""


def _sha256(path: Path) -> bytes:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.digest()
