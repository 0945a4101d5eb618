"""Extraction through an Apache Tika server (production compose runs the `apache/tika` image).

The parsing happens in the Tika container, so no sandbox child is needed here; what this module guards
is the worker itself: a total deadline and a cap on the response size (both enforced while the body
streams in), and Tika's answers mapped to our error codes. Uses the `tika` PyPI client in client-only
mode (it never looks for, downloads or starts a jar), against `/rmeta/xml`: the XHTML keeps Tika's
`<div class="page">` (PDF) and `<div class="slide-content">` (PPTX) boundaries, which become pages.

Each endpoint has a circuit breaker (`breaker_for`): after FAIL_MAX calls in a row that found the
server unreachable or answering 429/5xx-busy (`backend_unavailable`), calls fail at once with
`TikaCircuitOpen` (an `ExtractionError("backend_unavailable")`, transient) and no network request
for RESET_TIMEOUT_S, then one trial call goes through. Per-document outcomes (a timeout on a slow
file, a corrupt or oversized document) do not count: they say nothing about the server's health.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from appliance.extract.base import ExtractionError, FormatSpec, Limits, RawResult
from appliance.resilience import CircuitBreaker, CircuitOpen, open_message

BACKEND = "tika"
CONNECT_TIMEOUT_S = 5.0
FAIL_MAX = 5
RESET_TIMEOUT_S = 30.0
WINDOW_S = 60.0
_PAGE_CLASSES = {"page", "slide-content"}
_BLOCKS = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "table", "pre", "blockquote"}
_SKIP = {"head", "script", "style", "title"}


class _ResponseTooLarge(Exception):
    pass


class _DeadlineExceeded(Exception):
    pass


class TikaCircuitOpen(ExtractionError, CircuitOpen):
    """The Tika server's circuit is open: the document was not sent (transient, retry later)."""

    def __init__(self, dependency: str, retry_in: float) -> None:
        super().__init__("backend_unavailable", open_message(dependency, retry_in))
        self.dependency = dependency
        self.retry_in = retry_in


def _is_tika_failure(exc: BaseException) -> bool:
    return (
        isinstance(exc, ExtractionError)
        and not isinstance(exc, CircuitOpen)
        and exc.code == "backend_unavailable"
    )


_breakers: dict[str, CircuitBreaker] = {}
_breakers_lock = threading.Lock()


def breaker_for(endpoint: str) -> CircuitBreaker:
    """The process-wide breaker of one Tika endpoint (made on first use)."""
    endpoint = endpoint.rstrip("/")
    with _breakers_lock:
        breaker = _breakers.get(endpoint)
        if breaker is None:
            breaker = _breakers[endpoint] = CircuitBreaker(
                f"Tika server at {endpoint}",
                is_failure=_is_tika_failure,
                open_error=TikaCircuitOpen,
                fail_max=FAIL_MAX,
                reset_timeout_s=RESET_TIMEOUT_S,
                window_s=WINDOW_S,
            )
        return breaker


def reset_breakers() -> None:
    """Forget every endpoint's breaker state (tests; an operator who knows Tika is back)."""
    with _breakers_lock:
        _breakers.clear()


def _parser_module() -> Any:
    """The tika client's parser, imported in client-only mode and without its log file in $TMPDIR."""
    os.environ["TIKA_CLIENT_ONLY"] = "True"
    os.environ.setdefault("TIKA_SERVER_ENDPOINT", "http://127.0.0.1:9998")
    os.environ["TIKA_LOG_FILE"] = ""
    from tika import parser
    from tika import tika as tika_core

    tika_core.TikaClientOnly = True  # in case the module was imported earlier without the variable
    return parser


def _capped_body(cap: int, deadline: float) -> Callable[..., Any]:
    """A requests response hook: reads the streamed body up to `cap` bytes and until `deadline`."""

    def hook(response: Any, *args: Any, **kwargs: Any) -> Any:
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > cap:
            response.close()
            raise _ResponseTooLarge(declared)
        body = bytearray()
        for chunk in response.iter_content(1 << 16):
            body += chunk
            if len(body) > cap:
                response.close()
                raise _ResponseTooLarge(str(len(body)))
            if time.monotonic() > deadline:
                response.close()
                raise _DeadlineExceeded()
        response._content = bytes(body)  # what requests' .text/.content read from
        response._content_consumed = True
        return response

    return hook


def extract_with_tika(path: Path, spec: FormatSpec, endpoint: str, *, limits: Limits) -> RawResult:
    """Send the file to Tika through the endpoint's breaker (open: TikaCircuitOpen, no request)."""
    status, body = breaker_for(endpoint).call(_request, path, spec, endpoint, limits)
    return _result(status, body, spec)


def _request(path: Path, spec: FormatSpec, endpoint: str, limits: Limits) -> tuple[int, str]:
    """One PUT to Tika: (status, body), or ExtractionError. Busy answers (429, 5xx-busy) are raised
    here, inside the breaker, so they count; other statuses are mapped by `_result` outside it."""
    import requests

    parser = _parser_module()
    deadline = time.monotonic() + limits.timeout_s
    cap = 6 * limits.max_chars + (1 << 20)
    options = {
        "timeout": (CONNECT_TIMEOUT_S, limits.timeout_s),
        "verify": True,  # the client's default is False
        "stream": True,
        "hooks": {"response": [_capped_body(cap, deadline)]},
    }
    headers = {"Content-Type": spec.mime, "X-Tika-PDFOcrStrategy": "no_ocr"}
    if spec.image:
        headers.pop("X-Tika-PDFOcrStrategy")
    try:
        with path.open("rb") as document:  # a file object: the client never treats the path as a URL
            status, body = parser.from_file(
                document,
                serverEndpoint=endpoint.rstrip("/"),
                xmlContent=True,
                headers=headers,
                requestOptions=options,
                raw_response=True,
            )
    except _ResponseTooLarge:
        raise ExtractionError("too_large", f"Tika response over {cap} bytes") from None
    except requests.ConnectTimeout as exc:  # never connected: the server, not the document
        raise ExtractionError("backend_unavailable", f"Tika server unreachable: {exc}") from None
    except (_DeadlineExceeded, requests.Timeout):
        raise ExtractionError("timeout", f"Tika took over {limits.timeout_s:g} s") from None
    except requests.ConnectionError as exc:
        raise ExtractionError("backend_unavailable", f"Tika server unreachable: {exc}") from None
    except requests.RequestException as exc:
        raise ExtractionError("backend_unavailable", f"Tika request failed: {exc}") from None
    status = int(status)
    text = body if isinstance(body, str) else body.decode("utf-8", "replace")
    if status in _BUSY_STATUSES:
        raise _status_error(status, text)
    return status, text


_BUSY_STATUSES = frozenset({404, 405, 429, 502, 503, 504})  # mapped to backend_unavailable below


def _status_error(status: int, body: str) -> ExtractionError:
    snippet = " ".join(body.split())[:200]
    if "encrypteddocumentexception" in body.lower():
        return ExtractionError("encrypted_file", "the document is password-protected (Tika)")
    if status == 415:
        return ExtractionError("unsupported_type", f"Tika cannot parse this type: {snippet}")
    if status == 422:
        return ExtractionError("corrupt_file", f"Tika could not parse the document: {snippet}")
    if status == 413:
        return ExtractionError("too_large", "Tika refused the document as too large")
    if status in (404, 405, 429, 502, 503, 504):
        return ExtractionError("backend_unavailable", f"Tika server answered {status}")
    return ExtractionError("extractor_crashed", f"Tika server answered {status}: {snippet}")


def _result(status: int, body: str, spec: FormatSpec) -> RawResult:
    if status == 204:
        return RawResult(pages=[], metadata={}, ocr_used=False, backend=BACKEND)
    if status != 200:
        raise _status_error(status, body)
    try:
        documents = json.loads(body)
    except ValueError:
        raise ExtractionError("extractor_crashed", "Tika answered with invalid JSON") from None
    if not isinstance(documents, list) or not documents or not isinstance(documents[0], dict):
        raise ExtractionError("extractor_crashed", "Tika answered with an unexpected JSON shape")
    container = documents[0]
    exception = str(container.get("X-TIKA:EXCEPTION:container_exception", ""))
    if exception:
        if "EncryptedDocumentException" in exception:
            raise ExtractionError("encrypted_file", "the document is password-protected (Tika)")
        first_line = exception.strip().splitlines()[0] if exception.strip() else "parse error"
        raise ExtractionError("corrupt_file", f"Tika could not parse the document: {first_line[:200]}")
    if container.get("X-TIKA:EXCEPTION:write_limit_reached"):
        raise ExtractionError("too_large", "Tika's write limit was reached")

    pages = xhtml_pages(str(container.get("X-TIKA:content") or ""), paged=spec.paged)
    embedded = [xhtml_pages(str(d.get("X-TIKA:content") or ""), paged=False) for d in documents[1:]]
    extra = "\n\n".join(text for doc in embedded for _, text in doc if text.strip())
    if extra:  # attachments and embedded files: their text follows the container's last page
        number, text = pages[-1] if pages else (None, "")
        pages[-1:] = [(number, f"{text}\n\n{extra}" if text else extra)]
    parsed_by = " ".join(str(d.get("X-TIKA:Parsed-By", "")) for d in documents if isinstance(d, dict))
    metadata = {
        key: value
        for key, value in container.items()
        if not key.startswith("X-TIKA:") and key != "X-Parsed-By"
    }
    return RawResult(
        pages=pages,
        metadata=metadata,
        ocr_used="TesseractOCRParser" in parsed_by,
        backend=BACKEND,
    )


class _PageCollector(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.outside: list[str] = []
        self.pages: list[list[str]] = []
        self.page_depth = 0
        self.skip_depth = 0

    def _sink(self) -> list[str]:
        return self.pages[-1] if self.page_depth else self.outside

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIP:
            self.skip_depth += 1
        if tag == "div":
            classes = set((dict(attrs).get("class") or "").split())
            if self.page_depth:
                self.page_depth += 1
            elif classes & _PAGE_CLASSES:
                self.pages.append([])
                self.page_depth = 1
        if tag in _BLOCKS:
            self._sink().append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP and self.skip_depth:
            self.skip_depth -= 1
        if tag in _BLOCKS:
            self._sink().append("\n")
        if tag == "div" and self.page_depth:
            self.page_depth -= 1

    def handle_data(self, data: str) -> None:
        if not self.skip_depth:
            self._sink().append(data)


def _tidy(parts: list[str]) -> str:
    lines = [" ".join(line.split()) for line in "".join(parts).splitlines()]
    out: list[str] = []
    for line in lines:
        if line or (out and out[-1]):
            out.append(line)
    return "\n".join(out).strip()


def xhtml_pages(xhtml: str, *, paged: bool) -> list[tuple[int | None, str]]:
    """Tika's XHTML as (page number, text): numbered pages where Tika marked them, else one page."""
    collector = _PageCollector()
    collector.feed(xhtml)
    collector.close()
    if paged and collector.pages:
        return [(number, _tidy(parts)) for number, parts in enumerate(collector.pages, 1)]
    everything = collector.outside + [piece for page in collector.pages for piece in ["\n", *page]]
    return [(None, _tidy(everything))]
