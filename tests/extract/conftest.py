"""Documents for the extraction tests, made here from known sentences with the standard library only.

Nothing is committed as a binary and nothing comes from the internet: every format is written by a small
generator below (PDF objects and xref by hand, OOXML/ODF packages with zipfile, EML with email, Outlook
MSG as a Compound File Binary written by hand, RTF/HTML/Markdown/CSV/text as text). The scanned PDF is
made by rendering a text PDF with kreuzberg (pdfium) and wrapping the PNGs as image-only pages; the
zip bomb is a raw deflate stream built from one compressed 1 MiB block repeated, so a 1 GiB entry costs
~1 MB on disk and ~0.2 s to write.
"""

from __future__ import annotations

import email.message
import email.policy
import hashlib
import io
import struct
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

import pytest

from tests.support.hostile import Bomb, write_zip

# ---------------------------------------- PDF


def _pdf_escape(text: str) -> bytes:
    return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)").encode("latin-1")


def _rc4(key: bytes, data: bytes) -> bytes:
    s = list(range(256))
    j = 0
    for i in range(256):
        j = (j + s[i] + key[i % len(key)]) % 256
        s[i], s[j] = s[j], s[i]
    out = bytearray()
    i = j = 0
    for byte in data:
        i = (i + 1) % 256
        j = (j + s[i]) % 256
        s[i], s[j] = s[j], s[i]
        out.append(byte ^ s[(s[i] + s[j]) % 256])
    return bytes(out)


_PDF_PAD = bytes.fromhex("28BF4E5E4E758A4164004E56FFFA01082E2E00B6D0683E802F0CA9FE6453697A")


def _write_pdf(objects: dict[int, bytes | tuple[bytes, bytes]], *, user_password: str | None = None) -> bytes:
    """objects: id → dictionary bytes, or (dictionary without /Length, stream data). Object 1 is the
    catalog. With `user_password`, streams are RC4-40 encrypted (standard security handler, R2)."""
    file_id = hashlib.md5(repr(sorted(objects)).encode()).digest()
    key = b""
    encrypt_id = max(objects) + 1
    if user_password is not None:
        owner_key = hashlib.md5(_PDF_PAD).digest()[:5]  # empty owner password
        o_entry = _rc4(owner_key, (user_password.encode() + _PDF_PAD)[:32])
        permissions = struct.pack("<i", -4)
        key = hashlib.md5(
            (user_password.encode() + _PDF_PAD)[:32] + o_entry + permissions + file_id
        ).digest()[:5]
        u_entry = _rc4(key, _PDF_PAD)
        objects = dict(objects)
        objects[encrypt_id] = b"<< /Filter /Standard /V 1 /R 2 /O <%s> /U <%s> /P -4 >>" % (
            o_entry.hex().encode(),
            u_entry.hex().encode(),
        )
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets: dict[int, int] = {}
    for number in sorted(objects):
        offsets[number] = len(out)
        body = objects[number]
        if isinstance(body, tuple):
            head, data = body
            if key:
                object_key = hashlib.md5(key + struct.pack("<I", number)[:3] + b"\0\0").digest()[:10]
                data = _rc4(object_key, data)
            body = head[:-2] + b" /Length %d >>\nstream\n" % len(data) + data + b"\nendstream"
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    size = max(objects) + 1
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % size
    for number in range(1, size):
        out += b"%010d 00000 n \n" % offsets[number] if number in offsets else b"0000000000 65535 f \n"
    trailer = b"/Size %d /Root 1 0 R /ID [<%s> <%s>]" % (size, file_id.hex().encode(), file_id.hex().encode())
    if key:
        trailer += b" /Encrypt %d 0 R" % encrypt_id
    out += b"trailer\n<< " + trailer + b" >>\nstartxref\n%d\n%%%%EOF\n" % xref
    return bytes(out)


def make_pdf(pages: list[list[str]], *, user_password: str | None = None) -> bytes:
    """A text PDF: one list of lines per page, Helvetica 14 pt."""
    objects: dict[int, bytes | tuple[bytes, bytes]] = {
        3: b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>"
    }
    kids = []
    for index, lines in enumerate(pages):
        page_id, content_id = 4 + 2 * index, 5 + 2 * index
        ops = b"BT /F1 14 Tf 72 720 Td 18 TL " + b"".join(
            b"(%s) Tj T* " % _pdf_escape(line) for line in lines
        )
        objects[content_id] = (b"<< >>", ops + b"ET")
        objects[page_id] = (
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >>"
            b" /Contents %d 0 R >>" % content_id
        )
        kids.append(page_id)
    objects[1] = b"<< /Type /Catalog /Pages 2 0 R >>"
    objects[2] = b"<< /Type /Pages /Kids [%s] /Count %d >>" % (
        b" ".join(b"%d 0 R" % k for k in kids),
        len(kids),
    )
    return _write_pdf(objects, user_password=user_password)


def image_pdf(pngs: list[bytes]) -> bytes:
    """An image-only PDF (no text layer), one full-page image per PNG. The PNG's IDAT data goes in
    unchanged: PDF's Flate filter with PNG predictors (/Predictor 15) reads it as is."""
    objects: dict[int, bytes | tuple[bytes, bytes]] = {1: b"<< /Type /Catalog /Pages 2 0 R >>"}
    kids = []
    for index, png in enumerate(pngs):
        width, height, depth, color_type, _, _, interlace = struct.unpack(">IIBBBBB", png[16:29])
        assert depth == 8 and color_type in (0, 2) and interlace == 0, "8-bit gray/RGB, not interlaced"
        colors = 3 if color_type == 2 else 1
        idat = bytearray()
        pos = 8
        while pos < len(png):
            (length,) = struct.unpack(">I", png[pos : pos + 4])
            if png[pos + 4 : pos + 8] == b"IDAT":
                idat += png[pos + 8 : pos + 8 + length]
            pos += 12 + length
        image_id, content_id, page_id = 3 + 3 * index, 4 + 3 * index, 5 + 3 * index
        space = b"/DeviceRGB" if colors == 3 else b"/DeviceGray"
        objects[image_id] = (
            b"<< /Type /XObject /Subtype /Image /Width %d /Height %d /ColorSpace %s /BitsPerComponent 8"
            b" /Filter /FlateDecode"
            b" /DecodeParms << /Predictor 15 /Colors %d /BitsPerComponent 8 /Columns %d >> >>"
            % (width, height, space, colors, width),
            bytes(idat),
        )
        objects[content_id] = (b"<< >>", b"q 612 0 0 792 0 0 cm /Im1 Do Q")
        objects[page_id] = (
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792]"
            b" /Resources << /XObject << /Im1 %d 0 R >> >> /Contents %d 0 R >>" % (image_id, content_id)
        )
        kids.append(page_id)
    objects[2] = b"<< /Type /Pages /Kids [%s] /Count %d >>" % (
        b" ".join(b"%d 0 R" % k for k in kids),
        len(kids),
    )
    return _write_pdf(objects)


def render_pngs(pdf: Path, dpi: int = 150) -> list[bytes]:
    import kreuzberg  # only the tests that need a rendered page import it in the test process

    with kreuzberg.PdfPageIterator(str(pdf), dpi=dpi) as pages:
        return [png for _, png in pages]


# ---------------------------------------- OOXML / ODF

R_NS = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
W_NS = "http://schemas.openxmlformats.org/wordprocessingml/2006/main"
P_NS = "http://schemas.openxmlformats.org/presentationml/2006/main"
A_NS = "http://schemas.openxmlformats.org/drawingml/2006/main"
S_NS = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
XML_HEAD = '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
DOCX_MAIN = "application/vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml"


def _zip(entries: list[tuple[str, str]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries:
            method = zipfile.ZIP_STORED if name == "mimetype" else zipfile.ZIP_DEFLATED
            zf.writestr(name, data, compress_type=method)
    return buf.getvalue()


def content_types(overrides: list[tuple[str, str]]) -> str:
    parts = "".join(f'<Override PartName="{part}" ContentType="{ctype}"/>' for part, ctype in overrides)
    return (
        f'{XML_HEAD}<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
        '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
        f'<Default Extension="xml" ContentType="application/xml"/>{parts}</Types>'
    )


def relationships(rels: list[tuple[str, str, str]]) -> str:
    body = "".join(
        f'<Relationship Id="{i}" Type="{R_NS}/{kind}" Target="{target}"/>' for i, kind, target in rels
    )
    return f'{XML_HEAD}<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">{body}</Relationships>'


def make_docx(paragraphs: list[str]) -> bytes:
    body = "".join(f'<w:p><w:r><w:t xml:space="preserve">{escape(p)}</w:t></w:r></w:p>' for p in paragraphs)
    document = f'{XML_HEAD}<w:document xmlns:w="{W_NS}"><w:body>{body}</w:body></w:document>'
    return _zip(
        [
            ("[Content_Types].xml", content_types([("/word/document.xml", DOCX_MAIN)])),
            ("_rels/.rels", relationships([("rId1", "officeDocument", "word/document.xml")])),
            ("word/document.xml", document),
        ]
    )


def make_pptx(slides: list[str]) -> bytes:
    ns = f'xmlns:p="{P_NS}" xmlns:a="{A_NS}" xmlns:r="{R_NS}"'
    ids = "".join(f'<p:sldId id="{256 + i}" r:id="rId{i + 1}"/>' for i in range(len(slides)))
    presentation = (
        f"{XML_HEAD}<p:presentation {ns}><p:sldIdLst>{ids}</p:sldIdLst>"
        '<p:sldSz cx="9144000" cy="6858000"/></p:presentation>'
    )
    overrides = [
        (
            "/ppt/presentation.xml",
            "application/vnd.openxmlformats-officedocument.presentationml.presentation.main+xml",
        )
    ]
    rels, entries = [], []
    for number, text in enumerate(slides, 1):
        shape = (
            '<p:sp><p:nvSpPr><p:cNvPr id="2" name="Title"/><p:cNvSpPr/><p:nvPr/></p:nvSpPr><p:spPr/>'
            f"<p:txBody><a:bodyPr/><a:p><a:r><a:t>{escape(text)}</a:t></a:r></a:p></p:txBody></p:sp>"
        )
        slide = (
            f'{XML_HEAD}<p:sld {ns}><p:cSld><p:spTree><p:nvGrpSpPr><p:cNvPr id="1" name=""/><p:cNvGrpSpPr/>'
            f"<p:nvPr/></p:nvGrpSpPr><p:grpSpPr/>{shape}</p:spTree></p:cSld></p:sld>"
        )
        entries.append((f"ppt/slides/slide{number}.xml", slide))
        overrides.append(
            (
                f"/ppt/slides/slide{number}.xml",
                "application/vnd.openxmlformats-officedocument.presentationml.slide+xml",
            )
        )
        rels.append((f"rId{number}", "slide", f"slides/slide{number}.xml"))
    return _zip(
        [
            ("[Content_Types].xml", content_types(overrides)),
            ("_rels/.rels", relationships([("rId1", "officeDocument", "ppt/presentation.xml")])),
            ("ppt/presentation.xml", presentation),
            ("ppt/_rels/presentation.xml.rels", relationships(rels)),
            *entries,
        ]
    )


def make_xlsx(sheet_name: str, rows: list[list[str | int | float]]) -> bytes:
    def cell(ref: str, value: str | int | float) -> str:
        if isinstance(value, str):
            return f'<c r="{ref}" t="inlineStr"><is><t>{escape(value)}</t></is></c>'
        return f'<c r="{ref}"><v>{value}</v></c>'

    xml_rows = "".join(
        f'<row r="{r}">' + "".join(cell(f"{chr(65 + c)}{r}", v) for c, v in enumerate(row)) + "</row>"
        for r, row in enumerate(rows, 1)
    )
    ns = f'xmlns="{S_NS}" xmlns:r="{R_NS}"'
    return _zip(
        [
            (
                "[Content_Types].xml",
                content_types(
                    [
                        (
                            "/xl/workbook.xml",
                            "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet.main+xml",
                        ),
                        (
                            "/xl/worksheets/sheet1.xml",
                            "application/vnd.openxmlformats-officedocument.spreadsheetml.worksheet+xml",
                        ),
                    ]
                ),
            ),
            ("_rels/.rels", relationships([("rId1", "officeDocument", "xl/workbook.xml")])),
            (
                "xl/workbook.xml",
                f'{XML_HEAD}<workbook {ns}><sheets><sheet name="{sheet_name}" sheetId="1" r:id="rId1"/>'
                "</sheets></workbook>",
            ),
            ("xl/_rels/workbook.xml.rels", relationships([("rId1", "worksheet", "worksheets/sheet1.xml")])),
            (
                "xl/worksheets/sheet1.xml",
                f"{XML_HEAD}<worksheet {ns}><sheetData>{xml_rows}</sheetData></worksheet>",
            ),
        ]
    )


def make_odt(paragraphs: list[str]) -> bytes:
    text = "".join(f"<text:p>{escape(p)}</text:p>" for p in paragraphs)
    content = (
        '<?xml version="1.0" encoding="UTF-8"?><office:document-content'
        ' xmlns:office="urn:oasis:names:tc:opendocument:xmlns:office:1.0"'
        ' xmlns:text="urn:oasis:names:tc:opendocument:xmlns:text:1.0" office:version="1.2">'
        f"<office:body><office:text>{text}</office:text></office:body></office:document-content>"
    )
    manifest = (
        '<?xml version="1.0" encoding="UTF-8"?><manifest:manifest'
        ' xmlns:manifest="urn:oasis:names:tc:opendocument:xmlns:manifest:1.0" manifest:version="1.2">'
        '<manifest:file-entry manifest:full-path="/"'
        ' manifest:media-type="application/vnd.oasis.opendocument.text"/>'
        '<manifest:file-entry manifest:full-path="content.xml" manifest:media-type="text/xml"/>'
        "</manifest:manifest>"
    )
    return _zip(
        [
            ("mimetype", "application/vnd.oasis.opendocument.text"),
            ("META-INF/manifest.xml", manifest),
            ("content.xml", content),
        ]
    )


# ---------------------------------------- zip bomb


def write_bomb_docx(path: Path, *, inflated_mib: int, lie_about_size: bool = False) -> int:
    """A DOCX whose word/document.xml inflates to `inflated_mib` MiB of spaces inside valid XML, written
    as a stream (never held in memory) by the hostile-file zip writer. With `lie_about_size` the zip
    headers declare 5,000 bytes. Returns the true inflated size of word/document.xml."""
    document = Bomb(
        f'{XML_HEAD}<w:document xmlns:w="{W_NS}"><w:body><w:p><w:r><w:t>'.encode(),
        b"</w:t></w:r></w:p></w:body></w:document>",
        inflated_mib,
        filler=b" ",
        declared=5000 if lie_about_size else None,
    )
    write_zip(
        path,
        [
            ("[Content_Types].xml", content_types([("/word/document.xml", DOCX_MAIN)]).encode()),
            ("_rels/.rels", relationships([("rId1", "officeDocument", "word/document.xml")]).encode()),
            ("word/document.xml", document),
        ],
    )
    return document.true_size


# ---------------------------------------- Outlook MSG

_ENDOFCHAIN, _FREESECT, _FATSECT, _NOSTREAM = 0xFFFFFFFE, 0xFFFFFFFF, 0xFFFFFFFD, 0xFFFFFFFF
CfbTree = Mapping[str, "bytes | CfbTree"]


def make_cfb(tree: CfbTree) -> bytes:
    """A Compound File Binary (v3, 512-byte sectors): storages are dicts, streams are bytes. Streams under
    4096 bytes live in the mini stream, as the format requires; sibling trees are balanced, all black."""
    entries: list[list] = []  # [name, type (1 storage, 2 stream, 5 root), child indexes, data]

    def add(name: str, node: bytes | CfbTree) -> int:
        index = len(entries)
        if isinstance(node, bytes):
            entries.append([name, 2, [], node])
        else:
            entries.append([name, 1, [], b""])
            for child_name, child in node.items():
                entries[index][2].append(add(child_name, child))
        return index

    entries[add("Root Entry", tree)][1] = 5
    sectors: list[bytes] = []
    fat: list[int] = []

    def alloc(blob: bytes) -> int:
        count = max(1, (len(blob) + 511) // 512)
        first = len(sectors)
        blob = blob.ljust(count * 512, b"\0")
        for j in range(count):
            sectors.append(blob[j * 512 : (j + 1) * 512])
            fat.append(first + j + 1 if j < count - 1 else _ENDOFCHAIN)
        return first

    mini = bytearray()
    minifat: list[int] = []
    start: dict[int, int] = {}
    for index, (_, kind, _, data) in enumerate(entries):
        if kind != 2:
            continue
        if not data:
            start[index] = _ENDOFCHAIN
        elif len(data) < 4096:
            first, count = len(mini) // 64, (len(data) + 63) // 64
            start[index] = first
            minifat += [first + j + 1 for j in range(count - 1)] + [_ENDOFCHAIN]
            mini += data.ljust(count * 64, b"\0")
        else:
            start[index] = alloc(data)
    mini_start = alloc(bytes(mini)) if mini else _ENDOFCHAIN
    minifat_blob = b"".join(struct.pack("<I", x) for x in minifat)
    minifat_blob += b"\xff" * (-len(minifat_blob) % 512)
    minifat_start = alloc(minifat_blob) if minifat else _ENDOFCHAIN
    minifat_sectors = len(minifat_blob) // 512

    def key(i: int) -> tuple[int, str]:
        return (len(entries[i][0]), entries[i][0].upper())

    left: dict[int, int] = {}
    right: dict[int, int] = {}

    def build(ids: list[int]) -> int:
        if not ids:
            return _NOSTREAM
        ids = sorted(ids, key=key)
        mid = len(ids) // 2
        left[ids[mid]], right[ids[mid]] = build(ids[:mid]), build(ids[mid + 1 :])
        return ids[mid]

    directory = bytearray()
    children = {i: build(e[2]) if e[1] != 2 else _NOSTREAM for i, e in enumerate(entries)}
    for index, (name, kind, _, data) in enumerate(entries):
        raw = name.encode("utf-16-le") + b"\0\0"
        size = len(mini) if kind == 5 else len(data)
        first = mini_start if kind == 5 else start.get(index, 0)
        directory += raw.ljust(64, b"\0") + struct.pack(
            "<HBBIII",
            len(raw),
            kind,
            1,
            left.get(index, _NOSTREAM),
            right.get(index, _NOSTREAM),
            children[index],
        )
        directory += b"\0" * 36 + struct.pack("<IQ", first, size)
    while len(directory) % 512:
        directory += (
            b"\0" * 64 + struct.pack("<HBBIII", 0, 0, 0, _NOSTREAM, _NOSTREAM, _NOSTREAM) + b"\0" * 48
        )
    directory_start = alloc(bytes(directory))
    fat_sectors = 1
    while len(sectors) + fat_sectors > fat_sectors * 128:
        fat_sectors += 1
    fat_start = len(sectors)
    fat += [_FATSECT] * fat_sectors
    fat += [_FREESECT] * (fat_sectors * 128 - len(fat))
    fat_blob = b"".join(struct.pack("<I", x) for x in fat)
    sectors += [fat_blob[j * 512 : (j + 1) * 512] for j in range(fat_sectors)]
    difat = [fat_start + j for j in range(fat_sectors)] + [_FREESECT] * (109 - fat_sectors)
    header = (
        b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
        + b"\0" * 16
        + struct.pack("<HHHHH", 0x3E, 3, 0xFFFE, 9, 6)
        + b"\0" * 6
        + struct.pack(
            "<IIIIIIIII",
            0,
            fat_sectors,
            directory_start,
            0,
            4096,
            minifat_start,
            minifat_sectors,
            _ENDOFCHAIN,
            0,
        )
        + b"".join(struct.pack("<I", x) for x in difat)
    )
    return header + b"".join(sectors)


def make_msg(*, subject: str, body: str, sender_name: str, sender_email: str, to: str) -> bytes:
    """An Outlook .msg (MS-OXMSG): Unicode string properties in __substg1.0_XXXX001F streams, listed in
    __properties_version1.0, plus the empty named-property storage Outlook always writes."""
    strings = {
        0x001A: "IPM.Note",
        0x0037: subject,
        0x1000: body,
        0x0C1A: sender_name,
        0x0C1F: sender_email,
        0x0042: sender_name,
        0x0065: sender_email,
        0x0E04: to,
    }
    properties = bytearray(b"\0" * 32)  # header of a top-level message: ids and counts all zero
    tree: dict[str, bytes | CfbTree] = {}
    for prop_id, value in sorted(strings.items()):
        data = value.encode("utf-16-le")
        tree[f"__substg1.0_{prop_id:04X}001F"] = data
        properties += struct.pack("<IIII", (prop_id << 16) | 0x001F, 0x6, len(data) + 2, 0)
    tree["__properties_version1.0"] = bytes(properties)
    tree["__nameid_version1.0"] = {f"__substg1.0_000{n}0102": b"" for n in (2, 3, 4)}
    return make_cfb(tree)


def make_eml(*, subject: str, body: str) -> bytes:
    message = email.message.EmailMessage()
    message["From"] = "Alice Example <alice@example.test>"
    message["To"] = "bob@example.test"
    message["Subject"] = subject
    message["Date"] = "Tue, 24 Nov 2026 10:00:00 +0000"
    message["Message-ID"] = "<fixture-1@example.test>"
    message.set_content(body)
    return message.as_bytes(policy=email.policy.SMTP)


# ---------------------------------------- samples

DOCX = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
PPTX = "application/vnd.openxmlformats-officedocument.presentationml.presentation"
XLSX = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
ODT = "application/vnd.oasis.opendocument.text"


@dataclass(frozen=True)
class Sample:
    name: str
    content_type: str
    data: bytes
    expected: tuple[str, ...]  # sentences the text must contain
    page_texts: tuple[str, ...] | None = None  # for paged formats: a sentence per page, in order


PDF_PAGES = (
    "Page one talks about alpha rivers.",
    "Page two talks about bravo mountains.",
    "Page three (3) ends.",
)
SLIDES = ("Slide one sells apples.", "Slide two sells pears.", "Slide three sells plums.")

SAMPLES: tuple[Sample, ...] = (
    Sample("three-pages.pdf", "application/pdf", make_pdf([[t] for t in PDF_PAGES]), PDF_PAGES, PDF_PAGES),
    Sample("deck.pptx", PPTX, make_pptx(list(SLIDES)), SLIDES, SLIDES),
    Sample(
        "letter.docx",
        DOCX,
        make_docx(["The quick docx fox jumps over the lazy dog.", "A second paragraph about Zürich & Köln."]),
        ("The quick docx fox jumps over the lazy dog.", "A second paragraph about Zürich & Köln."),
    ),
    Sample(
        "budget.xlsx",
        XLSX,
        make_xlsx("Budget", [["Item", "Cost"], ["Quarterly widget budget", 1234], ["Gadget line", 56.5]]),
        ("Quarterly widget budget", "1234", "Gadget line", "56.5"),
    ),
    Sample(
        "notes.odt",
        ODT,
        make_odt(["An open document paragraph about lighthouses.", "Another ODT line about harbours."]),
        ("An open document paragraph about lighthouses.", "Another ODT line about harbours."),
    ),
    Sample(
        "page.html",
        "text/html",
        b"<!doctype html><html><head><title>Fixture page</title><script>var hidden='script text';</script>"
        b"</head><body><h1>Harbour schedule</h1>"
        b"<p>The ferry leaves at nine &amp; returns at five.</p></body></html>",
        ("Harbour schedule", "The ferry leaves at nine & returns at five."),
    ),
    Sample(
        "mail.eml",
        "message/rfc822",
        make_eml(subject="Quarterly report", body="Hello Bob,\nthe quarterly report is attached.\n"),
        ("Quarterly report", "the quarterly report is attached."),
    ),
    Sample(
        "mail.msg",
        "application/vnd.ms-outlook",
        make_msg(
            subject="Budget meeting moved",
            body="Hi team,\nthe budget meeting moved to Thursday.\n",
            sender_name="Carol Sender",
            sender_email="carol@example.test",
            to="Dave Receiver",
        ),
        ("Budget meeting moved", "the budget meeting moved to Thursday."),
    ),
    Sample(
        "memo.rtf",
        "text/rtf",
        b"{\\rtf1\\ansi\\deff0{\\fonttbl{\\f0 Helvetica;}}\\f0\\fs24 "
        b"Rich text says hello to the reader.\\par\n"
        b"A second rich line about \\'e9t\\'e9.\\par\n}",
        ("Rich text says hello to the reader.", "A second rich line about été."),
    ),
    Sample(
        "readme.md",
        "text/markdown",
        b"# Installation guide\n\nRun the *installer* and follow the prompts.\n\n- first item in a list\n",
        ("Installation guide", "Run the installer and follow the prompts.", "first item in a list"),
    ),
    Sample(
        "people.csv",
        "text/csv",
        b"name,city\nAlice,Paris\nBob,Berlin\n",
        ("Alice", "Paris", "Bob", "Berlin"),
    ),
    Sample(
        "plain.txt",
        "text/plain",
        "Plain text with ümlauts, a euro sign € and a tab\there.\r\nSecond line.\n".encode(),
        ("Plain text with ümlauts, a euro sign € and a tab\there.", "Second line."),
    ),
)


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("extract-samples")
    for sample in SAMPLES:
        (directory / sample.name).write_bytes(sample.data)
    return directory


@pytest.fixture(scope="session")
def scanned_pdf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One image-only page showing two lines of text (rendered at 150 dpi, so OCR has to read pixels)."""
    directory = tmp_path_factory.mktemp("scanned")
    source = directory / "source.pdf"
    source.write_bytes(make_pdf([["Scanned invoice number 4711", "Total amount due 250 EUR"]]))
    scanned = directory / "scanned.pdf"
    scanned.write_bytes(image_pdf(render_pngs(source)))
    return scanned


@pytest.fixture
def write(tmp_path: Path) -> Callable[[str, bytes], Path]:
    def _write(name: str, data: bytes) -> Path:
        path = tmp_path / name
        path.write_bytes(data)
        return path

    return _write
