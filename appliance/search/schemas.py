from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Mode = Literal["vector", "fulltext", "hybrid"]


class SearchFilters(BaseModel):
    """Every filter given must hold (AND). Filters apply inside the index scan, so a selective filter
    still returns `top_k` results when that many match (pgvector iterative index scans)."""

    model_config = ConfigDict(extra="forbid")

    document_ids: list[uuid.UUID] | None = Field(default=None, max_length=1000)
    tags: list[str] | None = Field(
        default=None, max_length=50, description="The document has every one of these tags."
    )
    metadata: dict[str, Any] | None = Field(
        default=None,
        description='JSON containment on the document\'s `extra` metadata, e.g. {"dept": "legal"}.',
    )
    content_types: list[str] | None = Field(
        default=None, max_length=50, description="Sniffed types, e.g. application/pdf."
    )
    created_after: datetime | None = None
    created_before: datetime | None = None

    @model_validator(mode="after")
    def _range(self) -> SearchFilters:
        if self.created_after and self.created_before and self.created_after > self.created_before:
            raise ValueError("created_after is later than created_before")
        return self


class Weights(BaseModel):
    model_config = ConfigDict(extra="forbid")

    vector: float = Field(default=1.0, ge=0, le=100)
    fulltext: float = Field(default=1.0, ge=0, le=100)


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: str = Field(min_length=1, max_length=2000)
    mode: Mode = "hybrid"
    top_k: int = Field(default=10, ge=1, le=100)
    filters: SearchFilters | None = None
    weights: Weights | None = Field(
        default=None, description="Hybrid only: each list's weight in the fusion."
    )
    rerank: bool = Field(
        default=False,
        description="Re-score the fused candidates with a reranker model (needs one in the models manifest).",
    )


class SearchResult(BaseModel):
    document_id: uuid.UUID
    version_id: uuid.UUID
    version: int
    chunk_id: int
    ordinal: int
    title: str | None
    page_start: int | None
    page_end: int | None
    char_start: int
    char_end: int
    score: float = Field(
        description="Cosine similarity (vector), rank (fulltext) or fused RRF score (hybrid)."
    )
    vector_rank: int | None = None
    fulltext_rank: int | None = None
    text: str
    snippet: str = Field(description="The passage with query terms wrapped in <mark>…</mark> (HTML-escaped).")


class SearchResponse(BaseModel):
    query: str
    mode: Mode
    model: str
    cached: bool
    results: list[SearchResult]
