"""Snippets are made in the API process (chunk text is sealed at rest): the query's words marked by
their Snowball English stem, as the full-text index matches them."""

from __future__ import annotations

from appliance.search.highlight import DELIMITER, MAX_WORDS, MIN_WORDS, highlight, query_stems

PROSE = (
    "The committee reviewed the budgets of every department. "
    "Patients receiving vaccinations showed fewer infections; the vaccine was well tolerated. "
)


def test_words_are_matched_by_stem_and_case_insensitively() -> None:
    snippet = highlight(PROSE, "Does the VACCINE reduce infection in patients?")
    for word in ("Patients", "vaccinations", "infections", "vaccine"):
        assert f"<mark>{word}</mark>" in snippet
    assert "<mark>The</mark>" not in snippet and "<mark>the</mark>" not in snippet  # a stop word
    assert "<mark>department</mark>" not in snippet


def test_only_whole_words_are_marked_at_word_starts_in_any_script() -> None:
    """A query word's letters inside another word are no match; a word after an apostrophe (when what
    is before it is no candidate), an underscore or a hyphen starts one; inner apostrophes belong to
    the word; and text whose lower case is longer than itself (Turkish dotted I) keeps its offsets."""
    text = "Preprotein, ab'protein, don't_protein protein-rich PROTEIN's İstanbul istanbul"
    snippet = highlight(text, "protein istanbul don't")
    assert snippet == (
        "Preprotein, ab'<mark>protein</mark>, <mark>don't</mark>_<mark>protein</mark> "
        "<mark>protein</mark>-rich <mark>PROTEIN's</mark> İstanbul <mark>istanbul</mark>"
    )  # "İstanbul" lower-cases to "i̇stanbul", another stem (as to_tsvector has it)


def test_stop_words_in_the_query_mark_nothing() -> None:
    assert query_stems("the and of what is") == frozenset()
    assert "<mark>" not in highlight(PROSE, "the and of what is")


def test_text_is_html_escaped_but_the_marks_are_not() -> None:
    snippet = highlight("Use <script>alert('x')</script> & patient care", "patients")
    assert "<script>" not in snippet and "&lt;script&gt;" in snippet and "&amp;" in snippet
    assert "<mark>patient</mark>" in snippet


def test_far_apart_matches_become_two_fragments_of_bounded_length() -> None:
    filler = " ".join(f"word{i}" for i in range(400))
    text = f"Alpha vaccine trial opened. {filler} The vaccine booster followed. {filler} A vaccine again."
    snippet = highlight(text, "vaccine")
    fragments = snippet.split(DELIMITER)
    assert len(fragments) == 2 and all("<mark>vaccine</mark>" in f for f in fragments)
    for fragment in fragments:
        assert len(fragment.split()) <= MAX_WORDS + 5  # about MaxWords words each
    assert len(snippet) < len(text) / 5


def test_without_a_match_the_snippet_is_the_start_of_the_text() -> None:
    text = " ".join(f"w{i}" for i in range(100))
    snippet = highlight(text, "vaccine")
    assert snippet.startswith("w0 w1 w2") and len(snippet.split()) == MIN_WORDS and "<mark>" not in snippet
    assert highlight("", "vaccine") == ""


def test_the_c_stemmer_is_used_per_thread_and_stems_as_snowball_does() -> None:
    """PyStemmer (C) gives exactly the pure-Python Snowball English stems; each thread has its own."""
    import threading

    from snowballstemmer.english_stemmer import EnglishStemmer

    from appliance.search.highlight import english_stemmer

    mine = english_stemmer()
    assert type(mine).__module__ == "Stemmer"  # the dependency is installed and picked up
    assert english_stemmer() is mine
    other: list[object] = []
    thread = threading.Thread(target=lambda: other.append(english_stemmer()))
    thread.start()
    thread.join()
    assert other[0] is not mine
    reference = EnglishStemmer()
    words = PROSE.lower().replace(".", " ").replace(";", " ").split() + [
        "generously",
        "organization",
        "running",
        "flies",
        "dying",
        "skies",
        "news",
        "proceeding",
    ]
    assert [mine.stemWord(w) for w in words] == [reference.stemWord(w) for w in words]
