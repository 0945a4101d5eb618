"""Streaming decrypted content with correct headers and single-range support (RFC 9110)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from urllib.parse import quote

from starlette.responses import Response, StreamingResponse

from appliance.documents.models import DocumentVersion
from appliance.errors import AppError
from appliance.keys.envelope import BlobIntegrityError, BlobReader
from appliance.logs import get_logger

log = get_logger("appliance.documents")
RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


class RangeNotSatisfiable(AppError):
    status = 416
    code = "range_not_satisfiable"
    title = "Range not satisfiable"


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, end_exclusive) for one `bytes=` range, None to send everything. Multiple ranges:
    everything (allowed by RFC 9110). Unsatisfiable: 416."""
    if not header:
        return None
    header = header.strip()
    if "," in header:
        return None
    m = RANGE_RE.match(header)
    if not m or (not m.group(1) and not m.group(2)):
        return None
    first, last = m.group(1), m.group(2)
    if not first:  # suffix: the last N bytes
        n = int(last)
        if n == 0 or size == 0:
            raise RangeNotSatisfiable(f"bytes */{size}", extra={"size": size})
        return max(0, size - n), size
    start = int(first)
    end = min(int(last) + 1, size) if last else size
    if start >= size or (last and int(last) < start):
        raise RangeNotSatisfiable(
            f"The range starts beyond the {size} bytes of this version.", extra={"size": size}
        )
    return start, end


def _iterate(reader: BlobReader, start: int, end: int, version_id: str) -> Iterator[bytes]:
    try:
        yield from reader.iter_range(start, end)
    except BlobIntegrityError:
        # Headers are gone already: abort the stream so the client sees a truncated body, never
        # bytes that did not authenticate.
        log.error("blob integrity failure while streaming", version_id=version_id)
        raise


def content_response(reader: BlobReader, version: DocumentVersion, range_header: str | None) -> Response:
    size = reader.plaintext_size
    if size != version.size:
        raise BlobIntegrityError(f"stored blob holds {size} bytes, the catalogue says {version.size}")
    try:
        span = parse_range(range_header, size)
    except RangeNotSatisfiable as exc:
        exc.headers = {"Content-Range": f"bytes */{size}"}
        raise
    filename = version.source_filename or f"document-{version.document_id}"
    headers = {
        "Accept-Ranges": "bytes",
        "ETag": f'"{version.content_sha256.hex()}"',
        "Content-Disposition": f"attachment; filename*=UTF-8''{quote(filename)}",
        "Cache-Control": "private, no-store",
        "X-Content-Type-Options": "nosniff",
    }
    start, end = span if span else (0, size)
    headers["Content-Length"] = str(end - start)
    status = 200
    if span is not None:
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    return StreamingResponse(
        _iterate(reader, start, end, str(version.id)),
        status_code=status,
        media_type=version.content_type,
        headers=headers,
    )
