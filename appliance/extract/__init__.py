"""Text extraction: a document's bytes → text with pages, parsed out of process under limits.

    from appliance.extract import extract, Limits, ExtractionError
    result = extract(path, "application/pdf")

See docs/extraction.md for formats, limits, error codes and OCR.
"""

from appliance.extract.base import (
    ERROR_CODES,
    PAGE_SEPARATOR,
    TRANSIENT_CODES,
    Extraction,
    ExtractionError,
    Limits,
    Page,
    extract,
    normalize_content_type,
    ocr_available,
)

__all__ = [
    "ERROR_CODES",
    "PAGE_SEPARATOR",
    "TRANSIENT_CODES",
    "Extraction",
    "ExtractionError",
    "Limits",
    "Page",
    "extract",
    "normalize_content_type",
    "ocr_available",
]
