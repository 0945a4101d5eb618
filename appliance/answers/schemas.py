from __future__ import annotations

import uuid

from pydantic import BaseModel, ConfigDict, Field

from appliance.search.schemas import SearchFilters, SearchResult


class AnswerRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    question: str = Field(min_length=1, max_length=2000)
    stream: bool = Field(default=False, description="Send the answer as server-sent events as it is written.")
    filters: SearchFilters | None = None
    top_k: int | None = Field(
        default=None, ge=1, le=20, description="Passages to retrieve (default: the setting)."
    )
    max_tokens: int | None = Field(default=None, ge=16, le=4096)


class Citation(BaseModel):
    marker: int = Field(description="The [n] the answer uses for this passage.")
    referenced: bool = Field(
        description="False when the answer marked no passage and every passage given is listed."
    )
    document_id: uuid.UUID
    version_id: uuid.UUID
    version: int
    chunk_id: int
    title: str | None
    page_start: int | None
    page_end: int | None
    char_start: int
    char_end: int
    text: str

    @classmethod
    def from_result(cls, marker: int, r: SearchResult, *, referenced: bool) -> Citation:
        return cls(
            marker=marker,
            referenced=referenced,
            document_id=r.document_id,
            version_id=r.version_id,
            version=r.version,
            chunk_id=r.chunk_id,
            title=r.title,
            page_start=r.page_start,
            page_end=r.page_end,
            char_start=r.char_start,
            char_end=r.char_end,
            text=r.text,
        )


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class AnswerResponse(BaseModel):
    question: str
    answer: str
    found: bool = Field(description="False when the documents do not contain an answer (the answer says so).")
    citations: list[Citation]
    model: str
    usage: Usage
    finish_reason: str | None
