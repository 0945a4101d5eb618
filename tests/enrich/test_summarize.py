"""Summaries within the context window: map-reduce on the real LLM server, and the text helpers."""

from __future__ import annotations

import uuid

import pytest

from appliance.enrich.summarize import ChunkText, Summarizer, even_sample, trim_to_sentence, without_overlap
from appliance.inference.llm import LLMClient
from appliance.ingest.pipeline import PermanentError
from appliance.settings import Settings
from tests.enrich.test_classify import FINANCE, HEATING


def test_without_overlap_cuts_the_repeated_seam() -> None:
    text = "One. Two. Three. Four."
    chunks = [ChunkText(0, 10, text[0:10]), ChunkText(5, 17, text[5:17]), ChunkText(17, 22, text[17:22])]
    assert without_overlap(chunks) == ["One. Two.", "Three.", "Four."]


def test_even_sample_and_trim() -> None:
    items = [ChunkText(i, i + 1, str(i)) for i in range(10)]
    assert [c.text for c in even_sample(items, 4)] == ["0", "3", "6", "9"]
    assert even_sample(items, 20) == items
    assert trim_to_sentence("A full first sentence. And a cut") == "A full first sentence."
    assert trim_to_sentence("Short. A much longer tail that never ends and goes on") == (
        "Short. A much longer tail that never ends and goes on"
    )


async def test_map_reduce_when_the_document_does_not_fit(settings: Settings, llm_server: str) -> None:
    """With a 400-token context the report does not fit one prompt: it is summarised in parts, then the
    parts' summaries are combined. The real server, a smaller budget."""
    llm = LLMClient(settings, model="smollm2-135m-instruct", n_ctx=400)
    text = "\n\n".join([*FINANCE, HEATING])
    chunks, pos = [], 0
    for para in text.split("\n\n"):
        chunks.append(ChunkText(pos, pos + len(para), para))
        pos += len(para) + 2
    done: list[tuple[int, int]] = []

    async def progress(n: int, planned: int) -> None:
        done.append((n, planned))

    try:
        summary = await Summarizer(llm, tenant_id=uuid.uuid4(), max_tokens=64, progress=progress).run(chunks)
        assert summary.strategy == "map_reduce" and summary.levels >= 2 and summary.calls >= 3
        assert summary.text.strip() and summary.prompt_tokens > 0 < summary.completion_tokens
        assert [n for n, _ in done] == list(range(1, summary.calls + 1))
        assert all(planned >= n for n, planned in done) and done[-1] == (summary.calls, summary.calls)
        # A context too small to hold text next to a summary is a permanent error, not a loop.
        tiny = LLMClient(settings, model="smollm2-135m-instruct", n_ctx=200)
        try:
            with pytest.raises(PermanentError) as err:
                await Summarizer(tiny, tenant_id=uuid.uuid4(), max_tokens=48).run(chunks)
            assert err.value.code == "llm_context_too_small"
        finally:
            await tiny.aclose()
    finally:
        await llm.aclose()
