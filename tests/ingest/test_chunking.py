"""Token-aware chunking, checked with the embedding model's real tokenizer.

Most tests run `check_invariants`: exact offsets, no chunk over `max_tokens` by the real tokenizer, every
character with a token covered, overlap bounded and only reaching back into the previous chunk, page
ranges as the spans say. The property tests at the end run it on random text.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable, Sequence
from itertools import groupby, pairwise

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.inference.embedding import LlamaEmbedder, get_embedder
from appliance.ingest.chunking import (
    Chunk,
    PageSpan,
    chunk_text,
    heading_spans,
    sentence_spans,
    split_sentences,
)
from appliance.settings import get_settings

SENTENCES = [
    "The committee reviewed the quarterly report in detail.",
    "Operating costs rose faster than revenue, mostly because of energy prices.",
    "Staff were asked to prepare a revised budget before the end of the month!",
    "Did the customer survey show strong satisfaction with delivery times?",
    "Several members noted frequent complaints about invoices that were hard to read.",
    "Dr. Smith and Mr. Jones agreed to redesign the invoice layout by Jan. 15.",
    "The finance team will publish a short guide, e.g. with examples of the new layout.",
]
FRENCH = (
    "L'équipe a examiné le rapport trimestriel. Les coûts d'exploitation ont augmenté plus vite que "
    "les recettes, surtout à cause du prix de l'énergie. Le comité a demandé un budget révisé avant "
    "la fin du mois. Où en est la préparation du nouveau modèle de facture? Naïveté, façade, crème brûlée."
)
CHINESE = (
    "委员会详细审查了季度报告。运营成本的增长快于收入，主要是因为能源价格上涨。"
    "工作人员被要求在月底前准备一份修订预算。"
)


@pytest.fixture(scope="session")
def embedder() -> LlamaEmbedder:
    # The process-wide instance: loaded once per test session, shared with tests/inference.
    return get_embedder(get_settings())


def prose(n_sentences: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(SENTENCES) for _ in range(n_sentences))


def expected_pages(pages: Sequence[PageSpan], start: int, end: int) -> tuple[int | None, int | None]:
    numbers = [p for p, s, e in pages if p is not None and s < end and e > start]
    return (min(numbers), max(numbers)) if numbers else (None, None)


def check_invariants(
    text: str,
    chunks: list[Chunk],
    embedder: LlamaEmbedder | Callable[[str], int],
    *,
    max_tokens: int = 256,
    overlap_tokens: int = 32,
    pages: Sequence[PageSpan] = (),
) -> None:
    count = embedder.count_tokens if isinstance(embedder, LlamaEmbedder) else embedder
    assert [c.ordinal for c in chunks] == list(range(len(chunks)))
    covered = [False] * len(text)
    for c in chunks:
        assert 0 <= c.char_start < c.char_end <= len(text)
        assert text[c.char_start : c.char_end] == c.text
        assert c.text == c.text.strip(), "chunks never start or end with whitespace"
        assert c.token_count == count(c.text)
        assert 0 < c.token_count <= max_tokens
        assert (c.page_start, c.page_end) == expected_pages(pages, c.char_start, c.char_end)
        covered[c.char_start : c.char_end] = [True] * (c.char_end - c.char_start)
    # Nothing the model can see is lost: what no chunk covers has no token.
    pos = 0
    for is_covered, run in groupby(covered):
        n = len(list(run))
        if not is_covered:
            lost = text[pos : pos + n]
            assert not lost.strip() or count(lost) == 0, f"lost text at {pos}: {lost[:80]!r}"
        pos += n
    for prev, c in pairwise(chunks):
        assert c.char_start > prev.char_start and c.char_end > prev.char_end
        if c.char_start < prev.char_end:  # overlap: a bounded tail of the previous chunk
            assert count(text[c.char_start : prev.char_end]) <= overlap_tokens


def check_headings_start_chunks(text: str, chunks: list[Chunk]) -> None:
    """Each heading starts a chunk, or sits in a run of headings that starts one."""
    headings = heading_spans(text)
    in_heading = [False] * len(text)
    for s, e in headings:
        in_heading[s:e] = [True] * (e - s)
    for hs, _ in headings:
        for c in chunks:
            if c.char_start < hs < c.char_end:
                before = "".join(text[i] for i in range(c.char_start, hs) if not in_heading[i])
                assert not before.strip(), f"heading at {hs} follows body text in its chunk: {before[:80]!r}"


# Fixed inputs ---------------------------------------------------------------------------------------


def test_empty_and_whitespace_give_no_chunks(embedder: LlamaEmbedder) -> None:
    for text in ("", " ", "\n\n\t  \n", "\u200b\n\n\u200b"):
        assert chunk_text(text, tokenizer=embedder) == []


def test_short_text_is_one_chunk(embedder: LlamaEmbedder) -> None:
    text = "\n\n  Hello world.  \n"
    [chunk] = chunk_text(text, tokenizer=embedder)
    assert chunk == Chunk(0, "Hello world.", 4, 16, None, None, 3)


def test_long_paragraph_splits_at_sentences_with_overlap(embedder: LlamaEmbedder) -> None:
    text = prose(200)
    chunks = chunk_text(text, tokenizer=embedder, max_tokens=128, overlap_tokens=32)
    check_invariants(text, chunks, embedder, max_tokens=128, overlap_tokens=32)
    assert len(chunks) > 10
    ends = {e for _, e in sentence_spans(text)}
    for prev, c in pairwise(chunks):
        assert c.char_end in ends, "chunks end with whole sentences"
        assert text[c.char_start - 1] == " ", "the overlap starts with a whole sentence or word"
        overlap = embedder.count_tokens(text[c.char_start : prev.char_end])
        assert 0 < overlap <= 32
    assert min(c.token_count for c in chunks[:-1]) > 128 - 32 - 30  # packed, not one sentence each


def test_overlap_zero_gives_contiguous_chunks(embedder: LlamaEmbedder) -> None:
    text = prose(100, seed=1)
    chunks = chunk_text(text, tokenizer=embedder, max_tokens=64, overlap_tokens=0)
    check_invariants(text, chunks, embedder, max_tokens=64, overlap_tokens=0)
    for prev, c in pairwise(chunks):
        assert c.char_start > prev.char_end
        assert not text[prev.char_end : c.char_start].strip()


def test_overlap_falls_back_to_whole_words_for_a_long_last_sentence(embedder: LlamaEmbedder) -> None:
    long_sentence = " ".join(["word"] * 150) + "."
    text = f"{long_sentence} {long_sentence}"
    chunks = chunk_text(text, tokenizer=embedder, max_tokens=100, overlap_tokens=10)
    check_invariants(text, chunks, embedder, max_tokens=100, overlap_tokens=10)
    for prev, c in pairwise(chunks):
        tail = text[c.char_start : prev.char_end]
        assert 0 < embedder.count_tokens(tail) <= 10
        assert text[c.char_start - 1].isspace(), "the overlap starts at a word"


def test_markdown_headings_start_chunks(embedder: LlamaEmbedder) -> None:
    text = (
        "# Annual report\n\n"
        "## Summary\n"
        f"{prose(3)}\n\n"
        "## Costs\n\n"
        f"{prose(60, seed=2)}\n\n"
        f"{prose(5, seed=3)}\n"
        "### Energy\n"
        f"{prose(4, seed=4)}\n\n"
        "```\n# not a heading: a comment in code\n\nx = 1\n```\n\n"
        "## Outlook\n\nShort.\n"
    )
    chunks = chunk_text(text, tokenizer=embedder, max_tokens=96)
    check_invariants(text, chunks, embedder, max_tokens=96)
    check_headings_start_chunks(text, chunks)
    starts = {c.char_start for c in chunks}
    headings = [text[s:e] for s, e in heading_spans(text)]
    assert headings == ["# Annual report", "## Summary", "## Costs", "### Energy", "## Outlook"]
    assert chunks[0].text.startswith("# Annual report\n\n## Summary\nThe ")  # a run stays together
    for heading in ("## Costs", "### Energy", "## Outlook"):
        assert text.index(heading) in starts
    assert len([c for c in chunks if text.index("## Costs") <= c.char_start < text.index("### Energy")]) > 3
    assert chunks[-1].text == "## Outlook\n\nShort."
    code = "```\n# not a heading: a comment in code\n\nx = 1\n```"
    assert any(code in c.text for c in chunks), "a fenced block is one paragraph, without headings"


def test_heading_lookalikes(embedder: LlamaEmbedder) -> None:
    body = prose(6, seed=5)
    text = (
        f"{body}\n\n"
        "Introduction\n\n"  # short, no final period, blank line, then body text: a heading
        f"{body}\n\n"
        "1.2 Methods and materials\n\n"
        f"{body}\n\n"
        "Revenue\n\n1,234\n\nCost\n\n567\n\n"  # table cells: not headings
        "This line ends the paragraph\n"
        "and this one too\n\n"
        "Conclusion\n"  # no blank line after: not a heading
        f"{body}\n\n"
        "- a list item\n\n"  # a bullet: not a heading
        f"{body}\n\n"
        "The end"  # nothing follows: not a heading
    )
    chunks = chunk_text(text, tokenizer=embedder, max_tokens=256)
    check_invariants(text, chunks, embedder)
    check_headings_start_chunks(text, chunks)
    assert [text[s:e] for s, e in heading_spans(text)] == ["Introduction", "1.2 Methods and materials"]
    starts = {c.char_start for c in chunks}
    assert text.index("Introduction") in starts
    assert text.index("1.2 Methods") in starts


def test_a_heading_never_stands_alone_before_a_long_paragraph(embedder: LlamaEmbedder) -> None:
    heading = "# Operating costs and revenue in the northern region"
    paragraph = " ".join(SENTENCES * 6)
    while embedder.count_tokens(paragraph) > 250:
        paragraph = paragraph.rsplit(" ", 1)[0]
    text = f"{heading}\n\n{paragraph}\n"
    assert embedder.count_tokens(paragraph) <= 250 < embedder.count_tokens(text) - 6
    chunks = chunk_text(text, tokenizer=embedder)
    check_invariants(text, chunks, embedder)
    assert len(chunks) == 2
    assert chunks[0].text.startswith(f"{heading}\n\nThe ") and chunks[0].token_count > 200


def test_giant_word_is_cut_by_tokens(embedder: LlamaEmbedder) -> None:
    rng = random.Random(7)
    word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(10_000))
    text = f"{prose(5)}\n\n{word}\n\n{prose(5, seed=1)}"
    t0 = time.perf_counter()
    chunks = chunk_text(text, tokenizer=embedder)
    assert time.perf_counter() - t0 < 5
    check_invariants(text, chunks, embedder)
    start, end = text.index(word), text.index(word) + len(word)
    assert chunks[0].text == text[:start].strip()
    in_word = [c for c in chunks if c.char_start < end and c.char_end > start]
    assert len(in_word) > 5
    for prev, c in pairwise(in_word):
        assert c.char_start == prev.char_end, "hard cuts are contiguous, without overlap"


def test_giant_word_of_repeated_letters(embedder: LlamaEmbedder) -> None:
    text = "a" * 10_000
    chunks = chunk_text(text, tokenizer=embedder, max_tokens=256)
    check_invariants(text, chunks, embedder)
    assert all(c.token_count == 256 for c in chunks[:-1])


def test_accented_text(embedder: LlamaEmbedder) -> None:
    text = "\n\n".join([FRENCH] * 12)
    chunks = chunk_text(text, tokenizer=embedder, max_tokens=64, overlap_tokens=16)
    check_invariants(text, chunks, embedder, max_tokens=64, overlap_tokens=16)
    assert any("brûlée" in c.text for c in chunks)


def test_cjk_text(embedder: LlamaEmbedder) -> None:
    text = CHINESE * 30
    chunks = chunk_text(text, tokenizer=embedder, max_tokens=64, overlap_tokens=16)
    check_invariants(text, chunks, embedder, max_tokens=64, overlap_tokens=16)
    assert len(chunks) > 5
    assert all(c.text.endswith("。") for c in chunks), "CJK full stops end sentences without a space"
    unpunctuated = "委员会详细审查了季度报告" * 100  # no sentence or word boundary at all: hard cuts
    chunks = chunk_text(unpunctuated, tokenizer=embedder, max_tokens=64)
    check_invariants(unpunctuated, chunks, embedder, max_tokens=64)


def test_pages_across_a_boundary(embedder: LlamaEmbedder) -> None:
    page_texts = [prose(12, seed=i) for i in range(4)]
    text, pages = "", []
    for number, page in enumerate(page_texts, start=1):
        pages.append((number, len(text), len(text) + len(page)))
        text += page + "\n\f"
    chunks = chunk_text(text, pages, tokenizer=embedder, max_tokens=100)
    check_invariants(text, chunks, embedder, max_tokens=100, pages=pages)
    assert any(c.page_start is not None and c.page_end == c.page_start + 1 for c in chunks)
    assert chunks[0].page_start == 1 and chunks[-1].page_end == 4
    # The same text without pages, or with pages the format cannot number.
    assert all(c.page_start is None for c in chunk_text(text, tokenizer=embedder))
    unnumbered: list[PageSpan] = [(None, s, e) for _, s, e in pages]
    assert all(c.page_end is None for c in chunk_text(text, unnumbered, tokenizer=embedder))


def test_deterministic(embedder: LlamaEmbedder) -> None:
    text = f"# Title\n\n{prose(80)}\n\n{FRENCH}\n\n{CHINESE * 5}"
    assert chunk_text(text, tokenizer=embedder) == chunk_text(text, tokenizer=embedder)


def test_a_plain_counting_function_works_even_when_not_additive(embedder: LlamaEmbedder) -> None:
    # Characters as tokens: the sum of the pieces undercounts (the spaces between them count too), so
    # the final check with the real counter must give pieces back.
    text = prose(40)
    chunks = chunk_text(text, tokenizer=len, max_tokens=100, overlap_tokens=20)
    check_invariants(text, chunks, len, max_tokens=100, overlap_tokens=20)
    assert len(chunks) > 20


def test_arguments_are_checked(embedder: LlamaEmbedder) -> None:
    with pytest.raises(ValueError, match="more than the model"):
        chunk_text("text", tokenizer=embedder, max_tokens=embedder.max_tokens + 1)
    with pytest.raises(ValueError, match="overlap_tokens"):
        chunk_text("text", tokenizer=embedder, max_tokens=32, overlap_tokens=32)
    with pytest.raises(ValueError, match="outside the text"):
        chunk_text("text", [(1, 0, 10)], tokenizer=embedder)
    with pytest.raises(ValueError, match="overlap"):
        chunk_text("text text", [(1, 0, 6), (2, 4, 9)], tokenizer=embedder)


def test_hundred_pages_chunk_fast(embedder: LlamaEmbedder) -> None:
    text = "\n\n".join(f"Section {i}\n\n{prose(25, seed=i)}" for i in range(150))
    t0 = time.perf_counter()
    chunks = chunk_text(text, tokenizer=embedder)
    elapsed = time.perf_counter() - t0
    check_invariants(text, chunks, embedder)
    # Embedding runs at ~3,000 tokens/s here; chunking must be a small fraction of it.
    assert elapsed < sum(c.token_count for c in chunks) / 3000 / 10, elapsed


# The sentence splitter --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("One. Two! Three? Four", ["One.", "Two!", "Three?", "Four"]),
        (
            "Dr. Smith met Mr. Jones at 3 p.m. on Monday. Then he left.",
            ["Dr. Smith met Mr. Jones at 3 p.m. on Monday.", "Then he left."],
        ),
        (
            "J. R. R. Tolkien wrote it. The U.S. Army read it.",
            ["J. R. R. Tolkien wrote it.", "The U.S. Army read it."],
        ),
        (
            "It costs 3.50 dollars. See Fig. 2 and No. 5 for details.",
            ["It costs 3.50 dollars.", "See Fig. 2 and No. 5 for details."],
        ),
        (
            "The cat sat. Then it slept. I said no. So did she.",
            ["The cat sat.", "Then it slept.", "I said no.", "So did she."],
        ),
        ('He said "stop." Then he went.', ['He said "stop."', "Then he went."]),
        ("Wait... what happened? Nothing.", ["Wait... what happened?", "Nothing."]),
        (
            "1. Introduction to the topic. 2. Methods used.",
            ["1. Introduction to the topic.", "2. Methods used."],
        ),
        ("e.g. this stays. i.e. so does this.", ["e.g. this stays. i.e. so does this."]),
        ("First line without stop\n\nsecond paragraph", ["First line without stop", "second paragraph"]),
        ("ends here.\n\nlower-case paragraph", ["ends here.", "lower-case paragraph"]),
        ("委员会审查了报告。成本上涨了！为什么？", ["委员会审查了报告。", "成本上涨了！", "为什么？"]),
        ("", []),
        ("   ", []),
    ],
)
def test_split_sentences(text: str, expected: list[str]) -> None:
    assert split_sentences(text) == expected
    for s, e in sentence_spans(text):
        assert text[s:e] == text[s:e].strip()


# Properties on random text -----------------------------------------------------------------------------

PIECES = st.one_of(
    st.sampled_from(
        [
            " ",
            "  ",
            "\n",
            "\n\n",
            "\n\n\n",
            "\t",
            ". ",
            "? ",
            "! ",
            ", ",
            "。",
            "\f",
            "# ",
            "## Heading\n",
            "\n# Title\n\n",
            "Introduction\n\n",
            "```\n",
            "e.g. ",
            "Dr. ",
            "the ",
            "committee ",
            "report ",
            "Costs ",
            "énergie ",
            "naïve ",
            "委员会",
            "报告",
            "1. ",
            "- item\n",
            "\u200b",
            "😀",
            "x" * 300,
        ]
    ),
    st.sampled_from(SENTENCES).map(lambda s: s + " "),
    st.text(max_size=40),
    st.text(alphabet="abcdefghij", min_size=100, max_size=3000),
)
TEXTS = st.lists(PIECES, max_size=60).map("".join)


@st.composite
def texts_with_pages(draw: st.DrawFn) -> tuple[str, list[PageSpan]]:
    text = draw(TEXTS)
    cuts = sorted(set(draw(st.lists(st.integers(0, len(text)), max_size=6))) | {0, len(text)})
    numbered = draw(st.booleans())
    pages: list[PageSpan] = []
    for i, (s, e) in enumerate(pairwise(cuts)):
        if draw(st.booleans()) or i == 0:  # sometimes a gap between pages
            pages.append((i + 1 if numbered else None, s, e))
    return text, pages


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=texts_with_pages(),
    max_tokens=st.integers(8, 256),
    overlap_ratio=st.floats(0, 0.5),
)
def test_invariants_hold_on_random_text(
    embedder: LlamaEmbedder, data: tuple[str, list[PageSpan]], max_tokens: int, overlap_ratio: float
) -> None:
    text, pages = data
    overlap = int(max_tokens * overlap_ratio)
    chunks = chunk_text(text, pages, tokenizer=embedder, max_tokens=max_tokens, overlap_tokens=overlap)
    check_invariants(text, chunks, embedder, max_tokens=max_tokens, overlap_tokens=overlap, pages=pages)
    assert chunks == chunk_text(
        text, pages, tokenizer=embedder, max_tokens=max_tokens, overlap_tokens=overlap
    )
    check_headings_start_chunks(text, chunks)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=texts_with_pages(), max_tokens=st.integers(8, 400), overlap_ratio=st.floats(0, 0.5))
def test_invariants_hold_for_a_non_additive_counter(
    data: tuple[str, list[PageSpan]], max_tokens: int, overlap_ratio: float
) -> None:
    # Characters as tokens: the pieces' sum undercounts (the whitespace between them counts too),
    # so the final check with the real count has to give pieces back.
    text, pages = data
    overlap = int(max_tokens * overlap_ratio)
    chunks = chunk_text(text, pages, tokenizer=len, max_tokens=max_tokens, overlap_tokens=overlap)
    check_invariants(text, chunks, len, max_tokens=max_tokens, overlap_tokens=overlap, pages=pages)


@settings(max_examples=200, deadline=None)
@given(text=TEXTS)
def test_sentence_spans_partition_the_text(text: str) -> None:
    spans = sentence_spans(text)
    for (_, e1), (s2, _) in pairwise(spans):
        assert e1 <= s2 and not text[e1:s2].strip()
    joined = "".join(text[s:e] for s, e in spans)
    assert re.sub(r"\s", "", joined) == re.sub(r"\s", "", text)
