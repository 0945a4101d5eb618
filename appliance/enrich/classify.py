"""Labels for a document: by embedding similarity (the default) or by asking the chat model.

**Embedding.** Each label's "name: description" is embedded by the model that embedded the document's
chunks (vectors of two models are never compared) and cached on the label row. A label's score is the
cosine similarity between its vector and the document's **mean chunk vector** (the centroid: what the
document as a whole is about), computed by pgvector in Postgres. Labels scoring at least
`classify_threshold` are assigned, best first, at most `classify_max_labels`; the best label always is,
so a classified document never ends up with no label.

Why the mean and not the best single chunk (max over chunks), measured with all-minilm-l6-v2 on a
finance report holding one paragraph about a boiler (`tests/enrich/test_classify.py`): mean gives
finance 0.65 and facilities 0.25, max 0.64 and 0.34, so max assigns facilities too on the strength of
one passage (threshold 0.3); with 64-token chunks max nearly ties them (0.49 / 0.46) while the mean
keeps them apart (0.56 / 0.24). On one-chunk documents the two are the same. Both are recorded in the
result's details (`top`), so the choice can be revisited on real data.

**LLM.** The chat model gets the label list and the document's summary (when one exists already) or
its first chunks, and is asked for label names. The reply is matched against the names (whole words,
case-insensitive, longest names first); a reply that names no label, or every label of three or more
(an echo of the list, not a choice), falls back to the embedding method and says so. Labels the model
chose carry their embedding score too, so scores are comparable across methods.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from appliance.inference.llm import LLMClient

PROMPT_OVERHEAD_TOKENS = 48
LLM_MAX_TOKENS = 64  # a list of label names
LLM_SYSTEM = "You are a document classifier. Answer only with label names from the given list."
LLM_QUESTION = (
    "Which of these labels fit the document? Answer with the label names only, separated by commas."
)


def label_text(name: str, description: str) -> str:
    """What is embedded for a label."""
    return f"{name}: {description}" if description else name


@dataclass
class Score:
    label_id: uuid.UUID
    name: str
    mean: float  # cosine similarity to the document's mean chunk vector (the score used)
    max: float  # best cosine similarity to a single chunk (recorded, for comparison)


SCORES_SQL = text(
    """
    WITH doc AS (
        SELECT embedding FROM chunks WHERE version_id = :version_id AND embedding_model = :model
    ), centroid AS (
        SELECT avg(embedding) AS v FROM doc
    )
    SELECT l.id, l.name,
           1 - ((SELECT v FROM centroid) <=> l.embedding) AS mean_sim,
           (SELECT max(1 - (d.embedding <=> l.embedding)) FROM doc d) AS max_sim
    FROM labels l
    WHERE l.embedding IS NOT NULL AND l.embedding_model = :model
    ORDER BY l.position
    """
)


async def scores(session: AsyncSession, version_id: uuid.UUID, model: str) -> list[Score]:
    """Every label with a vector of `model`, scored against the version's chunks (label order)."""
    rows = await session.execute(SCORES_SQL, {"version_id": version_id, "model": model})
    return [
        Score(r.id, r.name, float(r.mean_sim), float(r.max_sim))
        for r in rows
        if r.mean_sim is not None and r.max_sim is not None
    ]


def choose(ranked: Sequence[Score], *, threshold: float, max_labels: int) -> list[Score]:
    """The labels to assign: those at or above `threshold`, best first, at most `max_labels`; always
    at least the best one."""
    best_first = sorted(ranked, key=lambda s: (-s.mean, s.name))
    if not best_first:
        return []
    chosen = [s for s in best_first if s.mean >= threshold][: max(1, max_labels)]
    return chosen or best_first[:1]


# LLM ---------------------------------------------------------------------------------------------


def parse_choice(reply: str, names: Sequence[str]) -> list[str] | None:
    """The label names the reply mentions, in the order it mentions them; None when it names none, or
    names every label of three or more (the list echoed back, not a choice)."""
    haystack = reply.casefold()
    found: list[tuple[int, str]] = []
    for name in sorted(names, key=len, reverse=True):  # "finance ops" before "finance"
        match = re.search(r"(?<!\w)" + re.escape(name.casefold()) + r"(?!\w)", haystack)
        if match is None:
            continue
        found.append((match.start(), name))
        haystack = haystack[: match.start()] + " " * (match.end() - match.start()) + haystack[match.end() :]
    if not found or (len(names) >= 3 and len(found) == len(names)):
        return None
    return [name for _, name in sorted(found)]


async def llm_messages(
    llm: LLMClient, labels: Sequence[tuple[str, str]], document: Sequence[str]
) -> list[dict[str, str]] | None:
    """The prompt: the label list, then as much of `document` (pieces in order: a summary, or the
    first chunks) as fits the context. None when the label list alone takes more than half of it."""
    listing = "Labels:\n" + "\n".join(f"- {label_text(n, d)}" for n, d in labels)
    fixed = await llm.count_tokens(f"{LLM_SYSTEM}\n{listing}\n\nDocument:\n\n{LLM_QUESTION}")
    if fixed > llm.n_ctx // 2:
        return None
    budget = llm.n_ctx - LLM_MAX_TOKENS - PROMPT_OVERHEAD_TOKENS - fixed
    kept: list[str] = []
    for piece in document:
        n = await llm.count_tokens(piece)
        if n > budget:
            if not kept:  # the first piece alone is too long: keep its beginning
                kept.append(piece[: max(1, int(len(piece) * budget / n * 0.9))])
            break
        kept.append(piece)
        budget -= n + 2
    body = "\n\n".join(kept)
    return [
        {"role": "system", "content": LLM_SYSTEM},
        {"role": "user", "content": f"{listing}\n\nDocument:\n{body}\n\n{LLM_QUESTION}"},
    ]
