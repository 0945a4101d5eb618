"""OpenAI-compatible endpoints, so internal apps use the stock `openai` client unchanged:

    client = OpenAI(base_url="http://appliance:8470/v1", api_key="apl_...")

- `GET /v1/models`: the manifest's chat and embedding models.
- `POST /v1/embeddings`: the embedding model (float or base64, as the client asks; the `openai`
  package asks for base64 by default).
- `POST /v1/chat/completions`: the chat model, streamed or not. With
  `extra_body={"grounding": {"enabled": true, "filters": {...}, "top_k": 6}}` the last user message is
  answered from the caller's tenant's documents: the passages go in as a system message and the
  response carries `citations` (the same objects as /api/v1/answers).

Authentication is the appliance's API key as the Bearer token (the client's `api_key`); each call is
audited (grounded calls with the chunks they used). Errors are problem+json with the same stable
codes as the rest of the API; the `openai` client raises its usual `APIStatusError` subclasses.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from array import array
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator
from sse_starlette import EventSourceResponse
from starlette.background import BackgroundTask

from appliance.answers import service as answers
from appliance.answers.routes import LLM, SlotHolder
from appliance.audit import service as audit
from appliance.auth.deps import GenerationSlot, SessionDep, require
from appliance.auth.principal import Principal
from appliance.errors import AppError, Forbidden, NotFound, Unauthorized, problem_responses
from appliance.inference.llm import LLMSaturated, LLMUnavailable, StreamState, record_usage
from appliance.search.routes import SearchSvc
from appliance.search.schemas import SearchFilters

router = APIRouter(tags=["openai-compatible"])
Viewer = Annotated[Principal, Depends(require("viewer"))]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "appliance"
    purpose: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    input: str | list[str] = Field(description="Text or texts (token-id inputs are not accepted).")
    model: str
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


class Grounding(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    filters: SearchFilters | None = None
    top_k: int | None = Field(default=None, ge=1, le=20)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # other fields (name, tool_calls, ...): accepted, not sent on

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _tool_reply(self) -> ChatMessage:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs its tool_call_id")
        return self

    def for_model(self) -> dict[str, Any]:
        """The message as the model server takes it. Only role and content (and a tool reply's id)
        go on: a field or role it does not know fails the whole request there as a 5xx (which
        would count against the LLM's circuit breaker). `developer` is OpenAI's newer `system`;
        a null content (an assistant turn that only called tools) is empty text to the template."""
        out: dict[str, Any] = {
            "role": "system" if self.role == "developer" else self.role,
            "content": self.content or "",
        }
        if self.role == "tool":
            out["tool_call_id"] = self.tool_call_id
        return out


TokenId = Annotated[str, StringConstraints(pattern=r"^[0-9]{1,9}$")]


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object"]


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # sampling options pass through to the model server

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(default=None, ge=1, le=8192)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=8192)
    temperature: float | None = Field(default=None, ge=0, le=2)
    grounding: Grounding | None = None
    # Sampling options passed on to the model server (_SAMPLING), typed here so that a malformed
    # one is this API's 422, not a failure of the model server.
    top_p: float | None = Field(default=None, ge=0, le=1)
    stop: str | list[str] | None = Field(default=None, max_length=4)
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[TokenId, float] | None = Field(default=None, max_length=300)
    response_format: ResponseFormat | None = None


def _models(svc: Any) -> list[Any]:
    from appliance.inference.manifest import load_manifest

    return [m for m in load_manifest(svc.settings.models_dir) if m.purpose in ("chat", "embedding")]


@router.get("/models", response_model=ModelList, responses=problem_responses(Unauthorized, Forbidden))
async def list_models(principal: Viewer, svc: SearchSvc) -> ModelList:
    now = int(time.time())
    return ModelList(data=[ModelCard(id=m.name, created=now, purpose=m.purpose) for m in _models(svc)])


def _check_model(svc: Any, name: str, purpose: str) -> str:
    wanted = svc.settings.embedding_model if purpose == "embedding" else svc.settings.chat_model
    for m in _models(svc):
        if m.purpose == purpose and (m.name == name or (wanted is None and name in ("default", ""))):
            return str(m.name)
    raise NotFound(f"No {purpose} model named {name!r}; GET /v1/models lists them.", code="model_not_found")


@router.post("/embeddings", responses=problem_responses(Unauthorized, Forbidden, NotFound, AppError))
async def embeddings(
    body: EmbeddingRequest, session: SessionDep, principal: Viewer, svc: SearchSvc
) -> dict[str, Any]:
    # The session is listed first: it authenticates inside the request's transaction (auth.deps).
    from appliance.search.service import _embedder

    name = _check_model(svc, body.model, "embedding")
    texts = [body.input] if isinstance(body.input, str) else list(body.input)
    if not texts or len(texts) > 256:
        raise AppError("`input` must hold 1 to 256 texts.", code="input_invalid", status=422)
    embedder = await anyio.to_thread.run_sync(_embedder, svc.settings)
    if body.dimensions is not None and body.dimensions != embedder.dimensions:
        raise AppError(
            f"{name} has {embedder.dimensions} dimensions.", code="dimensions_unsupported", status=422
        )
    counts = [embedder.count_tokens(t) for t in texts]
    for i, n in enumerate(counts):
        if n == 0 or n > embedder.max_tokens:
            raise AppError(
                f"input {i} has {n} tokens; {name} takes 1 to {embedder.max_tokens}.",
                code="input_too_long",
                status=422,
            )
    vectors = await anyio.to_thread.run_sync(embedder.embed, texts)
    audit.record(
        session, "openai.embeddings", resource_type="model", resource_id=name, details={"inputs": len(texts)}
    )

    def encode(v: list[float]) -> Any:
        return base64.b64encode(array("f", v).tobytes()).decode() if body.encoding_format == "base64" else v

    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)],
        "model": name,
        "usage": {"prompt_tokens": sum(counts), "total_tokens": sum(counts)},
    }


@router.post(
    "/chat/completions",
    dependencies=[GenerationSlot],
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "A chat completion, or chunks when `stream`",
        },
        **problem_responses(Unauthorized, Forbidden, NotFound, LLMSaturated, LLMUnavailable, AppError),
    },
)
async def chat_completions(
    body: ChatRequest, principal: Viewer, session: SessionDep, svc: SearchSvc, llm: LLM
) -> Any:
    tenant_id = principal.tenant_id
    assert tenant_id is not None
    name = _check_model(svc, body.model, "chat")
    max_tokens = body.max_completion_tokens or body.max_tokens or svc.settings.answer_max_tokens
    messages = [m.for_model() for m in body.messages]
    passthrough = body.model_dump(include=_SAMPLING, exclude_none=True)
    prepared = None
    if body.grounding is not None and body.grounding.enabled:
        question = next(
            (m["content"] for m in reversed(messages) if m["role"] == "user" and m.get("content")), None
        )
        if not question:
            raise AppError("Grounding needs a user message to answer.", code="grounding_invalid", status=422)
        history = [m for m in messages[:-1] if m["role"] in ("user", "assistant") and m.get("content")]
        prepared = await answers.prepare(
            svc,
            llm,
            session,
            tenant_id,
            question,
            filters=body.grounding.filters,
            top_k=body.grounding.top_k,
            max_tokens=max_tokens,
            history=history,
        )
        audit.record(
            session,
            "openai.chat",
            resource_type="model",
            resource_id=name,
            details={"grounded": True, **answers.audit_details(question, prepared)},
        )
        if prepared.found:
            messages = prepared.messages
    else:
        audit.record(
            session, "openai.chat", resource_type="model", resource_id=name, details={"grounded": False}
        )
    cites = _citations_json(prepared, None)
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())

    if prepared is not None and not prepared.found:
        text = answers.NOT_FOUND_TEXT
        if body.stream:
            return EventSourceResponse(_fixed_stream(completion_id, created, name, text, cites), sep="\n")
        return _completion(completion_id, created, name, text, "stop", 0, 0, cites)

    temperature = body.temperature if body.temperature is not None else (0.0 if prepared else 0.7)
    if not body.stream:
        async with llm.slot():
            done = await llm.complete(messages, max_tokens=max_tokens, temperature=temperature, **passthrough)
        record_usage(tenant_id, "openai", done.prompt_tokens, done.completion_tokens)
        cites = _citations_json(prepared, done.text)
        return _completion(
            completion_id,
            created,
            name,
            done.text,
            done.finish_reason,
            done.prompt_tokens,
            done.completion_tokens,
            cites,
        )

    holder = SlotHolder(llm)
    await holder.acquire()

    async def chunks() -> AsyncIterator[str]:
        state = StreamState()
        try:
            yield json.dumps(_chunk(completion_id, created, name, {"role": "assistant", "content": ""}, None))
            async for piece in llm.stream(
                messages, state, max_tokens=max_tokens, temperature=temperature, **passthrough
            ):
                yield json.dumps(_chunk(completion_id, created, name, {"content": piece}, None))
            record_usage(tenant_id, "openai", state.prompt_tokens, state.completion_tokens)
            final = _chunk(completion_id, created, name, {}, state.finish_reason or "stop")
            if prepared is not None:
                final["citations"] = _citations_json(prepared, state.text)
            yield json.dumps(final)
            yield "[DONE]"
        except AppError as exc:
            yield json.dumps({"error": {"code": exc.code, "message": exc.detail, "type": "server_error"}})
        finally:
            await holder.release()

    return EventSourceResponse(chunks(), background=BackgroundTask(holder.release), sep="\n")


_SAMPLING = {
    "top_p",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "response_format",
}


def _citations_json(prepared: Any, text: str | None) -> list[dict[str, Any]] | None:
    if prepared is None:
        return None
    if not prepared.found or (text is not None and answers.is_not_found(text)):
        return []
    return [c.model_dump(mode="json") for c in answers.citations(text or "", prepared.passages)]


def _completion(
    cid: str,
    created: int,
    model: str,
    text: str,
    finish: str | None,
    prompt: int,
    completion: int,
    cites: Any,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": cid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish or "stop"}
        ],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }
    if cites is not None:
        out["citations"] = cites
    return out


def _chunk(cid: str, created: int, model: str, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


async def _fixed_stream(cid: str, created: int, model: str, text: str, cites: Any) -> AsyncIterator[str]:
    yield json.dumps(_chunk(cid, created, model, {"role": "assistant", "content": text}, None))
    final = _chunk(cid, created, model, {}, "stop")
    final["citations"] = cites
    yield json.dumps(final)
    yield "[DONE]"
