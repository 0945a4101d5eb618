"""Search latency at scale: HTTP against direct Postgres, and HNSW recall@10, on synthetic chunks.

    .venv/bin/python bench/search_latency.py --chunks 100000 [--chunks 1000000] [--queries 200]
        [--concurrency 1,8] [--ef-search 40,100] [--ef-curve 10,20,40,64,100,200]
        [--real-queries 100] [--fulltext-queries N] [--paced-ms 7] [--exact-check 10] [--api-workers N]
        [--m M] [--ef-construction N] [--build-workers N] [--curve-only] [--seed 1] [--keep-home | --home DIR]

Starts `appliance up --detach` in a throw-away home on free loopback ports (as bench/ingest.py does;
always `appliance down` at the end, also on errors, Ctrl-C and SIGTERM; the home is removed unless
--keep-home), creates a tenant and a viewer key, loads `--chunks` synthetic chunks straight into its
database, and measures search. Repeating --chunks grows the same database (100k, then 900k more).

Data (deterministic in --seed; a larger run starts with the rows of a smaller one)
- Documents: `--chunks-per-doc` (10) chunks each; one `documents` row and one `document_versions`
  row (version 1, `ready`, unique sha256 and object key; no object is stored: search never reads it).
- Vectors, 384-d, like sentence embeddings rather than uniform noise: a Gaussian mixture of
  `--topics` (4096) centroids, each a random direction plus a shared direction (norm 0.45: real
  embeddings sit in a cone), normalised; a document = its topic's centroid + N(0, 0.4^2 Σ); a chunk =
  its document + N(0, 0.7^2 Σ), normalised. Σ is diagonal with a decaying spectrum (variance of
  dimension i ∝ 1/i, trace 1), so the data has a low effective dimension as real embeddings do.
  Topics are picked with probability ∝ (j + 1)^-0.5. Calibrated against 1,500 SciFact passages (first
  80 words) and its 300 queries embedded by the appliance's all-MiniLM-L6-v2 (1,500 points each,
  one chunk per document):

      statistic                                SciFact + MiniLM   this mixture
      random-pair cosine, mean ± sd            0.11 ± 0.12        0.08 ± 0.20
      norm of the mean vector                  0.34               0.28
      nearest neighbour cosine: 1st, 10th      0.61, 0.43         0.55, 0.43
      query's 1st, 10th neighbour cosine       0.54, 0.39         0.55, 0.44
      PCA components for 50%, 90% variance     32, 158            18, 174
      local intrinsic dimension (MLE, k=20)    19                 31

  The neighbour structure matches; the mixture's local dimension is higher, so it is, if anything,
  harder for HNSW than real text (recall here is a lower bound). Chunks of one document are close
  (nearest-neighbour cosine 0.79 within a document), as adjacent passages are.
- Queries: `--queries` vectors drawn like a chunk of a new document (never a stored vector), and as
  many `--warmup` ones for warming up only.
- Text: `--words-min`..`--words-max` (60-180, about a chunk of 256 tokens) words per chunk from a
  30,000-word vocabulary of pseudo-words with Zipf frequencies (s = 1); every word is one that
  Postgres's English configuration keeps as its own lexeme, so the tsvector is computed here (binary
  COPY) and equals `to_tsvector('english', text)` exactly (checked on a sample after each load).
  Query text: 2-6 words skipping the 100 most frequent (what a stop-word list would drop) plus a
  unique tag; OR-ed as the service does, a query matches about 7% of the chunks (printed).
- `text_enc`: the chunk's text sealed with the tenant's real data key (created as the first upload
  would, `tenant_dek(create=True)`) in the chunk's own context, BlobContext(tenant, "chunk",
  document, version), as ingest seals it (about 35 µs a chunk, so every chunk gets its own blob);
  the API decrypts every result (checked on a sample after each load).
- Loading: COPY (binary for chunks), one transaction per 1,000 documents, the next batch generated
  in a thread meanwhile. COPY runs as the cluster's superuser: Postgres refuses COPY FROM into a table
  with row-level security in force, and these tables FORCE it even for their owner (everything else
  below runs as the owner or the application role). The HNSW and GIN indexes are dropped first and
  rebuilt afterwards from the migration's own definitions (pg_indexes), with `maintenance_work_mem`
  (4GB) and `--build-workers` parallel workers, then VACUUM ANALYZE; each step is timed.

Measurement, for each --ef-search value (the appliance is restarted with
APPLIANCE_SEARCH_HNSW_EF_SEARCH=<value>, which `vector_ranked` reads), after an untimed warm-up
(other queries, every path, every API worker, the embedder), at each --concurrency (that many
clients, each with its own connection, every query once):

    pg direct                    the statement `vector_ranked` sends for a search (built by the
                                 service's own `knn_statement`, so the same SQL: the k-NN, each hit's
                                 row and the tenant's wrapped data key) as the application role, so
                                 under row-level security (the tenant set once per connection),
                                 over psycopg, ef_search and iterative scans set once per
                                 connection: the database's own cost, the baseline
    pg direct, k-NN only (owner) the k-NN alone (ids and distances) as the owner, whose policy admits
                                 every row: the baseline of runs before 2026-11-26 (the row fetch and
                                 RLS it leaves out cost about 1 ms at 1M chunks)
    service in-process           one app-role transaction with RLS: `vector_ranked` fetching the rows
                                 and data key with the k-NN, then `materialize` (decryption, snippets)
    route in-process, no audit   `service.search` (model state, Redis generation/result/embedding
                                 caches) in the request's transaction
    route in-process             the same plus the route's audit record (written at commit)
    HTTP vector                  POST /api/v1/search {"mode": "vector", "top_k": 10}: all the above
                                 plus HTTP, JSON, the rate limit and authentication (one statement in
                                 the request's transaction), sent by `RawHTTP` (a minimal keep-alive
                                 client, as wrk is; the response is decoded after the clock stops)
    HTTP vector, httpx client    the same requests through httpx (what its overhead adds)
    HTTP hybrid / fulltext       the other modes, same queries (--fulltext-queries: only the first N)
    HTTP ..., real text          short English questions never seen before: the API embeds them with
                                 MiniLM (the embedding's cost; recall does not apply)
    pg direct (again)            the baseline once more: how much the machine drifted meanwhile; the
                                 target's verdict takes the faster p95 of the two direct passes
    pg direct, N ms idle before  (concurrency 1, --paced-ms, default 7) the baseline with the client
      each                       idle N ms (untimed) before each query, as the API's database
                                 connection idles while the API's Python works (~7 ms a search on
                                 this VM): an idle vCPU here makes the next query ~1.5 ms slower
                                 (halted vCPU, cold caches), which the back-to-back baseline never pays

The HTTP and route paths get exactly the synthetic vector without embedding anything: before each
run the query-embedding cache (QEMB_KEY in appliance/search/service.py: the query text's sha256 ->
float32 bytes) is filled with each synthetic query's vector, which is where `embed_query` looks
first; no API change. The result cache is bypassed by bumping the tenant's search generation before
every pass (what ingest does); a response served from it would be counted in the table ("cached!").

Recall@10 is against the exact top 10, computed once per query per size: every stored vector the
statement can return is read out (binary COPY, same filters) and ranked by cosine in numpy against
the query as the SQL receives it; for the first --exact-check queries Postgres computes it too (the
same statement with `enable_indexscan = off`: a sequential scan over every distance, 2 s a query at
1M) and the two must agree. A separate table gives recall and latency over --ef-curve (direct SQL,
concurrency 1, no restarts), with the worst query, the queries below 0.8, and how much less similar
the 10th result is than the true 10th (cos gap: whether the misses are near-ties).

Printed per size: load time (generation and sealing overlapped with COPY), index build times,
relation sizes, the exact scan's cost, the full-text match rate, the ef_search curve, one table per
ef_search (p50/p95/p99/mean ms, req/s, recall@10, p95 minus the direct p95 at the same concurrency),
and at the end the issue's target: HTTP vector p95 within 5 ms of the direct query with recall@10 >=
0.95. Latencies are client round trips measured in this process (the client shares the machine's
cores with the appliance, as a co-located app would). Postgres runs with the appliance's own
settings (shared_buffers 128MB: at 1M chunks the HNSW index, ~2 GB, is read from the page cache).

Results (2026-11-25, this 2-core VM shared with other jobs: load average 1-13 during the runs;
/var/tmp/search_latency_100k.txt and _1m.txt hold the full output; ms are p50 / p95, concurrency 1)

                                 100k chunks              1M chunks
    load (COPY) / HNSW / GIN     14 s / 20 s / 2.6 s      129 s / 223 s / 28 s (index 1.95 GiB)
    recall@10 at ef 40 / 64      0.920 / 0.949            0.837 / 0.918
    recall@10 at ef 100 / 200    0.966 / 0.988            0.974 / 0.981
    pg direct, ef 100            4.3 / 5.6                5.6 / 10.5
    service in-process, ef 100   10.2 / 11.9              10.6 / 15.6
    route, no audit / audited    13.4 / 16.5, 16.4 / 19.9 14.0 / 19.0, 17.3 / 22.9
    HTTP vector, ef 100          21.7 / 24.5              22.2 / 27.6
    HTTP vector, real text       31.6 / 41.1              34.7 / 43.5 (MiniLM embedding: ~10 ms)
    HTTP fulltext, hybrid (p50)  303, 311                 2,541, 2,556

HNSW settings: keep the migration's m = 16 and ef_construction = 64 (pgvector's defaults; 1M
chunks build in under 4 minutes with one parallel worker) and the default
APPLIANCE_SEARCH_HNSW_EF_SEARCH = 100, the smallest value tried that keeps recall@10 >= 0.95 at
both sizes (0.966 and 0.974; ef 40 gives 0.92 and 0.84, ef 64 0.95 and 0.92) for about 2 ms more
than ef 40. The misses are near-ties (the 10th result's cosine is 0.002-0.005 below the true 10th's).
More build quality buys recall at the same ef: ef_construction 128 gives 0.974 / 0.998 at ef 100 /
160 at 100k and 0.980 / 0.995 at ef 100 / 200 at 1M (where ef_construction 64 flattens at 0.981),
for 1.75x the build time (389 s at 1M); m 24 gives 0.985 at ef 100 (100k) but 1.5x the query time.
Worth it only if recall above ~0.98 matters more than re-index time.
The issue's latency target (HTTP p95 within 5 ms of the direct query) is not met: the HTTP path
adds 16-19 ms at p95 (concurrency 1) over the direct query, spread over many round trips (see the
layered rows). Full text then took 0.3 s at 100k and 2.5 s at 1M whatever the query matched: `@@`
(ts_match_vq) is not leakproof, so under the app role's row-level security Postgres could not use
the GIN index and scanned every chunk.

Again on 2026-11-26 (after migration 0006: BM25 through `app_fulltext_ranked`, which the GIN index
serves; HNSW settings as connection defaults; fewer round trips), `--chunks 100000 --chunks 1000000
--ef-search 100 --fulltext-queries 50 --real-queries 20`, p50 / p95:

                                 100k chunks              1M chunks
    pg direct, ef 100            5.0 / 6.9                6.0 / 13.1   (recall@10 0.972 / 0.967)
    service in-process           11.2 / 13.3              12.5 / 19.6
    route, no audit / audited    12.7 / 14.9, 17.0 / 20.1 14.8 / 22.4, 18.4 / 26.2
    HTTP vector                  22.8 / 25.9              24.8 / 33.8
    HTTP fulltext                99.7 / 176.6             883 / 1,666

And after the search's round trips were cut (docs/retrieval.md lists the changes), same arguments
plus `--home /var/tmp/sl1m` (/var/tmp/search_latency_run3.txt):

                                 100k chunks              1M chunks
    pg direct, ef 100            3.97 / 5.31              4.38 / 9.40  (recall@10 0.968 / 0.964)
    service in-process           7.31 / 8.87              7.16 / 12.20
    route, no audit / audited    7.83 / 9.06, 8.54 / 10.01  7.87 / 13.27, 8.76 / 13.68
    HTTP vector (RawHTTP)        11.70 / 13.33            10.95 / 15.88   (p95 +8.0 / +6.5 ms)
    HTTP vector (httpx)          12.15 / 14.26            12.02 / 17.30
    HTTP fulltext                75.5 / 131.9             651 / 1,246

With the baseline as it is now (the statement the API sends, app role under RLS), 1M chunks only,
`--home /var/tmp/sl1m --chunks 1000000 --ef-search 100 --fulltext-queries 3 --real-queries 20
--concurrency 1,8` (2026-11-26, /var/tmp/sl_s5_b.txt), concurrency 1:

    pg direct                    5.03 / 10.35   (k-NN only, owner: 4.52 / 9.35; recall@10 0.964)
    service in-process           7.98 / 13.54
    route, no audit / audited    8.38 / 13.64, 9.17 / 14.76
    HTTP vector (RawHTTP)        12.02 / 17.85   (p95 +7.50 ms; +8.50 over the k-NN alone)

Run to run, this VM moves the HTTP rows by about 1 ms (the same code gave 10.95 / 15.88 above and
11.84 / 17.31 on the morning of 2026-11-26).

Full text ranks at most the chunks holding the query's rarest words (2% of the tenant's chunks,
500..20,000, the rarest word always); these synthetic queries are its hard case, since every word is
mid-frequency (the loader prints how many chunks an OR of them matches, not how many are ranked).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import statistics
import struct
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psycopg
from psycopg.rows import namedtuple_row

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from appliance.db.engine import TENANT_GUC  # noqa: E402
from appliance.settings import Settings, load_settings  # noqa: E402
from bench.ingest import cli, free_port, sentence  # noqa: E402

DIMS = 384
TOP_K = 10
KNN_ONLY = "pg direct, k-NN only (owner)"
EMBEDDING_MODEL = "all-minilm-l6-v2"  # checked against the manifest at start

# ---------------------------------------------------------------------------------------------
# Synthetic vectors: a Gaussian mixture with a decaying spectrum (see the module docstring).


@dataclass
class Mixture:
    topics: int
    seed: int
    alpha: float = 1.0  # variance of dimension i ∝ i^-alpha
    doc_sigma: float = 0.4  # a document's offset from its topic centroid (relative norm)
    chunk_sigma: float = 0.7  # a chunk's offset from its document (relative norm)
    common: float = 0.45  # norm of the direction every embedding shares (anisotropy)
    topic_skew: float = 0.5  # topic j is picked with probability ∝ (j + 1)^-topic_skew
    scale: np.ndarray = field(init=False, repr=False)
    centroids: np.ndarray = field(init=False, repr=False)
    weights: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        rng = np.random.default_rng([self.seed, 0])
        var = np.arange(1, DIMS + 1, dtype=np.float64) ** -self.alpha
        self.scale = np.sqrt(var / var.sum()).astype(np.float32)  # E|scale * N(0, I)|^2 = 1
        mean = np.zeros(DIMS, dtype=np.float32)
        mean[0] = 1.0
        c = self.noise(rng, self.topics) + self.common * mean
        self.centroids = (c / np.linalg.norm(c, axis=1, keepdims=True)).astype(np.float32)
        w = np.arange(1, self.topics + 1, dtype=np.float64) ** -self.topic_skew
        self.weights = w / w.sum()

    def noise(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return (rng.standard_normal((n, DIMS), dtype=np.float32) * self.scale).astype(np.float32)

    def documents(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """A centre (topic centroid + document offset) for each of `n` documents."""
        topics = rng.choice(self.topics, size=n, p=self.weights)
        return self.centroids[topics] + self.doc_sigma * self.noise(rng, n)

    def chunks(self, rng: np.random.Generator, centres: np.ndarray) -> np.ndarray:
        """One unit vector around each given document centre."""
        v = centres + self.chunk_sigma * self.noise(rng, len(centres))
        return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Synthetic text: pseudo-words (each its own English lexeme), Zipf-distributed.

ONSETS = [*"bcdfghjklmnprstvwz", "br", "cr", "dr", "fl", "gr", "kl", "pr", "st", "tr", "sk", "sp", "ch", "sh"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ou", "ea", "io"]
CODAS = ["", "", "", "n", "r", "l", "m", "k", "x", "nd", "rt", "lk"]


def pseudo_words(rng: np.random.Generator, n: int) -> list[str]:
    words: dict[str, None] = {}
    while len(words) < n:
        syl = int(rng.integers(2, 4))
        w = "".join(
            ONSETS[rng.integers(len(ONSETS))]
            + VOWELS[rng.integers(len(VOWELS))]
            + CODAS[rng.integers(len(CODAS))]
            for _ in range(syl)
        )
        words.setdefault(w)
    return list(words)


@dataclass
class Vocabulary:
    words: list[str]  # rank order: words[0] is the most frequent
    cdf: np.ndarray
    encoded: list[bytes]  # the tsvector binary lexeme (NUL-terminated)

    def draw(self, rng: np.random.Generator, n: int, *, skip_head: int = 0) -> np.ndarray:
        lo = self.cdf[skip_head - 1] if skip_head else 0.0
        idx = np.searchsorted(self.cdf, lo + rng.random(n) * (1.0 - lo), side="right")
        return np.minimum(idx, len(self.words) - 1)


def vocabulary(conn: psycopg.Connection, size: int, zipf_s: float, seed: int) -> Vocabulary:
    """`size` pseudo-words that Postgres's English configuration keeps verbatim (no stemming, no stop
    word), so a chunk's tsvector is exactly the words' positions (checked after the load)."""
    rng = np.random.default_rng([seed, 1])
    candidates = pseudo_words(rng, int(size * 1.6))
    rows = conn.execute(
        "SELECT w, to_tsvector('english', w)::text FROM unnest(%s::text[]) AS w", [candidates]
    ).fetchall()
    kept = [w for w, tsv in rows if tsv == f"'{w}':1"][:size]
    if len(kept) < size:
        raise SystemExit(f"only {len(kept)} pseudo-words survive the English stemmer; wanted {size}")
    p = np.arange(1, size + 1, dtype=np.float64) ** -zipf_s
    cdf = np.cumsum(p / p.sum())
    cdf[-1] = 1.0
    return Vocabulary(kept, cdf, [w.encode() + b"\0" for w in kept])


# ---------------------------------------------------------------------------------------------
# Rows, as binary COPY.

COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
COPY_TRAILER = struct.pack(">h", -1)
NULL = struct.pack(">i", -1)
_I32 = struct.Struct(">ii")  # length 4, value
_LEN = struct.Struct(">i")
_UUID_HEAD = _LEN.pack(16)
_VECTOR_HEAD = _LEN.pack(4 + 4 * DIMS) + struct.pack(">HH", DIMS, 0)
CHUNK_COLUMNS = (
    "tenant_id, document_id, version_id, ordinal, text_enc, char_start, char_end, page_start, page_end, "
    "token_count, embedding, embedding_model, tsv"
)


def tsvector_binary(words: np.ndarray, vocab: Vocabulary) -> bytes:
    """tsvector_recv's format: int32 count, then per lexeme: text NUL, uint16 npos, uint16 positions."""
    positions: dict[int, list[int]] = {}
    for pos, w in enumerate(words.tolist(), 1):
        positions.setdefault(w, []).append(pos)
    parts = [_LEN.pack(len(positions))]
    enc = vocab.encoded
    for w, at in positions.items():
        parts.append(enc[w])
        parts.append(struct.pack(f">H{len(at)}H", len(at), *at))
    body = b"".join(parts)
    return _LEN.pack(len(body)) + body


@dataclass
class Batch:
    documents: list[tuple[uuid.UUID, str]]
    versions: list[tuple[Any, ...]]
    chunks: bytes  # binary COPY tuples (no signature or trailer)
    count: int
    samples: list[tuple[uuid.UUID, int, str]]  # (version_id, ordinal, text) to check after the load


def make_batch(
    first_doc: int,
    n_docs: int,
    per_doc: int,
    tenant: uuid.UUID,
    dek: bytes,
    mix: Mixture,
    vocab: Vocabulary,
    words: tuple[int, int],
    seed: int,
) -> Batch:
    """Documents first_doc .. first_doc + n_docs - 1, each with `per_doc` chunks (deterministic in
    the seed and the document numbers, so a larger run starts with the same rows as a smaller one)."""
    from appliance.keys.envelope import BlobContext, seal_bytes

    rng = np.random.default_rng([seed, 2, first_doc])
    centres = mix.documents(rng, n_docs)
    vecs = mix.chunks(rng, np.repeat(centres, per_doc, axis=0)).astype(">f4")
    lengths = rng.integers(words[0], words[1] + 1, size=n_docs * per_doc)
    all_words = vocab.draw(rng, int(lengths.sum()))
    ids = rng.bytes(32 * n_docs)
    tenant_field = _UUID_HEAD + tenant.bytes
    model_field = _LEN.pack(len(EMBEDDING_MODEL)) + EMBEDDING_MODEL.encode()
    docs, versions, out, samples = [], [], [], []
    k = offset = 0
    for d in range(n_docs):
        doc_id = uuid.UUID(bytes=ids[32 * d : 32 * d + 16], version=4)
        ver_id = uuid.UUID(bytes=ids[32 * d + 16 : 32 * d + 32], version=4)
        n = first_doc + d
        docs.append((doc_id, f"Synthetic document {n}"))
        ctx = BlobContext(tenant, "chunk", doc_id, ver_id)
        doc_field, ver_field = _UUID_HEAD + doc_id.bytes, _UUID_HEAD + ver_id.bytes
        char = 0
        for ordinal in range(per_doc):
            w = all_words[offset : offset + lengths[k]]
            offset += int(lengths[k])
            text = " ".join(vocab.words[i] for i in w.tolist())
            blob = seal_bytes(dek, ctx, text.encode())
            out += [
                b"\x00\x0d",
                tenant_field,
                doc_field,
                ver_field,
                _I32.pack(4, ordinal),
                _LEN.pack(len(blob)),
                blob,
                _I32.pack(4, char),
                _I32.pack(4, char + len(text)),
                NULL,
                NULL,
                _I32.pack(4, round(1.3 * len(w))),
                _VECTOR_HEAD,
                vecs[k].tobytes(),
                model_field,
                tsvector_binary(w, vocab),
            ]
            if n % 997 == 0 and ordinal == 0:
                samples.append((ver_id, ordinal, text))
            char += len(text) + 1
            k += 1
        versions.append(
            (
                ver_id,
                tenant,
                doc_id,
                1,
                hashlib.sha256(ver_id.bytes).digest(),
                char,
                "text/plain",
                f"synthetic-{n:07d}.txt",
                f"bench/{ver_id}",
                char,
                "ready",
                char,
            )
        )
    return Batch(docs, versions, b"".join(out), k, samples)


# ---------------------------------------------------------------------------------------------
# Queries.


@dataclass
class Queries:
    vectors: np.ndarray  # float32, unit
    texts: list[str]  # distinct synthetic texts; the query-embedding cache maps each to its vector


def make_queries(mix: Mixture, vocab: Vocabulary, n: int, seed: int, tag: str) -> Queries:
    """Vectors from the same mixture (a chunk of a new document: never a stored vector) and 2-6
    vocabulary words each, skipping the 100 most frequent (the head a stop-word list would drop)."""
    rng = np.random.default_rng([seed, 3, sum(tag.encode())])
    vectors = mix.chunks(rng, mix.documents(rng, n))
    texts = []
    for i in range(n):
        w = vocab.draw(rng, int(rng.integers(2, 7)), skip_head=100)
        texts.append(" ".join(vocab.words[j] for j in w.tolist()) + f" q{tag}{i}")
    return Queries(vectors, texts)


def real_texts(n: int, seed: int, taken: set[str]) -> list[str]:
    """`n` distinct short English questions, none used before in this run (`Context.forget` drops
    their cached embeddings from earlier runs on the same home)."""
    import random

    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < n:
        words = re.sub(r"[^\w\s]", "", sentence(rng)).lower().split()
        text = " ".join(words[: rng.randint(5, 12)])
        if text not in taken:
            taken.add(text)
            out.append(text)
    return out


# ---------------------------------------------------------------------------------------------
# Measurement.


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


@dataclass
class PassResult:
    name: str
    concurrency: int
    latencies_ms: list[float]
    wall_s: float
    ids: dict[int, list[int]] = field(default_factory=dict)
    sims: dict[int, list[float]] = field(default_factory=dict)  # cosine similarities (direct only)
    errors: int = 0
    cached: int = 0
    note: str = ""

    def recall(self, exact: list[list[int]]) -> float | None:
        if not self.ids:
            return None
        return statistics.fmean(
            len(set(self.ids[i][:TOP_K]) & set(exact[i])) / max(len(exact[i]), 1) for i in self.ids
        )


async def run_pass(
    name: str,
    n: int,
    concurrency: int,
    open_worker: Callable[[], Awaitable[Any]],
    close_worker: Callable[[Any], Awaitable[None]],
    call: Callable[[Any, int], Awaitable[tuple[Any, ...]]],
    *,
    pause_s: float = 0.0,
) -> PassResult:
    """Every item 0 .. n-1 once, by `concurrency` workers; each latency is one call's round trip.
    `call` returns (ids, cached) or (ids, cached, done_at): when the answer was in (perf_counter), if
    checking it afterwards (decoding JSON) is not part of the latency. `pause_s`: an untimed pause
    before each call."""
    workers = [await open_worker() for _ in range(concurrency)]
    res = PassResult(name, concurrency, [], 0.0)
    todo = list(range(n - 1, -1, -1))

    async def loop(w: Any) -> None:
        while todo:
            i = todo.pop()
            if pause_s:
                await asyncio.sleep(pause_s)
            t0 = time.perf_counter()
            try:
                out = await call(w, i)
            except Exception as exc:  # noqa: BLE001 - counted and shown, the pass goes on
                res.errors += 1
                if res.errors <= 3:
                    print(f"    {name}: {type(exc).__name__}: {str(exc)[:300]}")
                continue
            done = out[2] if len(out) > 2 else time.perf_counter()
            ids, cached = out[0], out[1]
            res.latencies_ms.append(1000 * (done - t0))
            res.cached += cached
            if ids is not None:
                res.ids[i] = ids

    try:
        start = time.perf_counter()
        await asyncio.gather(*(loop(w) for w in workers))
        res.wall_s = time.perf_counter() - start
    finally:
        for w in workers:
            await close_worker(w)
    return res


def pg_url(settings: Settings, *, owner: bool) -> str:
    url = settings.owner_database_url if owner else settings.app_database_url
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def superuser_connect(settings: Settings) -> psycopg.Connection:
    """The cluster's superuser (BYPASSRLS), for COPY only: Postgres refuses COPY FROM into a table
    with row-level security in force, and these tables FORCE it even for their owner."""
    assert settings.pg_superuser_password is not None
    return psycopg.connect(
        host=settings.pg_host,
        port=settings.pg_port,
        dbname=settings.pg_database,
        user=settings.pg_superuser,
        password=settings.pg_superuser_password.get_secret_value(),
    )


# ---------------------------------------------------------------------------------------------
# The appliance and the database.

PREWARM_DONE = re.compile(r"autoprewarm successfully prewarmed (\d+) of (\d+) previously-loaded blocks")


def prewarm_watch(home: Path, timeout_s: float = 600.0) -> Callable[[], tuple[float, str] | None]:
    """Call just before `appliance up`; the `wait()` it returns, called after `up`, blocks until
    Postgres's autoprewarm has read its shared buffers back (the line it logs when done, written after
    this call) and returns (seconds waited, "N of M blocks"), or None when there was nothing to read
    back (no dump file).

    Measure only after it: the appliance serves while autoprewarm reads (at 1M chunks here 771,000
    blocks, 6 GB, in 1 to 70 s), and meanwhile the disk is busy, so a write transaction's commit (a
    search's audit record) waits behind the reads: p50 2.5 ms and p95 25-30 ms instead of 0.5 / 0.7
    (2026-11-27). A pass in that window measures the restart, not the search."""
    log = home / "logs" / "postgres.log"
    pending = (home / "postgres" / "data" / "autoprewarm.blocks").exists()
    offset = log.stat().st_size if log.exists() else 0

    def wait() -> tuple[float, str] | None:
        if not pending:
            return None
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout_s:
            with log.open("rb") as f:
                f.seek(offset)
                found = PREWARM_DONE.search(f.read().decode(errors="replace"))
            if found:
                return time.perf_counter() - t0, f"{int(found[1]):,} of {int(found[2]):,} blocks"
            time.sleep(0.5)
        raise SystemExit(f"autoprewarm did not finish within {timeout_s:.0f} s (watching {log})")

    return wait


class Appliance:
    """A throw-away appliance on free loopback ports; restarted to change the ef_search setting."""

    def __init__(self, home: Path, api_workers: int | None, ports: dict[str, int] | None = None) -> None:
        self.home = home
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
        ports = ports or {name: free_port() for name in ("api_port", "pg_port", "redis_port", "llm_port")}
        self.ports = ports
        self.env.update(
            {f"APPLIANCE_{k.upper()}": str(v) for k, v in ports.items()}, APPLIANCE_HOME=str(home)
        )
        # The limiter stays in the path (its Redis round trip is part of a search) but must not trip:
        # a pass sends more than the default 1,200 searches a minute per key.
        self.env.update(
            APPLIANCE_RATE_LIMIT_SEARCH="1000000/minute", APPLIANCE_TENANT_RATE_LIMIT_SEARCH="1000000/minute"
        )
        if api_workers is not None:
            self.env["APPLIANCE_API_WORKERS"] = str(api_workers)
        self.url = f"http://127.0.0.1:{ports['api_port']}"
        self.running = False
        self.ef: int | None = None

    def settings(self) -> Settings:
        overrides = {
            k.removeprefix("APPLIANCE_").lower(): v for k, v in self.env.items() if k.startswith("APPLIANCE_")
        }
        overrides.pop("home")
        if self.ef is not None:
            overrides["search_hnsw_ef_search"] = str(self.ef)
        return load_settings(home=self.home, **overrides)

    def up(self, ef: int) -> tuple[str, float]:
        """Start the appliance and return once Postgres's autoprewarm has read its buffers back (see
        `prewarm_watch`); the seconds returned include that wait, which is printed."""
        self.ef = ef
        env = dict(self.env, APPLIANCE_SEARCH_HNSW_EF_SEARCH=str(ef))
        t0 = time.perf_counter()
        self.running = True  # a failed start may have left servers behind: `down` them either way
        wait_for_prewarm = prewarm_watch(self.home)
        out = cli(env, "up", "--detach", "--timeout", "300")
        if out.returncode:
            raise SystemExit(f"appliance up failed:\n{out.stdout}{out.stderr}")
        prewarm = wait_for_prewarm()
        if prewarm is not None:
            print(f"  autoprewarm: {prewarm[1]} read back {prewarm[0]:.0f} s after `up` returned")
        return out.stdout, time.perf_counter() - t0

    def down(self) -> None:
        if not self.running:
            return
        out = cli(self.env, "down")
        if out.returncode:
            print(f"appliance down failed:\n{out.stdout}{out.stderr}", file=sys.stderr)
        self.running = False


def create_tenant(url: str, system_key: str) -> tuple[uuid.UUID, str]:
    """A new tenant and a viewer key for it (search needs no more)."""
    with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {system_key}"}) as c:
        r = c.post("/api/v1/tenants", json={"name": "bench-search"})
        r.raise_for_status()
        tid = r.json()["id"]
        r = c.post("/api/v1/keys", json={"name": "bench-search", "role": "viewer", "tenant_id": tid})
        r.raise_for_status()
        return uuid.UUID(tid), str(r.json()["key"])


async def tenant_data_key(settings: Settings, tenant: uuid.UUID) -> bytes:
    """The tenant's DEK, created on first use exactly as the first upload would (app role, RLS)."""
    from appliance.db.engine import Database
    from appliance.keys.keyring import Keyring
    from appliance.keys.service import tenant_dek

    db = Database(settings.app_database_url, pool_size=1)
    try:
        async with db.transaction(tenant_id=tenant) as session:
            return await tenant_dek(session, Keyring.from_settings(settings), tenant, create=True)
    finally:
        await db.dispose()


SEARCH_INDEXES = ("ix_chunks_embedding_hnsw", "ix_chunks_tsv")


def drop_search_indexes(conn: psycopg.Connection, defs: dict[str, str]) -> None:
    """Drop the HNSW and GIN indexes before a bulk load (building once afterwards is much faster),
    remembering the migration's definitions."""
    for name, indexdef in conn.execute(
        "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'chunks' AND indexname = ANY(%s)",
        [list(SEARCH_INDEXES)],
    ).fetchall():
        defs.setdefault(name, indexdef)
        conn.execute(f'DROP INDEX "{name}"')
    conn.commit()
    missing = set(SEARCH_INDEXES) - set(defs)
    if missing:
        raise SystemExit(f"chunks has no index {', '.join(sorted(missing))}: the migration changed?")


def hnsw_definition(indexdef: str, m: int | None, ef_construction: int | None) -> str:
    if m is None and ef_construction is None:
        return indexdef
    opts = (
        dict(re.findall(r"(\w+)='?(\d+)'?", indexdef.split(" WITH ", 1)[1])) if " WITH " in indexdef else {}
    )
    if m is not None:
        opts["m"] = str(m)
    if ef_construction is not None:
        opts["ef_construction"] = str(ef_construction)
    return indexdef.split(" WITH ", 1)[0] + " WITH (" + ", ".join(f"{k} = {v}" for k, v in opts.items()) + ")"


def build_indexes(
    conn: psycopg.Connection, defs: dict[str, str], args: argparse.Namespace
) -> dict[str, float]:
    conn.autocommit = True
    try:
        conn.execute(f"SET maintenance_work_mem = '{args.maintenance_work_mem}'")
        conn.execute(f"SET max_parallel_maintenance_workers = {args.build_workers}")
        took = {}
        for name in SEARCH_INDEXES:
            sql = defs[name]
            if name == "ix_chunks_embedding_hnsw":
                sql = hnsw_definition(sql, args.m, args.ef_construction)
            print(f"  {sql}")
            t0 = time.perf_counter()
            conn.execute(sql)
            took[name] = time.perf_counter() - t0
        t0 = time.perf_counter()
        conn.execute("VACUUM (ANALYZE) chunks")
        conn.execute("ANALYZE documents")
        conn.execute("ANALYZE document_versions")
        took["vacuum_analyze"] = time.perf_counter() - t0
    finally:
        conn.autocommit = False
    return took


def hnsw_params(conn: psycopg.Connection) -> tuple[int, int]:
    """(m, ef_construction) of the built index (pgvector's defaults where the definition has none)."""
    opts = conn.execute(
        "SELECT coalesce(reloptions, '{}') FROM pg_class WHERE relname = 'ix_chunks_embedding_hnsw'"
    ).fetchone()
    conn.commit()
    found = dict(o.split("=", 1) for o in (opts[0] if opts else []))
    return int(found.get("m", 16)), int(found.get("ef_construction", 64))


BATCH_DOCS = 1000


def load(
    conn: psycopg.Connection,
    first_doc: int,
    last_doc: int,
    tenant: uuid.UUID,
    dek: bytes,
    mix: Mixture,
    vocab: Vocabulary,
    args: argparse.Namespace,
) -> tuple[int, list[tuple[uuid.UUID, int, str]], float]:
    """Insert documents first_doc .. last_doc - 1 (one version each, `--chunks-per-doc` chunks) with
    COPY (as the superuser: see superuser_connect), one transaction per batch; the next batch is
    generated (and sealed) in a thread while Postgres takes the current one. Returns (chunks,
    samples, seconds spent generating)."""
    from concurrent.futures import ThreadPoolExecutor

    words = (args.words_min, args.words_max)
    starts = list(range(first_doc, last_doc, BATCH_DOCS))
    gen_s = 0.0

    def make(b0: int) -> tuple[Batch, float]:
        t0 = time.perf_counter()
        batch = make_batch(
            b0, min(BATCH_DOCS, last_doc - b0), args.chunks_per_doc, tenant, dek, mix, vocab, words, args.seed
        )
        return batch, time.perf_counter() - t0

    total, samples, last_print = 0, [], time.perf_counter()
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(make, starts[0]) if starts else None
        for j in range(len(starts)):
            assert pending is not None
            batch, took = pending.result()
            gen_s += took
            pending = pool.submit(make, starts[j + 1]) if j + 1 < len(starts) else None
            with conn.cursor() as cur:
                with cur.copy("COPY documents (id, tenant_id, title) FROM STDIN") as cp:
                    for doc_id, title in batch.documents:
                        cp.write_row((doc_id, tenant, title))
                with cur.copy(
                    "COPY document_versions (id, tenant_id, document_id, version, content_sha256, size, "
                    "content_type, source_filename, object_key, stored_size, ingest_status, text_chars) "
                    "FROM STDIN"
                ) as cp:
                    for row in batch.versions:
                        cp.write_row(row)
                with cur.copy(f"COPY chunks ({CHUNK_COLUMNS}) FROM STDIN (FORMAT BINARY)") as cp:
                    cp.write(COPY_SIGNATURE)
                    cp.write(batch.chunks)
                    cp.write(COPY_TRAILER)
            conn.commit()
            total += batch.count
            samples += batch.samples
            if time.perf_counter() - last_print > 30:
                last_print = time.perf_counter()
                print(f"    {total:,} chunks loaded")
    return total, samples, gen_s


def check_rows(
    conn: psycopg.Connection, samples: list[tuple[uuid.UUID, int, str]], tenant: uuid.UUID, dek: bytes
) -> None:
    """Each sampled chunk's tsvector equals to_tsvector('english', text) and its blob opens to the text."""
    from appliance.keys.envelope import BlobContext, open_bytes

    bad = 0
    for ver, ordinal, text in samples:
        row = conn.execute(
            "SELECT tsv = to_tsvector('english', %s), document_id, text_enc FROM chunks "
            "WHERE version_id = %s AND ordinal = %s",
            [text, ver, ordinal],
        ).fetchone()
        assert row is not None
        same_tsv, doc, blob = row
        opened = open_bytes(dek, BlobContext(tenant, "chunk", doc, ver), bytes(blob)).decode()
        bad += (not same_tsv) + (opened != text)
    conn.commit()
    if bad:
        raise SystemExit(f"{bad} problems in {len(samples)} sampled chunks (tsvector or sealed text)")
    print(f"  checked {len(samples)} sampled chunks: tsvector = to_tsvector('english', text), text opens")


def relation_sizes(conn: psycopg.Connection) -> str:
    rows = conn.execute(
        """
        SELECT 'chunks heap+toast', pg_table_size('chunks') UNION ALL
        SELECT 'hnsw', pg_relation_size('ix_chunks_embedding_hnsw') UNION ALL
        SELECT 'gin', pg_relation_size('ix_chunks_tsv')
        """
    ).fetchall()
    conn.commit()
    return ", ".join(f"{name} {size / 2**20:,.0f} MiB" for name, size in rows)


# ---------------------------------------------------------------------------------------------
# The paths measured.


@dataclass
class Context:
    app: Appliance
    settings: Settings
    tenant: uuid.UUID
    key: str
    model: str
    knn_sql: str  # the k-NN alone (ids, distances), as psycopg receives it
    search_sql: str  # the statement vector_ranked sends for a search: the k-NN with each hit's row
    redis: Any

    def knn_params(self, vector: np.ndarray, limit: int) -> dict[str, Any]:
        from appliance.search.service import vector_param

        return {"q": vector_param(np.asarray(vector, dtype="=f4").tobytes()), "model": self.model, "n": limit}

    def prefill(self, queries: Queries) -> None:
        """Put each synthetic query's vector in the query-embedding cache, where `embed_query` looks
        first: the HTTP search then uses exactly this vector and embeds nothing."""
        from appliance.search.service import QEMB_KEY, QEMB_TTL_S

        pipe = self.redis.pipeline()
        for text, vec in zip(queries.texts, queries.vectors, strict=True):
            digest = hashlib.sha256(text.encode()).hexdigest()
            key = QEMB_KEY.format(tenant=self.tenant, model=self.model, digest=digest)
            pipe.set(key, np.asarray(vec, dtype="<f4").tobytes(), ex=QEMB_TTL_S)
        pipe.execute()

    def forget(self, texts: list[str]) -> None:
        """Drop these texts' query embeddings from the cache, so the API embeds them (a --home run
        meets the real-text questions of earlier runs again, and Redis keeps its data)."""
        from appliance.search.service import QEMB_KEY

        digests = [hashlib.sha256(t.encode()).hexdigest() for t in texts]
        keys = [QEMB_KEY.format(tenant=self.tenant, model=self.model, digest=d) for d in digests]
        if keys:
            self.redis.delete(*keys)

    def bump_generation(self) -> None:
        """What ingest does after a commit: every cached search result of the tenant is stale."""
        from appliance.search.service import GEN_KEY

        self.redis.incr(GEN_KEY.format(tenant=self.tenant))


def knn_statement(model: str, vector: np.ndarray, *, with_rows: bool = False) -> str:
    """The statement `vector_ranked` sends (`knn_statement` builds it for both), so the direct query
    is the same statement, not a copy that could drift: with `with_rows` exactly what a search sends,
    without it the k-NN alone (for recall and the ef_search curve)."""
    from appliance.search.service import knn_statement as service_statement

    stmt, params = service_statement(vector.tolist(), model, None, TOP_K, with_rows=with_rows)
    if set(params) != {"q", "model", "n"}:
        raise SystemExit(f"vector_ranked's parameters changed: {sorted(params)}; update this bench")
    return stmt


def exact_sql(ctx: Context, vectors: np.ndarray, workers: int) -> tuple[list[list[int]], float]:
    """The true top 10 by Postgres: the same statement with index scans off (a parallel sequential
    scan computing every distance). Returns (ids per query, seconds per query)."""
    with psycopg.connect(pg_url(ctx.settings, owner=True), autocommit=True) as conn:
        conn.execute("SET enable_indexscan = off")
        conn.execute(f"SET max_parallel_workers_per_gather = {workers}")
        out = []
        t0 = time.perf_counter()
        for vec in vectors:
            out.append([r[0] for r in conn.execute(ctx.knn_sql, ctx.knn_params(vec, TOP_K)).fetchall()])
        return out, (time.perf_counter() - t0) / max(len(vectors), 1)


def exact_numpy(ctx: Context, vectors: np.ndarray) -> tuple[list[list[int]], list[list[float]], int]:
    """The true top 10 over every stored vector the statement can return (read out with a binary
    COPY, same filters), by cosine in numpy, with each query as the SQL receives it (the service's
    binary parameter: the float32s). Much faster than `exact_sql` at 1M chunks; checked against it on
    a sample."""
    from psycopg import sql

    q = np.asarray(vectors, dtype=np.float32).astype(np.float64)
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32).T
    row = np.dtype(
        [("nf", ">i2"), ("l1", ">i4"), ("id", ">i8"), ("l2", ">i4"), ("dim", ">u2"), ("pad", ">u2")]
        + [("v", ">f4", (DIMS,))]
    )
    best_sim = np.full((TOP_K, len(vectors)), -np.inf, dtype=np.float32)
    best_id = np.zeros((TOP_K, len(vectors)), dtype=np.int64)
    seen = 0

    def take(rows: np.ndarray) -> None:
        nonlocal best_sim, best_id, seen
        if not (
            np.all(rows["nf"] == 2) and np.all(rows["l2"] == 4 + 4 * DIMS) and np.all(rows["dim"] == DIMS)
        ):
            raise SystemExit("unexpected binary COPY layout for (id, embedding)")
        x = rows["v"].astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        sims = np.vstack([best_sim, x @ q])
        ids = np.vstack([best_id, np.repeat(rows["id"].astype(np.int64)[:, None], len(vectors), axis=1)])
        top = np.argpartition(-sims, TOP_K - 1, axis=0)[:TOP_K]
        best_sim = np.take_along_axis(sims, top, axis=0)
        best_id = np.take_along_axis(ids, top, axis=0)
        seen += len(rows)

    stmt = sql.SQL(
        "COPY (SELECT c.id, c.embedding FROM chunks c JOIN documents d ON d.id = c.document_id "
        "WHERE c.embedding_model = {} AND d.status = 'active') TO STDOUT (FORMAT BINARY)"
    ).format(sql.Literal(ctx.model))
    buf = bytearray()
    header = len(COPY_SIGNATURE)
    with psycopg.connect(pg_url(ctx.settings, owner=True)) as conn, conn.cursor().copy(stmt) as cp:
        for block in cp:
            buf += block
            if header and len(buf) >= header:
                del buf[:header]
                header = 0
            n = len(buf) // row.itemsize
            if n >= 32768 and not header:
                take(np.frombuffer(bytes(buf[: n * row.itemsize]), dtype=row))
                del buf[: n * row.itemsize]
    if bytes(buf[-len(COPY_TRAILER) :]) != COPY_TRAILER:
        raise SystemExit("binary COPY without its trailer")
    del buf[-len(COPY_TRAILER) :]
    if buf:
        take(np.frombuffer(bytes(buf), dtype=row))
    order = np.argsort(-best_sim, axis=0)
    ids = np.take_along_axis(best_id, order, axis=0).T.tolist()
    return ids, np.take_along_axis(best_sim, order, axis=0).T.tolist(), seen


def fulltext_matches(ctx: Context, texts: list[str]) -> list[int]:
    """How many chunks each query's OR-ed full-text query matches (what `fulltext_ranked` ranks)."""
    from appliance.search.service import OR_QUERY

    sql = f"SELECT count(*) FROM chunks c, {OR_QUERY.replace(':query', '%(query)s')} AS q WHERE c.tsv @@ q"
    with psycopg.connect(pg_url(ctx.settings, owner=True), autocommit=True) as conn:
        return [conn.execute(sql, {"query": t}).fetchone()[0] for t in texts]  # type: ignore[index]


async def pass_direct(
    ctx: Context,
    queries: Queries,
    ef: int,
    conc: int,
    name: str = "pg direct",
    *,
    knn_only: bool = False,
    pause_s: float = 0.0,
) -> PassResult:
    """The statement the API sends for a vector search (`knn_statement(..., with_rows=True)`: the
    k-NN, each hit's row and the tenant's wrapped key), as the application role under row-level
    security with the tenant set once per connection; or with `knn_only` the k-NN alone (ids and
    distances) as the owner, as the ef_search curve and the recall check run it. Autocommit, over
    psycopg, ef_search set once per connection."""

    async def open_worker() -> psycopg.AsyncConnection:
        conn = await psycopg.AsyncConnection.connect(pg_url(ctx.settings, owner=knn_only), autocommit=True)
        await conn.execute(f"SET hnsw.ef_search = {max(ef, TOP_K)}")
        await conn.execute("SET hnsw.iterative_scan = relaxed_order")
        if not knn_only:
            await conn.execute("SELECT set_config(%s, %s, false)", (TENANT_GUC, str(ctx.tenant)))
        return conn

    async def close(conn: psycopg.AsyncConnection) -> None:
        await conn.close()

    sims: dict[int, list[float]] = {}
    sql = ctx.knn_sql if knn_only else ctx.search_sql

    async def call(conn: psycopg.AsyncConnection, i: int) -> tuple[list[int], bool]:
        async with conn.cursor(row_factory=namedtuple_row) as cur:
            await cur.execute(sql, ctx.knn_params(queries.vectors[i], TOP_K))
            rows: list[Any] = await cur.fetchall()
        sims[i] = [1.0 - float(r.distance) for r in rows]
        return [int(r.id) for r in rows], False

    res = await run_pass(name, len(queries.texts), conc, open_worker, close, call, pause_s=pause_s)
    res.sims = sims
    return res


async def pass_service(ctx: Context, queries: Queries, ef: int, conc: int) -> PassResult:
    """What the route runs besides HTTP, auth, the caches and the audit record: one tenant transaction
    (app role, RLS) with `vector_ranked` and `materialize` (row fetch, decryption, headlines)."""
    from appliance.db.engine import Database
    from appliance.keys.keyring import Keyring
    from appliance.search.service import SearchServices, materialize, vector_ranked

    # The API's connections: pgvector's settings as session defaults (no per-query set_config).
    hnsw = {"hnsw.ef_search": str(ef), "hnsw.iterative_scan": "relaxed_order"}
    db = Database(ctx.settings.app_database_url, pool_size=conc, server_settings=hnsw)
    svc = SearchServices(settings=ctx.settings, keyring=Keyring.from_settings(ctx.settings), redis=None)

    async def open_worker() -> None:
        return None

    async def close(_: None) -> None:
        return None

    async def call(_: None, i: int) -> tuple[list[int], bool]:
        async with db.transaction(tenant_id=ctx.tenant) as session:
            ranked = await vector_ranked(
                session, queries.vectors[i].tolist(), ctx.model, None, TOP_K, ef_search=ef, with_rows=True
            )
            results = await materialize(svc, session, ctx.tenant, ranked, queries.texts[i])
        return [r.chunk_id for r in results], False

    try:
        return await run_pass("service in-process", len(queries.texts), conc, open_worker, close, call)
    finally:
        await db.dispose()


async def pass_route(ctx: Context, queries: Queries, conc: int, *, audited: bool = True) -> PassResult:
    """The route's body without HTTP and authentication: `service.search` with the Redis caches (the
    query vector from the pre-filled embedding cache; results made stale first) and the audit record
    written at commit (unless not `audited`: what the audit costs), in one tenant transaction."""
    import redis.asyncio as aredis

    from appliance.audit import service as audit
    from appliance.db.engine import Database
    from appliance.keys.keyring import Keyring
    from appliance.search import service
    from appliance.search.schemas import SearchRequest

    db = Database(
        ctx.settings.app_database_url,
        pool_size=conc,
        server_settings=service.search_server_settings(ctx.settings),
    )
    client = aredis.Redis.from_url(ctx.settings.redis_url)
    svc = service.SearchServices(
        settings=ctx.settings, keyring=Keyring.from_settings(ctx.settings), redis=client
    )
    ctx.bump_generation()

    async def open_worker() -> None:
        return None

    async def close(_: None) -> None:
        return None

    async def call(_: None, i: int) -> tuple[list[int], bool]:
        req = SearchRequest(query=queries.texts[i], mode="vector", top_k=TOP_K)
        async with db.transaction(tenant_id=ctx.tenant) as session:
            resp = await service.search(svc, session, ctx.tenant, req)
            if audited:
                audit.record(
                    session,
                    "search",
                    resource_type="search",
                    details=service.audit_details(req, resp.results),
                )
        return [r.chunk_id for r in resp.results], resp.cached

    try:
        name = "route in-process" if audited else "route in-process, no audit"
        return await run_pass(name, len(queries.texts), conc, open_worker, close, call)
    finally:
        await client.aclose()
        await db.dispose()


class RawHTTP:
    """A keep-alive HTTP/1.1 client on asyncio streams, as a load generator (wrk, ab) is: the latency
    is the server's and the loopback's, not a client library's (httpx adds about 0.6 ms a request on
    this machine: GET /healthz takes 0.24 ms p50 here, 0.78 ms through httpx). Content-Length bodies
    only (what the API sends for JSON)."""

    def __init__(self, url: str, key: str) -> None:
        self.host, _, port = url.removeprefix("http://").partition(":")
        self.port = int(port)
        self.key = key
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> RawHTTP:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        return self

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()

    async def post_json(self, path: str, body: bytes) -> tuple[int, bytes, float]:
        """(status, body, perf_counter when the whole body was in)."""
        assert self.reader is not None and self.writer is not None
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Authorization: Bearer {self.key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        self.writer.write(head.encode() + body)
        await self.writer.drain()
        lines = (await self.reader.readuntil(b"\r\n\r\n")).split(b"\r\n")
        status = int(lines[0].split()[1])
        fields = (line.partition(b":") for line in lines[1:])
        length = next((int(v) for k, _, v in fields if k.lower() == b"content-length"), None)
        if length is None:
            raise RuntimeError(f"HTTP {status} without Content-Length: {lines[:5]}")
        data = await self.reader.readexactly(length)
        return status, data, time.perf_counter()


async def pass_http(
    ctx: Context, name: str, texts: list[str], mode: str, conc: int, *, client: str = "raw"
) -> PassResult:
    """POST /api/v1/search, one keep-alive connection per concurrent client (`RawHTTP`, or httpx with
    client="httpx"); the result cache is made stale first (the generation bump), so every request
    runs the search. The latency ends when the response is in; decoding and checking it is not timed."""
    ctx.bump_generation()

    async def open_worker() -> Any:
        if client == "raw":
            return await RawHTTP(ctx.app.url, ctx.key).open()
        return httpx.AsyncClient(
            base_url=ctx.app.url,
            timeout=120,
            headers={"Authorization": f"Bearer {ctx.key}"},
            limits=httpx.Limits(max_connections=1),
        )

    async def close(worker: Any) -> None:
        await (worker.close() if client == "raw" else worker.aclose())

    async def call(worker: Any, i: int) -> tuple[list[int], bool, float]:
        request = {"query": texts[i], "mode": mode, "top_k": TOP_K}
        if client == "raw":
            status, data, done = await worker.post_json("/api/v1/search", json.dumps(request).encode())
        else:
            r = await worker.post("/api/v1/search", json=request)
            status, data, done = r.status_code, r.content, time.perf_counter()
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {data[:300]!r}")
        body = json.loads(data)
        return [x["chunk_id"] for x in body["results"]], bool(body["cached"]), done

    return await run_pass(name, len(texts), conc, open_worker, close, call)


async def measure(
    ctx: Context, queries: Queries, warm: Queries, ef: int, args: argparse.Namespace, taken: set[str]
) -> list[PassResult]:
    """Warm up (untimed: other queries, every API worker, the embedder), then per concurrency: the
    direct query, the service in-process, the HTTP modes, and the direct query again (drift check)."""
    top = max(args.concurrency)
    await pass_direct(ctx, warm, ef, 1)
    await pass_direct(ctx, warm, ef, 1, knn_only=True)
    await pass_service(ctx, warm, ef, min(2, top))
    await pass_route(ctx, warm, min(2, top))
    await pass_http(ctx, "warm-up", warm.texts, "vector", top)
    for mode in ("hybrid", "fulltext"):
        await pass_http(ctx, "warm-up", warm.texts[: args.fulltext_queries or None], mode, top)
    if args.real_queries:
        texts = real_texts(2 * top, args.seed + len(taken), taken)
        ctx.forget(texts)  # the warm-up is for the embedder: it must embed
        await pass_http(ctx, "warm-up", texts, "vector", top)
    out: list[PassResult] = []
    for conc in args.concurrency:
        out.append(await pass_direct(ctx, queries, ef, conc))
        out.append(await pass_direct(ctx, queries, ef, conc, name=KNN_ONLY, knn_only=True))
        if conc == 1 and args.paced_ms:
            name = f"pg direct, {args.paced_ms:g} ms idle before each"
            out.append(await pass_direct(ctx, queries, ef, conc, name=name, pause_s=args.paced_ms / 1000))
        out.append(await pass_service(ctx, queries, ef, conc))
        out.append(await pass_route(ctx, queries, conc, audited=False))
        out.append(await pass_route(ctx, queries, conc))
        out.append(await pass_http(ctx, "HTTP vector", queries.texts, "vector", conc))
        name = "HTTP vector, httpx client"
        out.append(await pass_http(ctx, name, queries.texts, "vector", conc, client="httpx"))
        ft = queries.texts[: args.fulltext_queries or None]
        out.append(await pass_http(ctx, "HTTP hybrid", ft, "hybrid", conc))
        out.append(await pass_http(ctx, "HTTP fulltext", ft, "fulltext", conc))
        for mode in ("vector", "hybrid") if args.real_queries else ():
            texts = real_texts(args.real_queries, args.seed + len(taken), taken)
            ctx.forget(texts)
            r = await pass_http(ctx, f"HTTP {mode}, real text (embeds)", texts, mode, conc)
            r.ids.clear()  # not the synthetic queries: no recall
            out.append(r)
        out.append(await pass_direct(ctx, queries, ef, conc, name="pg direct (again)"))
    for r in out:
        if r.name.startswith("HTTP") and not r.name.startswith("HTTP vector"):
            r.ids.clear()  # fused or full-text rankings: recall of the k-NN does not apply
    return out


def print_table(results: list[PassResult], exact: list[list[int]]) -> None:
    base = {r.concurrency: pct(r.latencies_ms, 95) for r in results if r.name == "pg direct"}
    print(
        "| path | conc | n | p50 ms | p95 ms | p99 ms | mean ms | req/s | recall@10 | p95 - direct p95 |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    for r in results:
        lat = r.latencies_ms
        rec = r.recall(exact)
        notes = []
        if r.errors:
            notes.append(f"{r.errors} errors")
        if r.cached:
            notes.append(f"{r.cached} cached!")
        print(
            f"| {r.name} | {r.concurrency} | {len(lat)} | {pct(lat, 50):.2f} | {pct(lat, 95):.2f} | "
            f"{pct(lat, 99):.2f} | {statistics.fmean(lat) if lat else float('nan'):.2f} | "
            f"{len(lat) / r.wall_s if r.wall_s else 0:.0f} | {'' if rec is None else f'{rec:.4f}'} | "
            f"{pct(lat, 95) - base[r.concurrency]:+.2f} |" + (f" {', '.join(notes)}" if notes else "")
        )


def int_list(value: str) -> list[int]:
    return [int(x) for x in value.split(",") if x.strip()]


def run(app: Appliance, args: argparse.Namespace, sizes: list[int]) -> None:
    import redis

    from appliance.inference.manifest import get_model

    out, took = app.up(args.ef_search[0])
    settings = app.settings()
    print(
        f"appliance up in {took:.0f} s ({app.home}): API workers {settings.api_workers}; "
        f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs"
    )
    state_file = app.home / "bench-state.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    if state:
        tenant, key = uuid.UUID(state["tenant"]), state["key"]
        print(f"reusing {app.home}: tenant {tenant}, {state['docs']:,} documents (seed {state['seed']})")
        if state["seed"] != args.seed or state["chunks_per_doc"] != args.chunks_per_doc:
            raise SystemExit("--seed and --chunks-per-doc must match the run that loaded this home")
    else:
        tenant, key = create_tenant(app.url, next(w for w in out.split() if w.startswith("apl_")))
        state = {"tenant": str(tenant), "key": key, "docs": 0, "seed": args.seed}
        state.update(ports=app.ports, chunks_per_doc=args.chunks_per_doc)
        state_file.write_text(json.dumps(state))
    model = get_model(settings.models_dir, name=settings.embedding_model, purpose="embedding").name
    if model != EMBEDDING_MODEL:
        raise SystemExit(f"the embedding model is {model}; this bench writes {EMBEDDING_MODEL} rows")
    dek = asyncio.run(tenant_data_key(settings, tenant))
    owner = psycopg.connect(pg_url(settings, owner=True))
    owner.add_notice_handler(lambda d: print(f"    postgres {d.severity}: {d.message_primary}"))
    try:
        pg = owner.execute(
            "SELECT current_setting('server_version'), (SELECT extversion FROM pg_extension "
            "WHERE extname = 'vector'), current_setting('shared_buffers'), current_setting('work_mem'), "
            "current_setting('effective_cache_size'), current_setting('max_parallel_workers_per_gather')"
        ).fetchone()
        owner.commit()
        assert pg is not None
        print(
            f"Postgres {pg[0]}, pgvector {pg[1]}; shared_buffers {pg[2]}, work_mem {pg[3]}, "
            f"effective_cache_size {pg[4]}, max_parallel_workers_per_gather {pg[5]} (the appliance's own)"
        )
        t0 = time.perf_counter()
        vocab = vocabulary(owner, args.vocab, args.zipf, args.seed)
        mix = Mixture(args.topics, args.seed)
        queries = make_queries(mix, vocab, args.queries, args.seed, "m")
        warm = make_queries(mix, vocab, args.warmup, args.seed, "w")
        print(
            f"synthetic data: {args.topics} topics, {len(vocab.words):,} pseudo-words (Zipf s={args.zipf}), "
            f"{args.words_min}-{args.words_max} words and {args.chunks_per_doc} chunks per document; "
            f"{args.queries} queries, {args.warmup} warm-up queries ({time.perf_counter() - t0:.1f} s)"
        )
        knn_sql = knn_statement(model, queries.vectors[0])
        search_sql = knn_statement(model, queries.vectors[0], with_rows=True)
        ctx = Context(
            app, settings, tenant, key, model, knn_sql, search_sql, redis.Redis.from_url(settings.redis_url)
        )
        defs: dict[str, str] = {}
        loaded_docs = int(state["docs"])
        summary: list[str] = []
        taken: set[str] = set()
        for size in sizes:
            docs = -(-size // args.chunks_per_doc)
            print(f"\n== {size:,} chunks ({docs:,} documents)")
            if docs < loaded_docs:
                raise SystemExit(f"this home already holds {loaded_docs:,} documents: use a larger --chunks")
            measure_size = docs > loaded_docs  # False: this --home holds exactly these rows already
            if not measure_size:
                print("  already loaded (--home): measuring only")
            if measure_size:
                drop_search_indexes(owner, defs)
                t0 = time.perf_counter()
                with superuser_connect(settings) as su:
                    n, samples, gen_s = load(su, loaded_docs, docs, tenant, dek, mix, vocab, args)
                load_s = time.perf_counter() - t0
                loaded_docs = docs
                total = owner.execute("SELECT count(*) FROM chunks").fetchone()[0]  # type: ignore[index]
                owner.commit()
                print(
                    f"  loaded {n:,} chunks (table now {total:,}) in {load_s:.1f} s "
                    f"({n / load_s:,.0f} chunks/s; "
                    f"generating and sealing {gen_s:.1f} s of it, overlapped with COPY)"
                )
                check_rows(owner, samples, tenant, dek)
                took_ix = build_indexes(owner, defs, args)
                m, efc = hnsw_params(owner)
                print(
                    f"  HNSW (m {m}, ef_construction {efc}) in {took_ix['ix_chunks_embedding_hnsw']:.1f} s, "
                    f"GIN in {took_ix['ix_chunks_tsv']:.1f} s, "
                    f"VACUUM ANALYZE {took_ix['vacuum_analyze']:.1f} s "
                    f"(maintenance_work_mem {args.maintenance_work_mem}, "
                    f"{args.build_workers} parallel workers); "
                    f"load + build {load_s + sum(took_ix.values()):.0f} s"
                )
                state["docs"] = loaded_docs
                (app.home / "bench-state.json").write_text(json.dumps(state))
            total = owner.execute("SELECT count(*) FROM chunks").fetchone()[0]  # type: ignore[index]
            owner.commit()
            m, efc = hnsw_params(owner)
            print(f"  sizes: {relation_sizes(owner)}")
            t0 = time.perf_counter()
            exact, exact_sims, scanned = exact_numpy(ctx, queries.vectors)
            took = time.perf_counter() - t0
            check, check_s = exact_sql(ctx, queries.vectors[: args.exact_check], args.build_workers)
            same = sum(set(a) == set(b) for a, b in zip(check, exact, strict=False))
            print(
                f"  exact top {TOP_K} of {len(exact)} queries over {scanned:,} stored vectors: {took:.1f} s "
                f"(numpy); Postgres without the index agrees on {same} of {len(check)} checked "
                f"({1000 * check_s:,.0f} ms per query)"
            )
            fts = fulltext_matches(ctx, queries.texts)
            real = fulltext_matches(ctx, real_texts(50, args.seed - 1, set()))
            print(
                f"  full text: a query matches {statistics.fmean(fts):,.0f} chunks on average "
                f"({100 * statistics.fmean(fts) / total:.1f}% of them; median {statistics.median(fts):,.0f}, "
                f"max {max(fts):,}) with the OR of its words, a real-text one {statistics.fmean(real):,.0f}; "
                "BM25 ranks those holding its rarest words"
            )

            print(f"\n  recall and latency by ef_search (pg direct, concurrency 1, {len(exact)} queries)")
            print(
                "| ef_search | p50 ms | p95 ms | recall@10 | worst | queries < 0.8 | cos gap@10 |\n"
                "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
            )
            asyncio.run(pass_direct(ctx, warm, max(args.ef_curve or [40]), 1, knn_only=True))
            for ef in args.ef_curve:
                r = asyncio.run(pass_direct(ctx, queries, ef, 1, name=f"ef {ef}", knn_only=True))
                per = [len(set(r.ids[i]) & set(exact[i])) / TOP_K for i in r.ids]
                gap = statistics.fmean(exact_sims[i][-1] - r.sims[i][-1] for i in r.sims if r.sims[i])
                print(
                    f"| {ef} | {pct(r.latencies_ms, 50):.2f} | {pct(r.latencies_ms, 95):.2f} | "
                    f"{r.recall(exact):.4f} | {min(per):.1f} | {sum(p < 0.8 for p in per)} | {gap:.4f} |"
                )

            order = sorted(args.ef_search, key=lambda e: e != app.ef)  # no restart for the running one
            for ef in order if not args.curve_only else ():
                if app.ef != ef:
                    app.down()
                    _, took = app.up(ef)
                    print(
                        f"\n  appliance restarted with APPLIANCE_SEARCH_HNSW_EF_SEARCH={ef} in {took:.0f} s"
                    )
                    ctx.settings = app.settings()
                    ctx.redis = redis.Redis.from_url(settings.redis_url)
                ctx.prefill(queries)
                ctx.prefill(warm)
                load_avg = os.getloadavg()[0]
                results = asyncio.run(measure(ctx, queries, warm, ef, args, taken))
                print(
                    f"\n  {size:,} chunks, ef_search {ef} (m {m}, ef_construction {efc}); load average "
                    f"{load_avg:.2f} -> {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs"
                )
                print_table(results, exact)
                # The verdict's baseline is the faster of the two direct passes (before the API's
                # passes and after them): a pass slowed by the machine raises the baseline and would
                # shrink the difference, so the slower one can never make the target look met.
                direct95: dict[int, float] = {}
                for r in results:
                    if r.name in ("pg direct", "pg direct (again)"):
                        p95 = pct(r.latencies_ms, 95)
                        direct95[r.concurrency] = min(direct95.get(r.concurrency, p95), p95)
                knn = {r.concurrency: r for r in results if r.name == KNN_ONLY}
                for r in results:
                    if r.name == "HTTP vector":
                        http95 = pct(r.latencies_ms, 95)
                        d = http95 - direct95[r.concurrency]
                        d_knn = http95 - pct(knn[r.concurrency].latencies_ms, 95)
                        rec = r.recall(exact) or 0.0
                        summary.append(
                            f"| {size:,} | {ef} | {r.concurrency} | {http95:.2f} | "
                            f"{direct95[r.concurrency]:.2f} | {d:+.2f} | {d_knn:+.2f} | "
                            f"{rec:.4f} | {'yes' if d <= 5 and rec >= 0.95 else 'no'} |"
                        )
        if summary:
            print(
                f"\nTarget: HTTP vector p95 within 5 ms of the direct query (the statement the API sends, "
                f"as the application role; the faster p95 of its two passes), recall@{TOP_K} >= 0.95 "
                f"(m {m}, ef_construction {efc}); the last difference is against the k-NN alone (owner), "
                "for comparison with earlier runs"
            )
            print(
                "| chunks | ef_search | conc | HTTP p95 ms | direct p95 ms | difference | vs k-NN only "
                "| recall@10 | met |\n"
                "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
            )
            print("\n".join(summary))
    finally:
        owner.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, action="append", help="chunks to load; repeat to grow (100000)")
    ap.add_argument("--queries", type=int, default=200, help="synthetic queries per pass (200)")
    ap.add_argument("--concurrency", type=int_list, default=[1, 8], help="concurrent clients (1,8)")
    ap.add_argument("--ef-search", type=int_list, default=[40, 100], help="APPLIANCE_SEARCH_HNSW_EF_SEARCH")
    ap.add_argument(
        "--ef-curve",
        type=int_list,
        default=[10, 20, 40, 64, 100, 200],
        help="ef_search values for the direct-SQL recall curve",
    )
    ap.add_argument(
        "--fulltext-queries",
        type=int,
        default=0,
        help="only the first N queries for hybrid/fulltext (0: all)",
    )
    ap.add_argument("--real-queries", type=int, default=100, help="real-text queries per pass (0: none)")
    ap.add_argument(
        "--paced-ms", type=float, default=7.0, help="idle before each query of the paced direct row (0: none)"
    )
    ap.add_argument(
        "--exact-check", type=int, default=10, help="queries whose exact top 10 Postgres also computes"
    )
    ap.add_argument("--warmup", type=int, default=100, help="warm-up queries (not timed)")
    ap.add_argument(
        "--api-workers", type=int, default=None, help="APPLIANCE_API_WORKERS (default: the appliance's)"
    )
    ap.add_argument("--m", type=int, default=None, help="HNSW m (default: the migration's)")
    ap.add_argument(
        "--ef-construction", type=int, default=None, help="HNSW ef_construction (default: the migration's)"
    )
    ap.add_argument("--maintenance-work-mem", default="4GB")
    ap.add_argument("--build-workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--chunks-per-doc", type=int, default=10)
    ap.add_argument("--words-min", type=int, default=60)
    ap.add_argument("--words-max", type=int, default=180)
    ap.add_argument("--vocab", type=int, default=30000)
    ap.add_argument("--zipf", type=float, default=1.0)
    ap.add_argument("--topics", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--curve-only", action="store_true", help="load, build, recall curve; no appliance-level passes"
    )
    ap.add_argument("--keep-home", action="store_true", help="keep the throw-away appliance home")
    ap.add_argument(
        "--home",
        help="appliance home to create or reuse (kept): a second run on it skips the sizes already "
        "loaded and measures only (same --seed; ports, tenant and key in DIR/bench-state.json)",
    )
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # progress through `tee`
    sizes = sorted(set(args.chunks or [100000]))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the same clean-up as Ctrl-C
    print("$ " + " ".join([Path(sys.executable).name, *sys.argv]))

    ports = None
    if args.home:
        home = Path(args.home).resolve()
        home.mkdir(parents=True, exist_ok=True)
        state_file = home / "bench-state.json"
        if state_file.exists():
            ports = json.loads(state_file.read_text())["ports"]
    else:
        home = Path(tempfile.mkdtemp(prefix="appliance-bench-search-", dir="/var/tmp"))
    os.chmod(home, 0o755)
    app = Appliance(home, args.api_workers, ports)
    try:
        run(app, args, sizes)
    finally:
        app.down()
        if args.keep_home or args.home:
            print(f"kept the appliance home {home}")
        else:
            shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
