"""Content sniffing: libmagic decides, except where it mistakes prose for an obscure format."""

from __future__ import annotations

import pytest

from appliance.documents.upload import sniff_content_type

PDF = b"%PDF-1.4\n1 0 obj<</Type/Catalog>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n"


@pytest.mark.parametrize(
    "head",
    [
        b"PAtients with type 2 diabetes were enrolled.",  # libmagic: application/vnd.hp-HPGL
        b"BPA exposure in early life",  # also HP-GL
        b"Article 5 of the regulation applies.",  # libmagic: message/news
        "Übersicht der Maßnahmen, caf\u00e9".encode(),
        "naïve".encode()[:3],  # a multi-byte sequence cut at the end of the sniffed head
    ],
)
def test_prose_that_libmagic_misreads_is_plain_text(head: bytes) -> None:
    assert sniff_content_type(head, None) == "text/plain"


def test_filename_refines_text_only() -> None:
    assert sniff_content_type(b"Article 5 of the regulation", "rules.md") == "text/markdown"
    assert sniff_content_type(b"a,b\n1,2\n", "t.csv") == "text/csv"
    assert sniff_content_type(PDF, "claims.txt") == "application/pdf"


@pytest.mark.parametrize(
    "head",
    [b"\x00\x01\x02binary", b"PA\x8f\x90\x91 not utf-8", b"PA\x00\x00HPGL with nulls", b""],
)
def test_binary_is_not_promoted_to_text(head: bytes) -> None:
    assert sniff_content_type(head, "x.txt") != "text/plain"
