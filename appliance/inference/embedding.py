"""The embedding runtime: one small interface (`Embedder`) and its llama.cpp implementation.

`LlamaEmbedder` loads the manifest's GGUF embedding model through `verified_path` (so a file whose sha256
does not match is never loaded) and embeds one passage per llama.cpp call: on CPU that is faster than
packing several passages into one batch (llama.cpp attends over the whole batch and masks, so the
attention cost grows with the batch; `bench/embed_throughput.py` measures both patterns), and with
flash attention on, which is faster still.

Threading: **one model instance per process** (`get_embedder`), shared by the process's threads. A lock
serialises calls into the llama.cpp context, which is not thread-safe; llama.cpp's own threads (`n_threads`)
do the parallel work inside each call, and ctypes releases the GIL meanwhile, so other Python threads run.
Tokenising only reads the vocabulary and takes no lock (llama-server tokenises on its HTTP threads while
its main loop decodes), so chunking in one thread never waits for an embedding running in another.

Inputs longer than `max_tokens` raise `ValueError`: the chunker guarantees chunks fit, and silently
truncating would index text that the vector does not represent.
"""

from __future__ import annotations

import atexit
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from appliance.inference.manifest import ManifestError, ModelSpec, get_model, verified_path

if TYPE_CHECKING:
    from appliance.settings import Settings

MIN_N_CTX = 512  # BERT-style models failed to load with n_ctx below 512 in llama.cpp


@runtime_checkable
class Embedder(Protocol):
    """What ingest and search need from an embedding model, whatever the runtime."""

    name: str
    dimensions: int
    max_tokens: int  # the most tokens (as `tokenize` counts them) one `embed` input may have

    def tokenize(self, text: str) -> list[int]:
        """The model's own token ids for `text`, without special tokens ([CLS]/[SEP], BOS/EOS)."""
        ...

    def count_tokens(self, text: str) -> int: ...

    def embed(self, texts: list[str]) -> list[list[float]]:
        """One L2-normalised vector per text, in order; `ValueError` if a text has more than `max_tokens`."""
        ...


def _pooling_type(spec: ModelSpec) -> int:
    import llama_cpp

    pooling = spec.params.get("pooling")
    if pooling is None:
        return int(llama_cpp.LLAMA_POOLING_TYPE_UNSPECIFIED)  # whatever the GGUF metadata says
    table = {"mean": llama_cpp.LLAMA_POOLING_TYPE_MEAN, "cls": llama_cpp.LLAMA_POOLING_TYPE_CLS}
    if pooling not in table:
        raise ManifestError(f"model {spec.name}: unknown pooling {pooling!r} (expected 'mean' or 'cls')")
    return int(table[pooling])


def _int_param(spec: ModelSpec, key: str, default: int | None = None) -> int:
    value = spec.params.get(key, default)
    if value is None or isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ManifestError(f"model {spec.name}: '{key}' must be a positive integer, got {value!r}")
    return value


def available_cpus() -> int:
    """CPUs this process may run on (cgroup/affinity aware where the OS tells)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class LlamaEmbedder:
    """A GGUF embedding model run by llama-cpp-python. Thread-safe; load one per process."""

    def __init__(self, llama: Any, *, name: str, dimensions: int, max_tokens: int) -> None:
        self._llama = llama
        self._lock = threading.Lock()
        self.name = name
        self.dimensions = dimensions
        self.max_tokens = max_tokens

    @classmethod
    def from_manifest(
        cls,
        models_dir: Path,
        name: str | None = None,
        *,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
        flash_attn: bool = True,
    ) -> LlamaEmbedder:
        """Load the manifest's embedding model (or the one named), after its sha256 check.

        `n_threads` defaults to every CPU this process may use (the worker runs one model per process);
        `n_gpu_layers=-1` offloads every layer where llama.cpp was built with a GPU backend.
        `flash_attn`: llama.cpp's fused attention, ~20 % faster on CPU here for MiniLM, vectors within
        cosine 0.999999 of the plain path (bench/embed_throughput.py measures both).
        """
        import llama_cpp

        spec = get_model(models_dir, name=name, purpose="embedding")
        dimensions = _int_param(spec, "dimensions")
        max_tokens = _int_param(spec, "max_tokens")
        n_ctx = max(MIN_N_CTX, _int_param(spec, "n_ctx", MIN_N_CTX))
        pooling_type = _pooling_type(spec)
        threads = n_threads or available_cpus()
        path = verified_path(spec, models_dir)
        llama = llama_cpp.Llama(
            model_path=str(path),
            embedding=True,
            n_ctx=n_ctx,
            n_batch=n_ctx,  # a whole passage is one batch: an encoder cannot split a sequence
            n_ubatch=n_ctx,
            pooling_type=pooling_type,
            n_threads=threads,
            n_threads_batch=threads,  # a passage is a prompt batch: this is the count that does the work
            n_gpu_layers=n_gpu_layers,
            flash_attn=flash_attn,
            verbose=False,
        )
        try:
            got = int(llama.n_embd())
            if got != dimensions:
                raise ManifestError(
                    f"model {spec.name}: the manifest says {dimensions} dimensions, the file {got}"
                )
            # [CLS] ... [SEP] (or BOS/EOS) go around every input: they must fit in the context too.
            n_special = len(llama.tokenize(b"", add_bos=True, special=False))
            if max_tokens + n_special > n_ctx:
                raise ManifestError(
                    f"model {spec.name}: max_tokens {max_tokens} + {n_special} special tokens > n_ctx {n_ctx}"
                )
        except BaseException:
            llama.close()
            raise
        return cls(llama, name=spec.name, dimensions=dimensions, max_tokens=max_tokens)

    def tokenize(self, text: str) -> list[int]:
        # No lock: tokenising reads the vocabulary only (see the module docstring).
        tokens: list[int] = self._llama.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        return tokens

    def count_tokens(self, text: str) -> int:
        return len(self.tokenize(text))

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        # Check every input before spending time on any: a bad batch fails whole and fast.
        for i, text in enumerate(texts):
            n = self.count_tokens(text)
            if n > self.max_tokens:
                raise ValueError(
                    f"input {i} has {n} tokens, more than {self.name}'s max_tokens {self.max_tokens}: "
                    "chunk it first"
                )
            if n == 0:
                raise ValueError(f"input {i} has no tokens: nothing to embed")
        vectors: list[list[float]] = []
        for text in texts:
            # One passage per call (faster on CPU, see the module docstring); the lock is taken per
            # passage so a short query from another thread waits for one passage, not a whole batch.
            with self._lock:
                vector = self._llama.embed(text, normalize=True, truncate=False)
            vectors.append(vector)
        return vectors

    def close(self) -> None:
        with self._lock:
            self._llama.close()

    def __enter__(self) -> LlamaEmbedder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# One embedder per process --------------------------------------------------------------------------

_cache: dict[tuple[int, Path, str | None], LlamaEmbedder] = {}
_cache_lock = threading.Lock()


def get_embedder(settings: Settings, name: str | None = None) -> LlamaEmbedder:
    """The process's embedder for `settings.models_dir`, loaded (and sha256-checked) on first use.

    Keyed by process id too: a child forked after the parent loaded the model loads its own instead of
    sharing a llama.cpp context across processes.
    """
    name = name or get_model(settings.models_dir, name=settings.embedding_model, purpose="embedding").name
    key = (os.getpid(), Path(settings.models_dir).resolve(), name)
    embedder = _cache.get(key)
    if embedder is not None:
        return embedder
    with _cache_lock:  # two threads asking at once load the model once
        embedder = _cache.get(key)
        if embedder is None:
            embedder = LlamaEmbedder.from_manifest(
                settings.models_dir,
                name,
                n_threads=settings.embedding_threads,
                n_gpu_layers=settings.embedding_gpu_layers,
            )
            _cache[key] = embedder
        return embedder


def loaded_embedder(settings: Settings, name: str) -> LlamaEmbedder | None:
    """The process's embedder `name` if it is loaded already (no disk, no lock: callable on an event loop)."""
    return _cache.get((os.getpid(), Path(settings.models_dir).resolve(), name))


@atexit.register
def _close_all() -> None:
    # Close before interpreter shutdown tears down llama_cpp's module globals, which makes
    # Llama.__del__ fail noisily ("'NoneType' object is not callable").
    for key, embedder in list(_cache.items()):
        if key[0] == os.getpid():
            embedder.close()
    _cache.clear()
