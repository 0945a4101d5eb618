"""Text extraction against real kreuzberg in real sandbox processes, and the Tika client against a stub.

Every document is generated in conftest.py. No Tika server can run here: the Tika tests exercise the real
`tika` client against a small http.server on loopback that answers with canned Tika-like responses.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from appliance.extract import (
    ERROR_CODES,
    PAGE_SEPARATOR,
    TRANSIENT_CODES,
    Extraction,
    ExtractionError,
    Limits,
    extract,
    ocr_available,
)
from appliance.extract.base import FORMATS, RawResult, assemble, finish
from appliance.extract.sandbox import output_cap, run_kreuzberg
from tests.extract.conftest import (
    DOCX,
    PDF_PAGES,
    PPTX,
    SAMPLES,
    SLIDES,
    Sample,
    image_pdf,
    make_cfb,
    make_docx,
    make_pdf,
    render_pngs,
    write_bomb_docx,
)

Writer = Callable[[str, bytes], Path]


def _our_sandbox_children() -> list[int]:
    """Sandbox children of this test process still running (other test runs on the machine don't count)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            status = (entry / "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        if (
            b"appliance.extract.sandbox" in cmdline
            and int(fields.get("PPid", "0")) == os.getpid()
            and not fields.get("State", "").startswith("Z")
        ):
            found.append(int(entry.name))
    return found


@pytest.fixture(autouse=True)
def nothing_left_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """After every test: no sandbox child alive, no sandbox working directory left (the sandbox makes
    them in tempfile's directory, pointed at this test's own folder)."""
    scratch = tmp_path / "tempdir"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    yield
    assert _our_sandbox_children() == []
    assert list(scratch.glob("appliance-extract-*")) == []


def _raises(code: str, fn: Callable[[], object]) -> ExtractionError:
    with pytest.raises(ExtractionError) as info:
        fn()
    assert info.value.code == code, repr(info.value)
    assert "\n" not in info.value.message
    assert info.value.permanent is (code not in TRANSIENT_CODES)
    return info.value


def _pid_gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state == "Z"  # exited; waiting for PID 1 to reap it


# ---------------------------------------- formats


@pytest.mark.parametrize("sample", SAMPLES, ids=[s.name for s in SAMPLES])
def test_each_format_extracts_its_known_text(sample: Sample, sample_dir: Path) -> None:
    result = extract(sample_dir / sample.name, sample.content_type)

    for sentence in sample.expected:
        assert sentence in result.text, (sentence, result.text)
    # UTF-8 plain text is decoded in process; every other format goes through the sandboxed parser.
    assert result.backend == ("plain" if sample.content_type == "text/plain" else "kreuzberg")
    assert result.ocr_used is False
    assert result.text == PAGE_SEPARATOR.join(p.text for p in result.pages)
    for page in result.pages:
        assert result.text[page.start : page.end] == page.text
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in result.metadata.items())
    assert "\x00" not in result.text and "\r" not in result.text
    if sample.page_texts is None:
        assert [p.number for p in result.pages] == [None]
    else:
        assert [p.number for p in result.pages] == list(range(1, len(sample.page_texts) + 1))
        for page, expected in zip(result.pages, sample.page_texts, strict=True):
            assert expected in page.text


def test_three_page_pdf_keeps_each_page_and_exact_offsets(sample_dir: Path) -> None:
    result = extract(sample_dir / "three-pages.pdf", "application/pdf")

    assert [(p.number, p.text) for p in result.pages] == [
        (1, PDF_PAGES[0]),
        (2, PDF_PAGES[1]),
        (3, PDF_PAGES[2]),
    ]
    assert result.text == "\n\n".join(PDF_PAGES)
    assert [(p.start, p.end) for p in result.pages] == [
        (0, len(PDF_PAGES[0])),
        (len(PDF_PAGES[0]) + 2, len(PDF_PAGES[0]) + 2 + len(PDF_PAGES[1])),
        (len(result.text) - len(PDF_PAGES[2]), len(result.text)),
    ]
    assert result.content_type == "application/pdf"
    assert result.metadata.get("page_count") == "3"


def test_pptx_slides_are_pages(sample_dir: Path) -> None:
    result = extract(sample_dir / "deck.pptx", PPTX)
    assert [(p.number, p.text) for p in result.pages] == [(i + 1, s) for i, s in enumerate(SLIDES)]


def test_content_type_parameters_case_and_aliases(sample_dir: Path) -> None:
    assert extract(sample_dir / "memo.rtf", "Text/RTF").content_type == "application/rtf"
    assert extract(sample_dir / "plain.txt", "text/plain; charset=utf-8").content_type == "text/plain"


def test_docx_keeps_ampersands_and_angle_brackets(write: Writer) -> None:
    """kreuzberg 4.10.4 alone turns "R&D <x>" into "RD x" (xberg-io/xberg#1242); the child works round it."""
    path = write("entities.docx", make_docx(["R&D budget for Q&A <draft> 5>3", "num &#233; stays literal"]))
    assert extract(path, DOCX).text == "R&D budget for Q&A <draft> 5>3\n\nnum &#233; stays literal"


def test_assemble_rule_with_empty_pages() -> None:
    text, pages = assemble([(1, "abc"), (2, ""), (3, "de")])
    assert text == "abc\n\n\n\nde"
    assert [(p.number, p.start, p.end) for p in pages] == [(1, 0, 3), (2, 5, 5), (3, 7, 9)]
    assert all(text[p.start : p.end] == p.text for p in pages)


def test_hundred_page_pdf_speed(write: Writer, capsys: pytest.CaptureFixture[str]) -> None:
    lines = [f"Line {n}: an ordinary sentence of benchmark text to extract from the page." for n in range(40)]
    path = write("hundred.pdf", make_pdf([[f"Page {p} heading", *lines] for p in range(1, 101)]))
    started = time.perf_counter()
    result = extract(path, "application/pdf")
    elapsed = time.perf_counter() - started
    assert [p.number for p in result.pages] == list(range(1, 101))
    assert all(p.text.startswith(f"Page {p.number} heading") for p in result.pages)
    with capsys.disabled():
        print(f"\n100-page PDF: {elapsed:.2f} s, {100 / elapsed:.0f} pages/s (sandbox start included)")
    assert elapsed < 20


# ---------------------------------------- hostile files


def test_zip_bomb_docx_is_refused_without_inflating(tmp_path: Path) -> None:
    path = tmp_path / "bomb.docx"
    inflated = write_bomb_docx(path, inflated_mib=1024)
    assert inflated >= 1 << 30 and path.stat().st_size < 2 << 20
    started = time.perf_counter()
    error = _raises("too_large", lambda: extract(path, DOCX))
    assert "declared" in error.message
    assert time.perf_counter() - started < 5  # inflating 1 GiB would take far longer


def test_zip_entry_lying_about_its_size_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "liar.docx"
    write_bomb_docx(path, inflated_mib=64, lie_about_size=True)
    _raises("corrupt_file", lambda: extract(path, DOCX))


def test_zip_with_too_many_entries(sample_dir: Path) -> None:
    _raises("too_large", lambda: extract(sample_dir / "letter.docx", DOCX, limits=Limits(max_zip_entries=2)))


def test_password_protected_files(write: Writer) -> None:
    pdf = write("locked.pdf", make_pdf([["secret text"]], user_password="hunter2"))
    _raises("encrypted_file", lambda: extract(pdf, "application/pdf"))
    # An encrypted OOXML file is an OLE container, not a zip.
    docx = write(
        "locked.docx",
        make_cfb({"EncryptionInfo": b"\x04\x00\x04\x00" + b"\0" * 60, "EncryptedPackage": b"\0" * 200}),
    )
    _raises("encrypted_file", lambda: extract(docx, DOCX))


def test_truncated_pdf_is_corrupt(write: Writer, sample_dir: Path) -> None:
    data = (sample_dir / "three-pages.pdf").read_bytes()
    path = write("truncated.pdf", data[: len(data) // 2])
    _raises("corrupt_file", lambda: extract(path, "application/pdf"))


def test_random_bytes_labelled_pdf_are_corrupt(write: Writer) -> None:
    path = write("random.pdf", os.urandom(20_000))
    _raises("corrupt_file", lambda: extract(path, "application/pdf"))


def test_truncated_docx_is_corrupt(write: Writer, sample_dir: Path) -> None:
    data = (sample_dir / "letter.docx").read_bytes()
    path = write("truncated.docx", data[: len(data) // 2])
    _raises("corrupt_file", lambda: extract(path, DOCX))


def test_empty_file_and_files_without_text(write: Writer) -> None:
    _raises("empty", lambda: extract(write("empty.pdf", b""), "application/pdf"))
    _raises("empty", lambda: extract(write("blank.txt", b" \n\t\r\n "), "text/plain"))
    _raises("empty", lambda: extract(write("script.html", b"<html><script>x=1</script></html>"), "text/html"))


def test_unsupported_types(write: Writer) -> None:
    elf = write("binary", Path(sys.executable).resolve().read_bytes()[:65536])
    _raises("unsupported_type", lambda: extract(elf, "application/x-executable"))
    _raises("unsupported_type", lambda: extract(elf, "application/zip"))
    _raises("unsupported_type", lambda: extract(elf, ""))
    png = write("image.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
    _raises("unsupported_type", lambda: extract(png, "image/png"))  # images only with ocr=True
    _raises("corrupt_file", lambda: extract(elf, "application/pdf"))  # an ELF that claims to be a PDF


def test_page_char_and_size_limits(write: Writer, sample_dir: Path) -> None:
    six = write("six.pdf", make_pdf([[f"page {n}"] for n in range(6)]))
    error = _raises("too_many_pages", lambda: extract(six, "application/pdf", limits=Limits(max_pages=5)))
    assert "6 pages" in error.message
    deck = sample_dir / "deck.pptx"
    _raises("too_many_pages", lambda: extract(deck, PPTX, limits=Limits(max_pages=2)))
    _raises("too_large", lambda: extract(six, "application/pdf", limits=Limits(max_chars=10)))
    _raises("too_large", lambda: extract(six, "application/pdf", limits=Limits(max_bytes=100)))


# ---------------------------------------- sandbox


def test_timeout_kills_the_child_and_its_grandchildren(tmp_path: Path, sample_dir: Path) -> None:
    pidfile = tmp_path / "pids"
    started = time.perf_counter()
    _raises(
        "timeout",
        lambda: run_kreuzberg(
            sample_dir / "plain.txt",
            FORMATS["text/plain"],
            limits=Limits(timeout_s=1.0),
            ocr=None,
            _test_hook=f"sleep:{pidfile}",
        ),
    )
    assert time.perf_counter() - started < 5
    child, grandchild = (int(x) for x in pidfile.read_text().split())
    deadline = time.monotonic() + 2
    while not (_pid_gone(child) and _pid_gone(grandchild)) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _pid_gone(child) and _pid_gone(grandchild)


def test_real_parser_over_its_time_budget_times_out(scanned_pdf: Path) -> None:
    if not ocr_available():
        pytest.skip("OCR is the slow real work used here")  # install.sh installs tesseract: not skipped in CI
    limits = Limits(timeout_s=0.5, ocr_page_timeout_s=0.2)  # OCR of the page takes over a second
    _raises("timeout", lambda: extract(scanned_pdf, "application/pdf", limits=limits))


def test_memory_limit_python_allocation(sample_dir: Path) -> None:
    _raises(
        "memory_limit",
        lambda: run_kreuzberg(
            sample_dir / "plain.txt",
            FORMATS["text/plain"],
            limits=Limits(memory_mb=256),
            ocr=None,
            _test_hook="allocate",
        ),
    )


def test_memory_limit_native_allocation(scanned_pdf: Path, sample_dir: Path) -> None:
    # Too little address space to map pdfium's library (kreuzberg loads it for a PDF): the loader fails.
    _raises(
        "memory_limit",
        lambda: extract(sample_dir / "three-pages.pdf", "application/pdf", limits=Limits(memory_mb=100)),
    )
    if ocr_available():
        # Rendering and OCR of a page in Rust/C++ under 250 MiB: the allocator fails and aborts.
        _raises("memory_limit", lambda: extract(scanned_pdf, "application/pdf", limits=Limits(memory_mb=250)))


def test_crash_and_cpu_limit_and_output_cap(sample_dir: Path) -> None:
    txt = sample_dir / "plain.txt"
    spec = FORMATS["text/plain"]
    crash = _raises(
        "extractor_crashed",
        lambda: run_kreuzberg(txt, spec, limits=Limits(), ocr=None, _test_hook="segfault"),
    )
    assert "SIGSEGV" in crash.message and crash.permanent is False
    cpu = _raises("timeout", lambda: run_kreuzberg(txt, spec, limits=Limits(), ocr=None, _test_hook="spin"))
    assert "CPU" in cpu.message
    small = Limits(max_chars=1000, max_pages=10)
    flood = _raises("too_large", lambda: run_kreuzberg(txt, spec, limits=small, ocr=None, _test_hook="flood"))
    assert str(output_cap(small)) in flood.message


# ---------------------------------------- OCR


def test_scanned_pdf_is_ocred_or_needs_ocr(scanned_pdf: Path) -> None:
    assert ocr_available(), "install tesseract-ocr and tesseract-ocr-eng: the OCR branch must run here"
    # timeout_s covers the text pass only: starting OCR adds ocr_page_timeout_s per page to the budget.
    result = extract(scanned_pdf, "application/pdf", limits=Limits(timeout_s=1.0))
    assert result.ocr_used is True
    assert [p.number for p in result.pages] == [1]
    assert "Scanned invoice number 4711" in result.text
    assert "Total amount due 250 EUR" in result.text


def test_scanned_pdf_without_ocr_needs_ocr(scanned_pdf: Path) -> None:
    # The branch a machine without tesseract takes; forced here with ocr=False.
    error = _raises("needs_ocr", lambda: extract(scanned_pdf, "application/pdf", ocr=False))
    assert error.permanent is True


def test_image_with_ocr_on(write: Writer, scanned_pdf: Path) -> None:
    png = write("scan.png", render_pngs(scanned_pdf, dpi=150)[0])
    if not ocr_available():
        _raises("needs_ocr", lambda: extract(png, "image/png", ocr=True))
        return
    result = extract(png, "image/png", ocr=True)
    assert result.ocr_used and "Scanned invoice number 4711" in result.text
    assert [p.number for p in result.pages] == [None]


def test_image_pdf_helper_has_no_text_layer(tmp_path: Path) -> None:
    source = tmp_path / "s.pdf"
    source.write_bytes(make_pdf([["x"]]))
    assert b"BT" not in image_pdf(render_pngs(source, dpi=30))


# ---------------------------------------- errors


def test_error_codes_and_permanence() -> None:
    assert {"timeout", "extractor_crashed", "backend_unavailable"} == TRANSIENT_CODES
    assert TRANSIENT_CODES < ERROR_CODES
    error = ExtractionError("corrupt_file", "bad\nthing")
    assert (error.code, error.permanent, str(error)) == ("corrupt_file", True, "bad thing")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.code, copy.message, copy.permanent) == (error.code, error.message, error.permanent)
    with pytest.raises(ValueError):
        ExtractionError("no_such_code")


def test_finish_names_empty_results() -> None:
    pdf, txt = FORMATS["application/pdf"], FORMATS["text/plain"]
    _raises("needs_ocr", lambda: finish(RawResult([(1, " ")], {}, False, "x"), pdf, Limits()))
    _raises("empty", lambda: finish(RawResult([(1, "")], {}, True, "x"), pdf, Limits()))
    _raises("empty", lambda: finish(RawResult([], {}, False, "x"), txt, Limits()))


# ---------------------------------------- Tika (stub)

TIKA_PDF = {
    "Content-Type": "application/pdf",
    "dc:title": "Stub report",
    "xmpTPg:NPages": "3",
    "X-TIKA:Parsed-By": ["org.apache.tika.parser.DefaultParser", "org.apache.tika.parser.pdf.PDFParser"],
    "X-TIKA:content": (
        '<html xmlns="http://www.w3.org/1999/xhtml"><head><title>Stub report</title></head><body>'
        '<div class="page"><p>First page from Tika.</p>\n</div>'
        '<div class="page"><p>Second page: fish &amp; chips.</p>\n</div>'
        '<div class="page"><p>Third page.</p></div></body></html>'
    ),
}
TIKA_DOCX_WITH_ATTACHMENT = [
    {
        "Content-Type": DOCX,
        "X-TIKA:content": "<html><body><p>Body of the letter.</p><p>Second paragraph.</p></body></html>",
    },
    {"Content-Type": "text/plain", "X-TIKA:content": "<html><body><p>Embedded note.</p></body></html>"},
]
STUB_RESPONSES: dict[str, tuple[int, str, float]] = {
    "pdf3": (200, json.dumps([TIKA_PDF]), 0),
    "docx": (200, json.dumps(TIKA_DOCX_WITH_ATTACHMENT), 0),
    "scanned": (
        200,
        json.dumps(
            [
                {
                    "Content-Type": "application/pdf",
                    "X-TIKA:content": '<html><body><div class="page"></div></body></html>',
                }
            ]
        ),
        0,
    ),
    "encrypted": (
        422,
        "org.apache.tika.exception.EncryptedDocumentException: Unable to process: document is encrypted",
        0,
    ),
    "corrupt": (422, "org.apache.tika.exception.TikaException: Unexpected RuntimeException", 0),
    "container": (
        200,
        json.dumps(
            [
                {
                    "X-TIKA:EXCEPTION:container_exception": (
                        "org.apache.tika.exception.TikaException: bad xref\n\tat x"
                    )
                }
            ]
        ),
        0,
    ),
    "unsupported": (415, "", 0),
    "crash": (500, "java.lang.OutOfMemoryError", 0),
    "busy": (503, "", 0),
    "garbage": (200, "this is not json", 0),
    "no-content": (204, "", 0),
    "slow": (200, json.dumps([TIKA_PDF]), 3.0),
    "huge": (200, json.dumps([{"X-TIKA:content": "x" * (3 << 20)}]), 0),
}


class _TikaStub(BaseHTTPRequestHandler):
    seen: list[tuple[str, str, str]] = []

    def do_PUT(self) -> None:  # noqa: N802 - http.server's naming
        length = int(self.headers.get("Content-Length") or 0)
        upload = self.rfile.read(length)
        scenario = (
            "docx" if upload[:2] == b"PK" else upload.decode().strip()
        )  # a real DOCX passes the zip guard
        _TikaStub.seen.append(
            (self.path, self.headers.get("Content-Type", ""), self.headers.get("Accept", ""))
        )
        status, body, delay = STUB_RESPONSES[scenario]
        time.sleep(delay)
        data = body.encode()
        self.send_response(status)
        if status != 204:
            self.send_header("Content-Type", "application/json" if body.startswith("[") else "text/plain")
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if status != 204:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def tika_stub() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _TikaStub)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _tika(
    write: Writer, endpoint: str, scenario: str, content_type: str, limits: Limits | None = None
) -> Extraction:
    """Upload a file naming the stub's scenario."""
    path = write(f"{scenario}.bin", scenario.encode())
    return extract(path, content_type, tika_endpoint=endpoint, limits=limits or Limits())


def test_tika_pages_text_and_metadata(write: Writer, tika_stub: str) -> None:
    result = _tika(write, tika_stub, "pdf3", "application/pdf")
    assert [(p.number, p.text) for p in result.pages] == [
        (1, "First page from Tika."),
        (2, "Second page: fish & chips."),
        (3, "Third page."),
    ]
    assert all(result.text[p.start : p.end] == p.text for p in result.pages)
    assert (result.backend, result.ocr_used, result.metadata["dc:title"]) == ("tika", False, "Stub report")
    assert _TikaStub.seen[-1] == ("/rmeta/xml", "application/pdf", "application/json")
    from tika import tika as tika_core

    assert tika_core.TikaClientOnly  # the client never tries to fetch or start a jar

    docx = extract(write("letter.docx", make_docx(["irrelevant"])), DOCX, tika_endpoint=tika_stub)
    assert docx.text == "Body of the letter.\n\nSecond paragraph.\n\nEmbedded note."
    assert [p.number for p in docx.pages] == [None]


@pytest.mark.parametrize(
    ("scenario", "code"),
    [
        ("scanned", "needs_ocr"),
        ("encrypted", "encrypted_file"),
        ("corrupt", "corrupt_file"),
        ("container", "corrupt_file"),
        ("unsupported", "unsupported_type"),
        ("crash", "extractor_crashed"),
        ("busy", "backend_unavailable"),
        ("garbage", "extractor_crashed"),
        ("no-content", "needs_ocr"),
    ],
)
def test_tika_error_mapping(write: Writer, tika_stub: str, scenario: str, code: str) -> None:
    _raises(code, lambda: _tika(write, tika_stub, scenario, "application/pdf"))


def test_tika_timeout_size_cap_and_unreachable(write: Writer, tika_stub: str) -> None:
    started = time.perf_counter()
    _raises(
        "timeout", lambda: _tika(write, tika_stub, "slow", "application/pdf", limits=Limits(timeout_s=0.5))
    )
    assert time.perf_counter() - started < 2.5
    _raises(
        "too_large", lambda: _tika(write, tika_stub, "huge", "application/rtf", limits=Limits(max_chars=1000))
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    _raises("backend_unavailable", lambda: _tika(write, closed, "pdf3", "application/pdf"))


def test_tika_path_keeps_the_zip_guard(tmp_path: Path, tika_stub: str) -> None:
    path = tmp_path / "bomb.docx"
    write_bomb_docx(path, inflated_mib=600)
    _raises("too_large", lambda: extract(path, DOCX, tika_endpoint=tika_stub))
