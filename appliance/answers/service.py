"""Retrieval-augmented answers: retrieve → build a prompt that fits → generate → cite.

1. Retrieve the question's passages with hybrid search (the caller's filters, RLS-scoped).
2. Gate: when even the best passage is not close to the question (cosine similarity below
   `answer_min_similarity`), answer "not found in the documents" without asking the model. A small
   model asked to answer from unrelated text invents; a retrieval that found nothing is the signal.
3. Pack the passages, best first, numbered [1]..[n], until the chat model's context (n_ctx from the
   manifest) would not hold them with the instructions, the question and `max_tokens` of answer.
   Token counts come from the chat model's own tokenizer (the LLM server's tokenize endpoint).
4. Generate at temperature 0 (the same question over the same passages gives the same answer,
   streamed or not). The instructions ask for [n] markers and for NOT_FOUND_TEXT when the passages
   do not hold the answer; the reply is checked for both.
5. Citations: the passages the answer marks with [n]; when it marks none, every passage it was given
   (flagged `referenced: false`), so a caller can always trace an answer to its sources.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from appliance.answers.schemas import AnswerRequest, AnswerResponse, Citation, Usage
from appliance.inference.llm import LLMClient
from appliance.search import service as search
from appliance.search.schemas import SearchResult

NOT_FOUND_TEXT = "I could not find the answer in the documents."
SYSTEM_PROMPT = (
    "You answer questions using only the numbered passages the user gives you. "
    "Cite the passages you use with their numbers in square brackets, like [1] or [2][3]. "
    f'If the passages do not contain the answer, reply exactly: "{NOT_FOUND_TEXT}" '
    "Do not use any other knowledge. Be concise."
)
_MARKER = re.compile(r"\[(\d{1,3})\]")
PROMPT_OVERHEAD_TOKENS = 48  # chat-template tokens around the messages (role headers, BOS/EOS)


@dataclass
class Prepared:
    """Everything decided before generation: the messages, the passages given, the gate's verdict."""

    messages: list[dict[str, str]]
    passages: list[SearchResult]
    found: bool  # False: the gate decided there is nothing to answer from
    prompt_tokens: int
    best_similarity: float | None


def _passage_block(i: int, p: SearchResult) -> str:
    where = f"{p.title or 'untitled'}"
    if p.page_start is not None:
        where += f", page {p.page_start}" + (
            f"-{p.page_end}" if p.page_end and p.page_end != p.page_start else ""
        )
    return f"[{i}] ({where})\n{p.text.strip()}\n"


async def retrieve(
    svc: search.SearchServices,
    session: AsyncSession,
    tenant_id: uuid.UUID,
    question: str,
    filters: Any,
    top_k: int,
) -> tuple[list[SearchResult], float | None]:
    """Hybrid-ranked passages for `question` and the best cosine similarity among them."""
    s = svc.settings
    candidates = max(top_k, s.search_candidates)
    vec, best = await search.vector_candidates(svc, session, tenant_id, question, filters, candidates)
    fts = await search.fulltext_ranked(session, question, filters, candidates, s)
    fused = search.fuse(
        vec, fts, k=s.search_rrf_k, w_vector=s.search_vector_weight, w_fulltext=s.search_fulltext_weight
    )
    passages = await search.materialize(svc, session, tenant_id, fused[:top_k], question, snippets=False)
    return passages, best


async def prepare(
    svc: search.SearchServices,
    llm: LLMClient,
    session: AsyncSession,
    tenant_id: uuid.UUID,
    question: str,
    *,
    filters: Any = None,
    top_k: int | None = None,
    max_tokens: int,
    history: list[dict[str, str]] | None = None,
) -> Prepared:
    s = svc.settings
    passages, best = await retrieve(
        svc, session, tenant_id, question, filters, top_k or s.answer_context_chunks
    )
    if not passages or best is None or best < s.answer_min_similarity:
        return Prepared([], [], False, 0, best)
    budget = llm.n_ctx - max_tokens - PROMPT_OVERHEAD_TOKENS
    fixed = await llm.count_tokens(SYSTEM_PROMPT + "\n" + question)
    for m in history or []:
        fixed += await llm.count_tokens(m.get("content") or "") + 4
    used = fixed
    kept: list[SearchResult] = []
    blocks: list[str] = []
    for p in passages:
        block = _passage_block(len(kept) + 1, p)
        n = await llm.count_tokens(block)
        if used + n > budget:
            break  # passages are best-first: what does not fit is the least relevant
        kept.append(p)
        blocks.append(block)
        used += n
    if not kept:
        return Prepared([], [], False, 0, best)
    user = "Passages:\n\n" + "\n".join(blocks) + f"\nQuestion: {question}\nAnswer (cite passages like [1]):"
    messages = [
        {"role": "system", "content": SYSTEM_PROMPT},
        *(history or []),
        {"role": "user", "content": user},
    ]
    return Prepared(messages, kept, True, used + PROMPT_OVERHEAD_TOKENS, best)


def citations(answer: str, passages: list[SearchResult]) -> list[Citation]:
    marked: list[int] = []
    for m in _MARKER.finditer(answer):
        n = int(m.group(1))
        if 1 <= n <= len(passages) and n not in marked:
            marked.append(n)
    referenced = bool(marked)
    chosen = marked if referenced else list(range(1, len(passages) + 1))
    return [Citation.from_result(n, passages[n - 1], referenced=referenced) for n in chosen]


def is_not_found(answer: str) -> bool:
    return NOT_FOUND_TEXT.lower().rstrip(".") in answer.lower()


def response(
    req: AnswerRequest,
    prepared: Prepared,
    answer: str,
    model: str,
    prompt_tokens: int,
    completion_tokens: int,
    finish: str | None,
) -> AnswerResponse:
    if not prepared.found:
        return AnswerResponse(
            question=req.question,
            answer=NOT_FOUND_TEXT,
            found=False,
            citations=[],
            model=model,
            usage=Usage(prompt_tokens=0, completion_tokens=0),
            finish_reason="not_found",
        )
    not_found = is_not_found(answer)
    return AnswerResponse(
        question=req.question,
        answer=answer.strip(),
        found=not not_found,
        citations=[] if not_found else citations(answer, prepared.passages),
        model=model,
        usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens),
        finish_reason=finish,
    )


def audit_details(question: str, prepared: Prepared) -> dict[str, Any]:
    """Which passages went to the model (and so out to the caller); the question as its sha256."""
    import hashlib

    return {
        "question_sha256": hashlib.sha256(question.encode()).hexdigest(),
        "found": prepared.found,
        "passages": [{"document_id": str(p.document_id), "chunk_id": p.chunk_id} for p in prepared.passages],
    }
