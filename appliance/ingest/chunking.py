"""Token-aware chunking of extracted text, with exact offsets back into it.

`chunk_text(text, pages, tokenizer=embedder)` cuts `text` into chunks of at most `max_tokens` tokens as the
embedding model's own tokenizer counts them. Each chunk is an exact slice of the input
(`text[chunk.char_start:chunk.char_end] == chunk.text`), so a search hit can be highlighted in the
original, and carries the pages it spans.

How text is cut, coarsest first; a finer level is used only inside a piece that does not fit:
  1. sections: a heading starts a new chunk (Markdown `#` lines outside code fences, and lines that
     look like headings: a short one-line paragraph, no final period, followed by a blank line and then
     body text or another heading). A run of headings stays together with the text under the last one.
  2. paragraphs (blank lines), 3. sentences (`split_sentences`), 4. lines, 5. words (whitespace),
  6. a hard cut by token count, for pathological input such as a 10,000-character "word".
Consecutive pieces of a section are packed greedily up to `max_tokens`. A chunk that would hold only
headings takes the first sentences of the next paragraph rather than standing alone.

Overlap: a chunk that continues the previous one (same section) starts with the previous chunk's last
whole sentences (or, when no whole sentence fits in half the budget, its last whole words) worth at most
`overlap_tokens` tokens; it is just an earlier `char_start`. The overlap shrinks when the next piece
leaves less room, and is never taken across a heading.

Token counts: each piece is tokenised once and counts are summed as an estimate (exact for WordPiece,
where whitespace and punctuation split words anyway); every finished chunk is then counted for real and,
if over `max_tokens` (another tokenizer, a hard-cut seam), gives back its last pieces to the next chunk.
`chunk.token_count` is that real count, without the model's special tokens. Text the tokenizer gives no
token for (whitespace, control and format characters) never makes a chunk of its own.
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

DEFAULT_MAX_TOKENS = 256
DEFAULT_OVERLAP_TOKENS = 32

PageSpan = tuple[int | None, int, int]  # (page number or None, start, end): a character span of the text


@dataclass(frozen=True, slots=True)
class Chunk:
    ordinal: int
    text: str
    char_start: int
    char_end: int
    page_start: int | None
    page_end: int | None
    token_count: int


@runtime_checkable
class TokenCounter(Protocol):
    def count_tokens(self, text: str) -> int: ...


# Sentences -----------------------------------------------------------------------------------------

# Words that end with a period without ending a sentence (compared lower-cased, without the final period),
# and those that do so only before a number ("Fig. 3", "No. 5", "pp. 12"): "the cat sat. Then" must split.
ABBREVIATIONS = frozenset(
    """
    mr mrs ms dr prof sr jr st mt ft vs etc e.g i.e cf al approx ca dept inc ltd co corp ed eds op cit
    lt sgt capt cmdr hon gov pres sen rep jan feb apr jun jul aug sep sept oct nov dec viz resp incl
    excl u.s u.k u.n a.m p.m ph.d m.d b.sc m.sc
    """.split()  # noqa: SIM905 (a word list reads better as text)
)
NUMBER_ABBREVIATIONS = frozenset(
    "no nos p pp vol vols fig figs eq eqs ref refs ch sec art para col tab".split()  # noqa: SIM905
)
_LIST_MARKER = re.compile(r"\(?(?:\d{1,3}|[ivxlcdm]{1,5}|[IVXLCDM]{1,5}|[A-Za-z])[.)]")
_ACRONYM = re.compile(r"(?:[A-Za-z]\.)+[A-Za-z]")
_BREAK = re.compile(
    r"(?P<latin>[.!?…]+[\"'”’»)\]]*)(?P<space>\s+)"  # sentence-final punctuation, then whitespace
    r"|(?P<cjk>[。！？]+[」』”’）)]*)\s*"  # CJK full stops need no space after them
    r"|(?P<para>\n[^\S\n]*\n)\s*"  # a blank line always ends a sentence
)
_BLANK_LINE = re.compile(r"\n[^\S\n]*\n")


def _is_boundary(text: str, m: re.Match[str], sent_start: int, end: int) -> bool:
    if m.group("latin") is None:
        return True
    if _BLANK_LINE.search(m.group("space")):
        return True
    nxt = m.end()
    if nxt < end and text[nxt].islower():
        return False  # "e.g. the", "approx. ten": a sentence starts with anything but a lower-case letter
    punct = m.group("latin").rstrip("\"'”’»)]")
    if punct != ".":
        return True  # "?", "!", "...", "?!": a boundary when the next word is not lower-case
    i = j = m.start()
    while j > sent_start and i - j < 40 and not text[j - 1].isspace():
        j -= 1
    core = text[j:i].lstrip("\"'“‘«([").lower()
    if core in ABBREVIATIONS or _ACRONYM.fullmatch(core):
        return False
    if core in NUMBER_ABBREVIATIONS and nxt < end and text[nxt].isdigit():
        return False
    if len(core) == 1 and core.isalpha():
        return False  # an initial: "J. Smith"
    # "1. Introduction", "(iv) Results", "a) ...": a list marker alone is not a sentence.
    return not _LIST_MARKER.fullmatch(text[sent_start : m.end("latin")].strip())


def _strip(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def sentence_spans(text: str, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
    """Sentences of `text[start:end]` as stripped `(start, end)` spans; blank lines also end sentences.

    Rules: `.`/`!`/`?`/`…` (with closing quotes/brackets) followed by whitespace and a word that does not
    start lower-case, except after common abbreviations, initials, acronyms (U.S.) and list markers
    ("1.", "iv)"); CJK `。！？` end a sentence with or without a space after.
    """
    end = len(text) if end is None else end
    spans: list[tuple[int, int]] = []
    sent_start = start
    for m in _BREAK.finditer(text, start, end):
        if not _is_boundary(text, m, sent_start, end):
            continue
        stop = m.end("latin") if m.group("latin") else m.end("cjk") if m.group("cjk") else m.start("para")
        s, e = _strip(text, sent_start, stop)
        if s < e:
            spans.append((s, e))
        sent_start = m.end()
    s, e = _strip(text, sent_start, end)
    if s < e:
        spans.append((s, e))
    return spans


def split_sentences(text: str) -> list[str]:
    """The sentences of `text` (see `sentence_spans`)."""
    return [text[s:e] for s, e in sentence_spans(text)]


# Blocks: headings and paragraphs ---------------------------------------------------------------------

_MD_HEADING = re.compile(r" {0,3}#{1,6}[ \t]+\S")
_FENCE = re.compile(r" {0,3}(```|~~~)")
_BULLET = re.compile(r"[-*+•▪◦–—>|]")
_LETTER = re.compile(r"[^\W\d_]")
HEADING_MAX_CHARS = 100
HEADING_MAX_WORDS = 12
BODY_MIN_WORDS = 6


@dataclass(slots=True)
class _Block:
    start: int
    end: int
    lines: int
    heading: bool  # a Markdown heading, or (after `_mark_headings`) a line that looks like one
    blank_after: bool  # ended by a blank line (not by a Markdown heading line or the end of the text)


def _blocks(text: str) -> list[_Block]:
    """Markdown heading lines and paragraphs (runs of non-blank lines), in order, as stripped spans."""
    blocks: list[_Block] = []
    para: list[int] = []  # [start, end, lines] of the open paragraph
    fenced = False

    def close(blank_after: bool) -> None:
        if para:
            s, e = _strip(text, para[0], para[1])
            if s < e:
                blocks.append(_Block(s, e, para[2], False, blank_after))
            para.clear()

    pos, n = 0, len(text)
    while pos < n:
        nl = text.find("\n", pos)
        line_end = n if nl < 0 else nl
        line = text[pos:line_end]
        if not fenced and _MD_HEADING.match(line):
            close(False)
            s, e = _strip(text, pos, line_end)
            blocks.append(_Block(s, e, 1, True, False))
        elif not line.strip() and not fenced:
            close(True)
        else:
            if _FENCE.match(line):
                fenced = not fenced
            if para:
                para[1], para[2] = line_end, para[2] + 1
            else:
                para.extend((pos, line_end, 1))
        pos = line_end + 1
    close(False)
    return blocks


def _heading_candidate(text: str, b: _Block) -> bool:
    if b.heading or b.lines != 1 or not b.blank_after or b.end - b.start > HEADING_MAX_CHARS:
        return False
    line = text[b.start : b.end]
    return (
        len(line.split()) <= HEADING_MAX_WORDS
        and line[-1] not in ".,;:。，；："
        and not _BULLET.match(line)
        and _LETTER.search(line) is not None
    )


def _mark_headings(text: str, blocks: list[_Block]) -> None:
    """Mark one-line paragraphs that look like headings: the candidate must be followed by body text or
    by another heading, so a column of short table cells ("Revenue", "1,234") is not taken for headings."""
    next_is_heading = False
    next_is_body = False
    for b in reversed(blocks):
        if not b.heading and _heading_candidate(text, b):
            b.heading = next_is_heading or next_is_body
            next_is_body = False
        else:
            content = text[b.start : b.end]
            next_is_body = not b.heading and (
                b.lines > 1 or len(content.split()) >= BODY_MIN_WORDS or content[-1] in ".!?:;。！？"
            )
        next_is_heading = b.heading


def _parse(text: str) -> list[_Block]:
    blocks = _blocks(text)
    _mark_headings(text, blocks)
    return blocks


def heading_spans(text: str) -> list[tuple[int, int]]:
    """The `(start, end)` spans of the lines `chunk_text` treats as headings."""
    return [(b.start, b.end) for b in _parse(text) if b.heading]


def _sections(blocks: list[_Block]) -> Iterable[list[_Block]]:
    """Blocks grouped so that each heading (or run of headings) starts a group."""
    section: list[_Block] = []
    has_body = False
    for b in blocks:
        if b.heading and has_body:
            yield section
            section, has_body = [], False
        section.append(b)
        has_body = has_body or not b.heading
    if section:
        yield section


# Packing ----------------------------------------------------------------------------------------------

PARAGRAPH, SENTENCE, LINE, WORD, CUT = range(5)
_LINE = re.compile(r"[^\n]+")
_WORD = re.compile(r"\S+")


@dataclass(frozen=True, slots=True)
class _Piece:
    start: int
    end: int
    level: int
    heading: bool


class _Chunker:
    def __init__(
        self,
        text: str,
        count: Callable[[str], int],
        max_tokens: int,
        overlap_tokens: int,
        pages: Sequence[PageSpan],
    ) -> None:
        self.text = text
        self._count = count
        self.max_tokens = max_tokens
        self.overlap_tokens = overlap_tokens
        self._counts: dict[tuple[int, int], int] = {}
        self._page_starts = [p[1] for p in pages]  # sorted and non-overlapping: see `_check_pages`
        self._page_ends = [p[2] for p in pages]
        self._page_numbers = [p[0] for p in pages]
        self.chunks: list[Chunk] = []

    def count(self, start: int, end: int) -> int:
        key = (start, end)
        n = self._counts.get(key)
        if n is None:
            n = self._counts[key] = self._count(self.text[start:end])
        return n

    # Splitting one piece into the next level's pieces ------------------------------------------------

    def children(self, p: _Piece, *, allow_cut: bool = True) -> list[_Piece] | None:
        """`p` split at the coarsest level that gives more than one piece; None if only a hard cut
        would split it and `allow_cut` is false."""
        level = p.level
        while level < WORD:
            level += 1
            spans = self._split(p.start, p.end, level)
            if len(spans) > 1:
                return [_Piece(s, e, level, p.heading) for s, e in spans]
        if not allow_cut:
            return None
        return [_Piece(s, e, CUT, p.heading) for s, e in self._hard_cut(p.start, p.end)]

    def _split(self, start: int, end: int, level: int) -> list[tuple[int, int]]:
        if level == SENTENCE:
            return sentence_spans(self.text, start, end)
        pattern = _LINE if level == LINE else _WORD
        spans = (_strip(self.text, m.start(), m.end()) for m in pattern.finditer(self.text, start, end))
        return [(s, e) for s, e in spans if s < e]

    def _hard_cut(self, start: int, end: int) -> list[tuple[int, int]]:
        """`text[start:end]` cut into consecutive pieces of at most `max_tokens` tokens each: for every
        piece, the longest prefix that fits (galloping, then binary search on the length)."""
        budget, text = self.max_tokens, self.text
        pieces: list[tuple[int, int]] = []
        pos = start
        while pos < end:
            if self.count(pos, end) <= budget:
                pieces.append((pos, end))
                break
            if self._count(text[pos : pos + 1]) > budget:
                raise ValueError(f"max_tokens={budget} is too small: one character has more tokens")
            lo, hi = 1, end - pos  # the prefix of length lo fits; hi does not
            probe = min(budget, hi - 1)
            while probe > lo:  # gallop up from `budget` characters
                if self._count(text[pos : pos + probe]) <= budget:
                    lo = probe
                    probe = min(probe * 2, hi - 1)
                else:
                    hi = probe
                    break
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if self._count(text[pos : pos + mid]) <= budget:
                    lo = mid
                else:
                    hi = mid
            pieces.append((pos, pos + lo))
            pos += lo
        return pieces

    # Overlap ---------------------------------------------------------------------------------------

    def _overlap(self, region: tuple[int, int], budget: int) -> tuple[int | None, int]:
        """The earliest start in `region`, after its first word, whose suffix is whole sentences (or,
        failing half the budget, whole words) of at most `budget` tokens, with the suffix's token count;
        (None, 0) if nothing fits."""
        if budget <= 0:
            return None, 0
        rs, re_ = region
        best, best_n = None, 0
        # Never from the region's first sentence or word: a chunk that repeated all of the previous
        # chunk's new text would hold it twice over, and add little.
        for s, _ in reversed(sentence_spans(self.text, rs, re_)):
            if s <= rs:
                break
            n = self._count(self.text[s:re_])
            if n > budget:
                break
            best, best_n = s, n
        if best_n * 2 >= budget:
            return best, best_n
        # Whole words: scan starts backwards from the end, within a window wide enough for `budget`
        # tokens (a token is rarely more than a few characters; a word cut by the window is skipped).
        window_start = max(rs, re_ - 64 * budget)
        starts = [
            m.start()
            for m in _WORD.finditer(self.text, window_start, re_)
            if m.start() > window_start or (window_start > rs and self.text[window_start - 1].isspace())
        ]
        for s in reversed(starts):
            n = self._count(self.text[s:re_])
            if n > budget:
                break
            best, best_n = s, n
        return best, best_n

    # Packing ---------------------------------------------------------------------------------------

    def pack_section(self, blocks: list[_Block]) -> None:
        queue = deque(_Piece(b.start, b.end, PARAGRAPH, b.heading) for b in blocks)
        body: list[_Piece] = []
        body_n = 0
        ov_start: int | None = None
        ov_n = 0
        carry: tuple[int, int] | None = None  # where the next chunk's overlap comes from
        while queue or body:
            if not queue:
                carry = self._flush(body, ov_start, queue)
                body, body_n, ov_start, ov_n = [], 0, None, 0
                continue
            p = queue.popleft()
            n = self.count(p.start, p.end)
            if n > self.max_tokens:
                queue.extendleft(reversed(self.children(p) or []))
                continue
            if not body:
                body, body_n = [p], n
                if carry is not None:
                    ov_start, ov_n = self._overlap(carry, min(self.overlap_tokens, self.max_tokens - n))
                    carry = None
                continue
            if ov_n + body_n + n <= self.max_tokens:
                body.append(p)
                body_n += n
                continue
            if all(b.heading for b in body) and not p.heading:
                # Headings alone make a poor chunk: fill it with the start of the next paragraph.
                parts = self.children(p, allow_cut=False)
                if parts:
                    queue.extendleft(reversed(parts))
                    continue
            queue.appendleft(p)
            carry = self._flush(body, ov_start, queue)
            body, body_n, ov_start, ov_n = [], 0, None, 0

    def _flush(
        self, body: list[_Piece], ov_start: int | None, queue: deque[_Piece]
    ) -> tuple[int, int] | None:
        """Emit the chunk made of the overlap and `body`, checked with the real tokenizer (giving its last
        pieces back to `queue` while over); returns the region the next chunk's overlap may come from."""
        body = list(body)
        start = body[0].start if ov_start is None else ov_start
        n = self.count(start, body[-1].end)
        while n > self.max_tokens:
            if len(body) > 1:
                queue.appendleft(body.pop())
            elif ov_start is not None:
                ov_start = None
                start = body[0].start
            else:  # a single piece is only placed when its own exact count fits
                raise AssertionError("a single piece over max_tokens")
            n = self.count(start, body[-1].end)
        if n == 0:
            return None  # only characters the model does not see (control, format): nothing to embed
        end = body[-1].end
        page_start, page_end = self._pages(start, end)
        self.chunks.append(
            Chunk(
                ordinal=len(self.chunks),
                text=self.text[start:end],
                char_start=start,
                char_end=end,
                page_start=page_start,
                page_end=page_end,
                token_count=n,
            )
        )
        # The next chunk's overlap comes from this chunk's new text after its headings (which lead).
        first_text = next((i for i, b in enumerate(body) if not b.heading), None)
        return None if first_text is None else (body[first_text].start, end)

    def _pages(self, start: int, end: int) -> tuple[int | None, int | None]:
        lo = bisect_right(self._page_ends, start)
        hi = bisect_left(self._page_starts, end)
        numbers = [p for p in self._page_numbers[lo:hi] if p is not None]
        if not numbers:
            return None, None
        return min(numbers), max(numbers)


def _check_pages(pages: Sequence[PageSpan], length: int) -> list[PageSpan]:
    spans = sorted(((p[0], int(p[1]), int(p[2])) for p in pages), key=lambda p: (p[1], p[2]))
    prev_end = 0
    for number, start, end in spans:
        if not 0 <= start <= end <= length:
            raise ValueError(f"page span {(number, start, end)} is outside the text (length {length})")
        if start < prev_end:
            raise ValueError(f"page spans overlap at {(number, start, end)}")
        prev_end = end
    return spans


def chunk_text(
    text: str,
    pages: Sequence[PageSpan] = (),
    *,
    tokenizer: TokenCounter | Callable[[str], int],
    max_tokens: int = DEFAULT_MAX_TOKENS,
    overlap_tokens: int = DEFAULT_OVERLAP_TOKENS,
) -> list[Chunk]:
    """Cut `text` into chunks of at most `max_tokens` tokens (see the module docstring).

    `pages`: `(page_number | None, start, end)` character spans of `text`, non-overlapping (empty for
    formats without pages). `tokenizer`: the embedding model (anything with `count_tokens`) or a
    function counting tokens; when it has `max_tokens`, `max_tokens` may not exceed it.
    """
    count: Callable[[str], int]
    if isinstance(tokenizer, TokenCounter):
        count = tokenizer.count_tokens
        model_max = getattr(tokenizer, "max_tokens", None)
        if isinstance(model_max, int) and max_tokens > model_max:
            raise ValueError(f"max_tokens {max_tokens} is more than the model's {model_max}")
    else:
        count = tokenizer
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    if not 0 <= overlap_tokens < max_tokens:
        raise ValueError(f"overlap_tokens must be in [0, max_tokens), got {overlap_tokens}")
    chunker = _Chunker(text, count, max_tokens, overlap_tokens, _check_pages(pages, len(text)))
    for section in _sections(_parse(text)):
        chunker.pack_section(section)
    return chunker.chunks
