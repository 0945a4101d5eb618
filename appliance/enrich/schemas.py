"""The enrichment API contract: what an upload asks for, the tenant's labels, and the results."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

ClassifyMethod = Literal["embedding", "llm"]
# The values `?classify=` takes: true (= embedding), embedding, llm, or false.
ClassifyParam = Literal["true", "false", "embedding", "llm"]

SUMMARIZE_DOC = "Summarise the document with the local chat model once it is indexed (a `summarize` job)."
CLASSIFY_DOC = (
    "Assign the tenant's labels (`PUT /api/v1/labels`) once it is indexed (a `classify` job): "
    "`true` or `embedding` by embedding similarity, `llm` by asking the chat model (falling back to "
    "embedding when its reply names no label)."
)


class EnrichRequest(BaseModel):
    """What enrichment an upload asked for; stored on the version as JSON (`document_versions.enrich`)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    summarize: bool = False
    classify: ClassifyMethod | None = None

    @classmethod
    def from_params(cls, summarize: bool | None, classify: ClassifyParam | bool | None) -> EnrichRequest:
        method: ClassifyMethod | None
        if classify is True or classify in ("true", "embedding"):
            method = "embedding"
        elif classify == "llm":
            method = "llm"
        else:
            method = None
        return cls(summarize=bool(summarize), classify=method)

    @classmethod
    def from_json(cls, raw: dict[str, Any] | None) -> EnrichRequest:
        return cls.model_validate(raw or {})

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(exclude_defaults=True)

    def merge(self, other: EnrichRequest) -> EnrichRequest:
        """Both requests: a summary if either asked, the newer classify method when it names one."""
        return EnrichRequest(
            summarize=self.summarize or other.summarize, classify=other.classify or self.classify
        )

    @property
    def kinds(self) -> list[str]:
        """The job kinds this request needs."""
        return [k for k, wanted in (("summarize", self.summarize), ("classify", self.classify)) if wanted]


# Labels -----------------------------------------------------------------------------------------

MAX_LABELS = 200
NAME_MAX_CHARS = 100
DESCRIPTION_MAX_CHARS = 500


class LabelIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        description=f"1-{NAME_MAX_CHARS} characters, no control characters; unique among the labels "
        "(compared case-insensitively). Surrounding and repeated whitespace is collapsed.",
        examples=["facilities"],
    )
    description: str = Field(
        default="",
        description=f"At most {DESCRIPTION_MAX_CHARS} characters: what documents with this label are about. "
        'Classification by embedding compares "name: description" with the document, so a few '
        "telling words help.",
        examples=["buildings, heating, maintenance"],
    )


class LabelsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    labels: list[LabelIn] = Field(
        description=f"1-{MAX_LABELS} labels, in the order to list them. Replaces all the tenant's labels."
    )


class LabelOut(BaseModel):
    name: str
    description: str


class LabelList(BaseModel):
    labels: list[LabelOut]


# Results, as returned with a document ---------------------------------------------------------------


class SummaryOut(BaseModel):
    text: str
    model: str = Field(description="The chat model that wrote it.")
    created_at: datetime = Field(description="When this summary was produced.")


class AssignedLabel(BaseModel):
    name: str
    score: float = Field(
        description="Cosine similarity between the label and the document (whichever method chose it)."
    )
    method: ClassifyMethod = Field(description="What chose the label: embedding similarity or the LLM.")


class EnrichmentJobOut(BaseModel):
    job_id: uuid.UUID
    kind: Literal["summarize", "classify"]
    status: str = Field(description="queued, running, retrying, succeeded, failed or dead (see /jobs).")
    error_code: str | None = None
