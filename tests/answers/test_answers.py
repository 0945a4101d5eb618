"""POST /api/v1/answers with the real chat model (SmolLM2-135M: fluent, often wrong — these tests check
the mechanics: grounding, citations, streaming, refusal, isolation, saturation — not the wording)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from appliance.inference.llm import LLMClient, LLMSaturated
from appliance.settings import Settings
from tests.factories import bearer
from tests.search.conftest import Corpus


async def ask(client: httpx.AsyncClient, key: str, **body: object) -> httpx.Response:
    return await client.post("/api/v1/answers", json=body, headers=bearer(key))


def sse_events(text: str) -> list[tuple[str, str]]:
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        name, data = "message", []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].lstrip(" "))
        if data:
            events.append((name, "\n".join(data)))
    return events


async def test_answer_cites_the_right_document(client: httpx.AsyncClient, corpus: Corpus) -> None:
    r = await ask(
        client, corpus.tenant.key, question="How often must the steam boiler be inspected?", max_tokens=60
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["found"] is True and body["answer"].strip()
    assert body["model"] == "smollm2-135m-instruct"
    assert body["usage"]["prompt_tokens"] > 50 and 0 < body["usage"]["completion_tokens"] <= 60
    assert body["citations"], body
    cited_docs = {c["document_id"] for c in body["citations"]}
    assert cited_docs <= set(corpus.ids.values())
    boiler = [c for c in body["citations"] if c["document_id"] == corpus.ids["boiler"]]
    assert boiler, "the passage that holds the answer is among the citations"
    c = boiler[0]
    assert c["version"] == 1 and c["char_start"] == 0 and c["char_end"] > 0 and "six months" in c["text"]


async def test_streaming_and_non_streaming_agree(client: httpx.AsyncClient, corpus: Corpus) -> None:
    q = {"question": "Who answers requests to erase personal data?", "max_tokens": 48}
    # Warm the server's prompt cache first: llama.cpp reuses the KV of a matching prompt prefix, and a
    # cold prompt evaluated in other batch sizes can differ from a warm one in the last float bits,
    # enough to flip a near-tie in greedy decoding. Warm against warm, the two paths must agree exactly.
    await ask(client, corpus.tenant.key, **q)
    r = await ask(client, corpus.tenant.key, **q, stream=True)
    plain = (await ask(client, corpus.tenant.key, **q)).json()
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    names = [n for n, _ in events]
    assert names[0] == "passages" and names[-1] == "answer" and "token" in names
    passages = json.loads(events[0][1])
    assert passages and passages[0]["marker"] == 1
    streamed = "".join(json.loads(d)["text"] for n, d in events if n == "token")
    final = json.loads(events[-1][1])
    assert final["answer"] == streamed.strip() == plain["answer"]
    assert final["citations"] == plain["citations"]
    assert final["usage"]["completion_tokens"] == plain["usage"]["completion_tokens"]


async def test_no_relevant_passage_means_no_invented_answer(
    client: httpx.AsyncClient, corpus: Corpus
) -> None:
    q = "What is the orbital period of the moons of Neptune?"
    r = await ask(client, corpus.tenant.key, question=q)
    body = r.json()
    assert r.status_code == 200 and body["found"] is False and body["citations"] == []
    assert "could not find" in body["answer"] and body["usage"]["completion_tokens"] == 0
    events = sse_events((await ask(client, corpus.tenant.key, question=q, stream=True)).text)
    assert json.loads(events[-1][1])["found"] is False


async def test_answers_never_cite_another_tenant(client: httpx.AsyncClient, corpus: Corpus) -> None:
    a_ids = set(corpus.ids.values())
    for question in ("How often must the steam boiler be inspected?", "How long are backups kept?"):
        body = (await ask(client, corpus.other.key, question=question, max_tokens=32)).json()
        assert body["citations"], body
        assert {c["document_id"] for c in body["citations"]}.isdisjoint(a_ids)
        assert {c["document_id"] for c in body["citations"]} <= set(corpus.other_ids.values())


async def test_filters_narrow_the_context(client: httpx.AsyncClient, corpus: Corpus) -> None:
    body = (
        await ask(
            client,
            corpus.tenant.key,
            question="What is the rule for records?",
            filters={"document_ids": [corpus.ids["vaccine"]]},
            max_tokens=32,
        )
    ).json()
    assert {c["document_id"] for c in body["citations"]} <= {corpus.ids["vaccine"]}


async def test_bad_requests(client: httpx.AsyncClient, corpus: Corpus) -> None:
    for body in (
        {"question": ""},
        {"question": "x", "max_tokens": 1},
        {"question": "x", "stream": "maybe"},
        {},
    ):
        r = await client.post("/api/v1/answers", json=body, headers=bearer(corpus.tenant.key))
        assert r.status_code == 422 and r.json()["code"] == "validation_error"


async def test_saturation_is_a_503_with_retry_after(settings: Settings, llm_server: str) -> None:
    """One slot, no queue: while one generation holds the slot, the next caller is refused at once."""
    llm = LLMClient(
        settings.model_copy(update={"llm_concurrency": 1, "llm_queue_size": 0}),
        model="smollm2-135m-instruct",
        n_ctx=2048,
    )
    try:
        async with llm.slot():
            with pytest.raises(LLMSaturated) as exc:
                async with llm.slot():
                    pass
            assert exc.value.status == 503 and exc.value.headers["Retry-After"]
        # A waiter whose turn does not come within the queue timeout is refused too.
        slow = LLMClient(
            settings.model_copy(
                update={"llm_concurrency": 1, "llm_queue_size": 4, "llm_queue_timeout_s": 0.2}
            ),
            model="smollm2-135m-instruct",
            n_ctx=2048,
        )
        async with slow.slot():
            with pytest.raises(LLMSaturated, match="within 0.2 s"):
                async with slow.slot():
                    pass
        # And a free slot serves: a real generation through the real server.
        async with llm.slot():
            done = await llm.complete([{"role": "user", "content": "Say yes."}], max_tokens=4)
        assert done.completion_tokens > 0
        await slow.aclose()
    finally:
        await llm.aclose()


async def test_llm_down_is_a_clear_503(settings: Settings) -> None:
    from appliance.inference.llm import LLMUnavailable
    from tests.conftest import free_port

    port = free_port()
    down = settings.model_copy(update={"llm_url": f"http://127.0.0.1:{port}"})
    llm = LLMClient(down, model="m", n_ctx=2048)
    try:
        for _ in range(3):
            with pytest.raises(LLMUnavailable) as exc:
                await llm.complete([{"role": "user", "content": "hi"}], max_tokens=4)
            assert exc.value.code == "llm_unavailable"
            assert str(port) not in exc.value.detail  # the internal address stays in the log
        # Three failures in a row open the circuit: the next call fails fast without trying.
        with pytest.raises(LLMUnavailable) as exc:
            await asyncio.wait_for(llm.complete([{"role": "user", "content": "hi"}], max_tokens=4), 1)
        assert "circuit open" in exc.value.detail and exc.value.headers["Retry-After"]
    finally:
        await llm.aclose()
