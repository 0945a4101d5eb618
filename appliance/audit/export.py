"""Audit exports for auditors: JSONL written from the database, verified with the public key alone.

One JSON object per line, in this order:

- `{"type": "header", "format": "appliance-audit-export-v1", ...}`: the range, and the appliance's
  public key for information only (verification uses the key the auditor was given, never this);
- `{"type": "event", <every chained field>, "prev_hash": hex, "hash": hex}` for each event of one
  contiguous seq range, in seq order; timestamps exactly as they are hashed (UTC, microseconds, `Z`);
- `{"type": "checkpoint", "seq", "hash", "signed_at", "key_id", "signature"}` (hex) right after the
  event it covers, for every checkpoint inside the range.

`verify_export` needs no database and no settings: it recomputes the chain from the first event's
prev_hash and checks every checkpoint against the given keys and the recomputed hash at its seq.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import Connection, text

from appliance.audit import signing
from appliance.audit.chain import CHAINED_FIELDS, ChainBreak, VerifyResult, chained_values, verify_chain
from appliance.audit.service import iter_rows, list_checkpoints

FORMAT = "appliance-audit-export-v1"


class ExportFormatError(Exception):
    """The file is not a well-formed export (the message names the line)."""


@dataclass(frozen=True)
class ExportSummary:
    events: int
    checkpoints: int
    first_seq: int | None
    last_seq: int | None


# Writing (as the owner role: every tenant's rows) ----------------------------------------------


def seq_range(conn: Connection, since: datetime | None, until: datetime | None) -> tuple[int, int] | None:
    """The smallest contiguous seq range holding every event that occurred in [since, until].

    Seq is commit order and occurred_at is when the event was recorded, so the two can cross by a
    few milliseconds at the edges: the range is widened to a contiguous one, never narrowed."""
    first = conn.execute(
        text("SELECT min(seq) FROM audit_events WHERE CAST(:t AS timestamptz) IS NULL OR occurred_at >= :t"),
        {"t": since},
    ).scalar_one()
    last = conn.execute(
        text("SELECT max(seq) FROM audit_events WHERE CAST(:t AS timestamptz) IS NULL OR occurred_at <= :t"),
        {"t": until},
    ).scalar_one()
    if first is None or last is None or first > last:
        return None
    return int(first), int(last)


def write_export(
    conn: Connection,
    out: TextIO,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    public_key: Ed25519PublicKey | None = None,
    seqs: tuple[int, int] | None = None,
) -> ExportSummary:
    """Write the events of [since, until], or of the seq range `seqs` when given (archived segments)."""
    bounds = seqs or seq_range(conn, since, until)
    header: dict[str, Any] = {
        "type": "header",
        "format": FORMAT,
        "since": signing.format_time(since) if since else None,
        "until": signing.format_time(until) if until else None,
        "first_seq": bounds[0] if bounds else None,
        "last_seq": bounds[1] if bounds else None,
        "key_id": signing.key_id(public_key) if public_key else None,
        "public_key": signing.public_pem(public_key).decode() if public_key else None,
        "note": "informational: verify with the public key you were given, not this one",
    }
    _line(out, header)
    if bounds is None:
        return ExportSummary(0, 0, None, None)
    checkpoints = {cp.seq: cp for cp in list_checkpoints(conn, first=bounds[0], last=bounds[1])}
    events = 0
    for row in iter_rows(conn, first=bounds[0], last_seq=bounds[1]):
        _line(out, event_line(row))
        events += 1
        cp = checkpoints.get(int(row["seq"]))
        if cp is not None:
            _line(out, checkpoint_line(cp))
    return ExportSummary(events, len(checkpoints), bounds[0], bounds[1])


def event_line(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "event",
        **chained_values(row),
        "prev_hash": bytes(row["prev_hash"]).hex(),
        "hash": bytes(row["hash"]).hex(),
    }


def checkpoint_line(cp: signing.Checkpoint) -> dict[str, Any]:
    return {
        "type": "checkpoint",
        "seq": cp.seq,
        "hash": cp.hash.hex(),
        "signed_at": signing.format_time(cp.signed_at),
        "key_id": cp.key_id,
        "signature": cp.signature.hex(),
    }


def _line(out: TextIO, obj: dict[str, Any]) -> None:
    out.write(json.dumps(obj, sort_keys=True, separators=(",", ":")) + "\n")


# Verifying (no database) -----------------------------------------------------------------------


def verify_export(path: Path, keys: list[Ed25519PublicKey]) -> VerifyResult:
    """Recompute the export's chain and check its checkpoints with `keys`. Two passes over the
    file: the checkpoints first (a few per hour), then the events streamed (constant memory)."""
    checkpoints: list[signing.Checkpoint] = []
    first: dict[str, Any] | None = None
    header: dict[str, Any] = {}
    for n, obj in _objects(path):
        if obj.get("type") == "checkpoint":
            checkpoints.append(_parse_checkpoint(n, obj))
        elif obj.get("type") == "event" and first is None:
            first = _parse_event(n, obj)
        elif obj.get("type") == "header":
            header = obj
        elif obj.get("type") != "event":
            raise ExportFormatError(f"line {n}: unknown record type {obj.get('type')!r}")
    start_seq = int(first["seq"]) if first else 1
    start_hash = bytes(first["prev_hash"]) if first else b""
    result = verify_chain(
        _events(path), start_seq=start_seq, start_hash=start_hash, anchors=signing.anchors(checkpoints, keys)
    )
    # The header is not signed: this only catches a file cut short at a line boundary by accident.
    expected_last = header.get("last_seq")
    if result.ok and isinstance(expected_last, int) and expected_last != result.last_seq:
        problem = f"the export ends at seq {result.last_seq} but its header says {expected_last} (truncated?)"
        return replace(result, first_break=ChainBreak(result.last_seq + 1, problem))
    return result


def _objects(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                raise ExportFormatError(f"line {n}: not JSON (truncated or corrupted file?)") from None
            if not isinstance(obj, dict):
                raise ExportFormatError(f"line {n}: not a JSON object")
            yield n, obj


def _events(path: Path) -> Iterator[dict[str, Any]]:
    for n, obj in _objects(path):
        if obj.get("type") == "event":
            yield _parse_event(n, obj)


def _parse_event(n: int, obj: dict[str, Any]) -> dict[str, Any]:
    missing = [f for f in (*CHAINED_FIELDS, "prev_hash", "hash") if f not in obj]
    if missing:
        raise ExportFormatError(f"line {n}: event lacks {', '.join(missing)}")
    try:
        row = {f: obj[f] for f in CHAINED_FIELDS}
        row["seq"] = int(obj["seq"])
        row["occurred_at"] = signing.parse_time(obj["occurred_at"])
        row["prev_hash"] = bytes.fromhex(obj["prev_hash"])
        row["hash"] = bytes.fromhex(obj["hash"])
    except (TypeError, ValueError) as exc:
        raise ExportFormatError(f"line {n}: malformed event (seq {obj.get('seq')}): {exc}") from None
    return row


def _parse_checkpoint(n: int, obj: dict[str, Any]) -> signing.Checkpoint:
    try:
        return signing.Checkpoint(
            seq=int(obj["seq"]),
            hash=bytes.fromhex(obj["hash"]),
            signed_at=signing.parse_time(obj["signed_at"]),
            key_id=str(obj["key_id"]),
            signature=bytes.fromhex(obj["signature"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ExportFormatError(f"line {n}: malformed checkpoint (seq {obj.get('seq')}): {exc}") from None
