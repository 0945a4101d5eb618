"""Streaming intake of an upload: parse (multipart or raw), hash, size-limit, sniff, and write the
bytes straight into an encrypted, compressed blob in a temp file on the data disk.

Plaintext never touches the disk and memory stays flat: the body is consumed chunk by chunk, at
most one blob segment (plus a 1 MiB write buffer) is held, and the CPU work (zstd + AES-GCM) runs
in a worker thread so the event loop keeps serving other requests.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any

import anyio
import magic
from python_multipart import MultipartParser

from appliance.errors import AppError
from appliance.extract.base import FORMATS, normalize_content_type
from appliance.keys.envelope import BlobContext, BlobWriter

SNIFF_BYTES = 64 * 1024
WRITE_BUFFER = 1024 * 1024
MAX_METADATA_BYTES = 64 * 1024

TEXT_EXTENSIONS = {
    ".md": "text/markdown",
    ".markdown": "text/markdown",
    ".csv": "text/csv",
    ".tsv": "text/tab-separated-values",
}


class PayloadTooLarge(AppError):
    status = 413
    code = "payload_too_large"
    title = "Upload too large"


class BadUpload(AppError):
    status = 400
    code = "bad_upload"
    title = "Malformed upload"


@dataclass
class StagedBlob:
    path: Path
    sha256: bytes
    size: int
    stored_size: int
    content_type: str
    filename: str | None
    metadata: dict[str, Any] = field(default_factory=dict)

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)


def sniff_content_type(head: bytes, filename: str | None) -> str:
    """The type from the bytes (libmagic). A filename only refines plain text (md, csv).

    libmagic guesses from a few leading bytes, so ordinary prose can look like an obscure format
    ("PAtients..." reads as HP-GL, "Article 5..." as a news spool). When its answer is a type we
    cannot extract but the bytes are clean UTF-8 text, the upload is plain text.
    """
    if not head:
        return "application/octet-stream"
    mime = magic.from_buffer(head, mime=True) or "application/octet-stream"
    if normalize_content_type(mime) not in FORMATS and _looks_like_text(head):
        mime = "text/plain"
    if mime == "text/plain" and filename:
        ext = os.path.splitext(filename)[1].lower()
        mime = TEXT_EXTENSIONS.get(ext, mime)
    return mime


_CONTROL = re.compile(rb"[\x00-\x08\x0b\x0e-\x1f\x7f]")


def _looks_like_text(head: bytes) -> bool:
    """UTF-8 (a sequence cut at the end of the sniffed head is fine) without control bytes."""
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3 or exc.reason != "unexpected end of data":
            return False
    return _CONTROL.search(head) is None


def _safe_filename(name: str | None) -> str | None:
    if not name:
        return None
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = re.sub(r"[\x00-\x1f\x7f]", "", name).strip()
    return name[:500] or None


class _Sink:
    """Hash, count, sniff and encrypt bytes as they arrive."""

    def __init__(self, writer: BlobWriter, limit: int) -> None:
        self.writer = writer
        self.limit = limit
        self.hash = hashlib.sha256()
        self.size = 0
        self.head = bytearray()
        self.buffer = bytearray()

    async def feed(self, data: bytes) -> None:
        if not data:
            return
        self.size += len(data)
        if self.size > self.limit:
            raise PayloadTooLarge(
                f"The upload exceeds the limit of {self.limit} bytes.", extra={"limit_bytes": self.limit}
            )
        self.hash.update(data)
        if len(self.head) < SNIFF_BYTES:
            self.head += data[: SNIFF_BYTES - len(self.head)]
        self.buffer += data
        if len(self.buffer) >= WRITE_BUFFER:
            await self.flush()

    async def flush(self) -> None:
        if self.buffer:
            chunk, self.buffer = bytes(self.buffer), bytearray()
            await anyio.to_thread.run_sync(self.writer.write, chunk)


async def stage_upload(
    body: AsyncIterator[bytes],
    content_type_header: str | None,
    *,
    dek: bytes,
    context: BlobContext,
    tmp_dir: Path,
    limit: int,
    segment_size: int,
    raw_filename: str | None = None,
) -> StagedBlob:
    """Consume the request body into an encrypted temp blob; remove everything on any failure."""
    fd, name = tempfile.mkstemp(prefix="upload-", suffix=".blob", dir=tmp_dir)
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            writer = BlobWriter(dek, context, out, segment_size=segment_size)
            sink = _Sink(writer, limit)
            ctype = (content_type_header or "").lower()
            if ctype.startswith("multipart/form-data"):
                filename, metadata, saw_file = await _read_multipart(body, content_type_header or "", sink)
                if not saw_file:
                    raise BadUpload("The multipart body has no 'file' part.", code="file_part_missing")
            else:
                filename, metadata = _safe_filename(raw_filename), {}
                async for chunk in body:
                    await sink.feed(chunk)
            await sink.flush()
            info = await anyio.to_thread.run_sync(writer.close)
            out.flush()
            os.fsync(out.fileno())
        return StagedBlob(
            path=path,
            sha256=sink.hash.digest(),
            size=sink.size,
            stored_size=info.stored_size,
            content_type=sniff_content_type(bytes(sink.head), filename),
            filename=filename,
            metadata=metadata,
        )
    except BaseException:
        path.unlink(missing_ok=True)  # noqa: ASYNC240  (one unlink: not worth a thread hop)
        raise


async def _read_multipart(
    body: AsyncIterator[bytes], content_type: str, sink: _Sink
) -> tuple[str | None, dict[str, Any], bool]:
    msg = Message()
    msg["content-type"] = content_type
    boundary = msg.get_param("boundary")
    if not boundary or not isinstance(boundary, str):
        raise BadUpload("multipart/form-data without a boundary.", code="multipart_boundary_missing")

    state: dict[str, Any] = {"headers": {}, "field": b"", "value": b"", "name": None, "filename": None}
    pending: list[bytes] = []  # file bytes produced by one parser.write() call, fed after it returns
    meta_buf = bytearray()
    result: dict[str, Any] = {"filename": None, "saw_file": False, "file_parts": 0}

    def on_part_begin() -> None:
        state.update(headers={}, name=None, filename=None)

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def on_header_end() -> None:
        state["headers"][state["field"].decode("latin-1").lower()] = state["value"].decode("utf-8", "replace")
        state["field"], state["value"] = b"", b""

    def on_headers_finished() -> None:
        disp = Message()
        disp["content-disposition"] = state["headers"].get("content-disposition", "")
        state["name"] = disp.get_param("name", header="content-disposition")
        state["filename"] = disp.get_param("filename", header="content-disposition")
        if state["name"] == "file":
            result["file_parts"] += 1
            if result["file_parts"] > 1:
                raise BadUpload("Send exactly one 'file' part.", code="multiple_files")
            result["saw_file"] = True
            result["filename"] = _safe_filename(
                state["filename"] if isinstance(state["filename"], str) else None
            )

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if state["name"] == "file":
            pending.append(bytes(data[start:end]))
        elif state["name"] == "metadata":
            meta_buf.extend(data[start:end])
            if len(meta_buf) > MAX_METADATA_BYTES:
                raise BadUpload("The metadata part is larger than 64 KiB.", code="metadata_too_large")

    parser = MultipartParser(
        boundary,
        {  # type: ignore[arg-type]
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
        },
    )
    async for chunk in body:
        parser.write(chunk)
        for piece in pending:
            await sink.feed(piece)
        pending.clear()
    parser.finalize()
    metadata: dict[str, Any] = {}
    if meta_buf:
        try:
            metadata = json.loads(bytes(meta_buf))
        except ValueError as exc:
            raise BadUpload(f"The metadata part is not valid JSON: {exc}", code="metadata_invalid") from exc
        if not isinstance(metadata, dict):
            raise BadUpload("The metadata part must be a JSON object.", code="metadata_invalid")
    return result["filename"], metadata, bool(result["saw_file"])


def new_ids() -> tuple[uuid.UUID, uuid.UUID]:
    """(document id, version id), chosen before the bytes arrive: the blob's AAD binds both."""
    return uuid.uuid4(), uuid.uuid4()
