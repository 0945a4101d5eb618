"""The embedding runtime on the real shipped model: shape, norm, determinism, limits, integrity, threads."""

from __future__ import annotations

import math
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from appliance.inference.embedding import Embedder, LlamaEmbedder, get_embedder
from appliance.inference.manifest import ModelIntegrityError, get_model, model_path
from appliance.settings import get_settings

PASSAGE = (
    "The committee reviewed the quarterly report and found that operating costs had risen faster than "
    "revenue, mostly because of higher energy prices and the delayed opening of the northern warehouse."
)


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="session")
def embedder() -> LlamaEmbedder:
    # The process-wide instance: loaded once per test session, shared with tests/ingest.
    return get_embedder(get_settings())


def test_manifest_model_shape(embedder: LlamaEmbedder) -> None:
    assert isinstance(embedder, Embedder)
    assert embedder.name == "all-minilm-l6-v2"
    assert embedder.dimensions == 384
    assert embedder.max_tokens == 256
    [vec] = embedder.embed([PASSAGE])
    assert len(vec) == 384
    assert all(isinstance(x, float) and math.isfinite(x) for x in vec)


def test_vectors_are_unit_norm(embedder: LlamaEmbedder) -> None:
    for vec in embedder.embed(["hello", PASSAGE, "Ünïcödé café, 日本語のテキスト。"]):
        assert math.isclose(math.sqrt(_dot(vec, vec)), 1.0, abs_tol=1e-5)


def test_deterministic(embedder: LlamaEmbedder) -> None:
    assert embedder.embed([PASSAGE, "a second text"]) == embedder.embed([PASSAGE, "a second text"])


def test_similar_scores_higher_than_unrelated(embedder: LlamaEmbedder) -> None:
    query, similar, unrelated = embedder.embed(
        [
            "How do I reset my account password?",
            "Steps to change a forgotten login password.",
            "The recipe needs two cups of flour and a pinch of salt.",
        ]
    )
    assert _dot(query, similar) > _dot(query, unrelated) + 0.2


def test_list_call_equals_one_by_one(embedder: LlamaEmbedder) -> None:
    texts = [PASSAGE, "short", "Another sentence about invoices and delivery times.", PASSAGE]
    together = embedder.embed(texts)
    one_by_one = [embedder.embed([t])[0] for t in texts]
    assert together == one_by_one
    assert embedder.embed([]) == []


def test_tokenize_is_the_models_wordpiece_without_special_tokens(embedder: LlamaEmbedder) -> None:
    assert embedder.tokenize("Hello world.") == [7592, 2088, 1012]  # no [CLS]=101 / [SEP]=102
    assert embedder.count_tokens("Hello world.") == 3
    assert embedder.tokenize("") == []
    assert embedder.tokenize("[SEP]") != [102]  # user text never becomes a special token


def test_input_over_max_tokens_raises_and_embeds_nothing(embedder: LlamaEmbedder) -> None:
    fits = " ".join(["hello"] * embedder.max_tokens)
    over = fits + " hello"
    assert embedder.count_tokens(fits) == embedder.max_tokens
    assert len(embedder.embed([fits])[0]) == 384
    with pytest.raises(ValueError, match="257 tokens"):
        embedder.embed([over])
    with pytest.raises(ValueError, match="input 1 "):
        embedder.embed(["fine", over])


def test_input_without_tokens_raises(embedder: LlamaEmbedder) -> None:
    for text in ("", "   \n\t", "\u200b"):
        with pytest.raises(ValueError, match="no tokens"):
            embedder.embed([text])


def test_thread_safe(embedder: LlamaEmbedder) -> None:
    texts = [f"{PASSAGE} Item number {i}." for i in range(8)]
    expected = embedder.embed(texts)
    tokens = [embedder.tokenize(t) for t in texts]
    with ThreadPoolExecutor(max_workers=4) as pool:
        # Tokenising takes no lock: run it alongside the embeddings, as chunking does in a worker.
        tokenized = pool.submit(lambda: [embedder.tokenize(t) for t in texts * 50])
        got = list(pool.map(lambda t: embedder.embed([t])[0], texts * 2))
        assert tokenized.result() == tokens * 50
    assert got == expected * 2


def test_get_embedder_loads_once_per_process(embedder: LlamaEmbedder) -> None:
    assert get_embedder(get_settings()) is embedder


def test_flash_attention_matches_the_plain_path(embedder: LlamaEmbedder) -> None:
    with LlamaEmbedder.from_manifest(get_settings().models_dir, flash_attn=False, n_threads=1) as plain:
        for a, b in zip(embedder.embed([PASSAGE, "hello"]), plain.embed([PASSAGE, "hello"]), strict=True):
            assert _dot(a, b) > 0.99999


@pytest.fixture
def models_copy(tmp_path: Path) -> Path:
    """A models directory with the manifest and a copy of the embedding model's GGUF."""
    src = get_settings().models_dir
    spec = get_model(src, purpose="embedding")
    (tmp_path / "gguf").mkdir()
    shutil.copy(src / "manifest.toml", tmp_path / "manifest.toml")
    shutil.copy(model_path(spec, src), model_path(spec, tmp_path))
    return tmp_path


def test_loader_accepts_an_intact_copy(models_copy: Path) -> None:
    with LlamaEmbedder.from_manifest(models_copy, n_threads=1) as copy:
        assert copy.dimensions == 384


def test_loader_refuses_a_tampered_copy(models_copy: Path) -> None:
    path = model_path(get_model(models_copy, purpose="embedding"), models_copy)
    with open(path, "r+b") as fh:  # flip one byte in the middle of the weights: same size, other hash
        fh.seek(path.stat().st_size // 2)
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ModelIntegrityError, match="sha256 mismatch"):
        LlamaEmbedder.from_manifest(models_copy)


def test_loader_refuses_a_missing_file(models_copy: Path) -> None:
    model_path(get_model(models_copy, purpose="embedding"), models_copy).unlink()
    with pytest.raises(ModelIntegrityError, match="missing"):
        LlamaEmbedder.from_manifest(models_copy)
