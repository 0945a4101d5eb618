"""Hostile documents, generated at test time from the standard library only (no downloaded samples).

Every generator writes to a path it is given (pytest's tmp_path), streaming where a file is large, so
nothing big is committed or held in memory:

- zip bombs in OOXML/ODF packages: a member whose raw deflate stream is one compressed block repeated
  (1 GiB of text costs ~1 MB on disk and well under a second to write), with headers that tell the truth
  or lie within deflate's own tolerance; many-member packages; an entry count that lies; a bomb nested
  inside another package.
- XML attacks inside the package parts and in HTML: billion laughs, quadratic blow-up, external
  entities (general, parameter, external DTD), XInclude and external relationship targets, all pointing
  at a canary file whose unique content must never come back.
- PDFs: deep array/dictionary nesting, a deep page tree, a page-tree cycle, self-referencing form
  XObjects, and 20,000 pages that all share one content stream (~3 MB).
- deeply nested HTML; an e-mail with a huge base64 attachment.

`Canary` also watches its file with inotify: `opened()` says whether any process opened it since the
watch began, which proves "no parser read a local file" beyond "the text does not contain it".
"""

from __future__ import annotations

import base64
import ctypes
import ctypes.util
import os
import struct
import uuid
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

# ---------------------------------------- formats

DOCX = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
XLSX = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
PPTX = "application/vnd.openxmlformats-officedocument.presentationml.presentation"
ODT = "application/vnd.oasis.opendocument.text"
PDF = "application/pdf"
HTML = "text/html"
EML = "message/rfc822"

W_NS = "http://schemas.openxmlformats.org/wordprocessingml/2006/main"
S_NS = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
P_NS = "http://schemas.openxmlformats.org/presentationml/2006/main"
A_NS = "http://schemas.openxmlformats.org/drawingml/2006/main"
R_NS = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
PKG_REL_NS = "http://schemas.openxmlformats.org/package/2006/relationships"
CT_NS = "http://schemas.openxmlformats.org/package/2006/content-types"
OFFICE_NS = "urn:oasis:names:tc:opendocument:xmlns:office:1.0"
TEXT_NS = "urn:oasis:names:tc:opendocument:xmlns:text:1.0"
XLINK_NS = "http://www.w3.org/1999/xlink"
XML_DECL = '<?xml version="1.0" encoding="UTF-8" standalone="no"?>'


@dataclass(frozen=True)
class OfficeKind:
    """Where a format keeps its text: the main part, and the XML around a run of text in it."""

    mime: str
    main_part: str
    open_text: str  # from the root element to the element that holds text
    close_text: str
    root_tag: str  # the DOCTYPE name

    def main_xml(self, text: str, *, doctype: str = "", extra: str = "") -> str:
        return f"{XML_DECL}{doctype}{self.open_text}{text}{extra}{self.close_text}"


OFFICE_KINDS: dict[str, OfficeKind] = {
    "docx": OfficeKind(
        DOCX,
        "word/document.xml",
        f'<w:document xmlns:w="{W_NS}" xmlns:r="{R_NS}"><w:body><w:p><w:r><w:t xml:space="preserve">',
        "</w:t></w:r></w:p></w:body></w:document>",
        "w:document",
    ),
    "xlsx": OfficeKind(
        XLSX,
        "xl/worksheets/sheet1.xml",
        f'<worksheet xmlns="{S_NS}" xmlns:r="{R_NS}"><sheetData><row r="1"><c r="A1" t="inlineStr"><is><t>',
        "</t></is></c></row></sheetData></worksheet>",
        "worksheet",
    ),
    "pptx": OfficeKind(
        PPTX,
        "ppt/slides/slide1.xml",
        f'<p:sld xmlns:p="{P_NS}" xmlns:a="{A_NS}" xmlns:r="{R_NS}"><p:cSld><p:spTree>'
        '<p:nvGrpSpPr><p:cNvPr id="1" name=""/><p:cNvGrpSpPr/><p:nvPr/></p:nvGrpSpPr><p:grpSpPr/>'
        '<p:sp><p:nvSpPr><p:cNvPr id="2" name="Title"/><p:cNvSpPr/><p:nvPr/></p:nvSpPr><p:spPr/>'
        "<p:txBody><a:bodyPr/><a:p><a:r><a:t>",
        "</a:t></a:r></a:p></p:txBody></p:sp></p:spTree></p:cSld></p:sld>",
        "p:sld",
    ),
    "odt": OfficeKind(
        ODT,
        "content.xml",
        f'<office:document-content xmlns:office="{OFFICE_NS}" xmlns:text="{TEXT_NS}"'
        f' xmlns:xlink="{XLINK_NS}" office:version="1.2"><office:body><office:text><text:p>',
        "</text:p></office:text></office:body></office:document-content>",
        "office:document-content",
    ),
}


def _content_types(overrides: Iterable[tuple[str, str]]) -> bytes:
    parts = "".join(f'<Override PartName="/{p}" ContentType="{c}"/>' for p, c in overrides)
    return (
        f'{XML_DECL}<Types xmlns="{CT_NS}">'
        '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
        f'<Default Extension="xml" ContentType="application/xml"/>{parts}</Types>'
    ).encode()


def relationships(rels: Iterable[tuple[str, str, str, bool]]) -> bytes:
    """(id, type suffix, target, external) → a .rels part."""
    body = "".join(
        f'<Relationship Id="{i}" Type="{R_NS}/{kind}" Target="{target}"'
        + (' TargetMode="External"' if external else "")
        + "/>"
        for i, kind, target, external in rels
    )
    return f'{XML_DECL}<Relationships xmlns="{PKG_REL_NS}">{body}</Relationships>'.encode()


def office_skeleton(
    kind: str, *, main_rels: Sequence[tuple[str, str, str, bool]] = ()
) -> list[tuple[str, bytes]]:
    """Every part of a minimal package except its main text part (`OFFICE_KINDS[kind].main_part`).
    `main_rels` are extra relationships of the main part (external targets, traversal paths)."""
    ct = "application/vnd.openxmlformats-officedocument"
    if kind == "docx":
        return [
            (
                "[Content_Types].xml",
                _content_types([("word/document.xml", f"{ct}.wordprocessingml.document.main+xml")]),
            ),
            ("_rels/.rels", relationships([("rId1", "officeDocument", "word/document.xml", False)])),
            ("word/_rels/document.xml.rels", relationships(main_rels)),
        ]
    if kind == "xlsx":
        workbook = (
            f'{XML_DECL}<workbook xmlns="{S_NS}" xmlns:r="{R_NS}"><sheets>'
            '<sheet name="Sheet1" sheetId="1" r:id="rId1"/></sheets></workbook>'
        ).encode()
        return [
            (
                "[Content_Types].xml",
                _content_types(
                    [
                        ("xl/workbook.xml", f"{ct}.spreadsheetml.sheet.main+xml"),
                        ("xl/worksheets/sheet1.xml", f"{ct}.spreadsheetml.worksheet+xml"),
                    ]
                ),
            ),
            ("_rels/.rels", relationships([("rId1", "officeDocument", "xl/workbook.xml", False)])),
            ("xl/workbook.xml", workbook),
            (
                "xl/_rels/workbook.xml.rels",
                relationships([("rId1", "worksheet", "worksheets/sheet1.xml", False)]),
            ),
            ("xl/worksheets/_rels/sheet1.xml.rels", relationships(main_rels)),
        ]
    if kind == "pptx":
        presentation = (
            f'{XML_DECL}<p:presentation xmlns:p="{P_NS}" xmlns:r="{R_NS}"><p:sldIdLst>'
            '<p:sldId id="256" r:id="rId1"/></p:sldIdLst>'
            '<p:sldSz cx="9144000" cy="6858000"/></p:presentation>'
        ).encode()
        return [
            (
                "[Content_Types].xml",
                _content_types(
                    [
                        ("ppt/presentation.xml", f"{ct}.presentationml.presentation.main+xml"),
                        ("ppt/slides/slide1.xml", f"{ct}.presentationml.slide+xml"),
                    ]
                ),
            ),
            ("_rels/.rels", relationships([("rId1", "officeDocument", "ppt/presentation.xml", False)])),
            ("ppt/presentation.xml", presentation),
            (
                "ppt/_rels/presentation.xml.rels",
                relationships([("rId1", "slide", "slides/slide1.xml", False)]),
            ),
            ("ppt/slides/_rels/slide1.xml.rels", relationships(main_rels)),
        ]
    if kind == "odt":
        manifest = (
            '<?xml version="1.0" encoding="UTF-8"?><manifest:manifest'
            ' xmlns:manifest="urn:oasis:names:tc:opendocument:xmlns:manifest:1.0" manifest:version="1.2">'
            f'<manifest:file-entry manifest:full-path="/" manifest:media-type="{ODT}"/>'
            '<manifest:file-entry manifest:full-path="content.xml" manifest:media-type="text/xml"/>'
            "</manifest:manifest>"
        ).encode()
        return [("mimetype", ODT.encode()), ("META-INF/manifest.xml", manifest)]
    raise ValueError(kind)


# ---------------------------------------- zip writer

MIB = 1 << 20


@dataclass(frozen=True)
class Bomb:
    """A member whose content is `prefix`, then `filler_mib` MiB of `filler`, then `suffix`, written as
    raw deflate with one compressed 1 MiB block repeated. `declared`: the uncompressed size written in
    the headers (None: the true one)."""

    prefix: bytes
    suffix: bytes
    filler_mib: int
    filler: bytes = b"lol "
    declared: int | None = None

    @property
    def true_size(self) -> int:
        return len(self.prefix) + self.filler_mib * MIB + len(self.suffix)


Member = bytes | Bomb


def _raw_deflate(data: bytes, *, final: bool) -> bytes:
    """Byte-aligned raw deflate blocks (full flush), so segments can be concatenated."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush(zlib.Z_FINISH if final else zlib.Z_FULL_FLUSH)


@dataclass
class _Written:
    name: bytes
    crc: int
    csize: int
    usize: int
    offset: int
    method: int


def write_zip(
    path: Path,
    members: Sequence[tuple[str, Member]],
    *,
    declared_entries: int | None = None,
) -> int:
    """Write a zip (no zip64: every size < 4 GiB) and return the true inflated total. A `bytes` member
    named "mimetype" is stored (ODF wants it so), others deflated. `declared_entries` overrides the
    entry count in the end-of-central-directory record (a lie)."""
    written: list[_Written] = []
    packed: dict[bytes, bytes] = {}  # many identical members are compressed once
    total = 0
    with path.open("wb") as f:
        for name, member in members:
            raw_name = name.encode()
            offset = f.tell()
            if isinstance(member, bytes):
                method = 0 if name == "mimetype" else 8
                if method == 0:
                    data = member
                else:
                    data = packed.get(member) or packed.setdefault(member, _raw_deflate(member, final=True))
                crc, usize, parts, repeat = zlib.crc32(member), len(member), [data], 0
                csize = len(data)
            else:
                block = (member.filler * (MIB // len(member.filler) + 1))[:MIB]
                segment = _raw_deflate(block, final=False)
                head, tail = _raw_deflate(member.prefix, final=False), _raw_deflate(member.suffix, final=True)
                crc = zlib.crc32(member.prefix)
                for _ in range(member.filler_mib):  # crc32 of 1 GiB: ~0.1 s
                    crc = zlib.crc32(block, crc)
                crc = zlib.crc32(member.suffix, crc)
                method, usize = 8, member.true_size if member.declared is None else member.declared
                parts, repeat = [head, segment, tail], member.filler_mib
                csize = len(head) + repeat * len(segment) + len(tail)
            assert csize < 1 << 32 and usize < 1 << 32, "no zip64 in this writer"
            f.write(
                struct.pack(
                    "<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0x21, crc, csize, usize, len(raw_name), 0
                )
            )
            f.write(raw_name)
            if len(parts) == 1:
                f.write(parts[0])
            else:
                f.write(parts[0])
                for _ in range(repeat):
                    f.write(parts[1])
                f.write(parts[2])
            written.append(_Written(raw_name, crc, csize, usize, offset, method))
            total += member.true_size if isinstance(member, Bomb) else len(member)
        start = f.tell()
        for w in written:
            f.write(
                struct.pack(
                    "<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, w.method, 0, 0x21, w.crc, w.csize, w.usize,
                    len(w.name), 0, 0, 0, 0, 0, w.offset,
                )
                + w.name
            )  # fmt: skip
        size = f.tell() - start
        count = len(written) if declared_entries is None else declared_entries
        f.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, size, start, 0))
    return total


def write_office(
    path: Path,
    kind: str,
    main: Member,
    *,
    main_rels: Sequence[tuple[str, str, str, bool]] = (),
    extra: Sequence[tuple[str, Member]] = (),
    replace: dict[str, bytes] | None = None,
) -> int:
    """A package of `kind` whose main text part is `main`; `replace` swaps skeleton parts (a hostile
    [Content_Types].xml or .rels), `extra` adds members. Returns the true inflated size."""
    spec = OFFICE_KINDS[kind]
    parts: list[tuple[str, Member]] = [
        (name, (replace or {}).get(name, data)) for name, data in office_skeleton(kind, main_rels=main_rels)
    ]
    # The main part last, as Office writes it: libmagic names the format from the first entries' names
    # and must not have to skip a 2 MB bomb member to find them.
    return write_zip(path, [*parts, (spec.main_part, main), *extra])


def office_bomb(
    kind: str, *, inflated_mib: int, declared: int | None = None, filler: bytes = b"lol "
) -> Bomb:
    """The main text part of `kind` as a bomb: valid XML around `inflated_mib` MiB of text."""
    spec = OFFICE_KINDS[kind]
    head, tail = spec.main_xml("\x00").split("\x00")
    return Bomb(head.encode(), tail.encode(), inflated_mib, filler=filler, declared=declared)


def tolerance_lie(inflated_mib: int) -> int:
    """A declared size the zip guard accepts for a ~1 MB-per-GiB stream (compressed ≤ declared + 1 %),
    while the member really inflates to `inflated_mib` MiB: the lie a declared-size check cannot see."""
    segment = len(_raw_deflate(b"lol " * (MIB // 4), final=False))
    return segment * inflated_mib + 4096


def write_many_members(path: Path, kind: str, *, count: int, member_bytes: int, text: str) -> int:
    """A valid `kind` package plus `count` extra members of `member_bytes` each (compressible)."""
    filler = (b"pad " * (member_bytes // 4 + 1))[:member_bytes]
    extra = [(f"customXml/item{i}.xml", filler) for i in range(count)]
    return write_office(path, kind, OFFICE_KINDS[kind].main_xml(text).encode(), extra=extra)


def write_nested_bomb(path: Path, kind: str, *, inner_mib: int, text: str) -> int:
    """A small, valid `kind` package that carries a DOCX zip bomb as an embedded object (stored, so the
    outer declared sizes are honest and small); returns the inner bomb's true size."""
    inner = path.with_suffix(".inner.docx")
    inner_size = write_office(inner, "docx", office_bomb("docx", inflated_mib=inner_mib))
    embedded = inner.read_bytes()
    inner.unlink()
    name = {"odt": "Object 1/embedded.docx", "docx": "word/embeddings/Microsoft_Word_Document.docx"}.get(
        kind, "ppt/embeddings/Microsoft_Word_Document.docx" if kind == "pptx" else "xl/embeddings/doc.docx"
    )
    main = OFFICE_KINDS[kind].main_xml(text).encode()
    write_office(path, kind, main, extra=[(name, embedded)])
    return inner_size


# ---------------------------------------- XML attacks


def billion_laughs_dtd(root: str, *, levels: int = 10, fan: int = 10) -> str:
    """`&lol{levels-1};` expands to fan**(levels-1) × "lol" (10, 10: 3 GB)."""
    entities = ['<!ENTITY lol0 "lol">'] + [
        f'<!ENTITY lol{i} "{f"&lol{i - 1};" * fan}">' for i in range(1, levels)
    ]
    return f"<!DOCTYPE {root} [{''.join(entities)}]>"


def quadratic_blowup(root: str, *, entity_chars: int = 100_000, refs: int = 50_000) -> tuple[str, str]:
    """(doctype, body): one big entity referenced many times (no nesting for a depth limit to catch):
    100 KB × 50,000 = 5 GB from a ~350 KB file."""
    return f'<!DOCTYPE {root} [<!ENTITY a "{"a" * entity_chars}">]>', "&a;" * refs


def xxe_dtd(root: str, targets: dict[str, str]) -> str:
    """General external entities, a parameter entity that is expanded in the DTD, and an external DTD
    subset, each pointing at a local file."""
    general = "".join(f'<!ENTITY {n} SYSTEM "{t}">' for n, t in targets.items())
    first = next(iter(targets.values()))
    return f'<!DOCTYPE {root} SYSTEM "{first}" [{general}<!ENTITY % pe SYSTEM "{first}"> %pe;]>'


def xinclude(target: str) -> str:
    return f'<xi:include xmlns:xi="http://www.w3.org/2001/XInclude" href="{target}" parse="text"/>'


# ---------------------------------------- canary


class Canary:
    """A local file with unique content. `watch()` starts an inotify watch; `opened()` says whether
    any process opened or read the file since (the generator writes it before the watch starts)."""

    _IN_ACCESS, _IN_OPEN, _IN_NONBLOCK = 0x1, 0x20, 0o4000

    def __init__(self, directory: Path) -> None:
        self.content = f"CANARY-{uuid.uuid4().hex}-do-not-leak"
        self.path = directory / "canary-secret.txt"
        self.path.write_text(self.content + "\n")
        self.url = f"file://{self.path}"
        self._fd = -1
        self._libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)

    def watch(self) -> bool:
        """False when inotify is not available (then only the text checks apply)."""
        fd = self._libc.inotify_init1(self._IN_NONBLOCK)
        if fd < 0:
            return False
        if self._libc.inotify_add_watch(fd, str(self.path).encode(), self._IN_OPEN | self._IN_ACCESS) < 0:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def opened(self) -> bool:
        if self._fd < 0:
            return False
        try:
            return bool(os.read(self._fd, 4096))
        except BlockingIOError:
            return False

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


PASSWD_MARKERS = ("root:x:0:0", "/bin/bash", "/usr/sbin/nologin", "/bin/sh")


def leaked(text: str, canary: Canary) -> bool:
    """Does `text` hold the canary's content or a line of /etc/passwd?"""
    return canary.content in text or any(m in text for m in PASSWD_MARKERS)


# ---------------------------------------- PDF


def write_pdf(path: Path, objects: dict[int, bytes | tuple[bytes, bytes]]) -> int:
    """objects: id → dictionary bytes, or (dictionary without /Length, stream data); object 1 is the
    catalog. Streamed to disk with a classic xref table; returns the file size."""
    offsets: dict[int, int] = {}
    with path.open("wb") as f:
        f.write(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
        for number in sorted(objects):
            offsets[number] = f.tell()
            body = objects[number]
            if isinstance(body, tuple):
                head, data = body
                body = head[:-2] + b" /Length %d >>\nstream\n" % len(data) + data + b"\nendstream"
            f.write(b"%d 0 obj\n" % number + body + b"\nendobj\n")
        size = max(objects) + 1
        xref = f.tell()
        f.write(b"xref\n0 %d\n0000000000 65535 f \n" % size)
        f.write(
            b"".join(
                b"%010d 00000 n \n" % offsets[n] if n in offsets else b"0000000000 65535 f \n"
                for n in range(1, size)
            )
        )
        f.write(b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (size, xref))
        return f.tell()


_FONT = b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"
_RES = b"/Resources << /Font << /F1 3 0 R >> >>"


def _text_stream(text: str) -> tuple[bytes, bytes]:
    return (b"<< >>", b"BT /F1 14 Tf 72 720 Td (%s) Tj ET" % text.encode("latin-1"))


def _page(parent: int, extra: bytes = b"", resources: bytes = _RES) -> bytes:
    return b"<< /Type /Page /Parent %d 0 R /MediaBox [0 0 612 792] %s /Contents 4 0 R %s >>" % (
        parent,
        resources,
        extra,
    )


def pdf_many_pages(path: Path, pages: int, text: str) -> int:
    """`pages` page objects sharing one content stream: 20,000 pages is ~3 MB."""
    objects: dict[int, bytes | tuple[bytes, bytes]] = {1: b"<< /Type /Catalog /Pages 2 0 R >>", 3: _FONT}
    objects[4] = _text_stream(text)
    kids = b" ".join(b"%d 0 R" % (10 + i) for i in range(pages))
    objects[2] = b"<< /Type /Pages /Kids [%s] /Count %d >>" % (kids, pages)
    page = _page(2)
    for i in range(pages):
        objects[10 + i] = page
    return write_pdf(path, objects)


def pdf_deep_nesting(path: Path, depth: int, text: str, *, kind: str = "array") -> int:
    """One page whose dictionary holds `depth` nested arrays or dictionaries (closed or not)."""
    if kind == "array":
        junk = b"[" * depth + b"]" * depth
    elif kind == "dict":
        junk = b"<< /A " * depth + b"1" + b" >>" * depth
    elif kind == "unclosed":
        junk = b"[" * depth
    else:
        raise ValueError(kind)
    objects: dict[int, bytes | tuple[bytes, bytes]] = {
        1: b"<< /Type /Catalog /Pages 2 0 R >>",
        2: b"<< /Type /Pages /Kids [5 0 R] /Count 1 >>",
        3: _FONT,
        4: _text_stream(text),
        5: _page(2, b"/Junk " + junk),
    }
    return write_pdf(path, objects)


def pdf_deep_page_tree(path: Path, depth: int, text: str) -> int:
    """A chain of `depth` /Pages nodes above the one page."""
    objects: dict[int, bytes | tuple[bytes, bytes]] = {1: b"<< /Type /Catalog /Pages 2 0 R >>", 3: _FONT}
    objects[4] = _text_stream(text)
    objects[2] = b"<< /Type /Pages /Kids [10 0 R] /Count 1 >>"
    for i in range(depth):
        n = 10 + i
        objects[n] = b"<< /Type /Pages /Parent %d 0 R /Kids [%d 0 R] /Count 1 >>" % (
            2 if i == 0 else n - 1,
            n + 1,
        )
    objects[10 + depth] = _page(9 + depth)
    return write_pdf(path, objects)


def pdf_page_tree_cycle(path: Path, text: str) -> int:
    """A /Pages node that lists itself and the root among its kids, with a /Count that lies."""
    objects: dict[int, bytes | tuple[bytes, bytes]] = {
        1: b"<< /Type /Catalog /Pages 2 0 R >>",
        2: b"<< /Type /Pages /Kids [5 0 R 6 0 R] /Count 2000000000 >>",
        3: _FONT,
        4: _text_stream(text),
        5: _page(2),
        6: b"<< /Type /Pages /Parent 2 0 R /Kids [2 0 R 6 0 R 5 0 R] /Count 2 >>",
    }
    return write_pdf(path, objects)


def pdf_xobject_fanout(path: Path, text: str) -> int:
    """Two form XObjects that each draw themselves and each other (fan-out 3 per level): a parser
    without a bound on the work (not only the depth) of form nesting grows exponentially."""
    res = b"/Resources << /Font << /F1 3 0 R >> /XObject << /X1 6 0 R /X2 7 0 R >> >>"
    form = b"<< /Type /XObject /Subtype /Form /BBox [0 0 612 792] %s >>" % res
    objects: dict[int, bytes | tuple[bytes, bytes]] = {
        1: b"<< /Type /Catalog /Pages 2 0 R >>",
        2: b"<< /Type /Pages /Kids [5 0 R] /Count 1 >>",
        3: _FONT,
        4: (b"<< >>", _text_stream(text)[1] + b" /X1 Do"),
        5: _page(2, resources=res),
        6: (form, b"BT /F1 10 Tf 10 10 Td (again) Tj ET /X1 Do /X2 Do /X1 Do"),
        7: (form, b"BT /F1 10 Tf 10 10 Td (twice) Tj ET /X1 Do /X2 Do /X2 Do"),
    }
    return write_pdf(path, objects)


# ---------------------------------------- HTML


def write_deep_html(
    path: Path,
    depth: int,
    *,
    tag: bytes = b"div",
    closed: bool = True,
    before: bytes = b"",
    text: bytes = b"",
) -> int:
    """`before`, then `depth` nested `tag` elements around `text` (a 1,000,000-deep `<div>` is 5–11 MB),
    written in 1 MiB pieces. `tag` may be a run such as `table><tr><td` (then pass closed=False)."""
    open_tag, close_tag = b"<" + tag + b">", b"</" + tag + b">"
    with path.open("wb") as f:
        f.write(b"<!doctype html><html><body>" + before)
        _repeat(f, open_tag, depth)
        f.write(text)
        if closed:
            _repeat(f, close_tag, depth)
            f.write(b"</body></html>")
        return f.tell()


def _repeat(f: object, piece: bytes, count: int) -> None:
    per = max(1, MIB // len(piece))
    while count > 0:
        n = min(per, count)
        f.write(piece * n)  # type: ignore[attr-defined]
        count -= n


# ---------------------------------------- e-mail


def write_eml_with_attachment(path: Path, *, attachment_bytes: int, body: str) -> int:
    """A MIME message with a text body and a base64 attachment of `attachment_bytes` pseudo-random
    bytes (incompressible, so nothing can shortcut it), streamed to disk in 76-character lines."""
    boundary = f"----=_Part_{uuid.uuid4().hex}"
    chunk = 57 * 18_000  # a multiple of 57 raw bytes = whole 76-character base64 lines
    seed = os.urandom(chunk)
    with path.open("wb") as f:
        f.write(
            (
                "From: Mallory <mallory@example.test>\r\nTo: victim@example.test\r\n"
                "Subject: Quarterly numbers (large attachment)\r\n"
                "Date: Tue, 24 Nov 2026 10:00:00 +0000\r\nMessage-ID: <hostile-1@example.test>\r\n"
                f'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="{boundary}"\r\n\r\n'
                f"--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{body}\r\n"
                f"--{boundary}\r\nContent-Type: application/octet-stream; name=huge.bin\r\n"
                "Content-Transfer-Encoding: base64\r\n"
                'Content-Disposition: attachment; filename="huge.bin"\r\n\r\n'
            ).encode()
        )
        left = attachment_bytes
        counter = 0
        while left > 0:
            n = min(chunk, left)
            block = bytes(b ^ (counter & 0xFF) for b in seed[:64]) + seed[64:n] if n > 64 else seed[:n]
            counter += 1
            encoded = base64.encodebytes(block).replace(b"\n", b"\r\n")
            f.write(encoded)
            left -= n
        f.write(f"--{boundary}--\r\n".encode())
        return f.tell()
