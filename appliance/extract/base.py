"""Types, limits, formats and the `extract()` entry point of text extraction.

Extraction turns a document's bytes into text with page boundaries. It runs in the workers, never in the
API request path, and treats every file as hostile: the parser runs in a separate, resource-limited
process (see `sandbox.py`), or on an Apache Tika server when one is configured (`tika_backend.py`).

This module holds what both backends share: the result types, the error codes, the supported formats,
the zip-bomb guard and the one rule that joins pages into text (`assemble`). It imports neither
kreuzberg nor the Tika client: the worker process never loads a parser; only the sandbox child does.
"""

from __future__ import annotations

import os
import shutil
import struct
import zipfile
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PAGE_SEPARATOR = "\n\n"
"""Pages are joined with this separator: `text == PAGE_SEPARATOR.join(p.text for p in pages)`."""

OCR_LANGUAGE = "eng"
"""Tesseract language used for OCR (Debian package `tesseract-ocr-eng`)."""

MAX_METADATA_KEYS = 50
MAX_METADATA_VALUE_CHARS = 1000


# ---------------------------------------- errors

ERROR_CODES: frozenset[str] = frozenset(
    {
        "unsupported_type",
        "corrupt_file",
        "encrypted_file",
        "too_large",
        "too_many_pages",
        "timeout",
        "memory_limit",
        "needs_ocr",
        "empty",
        "extractor_crashed",
        "backend_unavailable",
    }
)

TRANSIENT_CODES: frozenset[str] = frozenset({"timeout", "extractor_crashed", "backend_unavailable"})
"""Codes worth a retry: the same file may succeed on a less loaded machine, after a crash that was not
the file's fault (e.g. the kernel's OOM killer) or once the Tika server is back. Every other code is
permanent: the same bytes under the same limits fail the same way, so a job runner must not retry them."""


class ExtractionError(Exception):
    """A document could not be turned into text. `code` is stable (one of `ERROR_CODES`); `permanent`
    tells a job runner whether a retry can help; the message is one line, safe to show to a user."""

    def __init__(self, code: str, message: str | None = None, *, permanent: bool | None = None) -> None:
        if code not in ERROR_CODES:
            raise ValueError(f"unknown extraction error code {code!r}")
        message = " ".join((message or code.replace("_", " ")).split())[:500]
        super().__init__(message)
        self.code = code
        self.message = message
        self.permanent = code not in TRANSIENT_CODES if permanent is None else permanent

    def __repr__(self) -> str:
        return f"ExtractionError(code={self.code!r}, message={self.message!r}, permanent={self.permanent})"

    def __reduce__(self) -> tuple[Any, ...]:  # picklable for Dramatiq middlewares and multiprocessing
        return (_rebuild_error, (self.code, self.message, self.permanent))


def _rebuild_error(code: str, message: str, permanent: bool) -> ExtractionError:
    return ExtractionError(code, message, permanent=permanent)


# ---------------------------------------- types


@dataclass(frozen=True)
class Limits:
    """Bounds for one extraction. The defaults suit a worker with a few GiB of memory; see
    docs/extraction.md for what each one guards against."""

    max_bytes: int = 200 * 1024 * 1024
    max_pages: int = 5000
    max_chars: int = 50_000_000
    timeout_s: float = 120.0
    memory_mb: int = 1024
    max_decompressed_bytes: int = 500 * 1024 * 1024
    max_zip_entries: int = 10_000
    ocr_page_timeout_s: float = 10.0  # each page sent to OCR adds this to the wall-clock budget

    def __post_init__(self) -> None:
        for name in (
            "max_bytes",
            "max_pages",
            "max_chars",
            "timeout_s",
            "memory_mb",
            "max_decompressed_bytes",
            "max_zip_entries",
            "ocr_page_timeout_s",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"Limits.{name} must be positive")


@dataclass(frozen=True)
class Page:
    """One page (PDF page, PPTX slide) or the whole document (`number` None for formats without pages).
    `start`/`end` are character offsets into `Extraction.text`: `text[start:end] == page.text`."""

    number: int | None
    text: str
    start: int
    end: int


@dataclass(frozen=True)
class Extraction:
    text: str
    pages: list[Page]
    content_type: str
    backend: str
    ocr_used: bool
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RawResult:
    """What a backend returns before the shared checks: (page number, text) pairs in order."""

    pages: list[tuple[int | None, str]]
    metadata: dict[str, str]
    ocr_used: bool
    backend: str


# ---------------------------------------- formats


@dataclass(frozen=True)
class FormatSpec:
    mime: str
    kind: str
    paged: bool = False  # keeps page numbers (PDF pages, PPTX slides)
    zip_container: bool = False  # OOXML/ODF: zip-bomb guard before parsing
    image: bool = False  # only with OCR switched on


_FORMATS = [
    FormatSpec("application/pdf", "pdf", paged=True),
    FormatSpec(
        "application/vnd.openxmlformats-officedocument.wordprocessingml.document", "docx", zip_container=True
    ),
    FormatSpec(
        "application/vnd.openxmlformats-officedocument.presentationml.presentation",
        "pptx",
        paged=True,
        zip_container=True,
    ),
    FormatSpec(
        "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet", "xlsx", zip_container=True
    ),
    FormatSpec("application/vnd.oasis.opendocument.text", "odt", zip_container=True),
    FormatSpec("text/html", "html"),
    FormatSpec("message/rfc822", "eml"),
    FormatSpec("application/vnd.ms-outlook", "msg"),
    FormatSpec("application/rtf", "rtf"),
    FormatSpec("text/plain", "txt"),
    FormatSpec("text/markdown", "md"),
    FormatSpec("text/csv", "csv"),
    FormatSpec("image/png", "image", image=True),
    FormatSpec("image/jpeg", "image", image=True),
    FormatSpec("image/tiff", "image", image=True),
    FormatSpec("image/bmp", "image", image=True),
    FormatSpec("image/webp", "image", image=True),
]
FORMATS: Mapping[str, FormatSpec] = {f.mime: f for f in _FORMATS}

ALIASES: Mapping[str, str] = {
    "text/rtf": "application/rtf",
    "application/x-rtf": "application/rtf",
    "text/x-markdown": "text/markdown",
    "application/xhtml+xml": "text/html",
    "application/csv": "text/csv",
    "application/x-msg": "application/vnd.ms-outlook",
    "image/jpg": "image/jpeg",
}


def normalize_content_type(content_type: str) -> str:
    """`'Text/RTF; charset=x'` → `'application/rtf'`: lower case, no parameters, aliases resolved."""
    mime = content_type.split(";", 1)[0].strip().lower()
    return ALIASES.get(mime, mime)


def resolve_format(content_type: str, *, ocr: bool | None) -> FormatSpec:
    mime = normalize_content_type(content_type)
    spec = FORMATS.get(mime)
    if spec is None or (spec.image and ocr is not True):
        hint = " (images need ocr=True)" if spec is not None else ""
        raise ExtractionError("unsupported_type", f"cannot extract text from {mime or 'unknown type'}{hint}")
    return spec


def tessdata_dirs() -> list[Path]:
    dirs = [Path(p) for p in (os.environ.get("TESSDATA_PREFIX"),) if p]
    dirs += [Path(f"/usr/share/tesseract-ocr/{v}/tessdata") for v in (5, 4)] + [Path("/usr/share/tessdata")]
    return dirs


def ocr_available() -> bool:
    """True when Debian's tesseract and its English data are installed. kreuzberg links its own
    tesseract but reads the language data (`eng.traineddata`) from those packages."""
    if shutil.which("tesseract") is None:
        return False
    return any((d / f"{OCR_LANGUAGE}.traineddata").is_file() for d in tessdata_dirs())


# ---------------------------------------- zip guard

_EOCD = b"PK\x05\x06"
_EOCD64_LOCATOR = b"PK\x06\x07"
_CFB_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"


def _declared_entry_count(path: Path, tail: bytes, size: int) -> int:
    """Entry count from the end-of-central-directory record (zip64 when the 16-bit field overflows)."""
    pos = tail.rfind(_EOCD)
    if pos < 0 or len(tail) - pos < 22:
        raise ExtractionError("corrupt_file", "zip package has no central directory (truncated?)")
    (entries,) = struct.unpack_from("<H", tail, pos + 10)
    if entries != 0xFFFF:
        return int(entries)
    loc = pos - 20
    if loc < 0 or tail[loc : loc + 4] != _EOCD64_LOCATOR:
        raise ExtractionError("corrupt_file", "zip64 package without its locator")
    (offset,) = struct.unpack_from("<Q", tail, loc + 8)
    if offset > size - 56:
        raise ExtractionError("corrupt_file", "zip64 end record out of range")
    with path.open("rb") as f:
        f.seek(offset)
        record = f.read(56)
    if record[:4] != b"PK\x06\x06":
        raise ExtractionError("corrupt_file", "zip64 end record missing")
    (total,) = struct.unpack_from("<Q", record, 32)
    return int(total)


def check_zip_container(path: Path, limits: Limits) -> None:
    """Reject an OOXML/ODF package whose declared sizes exceed the limits, without inflating anything.

    Reads only the end-of-central-directory record and the central directory. The entry count is
    checked before `zipfile` builds its index, so a directory of millions of entries is refused cheaply.
    An entry whose compressed size exceeds its declared size beyond what deflate can add is a lie about
    sizes (the trick that gets a bomb past a declared-size check) and is refused too.
    """
    with path.open("rb") as f:
        head = f.read(8)
        if head == _CFB_MAGIC:
            # A password-protected OOXML file is an OLE container holding EncryptionInfo + EncryptedPackage.
            raise ExtractionError("encrypted_file", "the document is password-protected")
        if head[:2] != b"PK":
            raise ExtractionError("corrupt_file", "not a zip package (OOXML/ODF)")
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - (65535 + 22)))
        tail = f.read()
    entries = _declared_entry_count(path, tail, size)
    if entries > limits.max_zip_entries:
        raise ExtractionError("too_large", f"zip package has over {limits.max_zip_entries} entries")
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error) as exc:
        raise ExtractionError("corrupt_file", f"zip package unreadable: {exc}") from None
    if len(infos) > limits.max_zip_entries:
        raise ExtractionError("too_large", f"zip package has over {limits.max_zip_entries} entries")
    total = 0
    for info in infos:
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            # OOXML (ECMA-376 part 2) and ODF allow only these two; bzip2/LZMA members have ratios far
            # beyond deflate's, which the size-lie test below relies on.
            raise ExtractionError(
                "corrupt_file", f"zip entry {info.filename!r} uses an unsupported compression"
            )
        if info.compress_type == zipfile.ZIP_STORED:
            if info.compress_size != info.file_size and not info.flag_bits & 0x1:
                raise ExtractionError("corrupt_file", f"zip entry {info.filename!r} has inconsistent sizes")
        elif info.compress_size > info.file_size + info.file_size // 100 + 1024:
            raise ExtractionError("corrupt_file", f"zip entry {info.filename!r} declares a false size")
        total += info.file_size
        if total > limits.max_decompressed_bytes:
            raise ExtractionError(
                "too_large",
                f"zip package inflates to over {limits.max_decompressed_bytes} bytes (declared sizes)",
            )


_INFLATE_READ = 1 << 16


def check_zip_inflation(path: Path, limits: Limits) -> None:
    """Inflate every deflated member of a package that passed `check_zip_container`, keeping nothing,
    and refuse one that inflates beyond its declared size.

    The declared-size checks cannot see the lie in the other direction: a member declared as 1 MB whose
    1 MB of deflate really inflates to 1 GiB (deflate reaches ~1000:1). Parsers that trust the stream,
    not the header, would inflate all of it. Each member is inflated at most to its declared size + 1
    byte, so the work is bounded by the declared total (≤ `max_decompressed_bytes`) and memory by
    one read. Runs in the sandbox child only: the worker never inflates hostile bytes.
    """
    try:
        with zipfile.ZipFile(path) as zf, path.open("rb") as f:
            for info in zf.infolist():
                if info.compress_type != zipfile.ZIP_DEFLATED:
                    continue  # stored: its size was checked; nothing else got past check_zip_container
                f.seek(info.header_offset)
                header = f.read(30)
                if len(header) < 30 or header[:4] != b"PK\x03\x04":
                    raise ExtractionError("corrupt_file", f"zip entry {info.filename!r} has no local header")
                name_length, extra_length = struct.unpack_from("<HH", header, 26)
                f.seek(info.header_offset + 30 + name_length + extra_length)
                inflater = zlib.decompressobj(-zlib.MAX_WBITS)
                left, produced, pending = info.compress_size, 0, b""
                while produced <= info.file_size and not inflater.eof and (left > 0 or pending):
                    if not pending:
                        pending = f.read(min(left, _INFLATE_READ))
                        if not pending:
                            break  # truncated: the parser reports it
                        left -= len(pending)
                    produced += len(inflater.decompress(pending, info.file_size - produced + 1))
                    pending = inflater.unconsumed_tail
                if produced > info.file_size:
                    raise ExtractionError(
                        "too_large",
                        f"zip entry {info.filename!r} inflates beyond its declared {info.file_size} bytes",
                    )
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error, zlib.error) as exc:
        raise ExtractionError("corrupt_file", f"zip package unreadable: {exc}") from None


# ---------------------------------------- assembly


def clean_text(text: str) -> str:
    """Newlines normalised to LF, NULs dropped (PostgreSQL text cannot hold them), ends trimmed."""
    return text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "").strip()


def assemble(pages: Iterable[tuple[int | None, str]]) -> tuple[str, list[Page]]:
    """Join page texts with `PAGE_SEPARATOR`; each Page's start/end index its own text in the result."""
    out: list[Page] = []
    parts: list[str] = []
    offset = 0
    for number, text in pages:
        if parts:
            parts.append(PAGE_SEPARATOR)
            offset += len(PAGE_SEPARATOR)
        parts.append(text)
        out.append(Page(number=number, text=text, start=offset, end=offset + len(text)))
        offset += len(text)
    return "".join(parts), out


def clean_metadata(raw: Mapping[str, Any]) -> dict[str, str]:
    """Scalar metadata as strings (lists of scalars joined); nested structures dropped; bounded."""
    out: dict[str, str] = {}
    for key, value in raw.items():
        if len(out) >= MAX_METADATA_KEYS:
            break
        if isinstance(value, bool | int | float | str):
            text = str(value)
        elif (
            isinstance(value, list | tuple) and value and all(isinstance(v, str | int | float) for v in value)
        ):
            text = ", ".join(str(v) for v in value)
        else:
            continue
        text = clean_text(text)[:MAX_METADATA_VALUE_CHARS]
        if text:
            out[clean_text(str(key))[:100]] = text
    return out


def finish(raw: RawResult, spec: FormatSpec, limits: Limits) -> Extraction:
    """Shared checks on a backend's result: page and character limits, empty text, exact offsets."""
    pages = [(number, clean_text(text)) for number, text in raw.pages]
    if spec.paged and len(pages) > limits.max_pages:
        raise ExtractionError("too_many_pages", f"{len(pages)} pages, limit {limits.max_pages}")
    if not spec.paged:
        pages = [(None, PAGE_SEPARATOR.join(t for _, t in pages if t))]
    if not any(text for _, text in pages):
        if (spec.kind == "pdf" or spec.image) and not raw.ocr_used:
            raise ExtractionError("needs_ocr", "no text layer; OCR is off or tesseract is not installed")
        raise ExtractionError("empty", "OCR found no text" if raw.ocr_used else "the document has no text")
    text, page_list = assemble(pages)
    if len(text) > limits.max_chars:
        raise ExtractionError("too_large", f"{len(text)} characters of text, limit {limits.max_chars}")
    return Extraction(
        text=text,
        pages=page_list,
        content_type=spec.mime,
        backend=raw.backend,
        ocr_used=raw.ocr_used,
        metadata=clean_metadata(raw.metadata),
    )


# ---------------------------------------- entry point


def _plain_utf8(path: Path) -> str | None:
    """The file as text when it is valid UTF-8 (a BOM is dropped), else None."""
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        return None


def extract(
    path: Path,
    content_type: str,
    *,
    limits: Limits = Limits(),  # noqa: B008 - frozen dataclass, immutable default
    tika_endpoint: str | None = None,
    ocr: bool | None = None,
) -> Extraction:
    """Extract the text of the document at `path`, whose sniffed MIME type is `content_type`.

    `ocr`: None (default) OCRs a PDF without a text layer when tesseract is installed; True also accepts
    images; False never OCRs (a scanned PDF then fails with "needs_ocr"). With `tika_endpoint` the file
    goes to that Apache Tika server instead of the local kreuzberg sandbox.

    Raises `ExtractionError` with a stable code; `permanent` says whether a retry can help.
    """
    spec = resolve_format(content_type, ocr=ocr)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ExtractionError("corrupt_file", "file not found") from None
    if not path.is_file():
        raise ExtractionError("corrupt_file", "not a regular file")
    if size == 0:
        raise ExtractionError("empty", "the file is empty")
    if size > limits.max_bytes:
        raise ExtractionError("too_large", f"{size} bytes, limit {limits.max_bytes}")

    if spec.mime == "text/plain" and (plain := _plain_utf8(path)) is not None:
        # Decoding UTF-8 is not parsing: no parser, no sandbox process (≈0.2 s of CPU saved per file,
        # most of the cost of a small text document). Other encodings still go to the parser.
        return finish(RawResult([(None, plain)], {}, False, "plain"), spec, limits)
    if tika_endpoint:
        from appliance.extract import tika_backend  # the Tika client loads only where it is used

        if spec.zip_container:
            check_zip_container(path, limits)
        raw = tika_backend.extract_with_tika(path.resolve(), spec, tika_endpoint, limits=limits)
    else:
        from appliance.extract import sandbox

        raw = sandbox.run_kreuzberg(path.resolve(), spec, limits=limits, ocr=ocr)
    return finish(raw, spec, limits)


MEMORY_MARKERS = (
    "memoryerror",
    "memory allocation of",  # Rust's alloc error handler, then abort()
    "std::bad_alloc",  # C++ (pdfium, tesseract)
    "cannot allocate memory",
    "out of memory",
    "failed to allocate",
    "allocerror",  # Rust TryReserveError surfacing as a pyo3 PanicException
    "failed to map segment",  # the loader could not mmap a shared library under RLIMIT_AS
    # pdfium is built without exceptions, but its libc++ operator new throws std::bad_alloc under
    # RLIMIT_AS; Rust cannot unwind a C++ exception and aborts with this line (seen with
    # self-referencing form XObjects that fan out until memory runs out).
    "rust cannot catch foreign exceptions",
)


def has_memory_marker(text: bytes) -> bool:
    """Whether a parser's message or stderr says an allocation or a library mapping was refused (what
    RLIMIT_AS looks like from inside a parser)."""
    lowered = text.decode("utf-8", "replace").lower()
    return any(marker in lowered for marker in MEMORY_MARKERS)
