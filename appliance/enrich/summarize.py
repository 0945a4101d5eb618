"""A document's summary within the chat model's context window.

The input is the version's chunks in order, with the overlap between consecutive chunks removed (the
chunker repeats a few sentences at each seam for retrieval; a summary would read them twice).

- Everything fits in one prompt (the model's `n_ctx` less the answer's `max_tokens`, the instructions
  and the chat template): one call.
- Otherwise map-reduce: the pieces are packed greedily, in order, into groups that each fit; each group
  is summarised ("map"); the partial summaries are packed and summarised again the same way until one
  group is left, which gives the final summary ("reduce"). Each level divides the text by at least
  `budget / max_tokens` (about 5 with the defaults), so the number of levels grows with the log of the
  length. `summary_max_chunks` bounds the work for very long documents: beyond it, that many chunks
  spread evenly over the document are read (`even_sample`; the job records `sampled`).

Token counts come from the chat model's own tokenizer (the LLM server's tokenize endpoint). Generation
is at temperature 0, so re-running a job over the same chunks writes the same summary. Each call is
bounded by the client's timeout (`llm_timeout_s`); an unreachable or saturated server raises
LLMUnavailable / LLMSaturated, which the job treats as transient.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from appliance.inference.llm import LLMClient, record_usage
from appliance.ingest.pipeline import PermanentError

PROMPT_OVERHEAD_TOKENS = 48  # chat-template tokens around the messages (role headers, BOS/EOS)
SEPARATOR = "\n\n"
SYSTEM = "You write short, factual summaries of documents. Use only the text you are given."
WHOLE = "Summarize this document in a few sentences.\n\nDocument:\n{text}"
PART = (
    "Summarize this part of a longer document in a few sentences. Keep names, numbers and dates.\n\n"
    "Part:\n{text}"
)
COMBINE = (
    "These are summaries of consecutive parts of one document. Combine them into one short summary of "
    "the whole document.\n\nSummaries:\n{text}"
)
T = TypeVar("T")
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


@dataclass
class ChunkText:
    char_start: int
    char_end: int
    text: str


@dataclass
class Summary:
    text: str
    strategy: str  # "single" (one call) or "map_reduce"
    calls: int
    levels: int  # 1 for a single call; map-reduce: the map level, then each reduce level
    prompt_tokens: int
    completion_tokens: int


def without_overlap(chunks: Sequence[ChunkText]) -> list[str]:
    """The chunks' texts with each one's repeat of the previous chunk's end cut off (by offsets)."""
    pieces: list[str] = []
    end = 0
    for c in chunks:
        skip = max(0, min(end, c.char_end) - c.char_start)
        piece = c.text[skip:].strip()
        if piece:
            pieces.append(piece)
        end = max(end, c.char_end)
    return pieces


def even_sample(items: Sequence[T], n: int) -> list[T]:
    """`n` items spread evenly from first to last, in order."""
    if len(items) <= n:
        return list(items)
    if n <= 1:
        return list(items[:1])
    picked = sorted({round(i * (len(items) - 1) / (n - 1)) for i in range(n)})
    return [items[i] for i in picked]


def trim_to_sentence(text: str) -> str:
    """A summary cut off by max_tokens, ended at its last full sentence when that keeps most of it."""
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    if ends and ends[-1] >= len(text) // 2:
        return text[: ends[-1]]
    return text


class Summarizer:
    """One summary per `run`. `progress(done, planned)` is awaited after each LLM call (planned is an
    estimate: map-reduce knows its next level's size only when it gets there)."""

    def __init__(
        self,
        llm: LLMClient,
        *,
        tenant_id: uuid.UUID,
        max_tokens: int,
        progress: Callable[[int, int], Awaitable[None]] | None = None,
    ) -> None:
        self.llm = llm
        self.tenant_id = tenant_id
        # A summary may take at most a quarter of the context, so a group always holds several.
        self.max_tokens = max(16, min(max_tokens, llm.n_ctx // 4))
        self.progress = progress
        self.calls = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0

    async def run(self, chunks: Sequence[ChunkText]) -> Summary:
        """Summarise `chunks` (in document order; see `even_sample` to bound them)."""
        pieces = without_overlap(chunks)
        if not pieces:
            raise PermanentError("no_text", "The document has no indexed text to summarise.")
        instructions = max(
            [await self.llm.count_tokens(SYSTEM + "\n" + t.format(text="")) for t in (WHOLE, PART, COMBINE)]
        )
        budget = self.llm.n_ctx - self.max_tokens - PROMPT_OVERHEAD_TOKENS - instructions
        if budget < 2 * self.max_tokens:
            raise PermanentError(
                "llm_context_too_small",
                f"The chat model's context ({self.llm.n_ctx} tokens) cannot hold text to summarise next to "
                f"a {self.max_tokens}-token summary.",
            )
        groups = await self._pack(pieces, budget)
        levels = 1
        if len(groups) == 1:
            text = await self._generate(WHOLE, groups[0], remaining=0)
            strategy = "single"
        else:
            strategy = "map_reduce"
            template = PART
            while len(groups) > 1:
                partials = [
                    await self._generate(template, g, remaining=len(groups) - i + 1)
                    for i, g in enumerate(groups, 1)
                ]
                template = COMBINE
                levels += 1
                regrouped = await self._pack(partials, budget)
                if len(regrouped) >= len(groups):  # cannot happen with budget >= 2 * max_tokens; never loop
                    raise PermanentError("summary_not_converging", "The partial summaries do not shrink.")
                groups = regrouped
            text = await self._generate(COMBINE, groups[0], remaining=0)
        return Summary(
            text=text,
            strategy=strategy,
            calls=self.calls,
            levels=levels,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
        )

    async def _fit(self, piece: str, budget: int) -> tuple[str, int]:
        """The piece and its token count, cut (by characters, proportionally) until it fits `budget`."""
        n = await self.llm.count_tokens(piece)
        while n > budget and len(piece) > 1:
            piece = piece[: max(1, int(len(piece) * budget / n * 0.9))]
            n = await self.llm.count_tokens(piece)
        return piece, n

    async def _pack(self, pieces: Sequence[str], budget: int) -> list[str]:
        """Consecutive pieces joined into as few groups as fit `budget` tokens each (greedy, in order)."""
        sep = await self.llm.count_tokens(SEPARATOR)
        groups: list[str] = []
        current: list[str] = []
        used = 0
        for raw in pieces:
            piece, n = await self._fit(raw, budget)
            if current and used + sep + n > budget:
                groups.append(SEPARATOR.join(current))
                current, used = [], 0
            used += n + (sep if current else 0)
            current.append(piece)
        if current:
            groups.append(SEPARATOR.join(current))
        return groups

    async def _generate(self, template: str, text: str, *, remaining: int) -> str:
        """One call; `remaining` estimates the calls still to come after it (for progress)."""
        messages = [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": template.format(text=text)},
        ]
        async with self.llm.slot():
            done = await self.llm.complete(messages, max_tokens=self.max_tokens, temperature=0.0)
        self.calls += 1
        self.prompt_tokens += done.prompt_tokens
        self.completion_tokens += done.completion_tokens
        record_usage(self.tenant_id, "summarize", done.prompt_tokens, done.completion_tokens)
        if self.progress is not None:
            await self.progress(self.calls, self.calls + remaining)
        out = done.text.strip()
        if done.finish_reason == "length":
            out = trim_to_sentence(out)
        if not out:
            raise PermanentError("summary_empty", "The chat model returned an empty summary.")
        return out
