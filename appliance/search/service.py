"""Search over a tenant's chunks: vector (pgvector HNSW, cosine), full text (tsvector, GIN) and hybrid.

Every query runs in the caller's tenant-scoped transaction, so row-level security decides what is
visible; the SQL adds only "the document is active" and the caller's filters.

- **vector**: the query embedded by the same model as the chunks (`chunks.embedding_model` must match:
  vectors of two models are never compared), nearest by cosine distance through the HNSW index.
  Filters are evaluated inside the index scan with pgvector's iterative scans
  (`hnsw.iterative_scan = relaxed_order`): when a filter is selective the scan keeps walking the graph
  until it has `candidates` rows that pass (up to `hnsw.max_scan_tuples`), instead of returning the few
  of the first `ef_search` that happen to pass. The CTE re-sorts the relaxed order exactly.
- **fulltext**: the query's English lexemes OR-ed (a natural-language question rarely has every word in
  one passage), ranked by BM25 with the tenant's lexeme statistics (migration 0006).
- **hybrid**: both lists fused by reciprocal rank (RRF, k = `search_rrf_k`), each weighted.

Only the newest indexed version of a document has chunks (ingest replaces the older version's chunks in
the transaction that indexes the new one), so results never mix versions of one document.

Caching (Redis, per tenant): the query's embedding, and each search's ranked chunk ids (ids and scores
only: no plaintext ever goes to Redis). The result cache key includes the tenant's generation counter,
which ingest, delete, purge and reindex bump after they commit; rows are fetched again through RLS on
every hit, so even a stale entry can never show a deleted document.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import html
import json
import struct
import sys
import uuid
from array import array
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import anyio
import psycopg
from psycopg.adapt import Dumper
from psycopg.pq import Format
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from appliance import metrics
from appliance.db.engine import driver_rows, driver_sql
from appliance.errors import AppError
from appliance.keys.envelope import BlobContext, open_bytes
from appliance.keys.keyring import Keyring
from appliance.keys.service import TenantKeyDestroyed, unwrap_dek
from appliance.search.highlight import highlight, query_stems
from appliance.search.schemas import SearchFilters, SearchRequest, SearchResponse, SearchResult
from appliance.settings import Settings

GEN_KEY = "appliance:search:gen:{tenant}"
RESULT_KEY = "appliance:search:res:{tenant}:{digest}"  # value: {"gen": generation, "ranked": [...]}
QEMB_KEY = "appliance:search:qemb:{tenant}:{model}:{digest}"
QEMB_TTL_S = 24 * 3600


class QueryTooLong(AppError):
    status = 422
    code = "query_too_long"
    title = "Query too long"


class RerankUnavailable(AppError):
    status = 422
    code = "rerank_unavailable"
    title = "No reranker installed"


@dataclass
class SearchServices:
    settings: Settings
    keyring: Keyring
    redis: Any  # redis.asyncio.Redis, or None to run without caching


@dataclass
class Ranked:
    chunk_id: int
    score: float
    vector_rank: int | None = None
    fulltext_rank: int | None = None
    row: Any = None  # the chunk's row (`ROW_COLUMNS`) when the ranking query fetched it


# Query embedding ---------------------------------------------------------------------------------


def _embedder(settings: Settings, name: str | None = None) -> Any:
    from appliance.inference.embedding import get_embedder

    return get_embedder(settings, name)


_NOT_FETCHED: Any = object()


async def embed_query(
    svc: SearchServices,
    tenant_id: uuid.UUID,
    query: str,
    model: str | None = None,
    *,
    cached: bytes | None = _NOT_FETCHED,
) -> array[float]:
    """The query's vector by `model` (default: the settings' one), from the per-tenant cache if seen.
    `cached`: the cache entry when the caller already read it (see `rank`)."""
    from appliance.inference.embedding import loaded_embedder

    embedder: Any = loaded_embedder(svc.settings, model) if model else None
    if embedder is None:  # not loaded yet: loading reads and checks the model file, off the event loop
        embedder = await anyio.to_thread.run_sync(_embedder, svc.settings, model)
    if svc.redis is not None:
        if cached is _NOT_FETCHED:
            cached = await _redis_get(svc, qemb_key(tenant_id, embedder.name, query))
        if cached is not None and len(cached) == 4 * embedder.dimensions:
            metrics.SEARCH_CACHE.labels("embedding", "hit").inc()
            return array("f", cached)
        metrics.SEARCH_CACHE.labels("embedding", "miss").inc()
    n = embedder.count_tokens(query)
    if n > embedder.max_tokens:
        raise QueryTooLong(
            f"The query has {n} tokens; the embedding model {embedder.name} takes at most "
            f"{embedder.max_tokens}."
        )
    if n == 0:
        raise AppError("The query has no searchable text.", code="query_empty", status=422)
    vector = array("f", (await anyio.to_thread.run_sync(embedder.embed, [query]))[0])
    if svc.redis is not None:
        key = qemb_key(tenant_id, embedder.name, query)
        _redis_set_later(svc, key, vector.tobytes(), QEMB_TTL_S)
    return vector


def qemb_key(tenant_id: uuid.UUID, model: str, query: str) -> str:
    return QEMB_KEY.format(tenant=tenant_id, model=model, digest=hashlib.sha256(query.encode()).hexdigest())


async def vector_candidates(
    svc: SearchServices,
    session: AsyncSession,
    tenant_id: uuid.UUID,
    query: str,
    filters: SearchFilters | None,
    limit: int,
    *,
    models: list[str] | None = None,
    cached_vector: bytes | None = _NOT_FETCHED,
    with_rows: bool = False,
) -> tuple[list[Ranked], float | None]:
    """The vector list and the best cosine similarity in it.

    Normally one model. While a re-index runs (appliance.ingest.reindex) chunks carry one of two
    models: the query is embedded by each, each model's chunks are searched with their own vector, and
    the two lists are fused by reciprocal rank (cosines of two models are not comparable).
    `cached_vector`: the query-embedding cache entry of the (single) model, when already read.
    `with_rows`: fetch each hit's row in the same statement (see `materialize`)."""
    from appliance.ingest.reindex import search_models

    s = svc.settings
    lists = []
    best: float | None = None
    models = models or await search_models(session, s)
    for model in models:
        if len(models) == 1:
            vector = await embed_query(svc, tenant_id, query, model, cached=cached_vector)
        else:
            vector = await embed_query(svc, tenant_id, query, model)
        ranked = await vector_ranked(
            session,
            vector,
            model,
            filters,
            limit,
            ef_search=s.search_hnsw_ef_search,
            with_rows=with_rows and len(models) == 1,
        )
        if ranked:
            best = ranked[0].score if best is None else max(best, ranked[0].score)
        lists.append(ranked)
    if len(lists) == 1:
        return lists[0], best
    scores: dict[int, float] = {}
    for ranked in lists:
        for r in ranked:
            scores[r.chunk_id] = scores.get(r.chunk_id, 0.0) + 1.0 / (s.search_rrf_k + (r.vector_rank or 0))
    order = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]
    return [Ranked(cid, score, vector_rank=i) for i, (cid, score) in enumerate(order, 1)], best


async def _redis_get(svc: SearchServices, key: str) -> bytes | None:
    try:
        value: bytes | None = await svc.redis.get(key)
        return value
    except Exception:  # noqa: BLE001 - the cache is an optimisation: a Redis hiccup must not fail a search
        return None


async def _redis_mget(svc: SearchServices, keys: list[str]) -> list[bytes | None] | None:
    try:
        values: list[bytes | None] = await svc.redis.mget(keys)
        return values
    except Exception:  # noqa: BLE001 - as _redis_get
        return None


async def _redis_set(svc: SearchServices, key: str, value: bytes | str, ttl: int) -> None:
    with contextlib.suppress(Exception):  # a cache write that fails is a cache miss next time
        await svc.redis.set(key, value, ex=ttl)


_cache_writes: set[asyncio.Task[None]] = set()
CacheWrite = tuple[str, bytes | str, int]  # key, value, ttl in seconds
_deferred_writes: ContextVar[list[CacheWrite] | None] = ContextVar("search_cache_writes", default=None)


def _redis_set_later(svc: SearchServices, key: str, value: bytes | str, ttl: int) -> None:
    """`_redis_set` without waiting for it: the request goes on while the cache entry is written
    (sent at the request's next wait, so before any later request of this process can look for it);
    inside `deferred_cache_writes`, kept for `write_cache` instead."""
    deferred = _deferred_writes.get()
    if deferred is not None:
        deferred.append((key, value, ttl))
        return
    task = asyncio.get_running_loop().create_task(_redis_set(svc, key, value, ttl))
    _cache_writes.add(task)
    task.add_done_callback(_cache_writes.discard)


@contextlib.contextmanager
def deferred_cache_writes() -> Iterator[list[CacheWrite]]:
    """Collect the cache writes of the searches in the block, for `write_cache` once the response has
    been sent (the route's background task): they take no time from the request that makes them."""
    writes: list[CacheWrite] = []
    token = _deferred_writes.set(writes)
    try:
        yield writes
    finally:
        _deferred_writes.reset(token)


async def write_cache(svc: SearchServices, writes: list[CacheWrite]) -> None:
    """Write the collected entries in one round trip (a failure is a cache miss next time)."""
    if not writes or svc.redis is None:
        return
    with contextlib.suppress(Exception):
        pipe = svc.redis.pipeline(transaction=False)
        for key, value, ttl in writes:
            pipe.set(key, value, ex=ttl)
        await pipe.execute()


def invalidate(redis_client: Any, tenant_id: uuid.UUID) -> None:
    """Bump the tenant's search generation (sync client; call after the change committed)."""
    with contextlib.suppress(Exception):  # entries expire after search_cache_ttl_s anyway
        redis_client.incr(GEN_KEY.format(tenant=tenant_id))


# SQL ---------------------------------------------------------------------------------------------


def _filter_sql(filters: SearchFilters | None, params: dict[str, Any]) -> str:
    clauses = ["d.status = 'active'"]
    if filters is None:
        return " AND ".join(clauses)
    if filters.document_ids is not None:
        clauses.append("c.document_id = ANY(:f_doc_ids)")
        params["f_doc_ids"] = list(filters.document_ids)
    if filters.tags:
        clauses.append("d.tags @> CAST(:f_tags AS text[])")
        params["f_tags"] = list(filters.tags)
    if filters.metadata:
        clauses.append("d.metadata @> CAST(:f_meta AS jsonb)")
        params["f_meta"] = json.dumps(filters.metadata)
    if filters.content_types:
        clauses.append(
            "EXISTS (SELECT 1 FROM document_versions v"
            " WHERE v.id = c.version_id AND v.content_type = ANY(:f_cts))"
        )
        params["f_cts"] = list(filters.content_types)
    if filters.created_after is not None:
        clauses.append("d.created_at >= :f_after")
        params["f_after"] = filters.created_after
    if filters.created_before is not None:
        clauses.append("d.created_at <= :f_before")
        params["f_before"] = filters.created_before
    return " AND ".join(clauses)


def search_server_settings(settings: Settings) -> dict[str, str]:
    """Session defaults for a Database that searches (see `Database(server_settings=...)`)."""
    return {"hnsw.ef_search": str(settings.search_hnsw_ef_search), "hnsw.iterative_scan": "relaxed_order"}


class VectorParam(bytes):
    """A pgvector value in pgvector's binary wire format, sent by psycopg as is: exact float32s, no
    text to format here or parse there (0.1 ms of a search). Untyped on the wire, so the statement
    casts it (`CAST(:q AS vector)`: Postgres then receives it with vector_recv)."""


class _VectorParamDumper(Dumper):
    format = Format.BINARY

    def dump(self, obj: Any) -> bytes:
        return bytes(obj)


psycopg.adapters.register_dumper(VectorParam, _VectorParamDumper)


def vector_param(vector: Sequence[float] | bytes) -> VectorParam:
    """`vector` (floats, or float32s in this machine's byte order) as a `VectorParam`."""
    if isinstance(vector, array) and vector.typecode == "f":
        vector = vector.tobytes()
    values = array("f", vector)  # a copy (from bytes: their float32s as they are)
    if sys.byteorder == "little":
        values.byteswap()
    return VectorParam(struct.pack(">HH", len(values), 0) + values.tobytes())


def knn_statement(
    vector: Sequence[float] | bytes,
    model: str,
    filters: SearchFilters | None,
    limit: int,
    *,
    with_rows: bool = False,
) -> tuple[str, dict[str, Any]]:
    """The k-NN statement `vector_ranked` sends (psycopg placeholders) and its parameters. The CTE is
    the index scan (filters inside it: iterative scans keep walking the graph when they are selective);
    `with_rows` adds each hit's row (`ROW_COLUMNS`, what `materialize` needs), hits whose version was
    deleted left out."""
    params: dict[str, Any] = {"q": vector_param(vector), "model": model, "n": limit}
    where = _filter_sql(filters, params)
    knn = f"""
            WITH hits AS MATERIALIZED (
                SELECT c.id, c.embedding <=> CAST(:q AS vector) AS distance
                FROM chunks c JOIN documents d ON d.id = c.document_id
                WHERE c.embedding_model = :model AND {where}
                ORDER BY c.embedding <=> CAST(:q AS vector)
                LIMIT :n
            )
            """
    if with_rows:
        sql = (
            knn
            + f"""
            SELECT h.distance, {ROW_COLUMNS}
            FROM hits h JOIN chunks c ON c.id = h.id {ROW_JOINS}
            ORDER BY h.distance, h.id
            """
        )
    else:
        sql = knn + "SELECT id, distance FROM hits ORDER BY distance, id"
    return driver_sql(sql), params


async def vector_ranked(
    session: AsyncSession,
    vector: Sequence[float],
    model: str,
    filters: SearchFilters | None,
    limit: int,
    *,
    ef_search: int,
    with_rows: bool = False,
) -> list[Ranked]:
    """The k-NN list (`knn_statement`); with `with_rows`, each hit carries its row (`Ranked.row`)."""
    ef = str(max(ef_search, limit))
    defaults = session.info.get("server_settings") or {}
    if defaults.get("hnsw.ef_search") != ef or defaults.get("hnsw.iterative_scan") != "relaxed_order":
        # Not the connection's defaults (another Database, or more candidates than ef_search).
        await session.execute(
            text(
                "SELECT set_config('hnsw.ef_search', :ef, true),"
                " set_config('hnsw.iterative_scan', 'relaxed_order', true)"
            ),
            {"ef": ef},
        )
    sql, params = knn_statement(vector, model, filters, limit, with_rows=with_rows)
    rows = await driver_rows(session, sql, params)
    return [
        Ranked(int(r.id), 1.0 - float(r.distance), vector_rank=i, row=r if with_rows else None)
        for i, r in enumerate(rows, 1)
    ]


OR_QUERY = "to_tsquery('simple', replace(plainto_tsquery('english', :query)::text, ' & ', ' | '))"


async def fulltext_ranked(
    session: AsyncSession,
    query: str,
    filters: SearchFilters | None,
    limit: int,
    settings: Settings,
) -> list[Ranked]:
    """BM25 through `app_fulltext_ranked` (migration 0006): under RLS a plain query cannot use the GIN
    index (`@@` is not leakproof); the function can, and applies the tenant scope and the filters."""
    f = filters or SearchFilters()
    params: dict[str, Any] = {
        "query": query,
        "n": limit,
        "fraction": settings.search_fulltext_candidate_fraction,
        "min": settings.search_fulltext_min_candidates,
        "max": settings.search_fulltext_max_candidates,
        "doc_ids": list(f.document_ids) if f.document_ids is not None else None,
        "tags": list(f.tags) if f.tags else None,
        "meta": json.dumps(f.metadata) if f.metadata else None,
        "cts": list(f.content_types) if f.content_types else None,
        "after": f.created_after,
        "before": f.created_before,
    }
    rows = await session.execute(
        text(
            """
            SELECT id, rank FROM app_fulltext_ranked(
                :query, :n, CAST(:fraction AS real), :min, :max, CAST(:doc_ids AS uuid[]),
                CAST(:tags AS text[]), CAST(:meta AS jsonb), CAST(:cts AS text[]),
                CAST(:after AS timestamptz), CAST(:before AS timestamptz))
            """
        ),
        params,
    )
    return [Ranked(int(r.id), float(r.rank), fulltext_rank=i) for i, r in enumerate(rows, 1)]


def fuse(
    vector: list[Ranked], fulltext: list[Ranked], *, k: int, w_vector: float, w_fulltext: float
) -> list[Ranked]:
    """Reciprocal-rank fusion: score = Σ w / (k + rank) over the lists a chunk appears in."""
    fused: dict[int, Ranked] = {}
    for r in vector:
        fused[r.chunk_id] = Ranked(
            r.chunk_id, w_vector / (k + (r.vector_rank or 0)), vector_rank=r.vector_rank
        )
    for r in fulltext:
        entry = fused.setdefault(r.chunk_id, Ranked(r.chunk_id, 0.0))
        entry.fulltext_rank = r.fulltext_rank
        entry.score += w_fulltext / (k + (r.fulltext_rank or 0))
    return sorted(fused.values(), key=lambda r: (-r.score, r.chunk_id))


ROW_COLUMNS = """c.id, c.document_id, c.version_id, v.version, c.ordinal, d.title, c.page_start,
               c.page_end, c.char_start, c.char_end, c.text_enc, c.tenant_id, k.wrapped_dek, k.kek_id"""
# Joined onto a chunks row `c`: its document (active), its version (not deleted), the tenant's wrapped key.
ROW_JOINS = """JOIN documents d ON d.id = c.document_id AND d.status = 'active'
            JOIN document_versions v ON v.id = c.version_id AND v.deleted_at IS NULL
            LEFT JOIN tenant_keys k ON k.tenant_id = c.tenant_id"""


async def _rows(session: AsyncSession, ids: list[int]) -> dict[int, Any]:
    if not ids:
        return {}
    rows = await session.execute(
        text(f"SELECT {ROW_COLUMNS} FROM chunks c {ROW_JOINS} WHERE c.id = ANY(:ids)"), {"ids": ids}
    )
    return {int(r.id): r for r in rows}


# The search --------------------------------------------------------------------------------------


def _cache_digest(req: SearchRequest, model: str, settings: Settings) -> str:
    material = {
        "r": req.model_dump(mode="json"),
        "m": model,
        "s": [settings.search_candidates, settings.search_rrf_k, settings.search_hnsw_ef_search],
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def cache_keys(svc: SearchServices, tenant_id: uuid.UUID, req: SearchRequest, models: list[str]) -> list[str]:
    """What a search reads from the cache first, in one round trip: the tenant's generation, this
    request's cached result and (vector or hybrid, one model) the query's cached vector."""
    keys = [
        GEN_KEY.format(tenant=tenant_id),
        RESULT_KEY.format(tenant=tenant_id, digest=_cache_digest(req, "+".join(models), svc.settings)),
    ]
    if req.mode != "fulltext" and len(models) == 1:
        keys.append(qemb_key(tenant_id, models[0], req.query))
    return keys


async def rank(
    svc: SearchServices,
    session: AsyncSession,
    tenant_id: uuid.UUID,
    req: SearchRequest,
    *,
    reads: dict[str, bytes | None] | None = None,
) -> tuple[list[Ranked], str, bool]:
    """The ranked chunk ids for a request (top_k of them), the embedding model, and whether cached.
    A vector search that runs (not cached) fetches its rows too (`Ranked.row`). `reads`: cache
    entries already read for this request (the rate limit's round trip, appliance.ratelimit)."""
    s = svc.settings
    if req.rerank:
        raise RerankUnavailable(
            "No reranker model is installed (none ships on PyPI for this appliance); search without rerank."
        )
    from appliance.ingest.reindex import search_models

    models = await search_models(session, s)
    model = "+".join(models)
    key = None
    gen = "0"
    cached_vector = _NOT_FETCHED
    if svc.redis is not None:
        wanted = cache_keys(svc, tenant_id, req, models)
        key = wanted[1]
        if reads is not None and all(k in reads for k in wanted):
            values: list[bytes | None] | None = [reads[k] for k in wanted]
        else:
            values = await _redis_mget(svc, wanted)
        if values is None:
            key = None  # no generation, no cache: never serve a result we cannot prove fresh
        else:
            gen = (values[0] or b"0").decode()
            if len(values) > 2:
                cached_vector = values[2]
            entry = json.loads(values[1]) if values[1] is not None else None
            if entry is not None and entry.get("gen") == gen:
                metrics.SEARCH_CACHE.labels("results", "hit").inc()
                return [Ranked(*item) for item in entry["ranked"]], model, True
            metrics.SEARCH_CACHE.labels("results", "miss").inc()
    candidates = max(req.top_k, s.search_candidates if req.mode == "hybrid" else req.top_k)
    vec: list[Ranked] = []
    fts: list[Ranked] = []
    if req.mode in ("vector", "hybrid"):
        vec, _best = await vector_candidates(
            svc,
            session,
            tenant_id,
            req.query,
            req.filters,
            candidates,
            models=models,
            cached_vector=cached_vector,
            with_rows=req.mode == "vector",
        )
    if req.mode in ("fulltext", "hybrid"):
        fts = await fulltext_ranked(session, req.query, req.filters, candidates, s)
    if req.mode == "vector":
        ranked = vec
    elif req.mode == "fulltext":
        ranked = fts
    else:
        w = req.weights
        ranked = fuse(
            vec,
            fts,
            k=s.search_rrf_k,
            w_vector=w.vector if w else s.search_vector_weight,
            w_fulltext=w.fulltext if w else s.search_fulltext_weight,
        )
    ranked = ranked[: req.top_k]
    if key is not None:
        payload = json.dumps(
            {"gen": gen, "ranked": [[r.chunk_id, r.score, r.vector_rank, r.fulltext_rank] for r in ranked]}
        )
        _redis_set_later(svc, key, payload, s.search_cache_ttl_s)
    return ranked, model, False


async def materialize(
    svc: SearchServices,
    session: AsyncSession,
    tenant_id: uuid.UUID,
    ranked: list[Ranked],
    query: str,
    *,
    snippets: bool = True,
) -> list[SearchResult]:
    """Fetch (unless the ranking already did), decrypt and shape the ranked chunks, dropping any no
    longer visible."""
    if ranked and all(r.row is not None for r in ranked):
        rows = {r.chunk_id: r.row for r in ranked}
    else:
        rows = await _rows(session, [r.chunk_id for r in ranked])
    if not rows:
        return []
    kept = [(r, rows[r.chunk_id]) for r in ranked if r.chunk_id in rows]
    first = kept[0][1]
    if first.wrapped_dek is None:
        raise TenantKeyDestroyed(f"tenant {tenant_id} has no data key")
    dek = unwrap_dek(svc.keyring, tenant_id, bytes(first.wrapped_dek), first.kek_id)
    texts = [
        open_bytes(
            dek, BlobContext(row.tenant_id, "chunk", row.document_id, row.version_id), bytes(row.text_enc)
        ).decode()
        for _, row in kept
    ]
    if snippets:
        stems = query_stems(query)
        heads = [highlight(t, query, stems=stems) for t in texts]
    else:
        heads = [html.escape(t, quote=False) for t in texts]
    return [
        SearchResult(
            document_id=row.document_id,
            version_id=row.version_id,
            version=row.version,
            chunk_id=row.id,
            ordinal=row.ordinal,
            title=row.title,
            page_start=row.page_start,
            page_end=row.page_end,
            char_start=row.char_start,
            char_end=row.char_end,
            score=r.score,
            vector_rank=r.vector_rank,
            fulltext_rank=r.fulltext_rank,
            text=t,
            snippet=h,
        )
        for (r, row), t, h in zip(kept, texts, heads, strict=True)
    ]


async def search(
    svc: SearchServices,
    session: AsyncSession,
    tenant_id: uuid.UUID,
    req: SearchRequest,
    *,
    reads: dict[str, bytes | None] | None = None,
) -> SearchResponse:
    ranked, model, cached = await rank(svc, session, tenant_id, req, reads=reads)
    results = await materialize(svc, session, tenant_id, ranked, req.query)
    return SearchResponse(query=req.query, mode=req.mode, model=model, cached=cached, results=results)


def audit_details(req: SearchRequest, results: Sequence[SearchResult]) -> dict[str, Any]:
    """What an auditor needs to know a search read: which chunks of which documents went out.
    The query itself may be sensitive: recorded as its sha256."""
    return {
        "mode": req.mode,
        "top_k": req.top_k,
        "query_sha256": hashlib.sha256(req.query.encode()).hexdigest(),
        "filters": req.filters.model_dump(mode="json", exclude_none=True) if req.filters else None,
        "results": [{"document_id": str(r.document_id), "chunk_id": r.chunk_id} for r in results],
    }


_sync_redis: dict[str, Any] = {}


def invalidate_after_commit(session: AsyncSession, tenant_id: uuid.UUID) -> None:
    """Bump the tenant's search generation once this transaction commits (documents changed)."""
    from appliance.db.engine import after_commit

    def bump() -> None:
        import redis

        from appliance.settings import get_settings

        url = get_settings().redis_url
        client = _sync_redis.get(url)
        if client is None:
            client = _sync_redis[url] = redis.Redis.from_url(url, socket_timeout=2)
        invalidate(client, tenant_id)

    after_commit(session, bump)
