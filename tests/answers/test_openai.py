"""The OpenAI-compatible surface, driven by the official `openai` package, unchanged, over real HTTP."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
import uvicorn

from appliance.api import create_app
from appliance.settings import Settings
from tests.conftest import free_port
from tests.search.conftest import Corpus


@pytest.fixture(scope="module")
def live_api(settings: Settings, llm_server: str) -> Iterator[str]:
    """The API served by uvicorn on a loopback port (its own app instance and event loop)."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the API did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=15)


def oai(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def test_models_and_embeddings(live_api: str, corpus: Corpus) -> None:
    client = oai(live_api, corpus.tenant.key)
    models = {m.id: m for m in client.models.list()}
    assert {"smollm2-135m-instruct", "all-minilm-l6-v2"} <= set(models)
    # The client asks for base64 by default and decodes it; ask for floats too: they must agree.
    texts = ["steam boiler inspection", "travel receipts"]
    b64 = client.embeddings.create(model="all-minilm-l6-v2", input=texts)
    floats = client.embeddings.create(model="all-minilm-l6-v2", input=texts, encoding_format="float")
    assert [d.index for d in b64.data] == [0, 1] and b64.model == "all-minilm-l6-v2"
    for a, b in zip(b64.data, floats.data, strict=True):
        assert len(a.embedding) == 384
        assert max(abs(x - y) for x, y in zip(a.embedding, b.embedding, strict=True)) < 1e-6
        assert abs(sum(x * x for x in a.embedding) - 1.0) < 1e-3  # normalised
    assert b64.usage.prompt_tokens > 0
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="text-embedding-3-small", input="x")


def test_chat_completions_plain_streamed_and_grounded(live_api: str, corpus: Corpus) -> None:
    client = oai(live_api, corpus.tenant.key)
    msgs = [{"role": "user", "content": "Reply with one word: hello"}]
    done = client.chat.completions.create(
        model="smollm2-135m-instruct", messages=msgs, max_tokens=8, temperature=0
    )
    assert done.choices[0].message.role == "assistant" and done.choices[0].message.content
    assert done.usage is not None and done.usage.completion_tokens > 0
    pieces = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model="smollm2-135m-instruct", messages=msgs, max_tokens=8, temperature=0, stream=True
        )
        if c.choices
    ]
    assert "".join(pieces).strip()

    grounded = client.chat.completions.create(
        model="smollm2-135m-instruct",
        messages=[{"role": "user", "content": "How often must the steam boiler be inspected?"}],
        max_tokens=40,
        extra_body={"grounding": {"enabled": True}},
    )
    citations = (grounded.model_extra or {})["citations"]
    assert citations and {c["document_id"] for c in citations} <= set(corpus.ids.values())
    assert corpus.ids["boiler"] in {c["document_id"] for c in citations}
    # Tenant B, same question: never A's documents.
    other = oai(live_api, corpus.other.key).chat.completions.create(
        model="smollm2-135m-instruct",
        messages=[{"role": "user", "content": "How often must the steam boiler be inspected?"}],
        max_tokens=16,
        extra_body={"grounding": {"enabled": True}},
    )
    other_docs = {c["document_id"] for c in (other.model_extra or {})["citations"]}
    assert other_docs and other_docs.isdisjoint(corpus.ids.values())
    # Grounded streaming ends with the citations in the last chunk.
    chunks = list(
        client.chat.completions.create(
            model="smollm2-135m-instruct",
            messages=[{"role": "user", "content": "How long are backups with personal data kept?"}],
            max_tokens=24,
            stream=True,
            extra_body={"grounding": {"enabled": True}},
        )
    )
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert corpus.ids["privacy"] in {c["document_id"] for c in (chunks[-1].model_extra or {})["citations"]}


def test_errors_reach_the_client_as_its_own_exceptions(live_api: str, corpus: Corpus) -> None:
    with pytest.raises(openai.AuthenticationError):
        oai(live_api, "apl_000000000000_" + "x" * 43).models.list()
    key = corpus.tenant.key
    wrong_secret = key[:-1] + ("y" if key.endswith("x") else "x")
    with pytest.raises(openai.AuthenticationError):  # authenticated inside the request's transaction
        oai(live_api, wrong_secret).embeddings.create(model="all-minilm-l6-v2", input="x")
    client = oai(live_api, corpus.tenant.key)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="smollm2-135m-instruct", messages=[])
    r = httpx.post(f"{live_api}/v1/chat/completions", json={"model": "smollm2-135m-instruct", "messages": []})
    assert r.status_code == 401 and r.headers["content-type"].startswith("application/problem+json")
