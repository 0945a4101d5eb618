"""Extraction with kreuzberg (Rust core, tesseract linked in for OCR).

Runs only inside the sandbox child (`sandbox.py`), under its memory and CPU limits: the worker process
never imports kreuzberg. Raises `ExtractionError` for every failure it can name; anything else it lets
through for the sandbox to report as "extractor_crashed".
"""

from __future__ import annotations

import codecs
import re
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any
from zlib import error as zlib_error

import kreuzberg as k

from appliance.extract.base import (
    OCR_LANGUAGE,
    ExtractionError,
    FormatSpec,
    Limits,
    RawResult,
    check_zip_container,
    check_zip_inflation,
    clean_metadata,
    has_memory_marker,
)

BACKEND = "kreuzberg"
OCR_DPI = 300
"""Resolution pages are rendered at for OCR: tesseract's sweet spot for body text."""


def _ocr_config() -> k.OcrConfig:
    tesseract = k.TesseractConfig(
        language=OCR_LANGUAGE, use_cache=False, enable_table_detection=False, output_format="text"
    )
    return k.OcrConfig(backend="tesseract", language=OCR_LANGUAGE, tesseract_config=tesseract)


def _config(*, threads: int, paged: bool, ocr: bool = False) -> k.ExtractionConfig:
    return k.ExtractionConfig(
        use_cache=False,  # nothing written to disk: the child's home is a throw-away directory anyway
        output_format="plain",
        pages=k.PageConfig(extract_pages=True) if paged else None,
        ocr=_ocr_config() if ocr else None,
        concurrency=k.ConcurrencyConfig(max_threads=threads),
        # no extraction_timeout_secs: the sandbox's deadline is the one clock (and it stretches for OCR)
    )


def map_error(exc: Exception) -> ExtractionError:
    """A kreuzberg exception as one of our codes. kreuzberg has few classes, so the message decides
    between the cases a ParsingError covers (encrypted, over a security limit, plain corrupt)."""
    message = " ".join(str(exc).split())
    lowered = message.lower()
    if isinstance(exc, k.ExtractionTimeoutError):
        return ExtractionError("timeout", message)
    if isinstance(exc, k.ValidationError) and "unsupported" in lowered:
        return ExtractionError("unsupported_type", message)
    if isinstance(exc, k.MissingDependencyError):
        if "ocr" in lowered or "tesseract" in lowered:
            return ExtractionError("needs_ocr", message)
        return ExtractionError("extractor_crashed", message)
    if "password" in lowered or "encrypt" in lowered:
        return ExtractionError("encrypted_file", message)
    if "security limit" in lowered:
        return ExtractionError("too_large", message)
    if has_memory_marker(message.encode()):
        # e.g. ODT "Failed to read content.xml: out of memory": an allocation refused under RLIMIT_AS,
        # or pdfium's library that could not be mapped ("failed to map segment from shared object")
        return ExtractionError("memory_limit", message)
    if isinstance(exc, k.ParsingError | k.OCRError | k.ImageProcessingError | k.ValidationError):
        return ExtractionError("corrupt_file", message)
    return ExtractionError("extractor_crashed", f"{type(exc).__name__}: {message}")


def _pdf_page_count(path: Path) -> int:
    """Opens the PDF (pdfium) without extracting: refuses a 100,000-page file before the work starts."""
    try:
        return len(k.PdfPageIterator(str(path), dpi=72))
    except k.KreuzbergError as exc:
        raise map_error(exc) from None
    except (RuntimeError, ValueError, OSError) as exc:  # PdfPageIterator raises plain RuntimeError
        message = " ".join(str(exc).split())
        if "password" in message.lower() or "encrypt" in message.lower():
            raise ExtractionError("encrypted_file", message) from None
        if has_memory_marker(message.encode()):
            raise ExtractionError("memory_limit", message) from None
        raise ExtractionError("corrupt_file", message) from None


def _pdf_pages(result: k.ExtractionResult) -> list[tuple[int | None, str]]:
    if result.pages:
        return [(int(p["page_number"]), p["content"]) for p in result.pages]
    return [(None, result.content)]


def _slides(result: k.ExtractionResult) -> list[tuple[int | None, str]]:
    """PPTX: kreuzberg reports slide boundaries as UTF-8 byte ranges of `content`."""
    info = result.metadata.get("pages") if isinstance(result.metadata, dict) else None
    boundaries = info.get("boundaries") if isinstance(info, dict) else None
    if not boundaries:
        return [(None, result.content)]
    data = result.content.encode("utf-8")
    return [
        (int(b["page_number"]), data[b["byte_start"] : b["byte_end"]].decode("utf-8", "replace"))
        for b in boundaries
    ]


# kreuzberg 4.10.4 drops XML entity and character references from DOCX text: "R&amp;D" comes out as
# "RD", "a &lt; b" as "a  b" (upstream xberg-io/xberg#1242, fixed in its successor `xberg`, not in
# kreuzberg 4.x). PPTX, XLSX and ODT are not affected. Until the dependency moves, the child rewrites the
# word/*.xml parts of a copy so that each reference becomes its character, with the five XML specials
# as private-use stand-ins that are mapped back after extraction. A document that already contains a
# stand-in character is extracted as it is (no rewrite), so no genuine character is ever changed.
_STAND_INS = {"&": "\ue026", "<": "\ue03c", ">": "\ue03e", '"': "\ue022", "'": "\ue027"}
_NAMED = {"amp": "&", "lt": "<", "gt": ">", "quot": '"', "apos": "'"}
_REFERENCE = re.compile(r"&(#x[0-9a-fA-F]{1,6}|#[0-9]{1,7}|amp|lt|gt|quot|apos);")
_RESTORE = str.maketrans({v: k for k, v in _STAND_INS.items()})
_MAX_REFERENCE = 16


def _replace_reference(match: re.Match[str]) -> str:
    name = match.group(1)
    if name in _NAMED:
        char = _NAMED[name]
    else:
        code = int(name[2:], 16) if name[1] == "x" else int(name[1:])
        if not (code in (0x9, 0xA, 0xD) or 0x20 <= code <= 0xD7FF or 0xE000 <= code <= 0x10FFFF):
            return match.group(0)
        if 0xD800 <= code <= 0xDFFF:
            return match.group(0)
        char = chr(code)
    return _STAND_INS.get(char, char)


def _rewrite_part(source: IO[bytes], sink: IO[bytes]) -> bool:
    """Stream one XML part, replacing references; False if it already holds a stand-in (or is not UTF-8)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    pending = ""
    try:
        while chunk := source.read(1 << 20):
            text = pending + decoder.decode(chunk)
            cut = text.rfind("&")
            if cut != -1 and ";" not in text[cut:] and len(text) - cut < _MAX_REFERENCE:
                text, pending = text[:cut], text[cut:]  # a reference may straddle the chunk boundary
            else:
                pending = ""
            if any(c in text for c in _STAND_INS.values()):
                return False
            sink.write(_REFERENCE.sub(_replace_reference, text).encode("utf-8"))
        sink.write((pending + decoder.decode(b"", final=True)).encode("utf-8"))
    except UnicodeDecodeError:
        return False
    return True


def _docx_references_resolved(path: Path) -> Path | None:
    """A text-only copy of the DOCX (XML parts and relationships; media left out, as text extraction
    never reads them) with references resolved as described above, or None to use the original."""
    copy = Path(tempfile.mkdtemp()) / "resolved.docx"  # in the child's throw-away TMPDIR
    try:
        with (
            zipfile.ZipFile(path) as src,
            zipfile.ZipFile(copy, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as dst,
        ):
            for info in src.infolist():
                if not info.filename.endswith((".xml", ".rels")):
                    continue
                with src.open(info) as reader, dst.open(info.filename, "w") as writer:
                    if info.filename.startswith("word/"):
                        if not _rewrite_part(reader, writer):
                            return None
                    else:
                        while chunk := reader.read(1 << 20):
                            writer.write(chunk)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib_error):
        return None  # let kreuzberg report the damage on the original
    return copy


def _check_chars(pages: list[tuple[int | None, str]], limits: Limits) -> None:
    total = sum(len(text) for _, text in pages)
    if total > limits.max_chars:
        raise ExtractionError("too_large", f"over {limits.max_chars} characters of text")


def _ocr_pdf(path: Path, limits: Limits, *, threads: int) -> list[tuple[int | None, str]]:
    """Render each page and OCR it on its own: exact page numbers, and one page image in memory at a
    time (OCR of several pages at once needed ~0.9 GiB of address space here)."""
    config = _config(threads=threads, paged=False, ocr=True)
    pages: list[tuple[int | None, str]] = []
    total = 0
    try:
        with k.PdfPageIterator(str(path), dpi=OCR_DPI) as rendered:
            for index, png in rendered:
                text = k.extract_bytes_sync(png, "image/png", config).content
                pages.append((index + 1, text))
                total += len(text)
                if total > limits.max_chars:
                    raise ExtractionError("too_large", f"over {limits.max_chars} characters of text")
    except k.KreuzbergError as exc:
        raise map_error(exc) from None
    return pages


def extract_document(
    path: Path,
    spec: FormatSpec,
    *,
    limits: Limits,
    ocr_mode: str,
    ocr_available: bool,
    threads: int,
    before_ocr: Callable[[int], None] = lambda pages: None,
) -> RawResult:
    """`ocr_mode`: "auto" (OCR a PDF without text when possible), "on" (also images), "off".
    `before_ocr(pages)` is called before OCR starts (the sandbox extends its time budget)."""
    if spec.zip_container:
        check_zip_container(path, limits)
        check_zip_inflation(path, limits)
    if spec.image:
        if not ocr_available:
            raise ExtractionError("needs_ocr", "image needs OCR but tesseract is not installed")
        config = _config(threads=threads, paged=False, ocr=True)
        before_ocr(1)
        try:
            result = k.extract_file_sync(str(path), spec.mime, config)
        except k.KreuzbergError as exc:
            raise map_error(exc) from None
        pages: list[tuple[int | None, str]] = [(None, result.content)]
        _check_chars(pages, limits)
        return RawResult(pages=pages, metadata=_metadata(result), ocr_used=True, backend=BACKEND)

    if spec.kind == "pdf":
        count = _pdf_page_count(path)
        if count > limits.max_pages:
            raise ExtractionError("too_many_pages", f"{count} pages, limit {limits.max_pages}")

    source = path
    resolved = _docx_references_resolved(path) if spec.kind == "docx" else None
    if resolved is not None:
        source = resolved
    try:
        result = k.extract_file_sync(str(source), spec.mime, _config(threads=threads, paged=spec.paged))
    except k.KreuzbergError as exc:
        raise map_error(exc) from None

    if spec.kind == "pdf":
        pages = _pdf_pages(result)
    elif spec.kind == "pptx":
        pages = _slides(result)
    elif resolved is not None:
        pages = [(None, result.content.translate(_RESTORE))]
    else:
        pages = [(None, result.content)]
    _check_chars(pages, limits)

    ocr_used = False
    no_text = spec.kind == "pdf" and pages and not any(text.strip() for _, text in pages)
    if no_text and ocr_mode != "off" and ocr_available:  # without OCR, base.finish names it "needs_ocr"
        before_ocr(len(pages))
        pages = _ocr_pdf(path, limits, threads=threads)
        ocr_used = True
    return RawResult(pages=pages, metadata=_metadata(result), ocr_used=ocr_used, backend=BACKEND)


def _metadata(result: k.ExtractionResult) -> dict[str, str]:
    meta: dict[str, Any] = dict(result.metadata) if isinstance(result.metadata, dict) else {}
    meta.pop("pages", None)
    return clean_metadata(meta)
