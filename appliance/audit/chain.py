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


def chained_values(event: Mapping[str, Any]) -> dict[str, Any]:
    """The chained fields as JSON values, exactly as they are hashed (what an export writes)."""
    return {f: _norm(event.get(f)) for f in CHAINED_FIELDS}


def canonical(event: Mapping[str, Any]) -> bytes:
    body = chained_values(event)
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
class Anchor:
    """A signed checkpoint as the walk sees it: the hash it vouches for at `seq`, or why its
    signature was refused (`problem`). Signature checking lives in appliance.audit.signing."""

    seq: int
    hash: bytes
    problem: str | None = None


@dataclass(frozen=True)
class VerifyResult:
    checked: int
    last_seq: int
    last_hash: bytes
    first_break: ChainBreak | None
    checkpoints: int = 0  # checkpoints whose signature and hash both verified
    last_anchored_seq: int = 0  # the newest of them (0: none)

    @property
    def ok(self) -> bool:
        return self.first_break is None

    @property
    def unanchored(self) -> int:
        """Events after the last verified checkpoint (all of them when there is none)."""
        return self.last_seq - max(self.last_anchored_seq, self.last_seq - self.checked)


class _Walk:
    """Recompute the chain one row at a time; `anchors` (sorted by seq) are checked as the walk passes."""

    def __init__(self, start_seq: int, start_hash: bytes, anchors: Iterable[Anchor]) -> None:
        self.expected_seq = start_seq
        self.prev_hash = start_hash
        self.checked = 0
        self.anchors = sorted(anchors, key=lambda a: a.seq)
        self.next_anchor = 0
        self.anchored = 0
        self.last_anchored = 0

    def result(self, brk: ChainBreak | None = None) -> VerifyResult:
        return VerifyResult(
            self.checked, self.expected_seq - 1, self.prev_hash, brk, self.anchored, self.last_anchored
        )

    def step(self, row: Mapping[str, Any]) -> ChainBreak | None:
        seq = int(row["seq"])
        if seq != self.expected_seq:
            expected = self.expected_seq
            if seq > expected:
                return ChainBreak(expected, f"row(s) {expected}..{seq - 1} missing (deleted)")
            return ChainBreak(expected, f"out of order: expected seq {expected}")
        if bytes(row["prev_hash"]) != self.prev_hash:
            return ChainBreak(
                seq, "prev_hash does not match the hash of the row before it (rows replaced or reordered)"
            )
        recomputed = link_hash(self.prev_hash, row)
        if recomputed != bytes(row["hash"]):
            return ChainBreak(seq, "content does not match its hash (row edited)")
        self.prev_hash = recomputed
        self.expected_seq += 1
        self.checked += 1
        return self._check_anchors(seq, recomputed)

    def _check_anchors(self, seq: int, hash_: bytes) -> ChainBreak | None:
        while self.next_anchor < len(self.anchors) and self.anchors[self.next_anchor].seq <= seq:
            anchor = self.anchors[self.next_anchor]
            self.next_anchor += 1
            if anchor.seq < seq:  # only before the first row: the walk visits every seq after it
                return ChainBreak(anchor.seq, "checkpoint precedes the first event checked")
            if anchor.problem:
                return ChainBreak(seq, f"checkpoint refused: {anchor.problem}")
            if anchor.hash != hash_:
                since = self.last_anchored + 1 if self.last_anchored else seq - self.checked + 1
                return ChainBreak(
                    seq,
                    f"checkpoint does not match the chain: rows {since}..{seq} were rewritten "
                    "(hashes recomputed after an edit, deletion or reordering)",
                )
            self.anchored += 1
            self.last_anchored = seq
        return None

    def finish(self, expected_head: tuple[int, bytes] | None) -> ChainBreak | None:
        last_seq = self.expected_seq - 1
        if expected_head is not None:
            head_seq, head_hash = expected_head
            if head_seq > last_seq:
                return ChainBreak(
                    last_seq + 1, f"rows {last_seq + 1}..{head_seq} missing at the end of the chain (deleted)"
                )
            if head_seq == last_seq and head_hash != self.prev_hash:
                return ChainBreak(last_seq, "chain head does not match the last row")
        if self.next_anchor < len(self.anchors):
            seq = self.anchors[self.next_anchor].seq
            if seq < self.expected_seq - self.checked:  # no rows at all, and the anchor is before the start
                return ChainBreak(seq, "checkpoint precedes the first event checked")
            return ChainBreak(
                seq, f"checkpoint at seq {seq} is past the last event {last_seq} (rows deleted at the end)"
            )
        return None


def verify_chain(
    rows: Iterable[Mapping[str, Any]],
    *,
    start_seq: int = 1,
    start_hash: bytes = GENESIS,
    expected_head: tuple[int, bytes] | None = None,
    anchors: Iterable[Anchor] = (),
) -> VerifyResult:
    """Walk rows ordered by seq and report the first broken link precisely.

    A gap in seq means a deleted row; a stored hash that does not recompute means an edited row;
    a prev_hash that does not match the previous row's hash means rows were reordered or replaced.
    `expected_head`, when given, catches deletion of the newest rows. Each anchor (a signed
    checkpoint) must match the recomputed hash at its seq: that catches a rewrite that recomputed
    every hash after the change, which the links alone cannot.
    """
    walk = _Walk(start_seq, start_hash, anchors)
    for row in rows:
        brk = walk.step(row)
        if brk is not None:
            return walk.result(brk)
    return walk.result(walk.finish(expected_head))
