"""`POST /api/v1/answers`: a cited answer, as JSON or streamed as server-sent events.

Streaming events, in order: `passages` (the passages given to the model, before the first token),
`token` (`{"text": ...}`, many), then `answer` (the same object the non-streaming call returns), or
`error` (problem+json fields) if generation fails midway. Retrieval and the audit event happen before
the response starts, in the request's transaction; the LLM slot is taken before it starts too, so a
saturated model is a plain `503` with `Retry-After`, never a stream that stalls.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from sse_starlette import EventSourceResponse
from starlette.background import BackgroundTask

from appliance.answers import service
from appliance.answers.schemas import AnswerRequest, AnswerResponse
from appliance.audit import service as audit
from appliance.auth.deps import GenerationSlot, SessionDep, require
from appliance.auth.principal import Principal
from appliance.errors import AppError, Forbidden, Unauthorized, problem_responses
from appliance.inference.llm import LLMClient, LLMSaturated, LLMUnavailable, StreamState, record_usage
from appliance.search.routes import SearchSvc

router = APIRouter(tags=["answers"])
Viewer = Annotated[Principal, Depends(require("viewer"))]


async def llm_client(request: Request) -> LLMClient:
    llm: LLMClient | None = request.app.state.llm
    if llm is None:
        raise LLMUnavailable("No chat model is configured (models/manifest.toml has none).")
    return llm


LLM = Annotated[LLMClient, Depends(llm_client)]


class SlotHolder:
    """The LLM slot of one streamed response, released exactly once: when the stream ends, or by the
    response's background task if the client went away before the stream began."""

    def __init__(self, llm: LLMClient) -> None:
        self._stack = contextlib.AsyncExitStack()
        self._llm = llm

    async def acquire(self) -> None:
        await self._stack.enter_async_context(self._llm.slot())

    async def release(self) -> None:
        await self._stack.aclose()


@router.post(
    "/answers",
    response_model=AnswerResponse,
    dependencies=[GenerationSlot],
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "JSON, or server-sent events when `stream`",
        },
        **problem_responses(Unauthorized, Forbidden, LLMSaturated, LLMUnavailable, AppError),
    },
)
async def answer(
    body: AnswerRequest, principal: Viewer, session: SessionDep, svc: SearchSvc, llm: LLM
) -> Any:
    """Answer a question from the tenant's documents with the local chat model, citing passages."""
    tenant_id = principal.tenant_id
    assert tenant_id is not None
    max_tokens = body.max_tokens or svc.settings.answer_max_tokens
    prepared = await service.prepare(
        svc,
        llm,
        session,
        tenant_id,
        body.question,
        filters=body.filters,
        top_k=body.top_k,
        max_tokens=max_tokens,
    )
    audit.record(
        session, "answer", resource_type="answer", details=service.audit_details(body.question, prepared)
    )
    if not prepared.found:
        result = service.response(body, prepared, "", llm.model, 0, 0, None)
        if not body.stream:
            return result
        return EventSourceResponse(_events_fixed(result))

    if not body.stream:
        async with llm.slot():
            done = await llm.complete(prepared.messages, max_tokens=max_tokens)
        record_usage(tenant_id, "answers", done.prompt_tokens, done.completion_tokens)
        return service.response(
            body,
            prepared,
            done.text,
            llm.model,
            done.prompt_tokens,
            done.completion_tokens,
            done.finish_reason,
        )

    holder = SlotHolder(llm)
    await holder.acquire()  # 503 here, before any byte of the stream

    async def events() -> AsyncIterator[dict[str, str]]:
        state = StreamState(prompt_tokens=prepared.prompt_tokens)
        try:
            yield {
                "event": "passages",
                "data": json.dumps([_passage(i, p) for i, p in enumerate(prepared.passages, 1)]),
            }
            async for piece in llm.stream(prepared.messages, state, max_tokens=max_tokens):
                yield {"event": "token", "data": json.dumps({"text": piece})}
            record_usage(tenant_id, "answers", state.prompt_tokens, state.completion_tokens)
            result = service.response(
                body,
                prepared,
                state.text,
                llm.model,
                state.prompt_tokens,
                state.completion_tokens,
                state.finish_reason,
            )
            yield {"event": "answer", "data": result.model_dump_json()}
        except AppError as exc:
            yield {
                "event": "error",
                "data": json.dumps({"code": exc.code, "status": exc.status, "detail": exc.detail}),
            }
        finally:
            await holder.release()

    return EventSourceResponse(events(), background=BackgroundTask(holder.release))


def _passage(marker: int, p: Any) -> dict[str, Any]:
    return {
        "marker": marker,
        "document_id": str(p.document_id),
        "version_id": str(p.version_id),
        "chunk_id": p.chunk_id,
        "title": p.title,
        "page_start": p.page_start,
        "page_end": p.page_end,
    }


async def _events_fixed(result: AnswerResponse) -> AsyncIterator[dict[str, str]]:
    yield {"event": "passages", "data": "[]"}
    yield {"event": "token", "data": json.dumps({"text": result.answer})}
    yield {"event": "answer", "data": result.model_dump_json()}
