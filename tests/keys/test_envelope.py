"""Encrypted blob format: round trips, range reads, tampering. Real AES-GCM and zstd, no mocks.

The throughput measurement behind docs/encryption.md is bench/envelope_throughput.py.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import struct
import tracemalloc
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance.keys.envelope import (
    DEFAULT_SEGMENT_SIZE,
    HEADER_SIZE,
    TRAILER_SIZE,
    BlobContext,
    BlobIntegrityError,
    BlobReader,
    BlobWriter,
    BytesSource,
    FileSource,
)
from appliance.keys.kek import generate_dek

S = DEFAULT_SEGMENT_SIZE
SMALL = 1024  # segment size for tests that want many segments
MiB = 1 << 20


def text_like(n: int, seed: int = 0) -> bytes:
    """Word salad with a Zipf-ish vocabulary: compresses about like extracted document text."""
    rnd = random.Random(seed)
    vocab = ["".join(rnd.choices("etaoinshrdlcumwfgypbvkjxqz", k=rnd.randint(2, 10))) for _ in range(5000)]
    weights = [1 / (i + 1) for i in range(len(vocab))]
    out = bytearray()
    while len(out) < n:
        out += (" ".join(rnd.choices(vocab, weights, k=500)) + ".\n").encode()
    return bytes(out[:n])


def random_bytes(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def new_context(**change: object) -> BlobContext:
    fields: dict[str, object] = {
        "tenant_id": uuid.uuid4(),
        "kind": "original",
        "document_id": uuid.uuid4(),
        "version_id": uuid.uuid4(),
    }
    fields |= change
    return BlobContext(**fields)  # type: ignore[arg-type]


@pytest.fixture
def dek() -> bytes:
    return generate_dek()


@pytest.fixture
def ctx() -> BlobContext:
    return new_context()


def seal(
    dek: bytes, ctx: BlobContext, data: bytes, *, segment_size: int = S, compress: bool = True, piece: int = 0
) -> bytes:
    sink = io.BytesIO()
    with BlobWriter(dek, ctx, sink, segment_size=segment_size, compress=compress) as w:
        if piece:
            for i in range(0, len(data), piece):
                w.write(data[i : i + piece])
        else:
            w.write(data)
    return sink.getvalue()


def read_all(dek: bytes, ctx: BlobContext, blob: bytes) -> bytes:
    return b"".join(BlobReader(dek, ctx, BytesSource(blob)).iter_all())


@dataclass
class Layout:
    """Parsed independently of the reader: where each record starts, from the clen chain."""

    segments: list[tuple[int, int]]  # (offset, record length incl. clen) per data segment
    index: tuple[int, int]
    size: int


def layout(blob: bytes) -> Layout:
    index_offset = struct.unpack(">Q", blob[-TRAILER_SIZE:-4])[0]
    records = []
    pos = HEADER_SIZE
    while pos < index_offset:
        clen = struct.unpack(">I", blob[pos : pos + 4])[0]
        records.append((pos, 4 + clen))
        pos += 4 + clen
    assert pos == index_offset
    return Layout(records, (index_offset, len(blob) - TRAILER_SIZE - index_offset), len(blob))


class CountingSource:
    """Wraps a source and counts what the reader asks for."""

    def __init__(self, inner: BytesSource | FileSource) -> None:
        self.inner = inner
        self.size = inner.size
        self.calls: list[tuple[int, int]] = []

    def read_at(self, offset: int, length: int) -> bytes:
        self.calls.append((offset, length))
        return self.inner.read_at(offset, length)


def drain(reader: BlobReader, **kw: int) -> tuple[bytes, BlobIntegrityError | None]:
    """Everything yielded before the first integrity error, and that error."""
    got = bytearray()
    try:
        for piece in reader.iter_all(**kw):
            got += piece
    except BlobIntegrityError as e:
        return bytes(got), e
    return bytes(got), None


def overhead(segments: int) -> int:
    return HEADER_SIZE + segments * (4 + 1 + 16) + 4 + (12 + 8 * (segments + 1) + 16) + TRAILER_SIZE


# --- round trips ----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, S - 1, S, S + 1, 5 * S + 12345])
@pytest.mark.parametrize("kind", ["random", "text"])
def test_round_trip(dek: bytes, ctx: BlobContext, size: int, kind: str) -> None:
    data = random_bytes(size, seed=size) if kind == "random" else text_like(size, seed=size)
    for piece in (0, 1 if size < 5000 else 4099, 100_003):
        blob = seal(dek, ctx, data, piece=piece)
        reader = BlobReader(dek, ctx, BytesSource(blob))
        assert reader.plaintext_size == size
        assert reader.segments == -(-size // S)
        assert b"".join(reader.iter_all()) == data
        reader.verify()
        if kind == "random":  # incompressible: every segment stored raw
            assert len(blob) == size + overhead(reader.segments)


def test_close_reports_info(dek: bytes, ctx: BlobContext) -> None:
    sink = io.BytesIO()
    w = BlobWriter(dek, ctx, sink, segment_size=SMALL)
    w.write(random_bytes(3 * SMALL + 5))
    info = w.close()
    assert info.plaintext_size == 3 * SMALL + 5
    assert info.segments == 4
    assert info.stored_size == len(sink.getvalue()) == 3 * SMALL + 5 + overhead(4)
    assert w.close() == info  # idempotent
    with pytest.raises(ValueError):
        w.write(b"more")


def test_compressible_data_is_stored_much_smaller(dek: bytes, ctx: BlobContext) -> None:
    text = text_like(4 * MiB)
    blob = seal(dek, ctx, text)
    assert len(blob) < len(text) // 2
    zeros = bytes(4 * MiB)
    blob = seal(dek, ctx, zeros)
    assert len(blob) < len(zeros) // 100
    assert read_all(dek, ctx, blob) == zeros
    # compress=False stores raw even when compression would help.
    raw = seal(dek, ctx, zeros, compress=False)
    assert len(raw) == len(zeros) + overhead(len(zeros) // S)
    assert read_all(dek, ctx, raw) == zeros


def test_mixed_segments_keep_compression_only_where_it_shrinks(dek: bytes, ctx: BlobContext) -> None:
    data = random_bytes(SMALL) + bytes(SMALL) + random_bytes(SMALL, seed=1) + b"ab" * (SMALL // 2)
    blob = seal(dek, ctx, data, segment_size=SMALL)
    lengths = [length for _, length in layout(blob).segments]
    assert lengths[0] == lengths[2] == 4 + 1 + SMALL + 16
    assert lengths[1] < 100 and lengths[3] < 100
    assert read_all(dek, ctx, blob) == data


def test_50_mib_streamed_through_files(dek: bytes, ctx: BlobContext, tmp_path: Path) -> None:
    """50 MiB in 1 MiB pieces, alternating random and text; compared by SHA-256."""
    text_piece = text_like(MiB, seed=7)
    path = tmp_path / "blob"
    written = hashlib.sha256()
    with open(path, "wb") as sink, BlobWriter(dek, ctx, sink) as w:
        for i in range(50):
            piece = os.urandom(MiB) if i % 2 else text_piece
            written.update(piece)
            w.write(piece)
    info = w.close()
    assert info.plaintext_size == 50 * MiB
    assert info.stored_size == path.stat().st_size < 50 * MiB
    read = hashlib.sha256()
    with FileSource(path) as src:
        reader = BlobReader(dek, ctx, src)
        for piece in reader.iter_all(chunk=MiB):
            read.update(piece)
    assert read.digest() == written.digest()


def test_writer_is_sequential_and_buffers_at_most_one_segment(dek: bytes, ctx: BlobContext) -> None:
    class AppendOnlySink:  # no seek, no tell: like a pipe
        def __init__(self) -> None:
            self.data = bytearray()

        def write(self, b: bytes) -> int:
            n = min(len(b), 1000)  # short writes, like a raw pipe
            self.data += b[:n]
            return n

    sink = AppendOnlySink()
    w = BlobWriter(dek, ctx, sink, segment_size=SMALL, compress=False)  # type: ignore[arg-type]
    data = random_bytes(10 * SMALL + 7)
    pos = 0
    for step in (1, SMALL - 1, 3 * SMALL + 5, 7, 6 * SMALL - 5):
        w.write(data[pos : pos + step])
        pos += step
        # Everything but the current partial segment has already reached the sink.
        assert len(sink.data) == HEADER_SIZE + (pos // SMALL) * (4 + 1 + SMALL + 16)
    assert pos == len(data)
    w.close()
    assert read_all(dek, ctx, bytes(sink.data)) == data


def test_pipe_sink(dek: bytes, ctx: BlobContext) -> None:
    r, wfd = os.pipe()
    data = text_like(3 * SMALL)
    with os.fdopen(wfd, "wb", buffering=0) as sink, BlobWriter(dek, ctx, sink, segment_size=SMALL) as w:
        w.write(data)
    with os.fdopen(r, "rb") as f:
        blob = f.read()
    assert read_all(dek, ctx, blob) == data


def test_memory_stays_flat(dek: bytes, ctx: BlobContext, tmp_path: Path) -> None:
    piece = random_bytes(MiB)
    path = tmp_path / "blob"
    tracemalloc.start()
    try:
        with open(path, "wb") as sink, BlobWriter(dek, ctx, sink) as w:
            for _ in range(16):
                w.write(piece)
        _, write_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        with FileSource(path) as src:
            for _ in BlobReader(dek, ctx, src).iter_all():
                pass
        _, read_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert write_peak < 5 * S, write_peak
    assert read_peak < 5 * S, read_peak


def test_exception_in_block_aborts(dek: bytes, ctx: BlobContext) -> None:
    sink = io.BytesIO()
    with pytest.raises(RuntimeError), BlobWriter(dek, ctx, sink, segment_size=SMALL) as w:
        w.write(random_bytes(3 * SMALL))
        raise RuntimeError("upload interrupted")
    with pytest.raises(ValueError):
        w.write(b"x")
    with pytest.raises(BlobIntegrityError):
        BlobReader(dek, ctx, BytesSource(sink.getvalue()))


def test_context_validation() -> None:
    with pytest.raises(TypeError):
        new_context(tenant_id=str(uuid.uuid4()))
    for kind in ("", "Original", "a b", "x" * 64, "é"):
        with pytest.raises(ValueError):
            new_context(kind=kind)
    a = new_context()
    assert a.to_bytes() == BlobContext(a.tenant_id, a.kind, a.document_id, a.version_id).to_bytes()
    assert a.to_bytes() != new_context(tenant_id=a.tenant_id, document_id=a.document_id).to_bytes()


def test_bad_parameters(dek: bytes, ctx: BlobContext) -> None:
    with pytest.raises(ValueError):
        BlobWriter(dek[:16], ctx, io.BytesIO())
    with pytest.raises(ValueError):
        BlobWriter(dek, ctx, io.BytesIO(), segment_size=100)


# --- range reads ----------------------------------------------------------------------------------


@pytest.fixture
def ranged(dek: bytes, ctx: BlobContext) -> tuple[bytes, bytes]:
    data = b"".join(
        random_bytes(SMALL, seed=i) if i % 3 else text_like(SMALL, seed=i) for i in range(40)
    ) + random_bytes(321)
    return data, seal(dek, ctx, data, segment_size=SMALL)


def test_range_reads_match_slices_and_read_only_needed_segments(
    dek: bytes, ctx: BlobContext, ranged: tuple[bytes, bytes]
) -> None:
    data, blob = ranged
    lay = layout(blob)
    src = CountingSource(BytesSource(blob))
    reader = BlobReader(dek, ctx, src)
    assert len(src.calls) == 3  # header, trailer, index record
    size = len(data)
    rnd = random.Random(42)
    cases = [(0, 0), (0, 1), (size - 1, size), (size, size), (0, size), (SMALL - 1, SMALL + 1)]
    cases += [(SMALL * k, SMALL * k) for k in range(3)]
    cases += [(SMALL * k - 1, SMALL * k) for k in range(1, 5)]
    cases += [(SMALL * k, SMALL * (k + 1)) for k in range(3)]
    for _ in range(400):
        a = rnd.randrange(size + 1)
        b = rnd.randrange(a, min(size, a + rnd.choice([1, 10, SMALL, 5 * SMALL])) + 1)
        cases.append((a, b))
    for start, end in cases:
        src.calls.clear()
        chunk = rnd.choice([1, 7, 100, SMALL, 10 * SMALL])
        pieces = list(reader.iter_range(start, end, chunk=chunk))
        assert b"".join(pieces) == data[start:end], (start, end)
        assert all(0 < len(p) <= chunk for p in pieces)
        needed = range(start // SMALL, (end - 1) // SMALL + 1) if end > start else range(0)
        assert src.calls == [lay.segments[i] for i in needed], (start, end)
    # end=None reads to the end; read_range is the joined form.
    assert b"".join(reader.iter_range(size - 5)) == data[-5:]
    assert reader.read_range(3 * SMALL - 2, 3 * SMALL + 2) == data[3 * SMALL - 2 : 3 * SMALL + 2]


def test_range_bounds_are_checked_eagerly(dek: bytes, ctx: BlobContext, ranged: tuple[bytes, bytes]) -> None:
    data, blob = ranged
    reader = BlobReader(dek, ctx, BytesSource(blob))
    for start, end in ((-1, 5), (5, 4), (0, len(data) + 1), (len(data) + 1, None)):
        with pytest.raises(ValueError):
            reader.iter_range(start, end)
    with pytest.raises(ValueError):
        reader.iter_range(0, 1, chunk=0)


def test_range_read_of_a_large_blob_reads_one_segment(dek: bytes, ctx: BlobContext, tmp_path: Path) -> None:
    path = tmp_path / "blob"
    data = random_bytes(8 * MiB)
    with open(path, "wb") as sink, BlobWriter(dek, ctx, sink) as w:
        w.write(data)
    with FileSource(path) as inner:
        src = CountingSource(inner)
        reader = BlobReader(dek, ctx, src)
        opened = sum(n for _, n in src.calls)
        assert opened == HEADER_SIZE + TRAILER_SIZE + 4 + 12 + 8 * 33 + 16  # not the blob
        src.calls.clear()
        assert reader.read_range(5 * MiB + 10, 5 * MiB + 20) == data[5 * MiB + 10 : 5 * MiB + 20]
        assert len(src.calls) == 1 and src.calls[0][1] == 4 + 1 + S + 16


# --- tampering ------------------------------------------------------------------------------------


def segment_of(lay: Layout, pos: int) -> int | None:
    for i, (off, length) in enumerate(lay.segments):
        if off <= pos < off + length:
            return i
    return None


def assert_rejected(dek: bytes, ctx: BlobContext, blob: bytes, data: bytes, bad_segment: int | None) -> None:
    """Open fails (bad_segment None), or reading fails at bad_segment having released only the
    plaintext of the segments before it; verify() fails too."""
    if bad_segment is None:
        with pytest.raises(BlobIntegrityError):
            BlobReader(dek, ctx, BytesSource(blob))
        return
    reader = BlobReader(dek, ctx, BytesSource(blob))
    got, err = drain(reader, chunk=97)
    assert err is not None, "tampering not detected"
    assert f"segment {bad_segment} " in str(err)
    assert got == data[: bad_segment * reader.segment_size]
    with pytest.raises(BlobIntegrityError):
        reader.verify()
    # A range inside the bad segment yields nothing at all.
    start = bad_segment * reader.segment_size
    with pytest.raises(BlobIntegrityError):
        next(reader.iter_range(start, start + 1))


@pytest.mark.parametrize("compress", [True, False])
def test_every_single_byte_flip_is_detected(dek: bytes, ctx: BlobContext, compress: bool) -> None:
    seg = 256
    data = random_bytes(seg) + text_like(seg) + random_bytes(seg, seed=3) + text_like(100, seed=4)
    blob = seal(dek, ctx, data, segment_size=seg, compress=compress)
    lay = layout(blob)
    assert len(lay.segments) == 4
    for pos in range(len(blob)):
        for bit in (0x01, 0x80):
            bad = bytearray(blob)
            bad[pos] ^= bit
            assert_rejected(dek, ctx, bytes(bad), data, segment_of(lay, pos))


def test_named_regions(dek: bytes, ctx: BlobContext) -> None:
    data = text_like(2 * SMALL) + random_bytes(2 * SMALL) + text_like(300, seed=9)
    blob = seal(dek, ctx, data, segment_size=SMALL)
    lay = layout(blob)
    seg1_off, seg1_len = lay.segments[1]
    idx_off, idx_len = lay.index
    regions = {
        "header magic": (0, None),
        "header version": (4, None),
        "header flags": (5, None),
        "header segment size": (9, None),
        "header salt": (20, None),
        "header nonce prefix": (HEADER_SIZE - 1, None),
        "segment length field": (seg1_off + 3, 1),
        "segment codec/ciphertext": (seg1_off + 4, 1),
        "segment ciphertext": (seg1_off + seg1_len // 2, 1),
        "segment tag": (seg1_off + seg1_len - 1, 1),
        "index length field": (idx_off + 3, None),
        "index ciphertext": (idx_off + 10, None),
        "index tag": (idx_off + idx_len - 1, None),
        "trailer offset": (len(blob) - 6, None),
        "trailer magic": (len(blob) - 1, None),
    }
    for name, (pos, bad_segment) in regions.items():
        bad = bytearray(blob)
        bad[pos] ^= 0x04
        try:
            assert_rejected(dek, ctx, bytes(bad), data, bad_segment)
        except AssertionError as e:  # pragma: no cover - names the region on failure
            raise AssertionError(f"{name}: {e}") from e


def test_truncation_is_detected_at_open(dek: bytes, ctx: BlobContext) -> None:
    data = random_bytes(4 * SMALL + 10)
    blob = seal(dek, ctx, data, segment_size=SMALL)
    lay = layout(blob)
    last_off, last_len = lay.segments[-1]
    idx_off, _ = lay.index
    trailer = blob[-TRAILER_SIZE:]
    cases = {
        "drop last segment, index, trailer": blob[:last_off],
        "drop last segment, keep index and trailer": blob[:last_off] + blob[idx_off:],
        "drop last segment, keep index, fix trailer": blob[:last_off]
        + blob[idx_off:-TRAILER_SIZE]
        + struct.pack(">Q4s", last_off, b"APLE"),
        "drop one byte": blob[:-1],
        "drop the trailer": blob[:-TRAILER_SIZE],
        "drop the index": blob[:idx_off] + trailer,
        "drop a middle byte": blob[:100] + blob[101:],
        "header only": blob[:HEADER_SIZE],
        "empty": b"",
    }
    for name, bad in cases.items():
        try:
            BlobReader(dek, ctx, BytesSource(bad))
        except BlobIntegrityError:
            continue
        pytest.fail(f"{name}: not detected")


def test_extension_is_detected_at_open(dek: bytes, ctx: BlobContext) -> None:
    data = random_bytes(3 * SMALL)
    blob = seal(dek, ctx, data, segment_size=SMALL)
    trailer = blob[-TRAILER_SIZE:]
    idx_off, _ = layout(blob).index
    cases = [
        blob + b"\x00",
        blob + trailer,
        blob[:-TRAILER_SIZE] + b"junk" + trailer,
        blob[:idx_off] + b"junk" + blob[idx_off:-TRAILER_SIZE] + struct.pack(">Q4s", idx_off + 4, b"APLE"),
        blob + blob,
    ]
    for bad in cases:
        with pytest.raises(BlobIntegrityError):
            BlobReader(dek, ctx, BytesSource(bad))


def test_empty_blob_cannot_be_extended_or_truncated(dek: bytes, ctx: BlobContext) -> None:
    blob = seal(dek, ctx, b"")
    assert read_all(dek, ctx, blob) == b""
    for bad in (blob[:-1], blob + b"\x00", blob[:HEADER_SIZE] + blob[HEADER_SIZE + 1 :]):
        with pytest.raises(BlobIntegrityError):
            BlobReader(dek, ctx, BytesSource(bad))


def test_swapping_segments_is_detected(dek: bytes, ctx: BlobContext) -> None:
    data = random_bytes(4 * SMALL)  # incompressible: all four records have the same length
    blob = seal(dek, ctx, data, segment_size=SMALL)
    lay = layout(blob)
    (o1, l1), (o2, l2) = lay.segments[1], lay.segments[2]
    assert l1 == l2
    swapped = blob[:o1] + blob[o2 : o2 + l2] + blob[o1 : o1 + l1] + blob[o2 + l2 :]
    assert_rejected(dek, ctx, swapped, data, 1)
    # Different lengths (compressed vs raw): the offsets no longer match the index.
    mixed = random_bytes(SMALL) + text_like(SMALL) + random_bytes(SMALL, seed=2)
    blob = seal(dek, ctx, mixed, segment_size=SMALL)
    lay = layout(blob)
    (o0, l0), (o1, l1) = lay.segments[0], lay.segments[1]
    swapped = blob[o1 : o1 + l1] + blob[o0 : o0 + l0]
    swapped = blob[:o0] + swapped + blob[o1 + l1 :]
    assert_rejected(dek, ctx, swapped, mixed, 0)


def test_segment_transplanted_from_another_blob_is_detected(dek: bytes, ctx: BlobContext) -> None:
    data = random_bytes(3 * SMALL)
    other = random_bytes(3 * SMALL, seed=99)
    blob = seal(dek, ctx, data, segment_size=SMALL)
    donor = seal(dek, ctx, other, segment_size=SMALL)  # same DEK, same context, same layout
    lay, dlay = layout(blob), layout(donor)
    assert lay.segments == dlay.segments
    off, length = lay.segments[1]
    bad = blob[:off] + donor[off : off + length] + blob[off + length :]
    assert_rejected(dek, ctx, bad, data, 1)
    # The donor's header on this blob's body (salt and nonce prefix swapped) fails at open.
    bad = donor[:HEADER_SIZE] + blob[HEADER_SIZE:]
    assert_rejected(dek, ctx, bad, data, None)


@pytest.mark.parametrize("field", ["tenant_id", "kind", "document_id", "version_id"])
def test_blob_under_another_context_is_refused(dek: bytes, ctx: BlobContext, field: str) -> None:
    blob = seal(dek, ctx, text_like(3 * SMALL), segment_size=SMALL)
    value: object = "text" if field == "kind" else uuid.uuid4()
    other = BlobContext(**({**ctx.__dict__, field: value}))
    with pytest.raises(BlobIntegrityError, match="index record: authentication failed"):
        BlobReader(dek, other, BytesSource(blob))


def test_another_tenants_dek_is_refused(dek: bytes, ctx: BlobContext) -> None:
    blob = seal(dek, ctx, text_like(3 * SMALL), segment_size=SMALL)
    with pytest.raises(BlobIntegrityError) as exc:
        BlobReader(generate_dek(), ctx, BytesSource(blob))
    msg = str(exc.value)
    assert "\n" not in msg
    assert dek.hex() not in msg


def test_errors_are_one_line_without_key_material(dek: bytes, ctx: BlobContext) -> None:
    data = random_bytes(3 * SMALL)
    blob = bytearray(seal(dek, ctx, data, segment_size=SMALL))
    off, _ = layout(bytes(blob)).segments[2]
    blob[off + 30] ^= 1
    _, err = drain(BlobReader(dek, ctx, BytesSource(bytes(blob))))
    assert err is not None
    msg = str(err)
    assert msg.startswith("segment 2 of 3: authentication failed")
    assert "\n" not in msg and dek.hex() not in msg and repr(dek)[2:-1] not in msg
