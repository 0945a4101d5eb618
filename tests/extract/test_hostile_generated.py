"""Hostile files beyond test_extract.py's (issue 9, item 7), generated at test time by
tests/support/hostile.py: zip bombs in every OOXML/ODF format (honest, lying within deflate's
tolerance, many members, an entry count that lies, nested), billion laughs, quadratic blow-up and
external entities in package parts and HTML, deeply nested PDF objects, page trees and HTML, a
20,000-page PDF, self-referencing PDF forms and an e-mail with a huge attachment.

Every case runs under the limits the ingest worker uses (`Limits()`, what pipeline.py passes) and
asserts: the expected outcome and code; wall time within `timeout_s` (+ slack for the kill and reap);
the sandbox child's peak RSS (sampled VmHWM) within `memory_mb`; a normal document extracts right after
(the worker keeps serving); and, where a canary is involved, its content appears nowhere (text,
metadata, error message) and inotify saw no process open it. A few representative cases go through
the real upload and ingest path, each followed by a normal upload that must reach `ready`.

A table (case, outcome, code, seconds, peak RSS) is printed at the end of the module.
"""

from __future__ import annotations

import threading
import time
import zipfile
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from appliance.db.engine import Database
from appliance.documents.upload import SNIFF_BYTES, sniff_content_type
from appliance.extract import ExtractionError, Limits, extract, sandbox
from tests.factories import bearer, ingest_pending, make_tenant
from tests.support import hostile as h

LIMITS = Limits()  # the ingest pipeline calls extract() with the defaults
SLACK_S = 5.0  # past the sandbox deadline: SIGKILL of the group, reaping, removing the work directory
NORMAL_TEXT = "The harbour ferry timetable changes on the first Monday of April."

# ---------------------------------------- measurement


class _Measured:
    """Samples each sandbox child's VmHWM (peak RSS of its own address space) every 10 ms until it
    exits, whichever way it was started (forked by the worker's zygote or started directly): wraps
    `sandbox._start_child`. wait4's ru_maxrss cannot be used: Linux carries the forking parent's RSS
    into the child's maxrss. A sample is a lower bound of the true peak; for a child forked from the
    zygote it includes the zygote's pages the child shares (Python and kreuzberg, loaded)."""

    samplers: list[_Measured] = []

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.hwm_kib = 0
        threading.Thread(target=self._sample, daemon=True).start()

    @classmethod
    def peak_kib(cls) -> int | None:
        peaks = [s.hwm_kib for s in cls.samplers if s.hwm_kib]
        return max(peaks) if peaks else None

    def _sample(self) -> None:
        status = Path(f"/proc/{self.pid}/status")
        while True:
            try:
                text = status.read_text()
            except OSError:
                return
            line = next((x for x in text.splitlines() if x.startswith("VmHWM:")), None)
            if line is None:  # a zombie has no memory left
                return
            self.hwm_kib = max(self.hwm_kib, int(line.split()[1]))
            time.sleep(0.01)


@dataclass
class Row:
    case: str
    outcome: str
    code: str
    seconds: float
    peak_mib: float | None
    path: str = "extract()"


ROWS: list[Row] = []


@pytest.fixture(scope="module", autouse=True)
def table(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None or not ROWS:
        return
    lines = [
        "",
        f"hostile files (limits: timeout {LIMITS.timeout_s:g} s, memory {LIMITS.memory_mb} MiB, "
        f"max_bytes {LIMITS.max_bytes >> 20} MiB, max_pages {LIMITS.max_pages})",
        f"{'case':<38} {'path':<9} {'outcome':<9} {'code':<14} {'seconds':>7} {'peak RSS':>9}",
    ]
    for r in ROWS:
        peak = f"{r.peak_mib:.0f} MiB" if r.peak_mib is not None else "-"
        lines.append(f"{r.case:<38} {r.path:<9} {r.outcome:<9} {r.code:<14} {r.seconds:>7.2f} {peak:>9}")
    with capture.global_and_fixture_disabled():
        for line in lines:
            reporter.write_line(line)


@pytest.fixture(autouse=True)
def measured(monkeypatch: pytest.MonkeyPatch) -> None:
    real = sandbox._start_child

    def start(workdir: str) -> Any:
        child, parent_pid = real(workdir)
        _Measured.samplers.append(_Measured(child.pid))
        return child, parent_pid

    monkeypatch.setattr(sandbox, "_start_child", start)


@pytest.fixture
def canary(tmp_path: Path) -> Iterator[h.Canary]:
    c = h.Canary(tmp_path)
    yield c
    c.close()


@pytest.fixture(scope="module")
def normal_docx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("normal") / "normal.docx"
    h.write_office(path, "docx", h.OFFICE_KINDS["docx"].main_xml(NORMAL_TEXT).encode())
    return path


def attempt(
    case: str,
    path: Path,
    content_type: str,
    expected: tuple[str, str],
    normal: Path,
    *,
    canary: h.Canary | None = None,
    expect_text: str | None = None,
) -> Any:
    """Extract `path` under LIMITS and check the invariants listed in the module docstring.
    `expected` is (outcome, code): ("failed", code) or ("succeeded", "-")."""
    if canary is not None:
        assert canary.watch(), "inotify is needed to prove no parser opens a local file"
    _Measured.samplers.clear()
    started = time.perf_counter()
    result = None
    try:
        result = extract(path, content_type, limits=LIMITS)
        outcome, code = "succeeded", "-"
        seen = result.text + " ".join(result.metadata.values())
    except ExtractionError as exc:
        outcome, code, seen = "failed", exc.code, exc.message
        assert "\n" not in exc.message
    seconds = time.perf_counter() - started
    peak_kib = _Measured.peak_kib()
    peak = peak_kib / 1024 if peak_kib is not None else None
    ROWS.append(Row(case, outcome, code, seconds, peak))

    assert (outcome, code) == expected, seen[:500]
    assert seconds < LIMITS.timeout_s + SLACK_S
    if peak is not None:
        assert peak <= LIMITS.memory_mb
    if canary is not None:
        assert not h.leaked(seen, canary)
        assert not canary.opened(), "a parser opened the canary file"
    if expect_text is not None:
        assert result is not None and expect_text in result.text
    # The worker keeps serving: the next document extracts normally.
    assert NORMAL_TEXT in extract(normal, h.DOCX, limits=LIMITS).text
    return result


# ---------------------------------------- zip bombs in OOXML/ODF

KINDS = list(h.OFFICE_KINDS)


@pytest.mark.parametrize("kind", KINDS)
def test_zip_bomb_member_expanding_to_gigabytes(kind: str, tmp_path: Path, normal_docx: Path) -> None:
    path = tmp_path / f"bomb.{kind}"
    inflated = h.write_office(path, kind, h.office_bomb(kind, inflated_mib=2048))
    assert inflated > 2 << 30 and path.stat().st_size < 3 << 20
    attempt(
        f"{kind} bomb 2 GiB (honest sizes)",
        path,
        h.OFFICE_KINDS[kind].mime,
        ("failed", "too_large"),
        normal_docx,
    )


@pytest.mark.parametrize("kind", KINDS)
def test_zip_bomb_lying_within_deflate_tolerance(kind: str, tmp_path: Path, normal_docx: Path) -> None:
    """Declared ≈ compressed size, so every declared-size check passes; 1 GiB really comes out."""
    path = tmp_path / f"liar.{kind}"
    h.write_office(path, kind, h.office_bomb(kind, inflated_mib=1024, declared=h.tolerance_lie(1024)))
    attempt(
        f"{kind} bomb 1 GiB declared 1 MB",
        path,
        h.OFFICE_KINDS[kind].mime,
        ("failed", "too_large"),
        normal_docx,
    )


@pytest.mark.parametrize("kind", ["docx", "xlsx"])
def test_many_members(kind: str, tmp_path: Path, normal_docx: Path) -> None:
    mime = h.OFFICE_KINDS[kind].mime
    many = tmp_path / f"many.{kind}"
    h.write_many_members(many, kind, count=20_000, member_bytes=16, text="Many members")
    attempt(f"{kind} 20,000 members", many, mime, ("failed", "too_large"), normal_docx)
    # 9,000 members (under the entry limit) of 64 KiB each: 576 MiB declared in all.
    heavy = tmp_path / f"heavy.{kind}"
    h.write_many_members(heavy, kind, count=9_000, member_bytes=64 * 1024, text="Many members")
    attempt(f"{kind} 9,000 x 64 KiB members", heavy, mime, ("failed", "too_large"), normal_docx)


def test_entry_count_that_lies(tmp_path: Path, normal_docx: Path) -> None:
    """The end record says 3 entries; the central directory holds 20,003."""
    path = tmp_path / "count-lie.docx"
    members: list[tuple[str, h.Member]] = [*h.office_skeleton("docx")]
    members.append(("word/document.xml", h.OFFICE_KINDS["docx"].main_xml("x").encode()))
    members += [(f"customXml/item{i}.xml", b"") for i in range(20_000)]
    h.write_zip(path, members, declared_entries=3)
    attempt("docx entry count lies (3 vs 20,003)", path, h.DOCX, ("failed", "too_large"), normal_docx)


def test_members_compressed_with_bzip2_or_lzma_are_refused(tmp_path: Path, normal_docx: Path) -> None:
    """OOXML allows only stored/deflate; bzip2 reaches ratios far beyond deflate's ~1000:1."""
    for method, label in ((zipfile.ZIP_BZIP2, "bzip2"), (zipfile.ZIP_LZMA, "lzma")):
        path = tmp_path / f"{label}.docx"
        with zipfile.ZipFile(path, "w") as zf:
            for name, data in h.office_skeleton("docx"):
                zf.writestr(name, data, compress_type=zipfile.ZIP_DEFLATED)
            zf.writestr(
                "word/document.xml", h.OFFICE_KINDS["docx"].main_xml("x" * 100_000), compress_type=method
            )
        attempt(f"docx member compressed with {label}", path, h.DOCX, ("failed", "corrupt_file"), normal_docx)


@pytest.mark.parametrize("kind", KINDS)
def test_nested_bomb_is_never_inflated(kind: str, tmp_path: Path, normal_docx: Path) -> None:
    """A 2 GiB DOCX bomb embedded in a small valid package: embedded objects are not extracted, so the
    outer text comes out (a documented safe outcome) and the inner bomb is never inflated."""
    path = tmp_path / f"nested.{kind}"
    assert h.write_nested_bomb(path, kind, inner_mib=2048, text="Outer text of a nested bomb") > 2 << 30
    attempt(
        f"{kind} with embedded 2 GiB bomb",
        path,
        h.OFFICE_KINDS[kind].mime,
        ("succeeded", "-"),
        normal_docx,
        expect_text="Outer text of a nested bomb",
    )


# ---------------------------------------- XML entities in package parts

# DOCX and XLSX parsers drop entity references (text around them stays; a sheet whose only cell is an
# entity is empty); PPTX and ODT refuse any DTD ("XML with DTD detected"). Nothing is expanded.
DTD_OUTCOME = {
    "docx": ("succeeded", "-"),
    "xlsx": ("failed", "empty"),
    "pptx": ("failed", "corrupt_file"),
    "odt": ("failed", "corrupt_file"),
}


def _entity_main(kind: str, attack: str, canary: h.Canary) -> str:
    spec = h.OFFICE_KINDS[kind]
    if attack == "xxe":
        dtd = h.xxe_dtd(spec.root_tag, {"xxe": canary.url, "pw": "file:///etc/passwd"})
        return spec.main_xml("&xxe;&pw;", doctype=dtd)
    if attack == "laughs":
        return spec.main_xml("&lol9;", doctype=h.billion_laughs_dtd(spec.root_tag))
    dtd, body = h.quadratic_blowup(spec.root_tag)
    return spec.main_xml(body, doctype=dtd)


@pytest.mark.parametrize("attack", ["xxe", "laughs", "quadratic"])
@pytest.mark.parametrize("kind", KINDS)
def test_entities_in_the_main_part(
    kind: str, attack: str, tmp_path: Path, canary: h.Canary, normal_docx: Path
) -> None:
    path = tmp_path / f"{attack}.{kind}"
    h.write_office(path, kind, _entity_main(kind, attack, canary).encode())
    expected = DTD_OUTCOME[kind]
    if kind == "docx":
        expected = ("failed", "empty")  # the part holds nothing but the references
    attempt(
        f"{kind} {attack} in main part", path, h.OFFICE_KINDS[kind].mime, expected, normal_docx, canary=canary
    )


@pytest.mark.parametrize("kind", KINDS)
def test_hostile_package_parts_and_external_targets(
    kind: str, tmp_path: Path, canary: h.Canary, normal_docx: Path
) -> None:
    """XXE in [Content_Types].xml, billion laughs in the package relationships (ODF: the manifest),
    XInclude in the main part, and relationships whose targets are local files (external mode and a
    ../ traversal out of the package)."""
    spec = h.OFFICE_KINDS[kind]
    targets = {"xxe": canary.url, "pw": "file:///etc/passwd"}
    types = (
        f'{h.XML_DECL}{h.xxe_dtd("Types", targets)}<Types xmlns="{h.CT_NS}">&xxe;'
        '<Default Extension="xml" ContentType="application/xml"/></Types>'
    )
    rels_name = "META-INF/manifest.xml" if kind == "odt" else "_rels/.rels"
    laughs = h.billion_laughs_dtd("Relationships")
    rels = f'{h.XML_DECL}{laughs}<Relationships xmlns="{h.PKG_REL_NS}">&lol9;</Relationships>'
    main = spec.main_xml("Ordinary text", extra=h.xinclude(canary.url))
    path = tmp_path / f"parts.{kind}"
    h.write_office(
        path,
        kind,
        main.encode(),
        replace={"[Content_Types].xml": types.encode(), rels_name: rels.encode()},
        main_rels=[
            ("rId7", "subDocument", canary.url, True),
            ("rId8", "image", "../../../../../../../.." + str(canary.path), False),
            ("rId9", "aFChunk", "file:///etc/passwd", True),
        ],
    )
    expected = ("failed", "corrupt_file") if kind == "xlsx" else ("succeeded", "-")
    attempt(f"{kind} hostile parts + ext targets", path, spec.mime, expected, normal_docx, canary=canary)


# ---------------------------------------- HTML


def test_html_entities_xinclude_and_local_references(
    tmp_path: Path, canary: h.Canary, normal_docx: Path
) -> None:
    """XHTML with an XXE DTD, billion laughs, XInclude and elements that point at local files. The
    HTML parser expands no entity and fetches nothing (a file:// URL may appear as a link, never the
    file's content). Through the upload path an XHTML file with an XML declaration is even sniffed as
    text/plain and decoded without any parser."""
    targets = {"xxe": canary.url, "pw": "file:///etc/passwd"}
    body = (
        f"<p>Visible paragraph &xxe; &pw; &lol9;</p>{h.xinclude(canary.url)}"
        f'<iframe src="{canary.url}"></iframe><object data="{canary.url}"></object><img src="{canary.url}"/>'
        f'<link rel="stylesheet" href="{canary.url}"/><embed src="file:///etc/passwd"/>'
    )
    dtd = h.xxe_dtd("html", targets)[:-2] + h.billion_laughs_dtd("html").split("[", 1)[1]
    html = f'<?xml version="1.0"?>{dtd}<html xmlns="http://www.w3.org/1999/xhtml"><body>{body}</body></html>'
    path = tmp_path / "xxe.html"
    path.write_text(html)
    attempt("html xxe + laughs + local refs", path, h.HTML, ("succeeded", "-"), normal_docx, canary=canary)
    assert sniff_content_type(html.encode()[:SNIFF_BYTES], "xxe.html") == "text/plain"


def test_deeply_nested_html(tmp_path: Path, normal_docx: Path) -> None:
    # Past the HTML parser's depth limit the nested content is dropped: the text before it survives.
    divs = tmp_path / "divs.html"
    h.write_deep_html(divs, 1_000_000, before=b"<p>Visible before the nesting</p>", text=b"deep text")
    attempt(
        "html 1,000,000 nested div",
        divs,
        h.HTML,
        ("succeeded", "-"),
        normal_docx,
        expect_text="Visible before the nesting",
    )
    tables = tmp_path / "tables.html"
    h.write_deep_html(tables, 1_000_000, tag=b"table><tr><td", closed=False, text=b"x")
    attempt("html 1,000,000 nested table", tables, h.HTML, ("failed", "memory_limit"), normal_docx)


# ---------------------------------------- PDF

PDF_TEXT = "Hello hostile world"


@pytest.mark.parametrize("kind", ["array", "dict", "unclosed"])
def test_pdf_deep_object_nesting(kind: str, tmp_path: Path, normal_docx: Path) -> None:
    """pdfium stops parsing an object past its nesting limit; the page's text still comes out."""
    path = tmp_path / f"deep-{kind}.pdf"
    h.pdf_deep_nesting(path, 1_000_000, PDF_TEXT, kind=kind)
    attempt(
        f"pdf 1,000,000 nested {kind}", path, h.PDF, ("succeeded", "-"), normal_docx, expect_text=PDF_TEXT
    )


def test_pdf_deep_page_tree_and_cycle(tmp_path: Path, normal_docx: Path) -> None:
    deep = tmp_path / "deep-tree.pdf"
    h.pdf_deep_page_tree(deep, 50_000, PDF_TEXT)
    attempt("pdf page tree 50,000 levels", deep, h.PDF, ("failed", "corrupt_file"), normal_docx)
    cycle = tmp_path / "cycle.pdf"
    h.pdf_page_tree_cycle(cycle, PDF_TEXT)
    attempt(
        "pdf page tree cycle, /Count 2e9", cycle, h.PDF, ("succeeded", "-"), normal_docx, expect_text=PDF_TEXT
    )


def test_pdf_twenty_thousand_pages(tmp_path: Path, normal_docx: Path) -> None:
    path = tmp_path / "pages.pdf"
    assert h.pdf_many_pages(path, 20_000, PDF_TEXT) < 4 << 20
    attempt("pdf 20,000 pages", path, h.PDF, ("failed", "too_many_pages"), normal_docx)


def test_pdf_self_referencing_forms(tmp_path: Path, normal_docx: Path) -> None:
    """Forms that draw themselves and each other: pdfium's work grows until RLIMIT_AS stops it, and its
    std::bad_alloc aborts the child: a permanent memory_limit, not a crash worth retrying."""
    path = tmp_path / "forms.pdf"
    h.pdf_xobject_fanout(path, PDF_TEXT)
    attempt("pdf self-referencing forms", path, h.PDF, ("failed", "memory_limit"), normal_docx)


# ---------------------------------------- e-mail


@pytest.mark.slow
def test_mail_with_a_huge_attachment_under_the_size_limit(tmp_path: Path, normal_docx: Path) -> None:
    """190 MB on disk (under max_bytes): the body is extracted, the 140 MB attachment only named."""
    path = tmp_path / "huge.eml"
    size = h.write_eml_with_attachment(
        path, attachment_bytes=140_000_000, body="Please find the numbers attached."
    )
    assert size <= LIMITS.max_bytes
    result = attempt(
        "eml 140 MB attachment (190 MB file)",
        path,
        h.EML,
        ("succeeded", "-"),
        normal_docx,
        expect_text="Please find the numbers attached.",
    )
    assert "huge.bin" in result.metadata.get("attachments", "")


# ---------------------------------------- through the real ingest path


async def _upload(client: httpx.AsyncClient, key: str, name: str, body: Any) -> str:
    r = await client.post(
        "/api/v1/documents",
        content=body,
        headers={**bearer(key), "Content-Type": "application/octet-stream", "X-Filename": name},
    )
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


async def _job(client: httpx.AsyncClient, key: str, doc_id: str) -> dict[str, Any]:
    r = await client.get(
        "/api/v1/jobs", params={"document_id": doc_id, "kind": "ingest"}, headers=bearer(key)
    )
    assert r.status_code == 200, r.text
    [job] = r.json()["items"]
    return dict(job)


async def _file_chunks(path: Path) -> AsyncIterator[bytes]:
    with path.open("rb") as f:  # noqa: ASYNC230 - a local temp file, read in 1 MiB pieces
        while piece := f.read(1 << 20):
            yield piece


IngestCase = tuple[str, str, Callable[[Path, h.Canary], Path], str, str]

INGEST_CASES: list[IngestCase] = [
    (
        "docx bomb 1 GiB declared 1 MB",
        "liar.docx",
        lambda d, c: _write(
            d / "liar.docx",
            lambda p: h.write_office(
                p, "docx", h.office_bomb("docx", inflated_mib=1024, declared=h.tolerance_lie(1024))
            ),
        ),
        "failed",
        "too_large",
    ),
    (
        "docx xxe + laughs (text around)",
        "xxe.docx",
        lambda d, c: _write(
            d / "xxe.docx",
            lambda p: h.write_office(
                p,
                "docx",
                h.OFFICE_KINDS["docx"]
                .main_xml(
                    "Quarterly harbour report &xxe; &pw; &lol9; ends here",
                    doctype=h.xxe_dtd("w:document", {"xxe": c.url, "pw": "file:///etc/passwd"})[:-2]
                    + h.billion_laughs_dtd("w:document").split("[", 1)[1],
                )
                .encode(),
            ),
        ),
        "ready",
        "-",
    ),
    (
        "pdf 20,000 pages",
        "pages.pdf",
        lambda d, c: _write(d / "pages.pdf", lambda p: h.pdf_many_pages(p, 20_000, PDF_TEXT)),
        "failed",
        "too_many_pages",
    ),
    (
        "html 1,000,000 nested table",
        "tables.html",
        lambda d, c: _write(
            d / "t.html", lambda p: h.write_deep_html(p, 1_000_000, tag=b"table><tr><td", closed=False)
        ),
        "failed",
        "memory_limit",
    ),
    (
        "pdf self-referencing forms",
        "forms.pdf",
        lambda d, c: _write(d / "forms.pdf", lambda p: h.pdf_xobject_fanout(p, PDF_TEXT)),
        "failed",
        "memory_limit",
    ),
]


def _write(path: Path, make: Callable[[Path], object]) -> Path:
    make(path)
    return path


async def _ingest_and_check(
    client: httpx.AsyncClient,
    app: FastAPI,
    tenant: Any,
    case: str,
    name: str,
    path: Path,
    expected: tuple[str, str],
    canary: h.Canary,
) -> None:
    doc_id = await _upload(client, tenant.key, name, _file_chunks(path))
    assert canary.watch()
    _Measured.samplers.clear()
    started = time.perf_counter()
    outcomes = await ingest_pending(app, tenant.id)
    seconds = time.perf_counter() - started
    peak_kib = _Measured.peak_kib()
    peak = peak_kib / 1024 if peak_kib is not None else None
    job = await _job(client, tenant.key, doc_id)
    doc = (await client.get(f"/api/v1/documents/{doc_id}", headers=bearer(tenant.key))).json()
    status = doc["current_version"]["ingest_status"]
    ROWS.append(Row(case, status, job["error_code"] or "-", seconds, peak, path="ingest"))

    # One attempt, a permanent outcome: no retry loop for a hostile file.
    assert outcomes == ["succeeded" if expected[0] == "ready" else "failed"], job
    assert (status, job["error_code"] or "-") == expected, job
    assert job["attempts"] == 1
    assert seconds < LIMITS.timeout_s + SLACK_S
    if peak is not None:
        assert peak <= LIMITS.memory_mb
    assert not h.leaked(str(job["error"]) + str(doc), canary)
    assert not canary.opened()

    # The worker keeps serving: a normal document right after reaches ready.
    fresh = path.parent / "normal.docx"  # unique bytes per case: an identical upload would be deduplicated
    h.write_office(fresh, "docx", h.OFFICE_KINDS["docx"].main_xml(f"{NORMAL_TEXT} Case: {case}.").encode())
    normal = await _upload(client, tenant.key, "normal.docx", fresh.read_bytes())
    assert await ingest_pending(app, tenant.id) == ["succeeded"]
    normal_doc = (await client.get(f"/api/v1/documents/{normal}", headers=bearer(tenant.key))).json()
    assert normal_doc["current_version"]["ingest_status"] == "ready"


async def test_hostile_files_through_the_ingest_path(
    client: httpx.AsyncClient, app: FastAPI, app_db: Database, tmp_path: Path, canary: h.Canary
) -> None:
    tenant = await make_tenant(app_db, role="editor")
    for case, name, make, status, code in INGEST_CASES:
        path = make(tmp_path, canary)
        await _ingest_and_check(client, app, tenant, case, name, path, (status, code), canary)
    # The chunks of the XXE document hold its text, never the canary's or /etc/passwd's.
    r = await client.post(
        "/api/v1/search",
        json={"query": "harbour report", "mode": "fulltext", "top_k": 20},
        headers=bearer(tenant.key),
    )
    assert r.status_code == 200, r.text
    texts = [hit["text"] for hit in r.json()["results"]]
    assert any("Quarterly harbour report" in t for t in texts), texts
    assert not any(h.leaked(t, canary) for t in texts)
    r = await client.post(
        "/api/v1/search", json={"query": canary.content, "mode": "fulltext"}, headers=bearer(tenant.key)
    )
    assert r.status_code == 200 and r.json()["results"] == []


@pytest.mark.slow
async def test_mail_over_the_size_limit_through_the_ingest_path(
    client: httpx.AsyncClient, app: FastAPI, app_db: Database, tmp_path: Path, canary: h.Canary
) -> None:
    """A 219 MB e-mail (160 MB attachment, base64) is accepted by the upload (its limit is the
    appliance's 2 GiB) and fails extraction with too_large, before any parser starts."""
    tenant = await make_tenant(app_db, role="editor")
    path = tmp_path / "huge.eml"
    size = h.write_eml_with_attachment(path, attachment_bytes=160_000_000, body="Numbers attached.")
    assert size > LIMITS.max_bytes
    await _ingest_and_check(
        client,
        app,
        tenant,
        "eml 160 MB attachment (219 MB file)",
        "huge.eml",
        path,
        ("failed", "too_large"),
        canary,
    )
