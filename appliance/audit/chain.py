"""The audit hash chain, independent of any database so an export can be checked on its own.

`hash_n = sha256(hash_{n-1} || canonical(event_n))` with `hash_0` = 32 zero bytes. The canonical
form is compact JSON with sorted keys over every recorded field except the two hashes, timestamps
in UTC ISO-8601 with microseconds, UUIDs as lowercase strings. Changing any field, deleting a row
or reordering rows breaks the chain at that row.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

GENESIS = b"\x00" * 32

CHAINED_FIELDS = (
    "seq",
    "id",
    "occurred_at",
    "tenant_id",
    "actor_type",
    "actor_id",
    "action",
    "resource_type",
    "resource_id",
    "outcome",
    "request_id",
    "client_addr",
    "details",
)


def _norm(value: Any) -> Any:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError("audit timestamps must be timezone-aware")
        return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


def canonical(event: Mapping[str, Any]) -> bytes:
    body = {f: _norm(event.get(f)) for f in CHAINED_FIELDS}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def link_hash(prev_hash: bytes, event: Mapping[str, Any]) -> bytes:
    return hashlib.sha256(prev_hash + canonical(event)).digest()


@dataclass(frozen=True)
class ChainBreak:
    seq: int
    problem: str

    def __str__(self) -> str:
        return f"seq {self.seq}: {self.problem}"


@dataclass(frozen=True)
class VerifyResult:
    checked: int
    last_seq: int
    last_hash: bytes
    first_break: ChainBreak | None

    @property
    def ok(self) -> bool:
        return self.first_break is None


def verify_chain(
    rows: Iterable[Mapping[str, Any]],
    *,
    start_seq: int = 1,
    start_hash: bytes = GENESIS,
    expected_head: tuple[int, bytes] | None = None,
) -> VerifyResult:
    """Walk rows ordered by seq and report the first broken link precisely.

    A gap in seq means a deleted row; a stored hash that does not recompute means an edited row;
    a prev_hash that does not match the previous row's hash means rows were reordered or replaced.
    `expected_head`, when given, catches deletion of the newest rows.
    """
    prev_hash = start_hash
    expected_seq = start_seq
    checked = 0
    for row in rows:
        seq = int(row["seq"])
        if seq != expected_seq:
            problem = (
                f"row(s) {expected_seq}..{seq - 1} missing (deleted)"
                if seq > expected_seq
                else f"out of order: expected seq {expected_seq}"
            )
            return VerifyResult(checked, expected_seq - 1, prev_hash, ChainBreak(expected_seq, problem))
        stored_prev = bytes(row["prev_hash"])
        if stored_prev != prev_hash:
            return VerifyResult(
                checked,
                seq - 1,
                prev_hash,
                ChainBreak(
                    seq, "prev_hash does not match the hash of the row before it (rows replaced or reordered)"
                ),
            )
        recomputed = link_hash(prev_hash, row)
        if recomputed != bytes(row["hash"]):
            return VerifyResult(
                checked, seq - 1, prev_hash, ChainBreak(seq, "content does not match its hash (row edited)")
            )
        prev_hash = recomputed
        expected_seq += 1
        checked += 1
    last_seq = expected_seq - 1
    if expected_head is not None:
        head_seq, head_hash = expected_head
        if head_seq > last_seq:
            return VerifyResult(
                checked,
                last_seq,
                prev_hash,
                ChainBreak(
                    last_seq + 1, f"rows {last_seq + 1}..{head_seq} missing at the end of the chain (deleted)"
                ),
            )
        if head_seq == last_seq and head_hash != prev_hash:
            return VerifyResult(
                checked, last_seq, prev_hash, ChainBreak(last_seq, "chain head does not match the last row")
            )
    return VerifyResult(checked, last_seq, prev_hash, None)
