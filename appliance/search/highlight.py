"""Search snippets: the query's words marked in a chunk's text, in up to two fragments.

Chunk text is sealed at rest, so Postgres cannot run `ts_headline` on it without a second round trip
carrying the decrypted text back (it cost 2.4 ms of a search here, more than the k-NN query itself).
This does the same job in the API process: words are compared by their Snowball English stem (the
`english` text-search configuration's stemmer: `snowballstemmer`, which runs PyStemmer's C build of
Snowball when it is installed, as the appliance's dependencies make sure) and Postgres's
English stop words are never marked, so what is highlighted is what the full-text index matches.
Fragments follow ts_headline's options as the service used them (MaxWords 45, MinWords 20,
MaxFragments 2, " … " between fragments); the output is HTML-escaped apart from the <mark> tags.
No library does this for Python (whoosh's highlighter needs its own index); it is small.
"""

from __future__ import annotations

import html
import re
import threading
from functools import lru_cache
from typing import Any

import snowballstemmer

MAX_WORDS = 45
MIN_WORDS = 20
MAX_FRAGMENTS = 2
DELIMITER = " … "
START, STOP = "<mark>", "</mark>"

# Postgres's tsearch_data/english.stop (the Snowball English list): never marked, as to_tsvector drops them.
_ENGLISH_STOP = """i me my myself we our ours ourselves you your yours yourself yourselves he him his himself
    she her
    hers herself it its itself they them their theirs themselves what which who whom this that these
    those am is are was were be been being have has had having do does did doing a an the and but if or
    because as until while of at by for with about against between into through during before after
    above below to from up down in out on off over under again further then once here there when where
    why how all any both each few more most other some such no nor not only own same so than too very s
    t can will just don should now"""
STOP_WORDS = frozenset(_ENGLISH_STOP.split())
_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")  # a word, with inner apostrophes (don't, o'clock)
_TAIL = re.compile(r"(?:['’][^\W_]+)+")
_local = threading.local()  # a stemmer keeps state while it works: one per thread


def english_stemmer() -> Any:
    """This thread's Snowball English stemmer (PyStemmer's C one when installed)."""
    stemmer = getattr(_local, "stemmer", None)
    if stemmer is None:
        stemmer = _local.stemmer = snowballstemmer.stemmer("english")
    return stemmer


@lru_cache(maxsize=65536)
def stem(word: str) -> str:
    """The lower-cased word's Snowball English stem (what `to_tsvector('english', …)` indexes)."""
    return str(english_stemmer().stemWord(word.lower()))


def query_stems(query: str) -> frozenset[str]:
    return frozenset(stem(w) for w in _WORD.findall(query) if w.lower() not in STOP_WORDS)


def _candidates(stems: frozenset[str], *, ignore_case: bool = False) -> re.Pattern[str] | None:
    """Words that could share one of `stems`: those starting with a stem's first two letters (Porter2
    trims endings and turns a final y into i, never touching the start), so most words of a chunk are
    never stemmed. Matched in lower-cased text (`ignore_case` for text whose lower case is longer).
    The pattern begins with the prefixes, so the regex engine skips ahead to their first letters, and
    checks that the prefix starts a word (no letter or digit before it) once it has matched; `_hits`
    adds what follows an inner apostrophe."""
    alternatives = []
    for width in (2, 1):  # stems of one letter have a one-letter prefix
        prefixes = sorted({re.escape(s[:2]) for s in stems if len(s[:2]) == width})
        if prefixes:
            # After the prefix, look back past it: the character before it is no letter or digit.
            alternatives.append(f"(?:{'|'.join(prefixes)})(?<![^\\W_]{'.' * width})")
    if not alternatives:
        return None
    flags = re.IGNORECASE if ignore_case else 0
    return re.compile(rf"(?:{'|'.join(alternatives)})[^\W_]*", flags)


def _hits(text: str, stems: frozenset[str]) -> list[tuple[int, int]]:
    """Where `text` has a word (not a stop word) whose stem is one of `stems`: (start, end) offsets."""
    haystack = text.lower()
    # Lower-casing maps no character to fewer, so equal lengths mean the offsets agree.
    pattern = _candidates(stems, ignore_case=len(haystack) != len(text))
    if pattern is None:
        return []
    if pattern.flags & re.IGNORECASE:
        haystack = text
    hits: list[tuple[int, int]] = []
    end = 0
    for m in pattern.finditer(haystack):
        start = m.start()
        if start < end:  # inside the apostrophe tail of the word before
            continue
        tail = _TAIL.match(haystack, m.end())  # inner apostrophes: don't, o'clock
        end = tail.end() if tail else m.end()
        word = haystack[start:end]
        if word.lower() not in STOP_WORDS and stem(word) in stems:
            hits.append((start, end))
    return hits


# Fragment geometry in characters (about MinWords / MaxWords words of English prose).
_FRAGMENT_CHARS = 6 * MAX_WORDS
_LEAD_CHARS = 60
_FIRST_WORDS = re.compile(rf"\s*(?:\S+\s+){{0,{MIN_WORDS - 1}}}\S+")


def highlight(text: str, query: str, *, stems: frozenset[str] | None = None) -> str:
    """`text` (plain) as an HTML-safe snippet with the query's words in <mark>…</mark>."""
    stems = query_stems(query) if stems is None else stems
    hits = _hits(text, stems)
    if not hits:
        first = _FIRST_WORDS.match(text)
        return html.escape(first.group().strip() if first else text.strip(), quote=False)
    # Hits close enough to share a fragment form a cluster; the clusters with most hits are shown.
    clusters: list[list[tuple[int, int]]] = [[hits[0]]]
    for hit in hits[1:]:
        if hit[1] - clusters[-1][0][0] <= _FRAGMENT_CHARS - _LEAD_CHARS:
            clusters[-1].append(hit)
        else:
            clusters.append([hit])
    best = sorted(sorted(clusters, key=len, reverse=True)[:MAX_FRAGMENTS], key=lambda c: c[0][0])
    return DELIMITER.join(_render(text, cluster) for cluster in best)


def _render(text: str, cluster: list[tuple[int, int]]) -> str:
    start = max(0, cluster[0][0] - _LEAD_CHARS)
    if start > 0:  # begin at a word: after the first space past `start`
        space = text.find(" ", start, cluster[0][0])
        start = space + 1 if space >= 0 else cluster[0][0]
    end = min(len(text), max(cluster[-1][1], start + _FRAGMENT_CHARS))
    if end < len(text):  # end at a word: before the last space ahead of `end`
        space = text.rfind(" ", cluster[-1][1], end)
        end = space if space >= 0 else cluster[-1][1]
    out = []
    pos = start
    for a, b in cluster:
        out.append(html.escape(text[pos:a], quote=False))
        out.append(f"{START}{html.escape(text[a:b], quote=False)}{STOP}")
        pos = b
    out.append(html.escape(text[pos:end], quote=False))
    return "".join(out).strip()
