"""Encrypted blob format: segmented, compressed, authenticated, range-readable.

A blob is written in one sequential pass (`BlobWriter`, flat memory: one segment buffered) and read
back whole or by byte range (`BlobReader`, which reads and decrypts only the segments a range
touches). It follows the STREAM construction (Hoang, Reyhanitabar, Rogaway, Vizár 2015), as Tink's
AES-GCM-HKDF streaming AEAD does: a per-blob subkey, nonces made of a prefix, the segment index and
a last-segment flag, and every segment's associated data naming its place.

Format v1 (all integers big-endian)::

    header        magic b"APLB" | version u8 = 1 | flags u8 | segment_size u32 | salt 32 B
                  | nonce_prefix 7 B                                       (49 bytes, in clear)
    segment i     clen u32 | AES-256-GCM(subkey, nonce_i, payload_i, aad_i)      (i = 0 .. n-1)
                  payload_i = codec u8 (0 raw, 1 zstd frame) || data
                  nonce_i   = nonce_prefix || i u32 || 0x00
                  aad_i     = header || context || i u32 || 0x00
    index record  clen u32 | AES-256-GCM(subkey, nonce_n, index, aad_n)          (the last segment)
                  index   = plaintext_size u64 || n u32 || offset_0 .. offset_(n-1) u64 || index_offset u64
                  nonce_n = nonce_prefix || n u32 || 0x01
                  aad_n   = header || context || n u32 || 0x01
    trailer       index_offset u64 | b"APLE"                                (12 bytes, in clear)

    subkey  = HKDF-SHA256(ikm = DEK, salt = header salt, info = b"appliance-blob-v1" || context)
    context = BlobContext.to_bytes() = 0x01 | tenant_id 16 B | len(kind) u8 | kind (ASCII)
              | document_id 16 B | version_id 16 B

`offset_i` is the file offset of segment i's `clen` field; `index_offset` is the offset of the index
record's `clen` field. Segment i holds plaintext bytes [i·S, min((i+1)·S, plaintext_size)) for
S = segment_size, so every segment but the last holds exactly S bytes and n = ceil(size / S).
flags bit 0 records that the writer tried compression; other bits must be zero.

Checks made when a blob is opened (`BlobReader.__init__`, three `read_at` calls):
- magic, version, flags and segment size are sane; the trailer magic is present;
- the index record fills exactly the bytes between `index_offset` and the trailer, its `clen` field
  agrees, and n follows from its length; it decrypts under the nonce and AAD for (n, final) --
  which authenticates the header (it is AAD), the context and DEK (HKDF and AAD), the segment count
  (truncation or extension by whole segments), the plaintext size, every segment's offset, and the
  trailer's `index_offset` (repeated inside the index);
- the authenticated offsets are consistent (start after the header, increase, end at the index).

Checks made per segment, before any byte of it is released: its stored length (from the
authenticated offsets) matches its `clen` field, it decrypts under (i, not final) -- so a segment
moved to another position, copied from another blob (different salt, hence subkey) or from another
document or tenant fails -- its codec is known, and its decompressed length is exactly what its
position requires.

Deviations from the first draft of this format, and why:
- The index also stores `index_offset` (offset n), so the trailer's pointer and the position of the
  index are authenticated; the reader requires the index record to end exactly at the trailer, so
  appended or inserted bytes anywhere are caught at open, not only when the trailer magic breaks.
- The reader derives n from the index record's length (it needs n for the nonce before it can
  decrypt) and then checks the n stored inside.
- The context encoding is versioned and length-prefixes `kind`, so distinct contexts can never
  produce the same bytes.

What stays in clear: the header (segment size, salt, nonce prefix), the number of segments, each
segment's stored length and so the compressibility of every S-byte region, and the total size.
The plaintext size is encrypted, but within S bytes it follows from the segment count (exactly,
when the last segment was not compressed). If compressibility of attacker-influenced content next to
secrets matters for a kind of blob (the CRIME/BREACH pattern), write it with `compress=False`.
"""

from __future__ import annotations

import io
import os
import re
import secrets
import struct
import sys
import threading
import uuid
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import BinaryIO, Protocol, runtime_checkable

import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "DEFAULT_CHUNK",
    "DEFAULT_SEGMENT_SIZE",
    "BlobContext",
    "BlobInfo",
    "BlobIntegrityError",
    "BlobReader",
    "BlobWriter",
    "BytesSource",
    "FileSource",
    "RandomAccessSource",
]

MAGIC = b"APLB"
TRAILER_MAGIC = b"APLE"
FORMAT_VERSION = 1
FLAG_COMPRESS = 0x01
_KNOWN_FLAGS = FLAG_COMPRESS

DEFAULT_SEGMENT_SIZE = 256 * 1024
MIN_SEGMENT_SIZE = 256
MAX_SEGMENT_SIZE = 64 * 1024 * 1024
DEFAULT_CHUNK = 64 * 1024
ZSTD_LEVEL = 3

CODEC_RAW = 0
CODEC_ZSTD = 1

_HEADER = struct.Struct(">4sBBI32s7s")
_TRAILER = struct.Struct(">Q4s")
_U32 = struct.Struct(">I")
_INDEX_HEAD = struct.Struct(">QI")
_POSITION = struct.Struct(">IB")  # segment index, final flag: the tail of every nonce and AAD

HEADER_SIZE = _HEADER.size  # 49
TRAILER_SIZE = _TRAILER.size  # 12
_TAG_SIZE = 16
_SALT_SIZE = 32
_PREFIX_SIZE = 7
_MIN_SEGMENT_RECORD = 4 + 1 + _TAG_SIZE  # clen + codec byte + tag (an empty segment is never written)
_MIN_INDEX_CT = _INDEX_HEAD.size + 8 + _TAG_SIZE  # n = 0: size, count, index_offset, tag
_MAX_SEGMENTS = 2**32 - 1
_MAX_INDEX_CT = _INDEX_HEAD.size + 8 * (8 * 1024 * 1024 + 1) + _TAG_SIZE  # 8 Mi segments (2 TiB at 256 KiB)
_HKDF_INFO = b"appliance-blob-v1"
_KIND_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_DEK_SIZE = 32

assert array("Q").itemsize == 8


class BlobIntegrityError(Exception):
    """The blob is not what was written for this DEK and context: corrupt, truncated, extended,
    reordered, moved, or opened with the wrong key or context. The message is one line naming the
    part that failed; it never contains key material or plaintext."""


@dataclass(frozen=True)
class BlobContext:
    """What a blob is: bound into its subkey and every segment's associated data.

    `kind` names the representation ("original", "text", ...): lowercase ASCII, digits, `.`, `_`,
    `-`, at most 63 characters.
    """

    tenant_id: uuid.UUID
    kind: str
    document_id: uuid.UUID
    version_id: uuid.UUID

    def __post_init__(self) -> None:
        for name in ("tenant_id", "document_id", "version_id"):
            if not isinstance(getattr(self, name), uuid.UUID):
                raise TypeError(f"BlobContext.{name} must be a uuid.UUID")
        if not isinstance(self.kind, str) or not _KIND_RE.match(self.kind):
            raise ValueError(f"BlobContext.kind {self.kind!r} must match {_KIND_RE.pattern}")

    def to_bytes(self) -> bytes:
        kind = self.kind.encode("ascii")
        return (
            b"\x01"
            + self.tenant_id.bytes
            + bytes([len(kind)])
            + kind
            + self.document_id.bytes
            + self.version_id.bytes
        )


@dataclass(frozen=True)
class BlobInfo:
    plaintext_size: int
    stored_size: int
    segments: int


def _subkey(dek: bytes, salt: bytes, context: bytes) -> AESGCM:
    if not isinstance(dek, bytes | bytearray | memoryview) or len(dek) != _DEK_SIZE:
        raise ValueError(f"the DEK must be {_DEK_SIZE} bytes")
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=_HKDF_INFO + context).derive(bytes(dek))
    return AESGCM(key)


def _check_segment_size(segment_size: int) -> None:
    if not MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE:
        raise ValueError(f"segment_size must be between {MIN_SEGMENT_SIZE} and {MAX_SEGMENT_SIZE}")


# --- writing --------------------------------------------------------------------------------------


class BlobWriter:
    """Encrypts a stream into `sink`, sequentially (a temp file or a pipe; never seeks).

    `write()` takes any sizes and buffers at most one segment; `close()` writes the last partial
    segment, the index record and the trailer, flushes `sink` (it does not close it) and returns
    `BlobInfo`. As a context manager, an exception inside the block aborts instead: no index or
    trailer is written, so what reached `sink` is not a valid blob and will never open.
    """

    def __init__(
        self,
        dek: bytes,
        context: BlobContext,
        sink: BinaryIO,
        *,
        segment_size: int = DEFAULT_SEGMENT_SIZE,
        compress: bool = True,
    ) -> None:
        _check_segment_size(segment_size)
        if not isinstance(context, BlobContext):
            raise TypeError("context must be a BlobContext")
        salt = secrets.token_bytes(_SALT_SIZE)
        self._prefix = secrets.token_bytes(_PREFIX_SIZE)
        flags = FLAG_COMPRESS if compress else 0
        header = _HEADER.pack(MAGIC, FORMAT_VERSION, flags, segment_size, salt, self._prefix)
        ctx = context.to_bytes()
        self._aead = _subkey(dek, salt, ctx)
        self._aad_prefix = header + ctx
        self._segment_size = segment_size
        self._cctx = (
            zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=False, write_dict_id=False)
            if compress
            else None
        )
        self._sink = sink
        self._buf = bytearray()
        self._offsets = array("Q")
        self._stored = 0
        self._plain = 0
        self._state = "open"  # open | closed | failed
        self._info: BlobInfo | None = None
        self._out(header)

    # context manager
    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __repr__(self) -> str:
        return f"BlobWriter(state={self._state!r}, plaintext={self._plain}, segments={len(self._offsets)})"

    def _out(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = self._sink.write(view)
            if written is None:  # a BufferedWriter writes everything; raw streams may write less
                break
            if written <= 0:
                raise OSError("sink accepted no bytes")
            view = view[written:]
        self._stored += len(data)

    def _seal(self, index: int, final: int, payload: bytes) -> None:
        position = _POSITION.pack(index, final)
        ct = self._aead.encrypt(self._prefix + position, payload, self._aad_prefix + position)
        self._out(_U32.pack(len(ct)) + ct)

    def _emit(self, plain: bytes | bytearray | memoryview) -> None:
        i = len(self._offsets)
        if i >= _MAX_SEGMENTS:
            raise ValueError("blob too large: the segment counter would overflow")
        payload = None
        if self._cctx is not None:
            packed = self._cctx.compress(plain)
            if len(packed) < len(plain):
                payload = bytes([CODEC_ZSTD]) + packed
        if payload is None:
            payload = bytes([CODEC_RAW]) + plain
        self._offsets.append(self._stored)
        self._seal(i, 0, payload)
        self._plain += len(plain)

    def _guard(self) -> None:
        if self._state != "open":
            raise ValueError(f"BlobWriter is {self._state}")

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Add plaintext; returns len(data). Full segments are sealed and written immediately."""
        self._guard()
        view = memoryview(data).cast("B")
        total = len(view)
        seg = self._segment_size
        try:
            if self._buf:
                take = min(seg - len(self._buf), len(view))
                self._buf += view[:take]
                view = view[take:]
                if len(self._buf) == seg:
                    self._emit(self._buf)
                    self._buf.clear()
            while len(view) >= seg:
                self._emit(view[:seg])
                view = view[seg:]
            if view:
                self._buf += view
        except BaseException:
            self._state = "failed"
            raise
        return total

    def close(self) -> BlobInfo:
        """Finish the blob. Calling it again returns the same `BlobInfo`."""
        if self._state == "closed" and self._info is not None:
            return self._info
        self._guard()
        try:
            if self._buf:
                self._emit(self._buf)
                self._buf.clear()
            n = len(self._offsets)
            offsets = array("Q", self._offsets)
            offsets.append(self._stored)  # index_offset, authenticated inside the index
            if sys.byteorder == "little":
                offsets.byteswap()
            index_offset = self._stored
            self._seal(n, 1, _INDEX_HEAD.pack(self._plain, n) + offsets.tobytes())
            self._out(_TRAILER.pack(index_offset, TRAILER_MAGIC))
            flush = getattr(self._sink, "flush", None)
            if flush is not None:
                flush()
        except BaseException:
            self._state = "failed"
            raise
        self._state = "closed"
        self._info = BlobInfo(plaintext_size=self._plain, stored_size=self._stored, segments=n)
        return self._info

    def abort(self) -> None:
        """Stop without writing the index: the bytes already in `sink` form no valid blob."""
        if self._state == "open":
            self._state = "failed"
        self._buf.clear()


# --- sources --------------------------------------------------------------------------------------


@runtime_checkable
class RandomAccessSource(Protocol):
    """Stored bytes readable at any offset (a local file, an object store's ranged GET, ...).

    `read_at` returns up to `length` bytes (fewer only at the end of the data); it must be safe
    to call from several threads if a reader is shared.
    """

    size: int

    def read_at(self, offset: int, length: int) -> bytes: ...


class FileSource:
    """A local file read with `os.pread` (thread-safe, no shared file position)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.size = os.fstat(self._fd).st_size

    def read_at(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError("offset and length must be >= 0")
        parts = []
        while length > 0:
            chunk = os.pread(self._fd, length, offset)
            if not chunk:
                break
            parts.append(chunk)
            offset += len(chunk)
            length -= len(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> FileSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BytesSource:
    """Bytes in memory (tests, small blobs)."""

    def __init__(self, data: bytes | bytearray) -> None:
        self._data = bytes(data)
        self.size = len(self._data)

    def read_at(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError("offset and length must be >= 0")
        return self._data[offset : offset + length]


# --- reading --------------------------------------------------------------------------------------


_local = threading.local()


def _decompressor() -> zstandard.ZstdDecompressor:
    """The thread's zstd decompressor: creating one allocates its context (about 17 µs, more than
    decrypting a chunk); they are not thread-safe, so one per thread. Each `decompress` is a whole
    frame, so nothing carries over between uses."""
    dctx: zstandard.ZstdDecompressor | None = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor()
    return dctx


class BlobReader:
    """Opens a blob for `context` with `dek`, authenticating its layout (see the module docstring).

    Opening costs three `read_at` calls (header, trailer, index record) and fails with
    `BlobIntegrityError` for a truncated, extended or corrupt blob, or the wrong DEK or context.
    Reading a range then reads exactly the segments it touches, one `read_at` each, and
    authenticates each segment completely before yielding any of its bytes. A failure in a later
    segment raises after earlier segments' bytes were yielded: a caller streaming a response must
    abort it (not end it cleanly) on `BlobIntegrityError`.

    The reader keeps no mutable state after opening, so one instance may serve several threads if
    its source allows concurrent `read_at` (FileSource does).
    """

    def __init__(self, dek: bytes, context: BlobContext, source: RandomAccessSource) -> None:
        if not isinstance(context, BlobContext):
            raise TypeError("context must be a BlobContext")
        self._source = source
        size = int(source.size)
        self.stored_size = size
        minimum = HEADER_SIZE + 4 + _MIN_INDEX_CT + TRAILER_SIZE
        if size < minimum:
            raise BlobIntegrityError(
                f"blob is {size} bytes, shorter than the smallest valid blob ({minimum})"
            )

        header = source.read_at(0, HEADER_SIZE)
        if len(header) != HEADER_SIZE:
            raise BlobIntegrityError("header: short read")
        magic, version, flags, seg, salt, prefix = _HEADER.unpack(header)
        if magic != MAGIC:
            raise BlobIntegrityError("header: bad magic (not an appliance blob)")
        if version != FORMAT_VERSION:
            raise BlobIntegrityError(f"header: unsupported format version {version}")
        if flags & ~_KNOWN_FLAGS:
            raise BlobIntegrityError(f"header: unknown flags 0x{flags:02x}")
        if not MIN_SEGMENT_SIZE <= seg <= MAX_SEGMENT_SIZE:
            raise BlobIntegrityError(f"header: segment size {seg} out of range")

        trailer = source.read_at(size - TRAILER_SIZE, TRAILER_SIZE)
        if len(trailer) != TRAILER_SIZE:
            raise BlobIntegrityError("trailer: short read")
        index_offset, tmagic = _TRAILER.unpack(trailer)
        if tmagic != TRAILER_MAGIC:
            raise BlobIntegrityError("trailer: bad magic (truncated or extended blob)")
        record_len = size - TRAILER_SIZE - index_offset
        if not (index_offset >= HEADER_SIZE and 4 + _MIN_INDEX_CT <= record_len <= 4 + _MAX_INDEX_CT):
            raise BlobIntegrityError(
                f"trailer: index offset {index_offset} impossible for a {size}-byte blob"
            )
        clen = record_len - 4
        if (clen - _MIN_INDEX_CT) % 8:
            raise BlobIntegrityError(f"index record: length {clen} is not a whole number of entries")
        n = (clen - _MIN_INDEX_CT) // 8

        record = source.read_at(index_offset, record_len)
        if len(record) != record_len:
            raise BlobIntegrityError("index record: short read")
        if _U32.unpack_from(record)[0] != clen:
            raise BlobIntegrityError("index record: length field does not match the layout")

        ctx = context.to_bytes()
        self._aead = _subkey(dek, salt, ctx)
        self._prefix = prefix
        self._aad_prefix = header + ctx
        try:
            index = self._open(n, 1, memoryview(record)[4:])
        except InvalidTag:
            raise BlobIntegrityError(
                "index record: authentication failed (corrupt, truncated or extended blob, "
                "or wrong DEK or context)"
            ) from None

        plaintext_size, count = _INDEX_HEAD.unpack_from(index)
        offsets = array("Q")
        offsets.frombytes(index[_INDEX_HEAD.size :])
        if sys.byteorder == "little":
            offsets.byteswap()
        # Authenticated, so these only fail for a writer bug; checked anyway before any use.
        if count != n or len(offsets) != n + 1 or offsets[n] != index_offset:
            raise BlobIntegrityError("index record: segment count or index offset inconsistent")
        if plaintext_size > n * seg or (n and plaintext_size <= (n - 1) * seg):
            raise BlobIntegrityError(
                f"index record: plaintext size {plaintext_size} does not fit {n} segments"
            )
        if offsets[0] != HEADER_SIZE:  # for n = 0, offsets[0] is the index offset
            raise BlobIntegrityError("index record: the first segment does not follow the header")
        for i in range(1, n + 1):
            if offsets[i] < offsets[i - 1] + _MIN_SEGMENT_RECORD:
                raise BlobIntegrityError(f"index record: offset {i} out of order")

        self.segment_size: int = seg
        self.segments: int = n
        self.compressed: bool = bool(flags & FLAG_COMPRESS)
        self._plaintext_size = plaintext_size
        self._offsets = offsets

    @property
    def plaintext_size(self) -> int:
        return self._plaintext_size

    def __repr__(self) -> str:
        return f"BlobReader(plaintext_size={self._plaintext_size}, segments={self.segments})"

    def _open(self, index: int, final: int, ciphertext: memoryview) -> bytes:
        position = _POSITION.pack(index, final)
        return self._aead.decrypt(self._prefix + position, ciphertext, self._aad_prefix + position)

    def _segment(self, i: int, dctx: zstandard.ZstdDecompressor) -> memoryview:
        """Read, authenticate and decode segment i; nothing is returned unless all checks pass."""
        n = self.segments
        start, end = self._offsets[i], self._offsets[i + 1]
        length = end - start
        raw = self._source.read_at(start, length)
        if len(raw) != length:
            raise BlobIntegrityError(f"segment {i} of {n}: short read ({len(raw)} of {length} bytes)")
        clen = _U32.unpack_from(raw)[0]
        if clen != length - 4:
            raise BlobIntegrityError(
                f"segment {i} of {n}: length field {clen} does not match the index ({length - 4})"
            )
        try:
            payload = self._open(i, 0, memoryview(raw)[4:])
        except InvalidTag:
            raise BlobIntegrityError(
                f"segment {i} of {n}: authentication failed (corrupt, reordered or transplanted segment, "
                "or wrong DEK or context)"
            ) from None
        expected = self.segment_size if i < n - 1 else self._plaintext_size - (n - 1) * self.segment_size
        codec = payload[0]
        body = memoryview(payload)[1:]
        if codec == CODEC_RAW:
            data = body
        elif codec == CODEC_ZSTD:
            try:
                if zstandard.frame_content_size(body) != expected:
                    raise BlobIntegrityError(f"segment {i} of {n}: compressed frame has the wrong size")
                data = memoryview(dctx.decompress(body, max_output_size=expected, allow_extra_data=False))
            except zstandard.ZstdError as e:
                raise BlobIntegrityError(f"segment {i} of {n}: decompression failed ({e})") from None
        else:
            raise BlobIntegrityError(f"segment {i} of {n}: unknown codec {codec}")
        if len(data) != expected:
            raise BlobIntegrityError(f"segment {i} of {n}: holds {len(data)} bytes, expected {expected}")
        return data

    def iter_range(
        self, start: int, end: int | None = None, *, chunk: int = DEFAULT_CHUNK
    ) -> Iterator[bytes]:
        """Plaintext bytes [start, end) (end exclusive; None = to the end), in pieces of <= `chunk`.

        Requires 0 <= start <= end <= plaintext_size (ValueError otherwise, raised here, not at the
        first `next()`); an empty range yields nothing and reads nothing. Pieces never span two
        segments, so memory stays at about one segment whatever the range.
        """
        if end is None:
            end = self._plaintext_size
        if not (0 <= start <= end <= self._plaintext_size):
            raise ValueError(f"range [{start}, {end}) is outside [0, {self._plaintext_size})")
        if chunk <= 0:
            raise ValueError("chunk must be > 0")
        return self._iter(start, end, chunk)

    def _iter(self, start: int, end: int, chunk: int) -> Iterator[bytes]:
        if start == end:
            return
        seg = self.segment_size
        dctx = _decompressor()
        for i in range(start // seg, (end - 1) // seg + 1):
            data = self._segment(i, dctx)
            base = i * seg
            lo = max(start - base, 0)
            hi = min(end - base, len(data))
            for p in range(lo, hi, chunk):
                yield bytes(data[p : min(p + chunk, hi)])

    def iter_all(self, *, chunk: int = DEFAULT_CHUNK) -> Iterator[bytes]:
        """The whole plaintext, segment by segment."""
        return self.iter_range(0, None, chunk=chunk)

    def read_range(self, start: int, end: int | None = None) -> bytes:
        """`b"".join(iter_range(start, end))`: for small ranges only."""
        return b"".join(self.iter_range(start, end, chunk=MAX_SEGMENT_SIZE))

    def verify(self) -> None:
        """Authenticate and decode every segment (reads the whole blob, holds one segment)."""
        dctx = _decompressor()
        for i in range(self.segments):
            self._segment(i, dctx)


def seal_bytes(dek: bytes, context: BlobContext, data: bytes) -> bytes:
    """A small value (a chunk's text, an extracted-text record) as one blob in memory."""
    out = io.BytesIO()
    with BlobWriter(dek, context, out) as writer:
        writer.write(data)
    return out.getvalue()


def open_bytes(dek: bytes, context: BlobContext, blob: bytes) -> bytes:
    """The plaintext of a `seal_bytes` blob; BlobIntegrityError if it was altered or the context differs."""
    return b"".join(BlobReader(dek, context, BytesSource(blob)).iter_range(0))
