"""llama-cpp-python loads both shipped models, through the integrity check, and they work."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import llama_cpp  # a core dependency: a missing runtime must fail, not skip
import pytest

from appliance.inference.manifest import ModelSpec, get_model, verified_path
from appliance.settings import get_settings


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


@pytest.fixture(scope="module")
def models_dir() -> Path:
    return get_settings().models_dir


@pytest.fixture(scope="module")
def embedding_spec(models_dir: Path) -> ModelSpec:
    return get_model(models_dir, purpose="embedding")


@pytest.fixture(scope="module")
def embedder(models_dir: Path, embedding_spec: ModelSpec) -> Iterator[llama_cpp.Llama]:
    path = verified_path(embedding_spec, models_dir)
    llm = llama_cpp.Llama(
        model_path=str(path),
        embedding=True,
        n_ctx=int(embedding_spec.params.get("n_ctx", 512)),
        verbose=False,
    )
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def chat(models_dir: Path) -> Iterator[llama_cpp.Llama]:
    spec = get_model(models_dir, purpose="chat")
    path = verified_path(spec, models_dir)
    n_ctx = int(spec.params.get("n_ctx", 2048))
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, verbose=False, seed=0)
    yield llm
    llm.close()


def test_embedding_is_unit_norm_with_manifest_dimensions(
    embedder: llama_cpp.Llama, embedding_spec: ModelSpec
) -> None:
    vec = embedder.embed("hello world", normalize=True)
    assert isinstance(vec, list)
    assert len(vec) == embedding_spec.params["dimensions"] == 384
    assert all(isinstance(x, float) and math.isfinite(x) for x in vec)
    assert math.isclose(math.sqrt(sum(x * x for x in vec)), 1.0, abs_tol=1e-3)


def test_similar_sentence_scores_higher(embedder: llama_cpp.Llama) -> None:
    query = embedder.embed("How do I reset my account password?", normalize=True)
    similar = embedder.embed("Steps to change a forgotten login password.", normalize=True)
    unrelated = embedder.embed("The recipe needs two cups of flour and a pinch of salt.", normalize=True)
    near, far = _cosine(query, similar), _cosine(query, unrelated)
    assert near > far + 0.2, (near, far)


def test_chat_model_completes_a_short_prompt(chat: llama_cpp.Llama) -> None:
    out = chat.create_chat_completion(
        messages=[
            {"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": "Name one colour of the rainbow."},
        ],
        max_tokens=8,
        temperature=0.0,
    )
    choice = out["choices"][0]
    text = choice["message"]["content"] or ""
    assert text.strip(), out
    assert out["usage"]["completion_tokens"] <= 8
    assert choice["finish_reason"] in ("stop", "length")
