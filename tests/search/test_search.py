"""POST /api/v1/search over a real ingested corpus: modes, filters, isolation, deletion, caching."""

from __future__ import annotations

import httpx
import pytest

from tests.factories import bearer, ingest_pending
from tests.search.conftest import Corpus, new_id, upload_text


async def search(client: httpx.AsyncClient, key: str, **body: object) -> httpx.Response:
    return await client.post("/api/v1/search", json=body, headers=bearer(key))


def doc_ids(r: httpx.Response) -> list[str]:
    return [x["document_id"] for x in r.json()["results"]]


@pytest.mark.parametrize(
    ("mode", "query", "expected"),
    [
        ("vector", "how often do we service the heating equipment", "boiler"),  # no shared keyword needed
        ("fulltext", "receipts reimbursed", "travel"),
        ("hybrid", "when can staff get a flu vaccination", "vaccine"),
        ("hybrid", "how long are backups with personal data kept", "privacy"),
    ],
)
async def test_each_mode_finds_the_right_document(
    client: httpx.AsyncClient, corpus: Corpus, mode: str, query: str, expected: str
) -> None:
    r = await search(client, corpus.tenant.key, query=query, mode=mode, top_k=3)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["mode"] == mode and body["model"] == "all-minilm-l6-v2"
    first = body["results"][0]
    assert first["document_id"] == corpus.ids[expected]
    assert first["title"] == expected and first["version"] == 1 and first["ordinal"] == 0
    assert first["char_start"] == 0 and first["char_end"] > 100
    scores = [x["score"] for x in body["results"]]
    assert scores == sorted(scores, reverse=True)
    if mode == "fulltext":
        assert "<mark>" in first["snippet"] and first["fulltext_rank"] == 1 and first["vector_rank"] is None
    if mode == "hybrid":
        assert first["vector_rank"] is not None


async def test_fulltext_matches_any_term_and_vector_ranks_everything(
    client: httpx.AsyncClient, corpus: Corpus
) -> None:
    # "boiler" and "hepatitis" never occur in one document: OR semantics finds both.
    r = await search(client, corpus.tenant.key, query="boiler hepatitis", mode="fulltext", top_k=10)
    assert set(doc_ids(r)) == {corpus.ids["boiler"], corpus.ids["vaccine"]}
    r = await search(client, corpus.tenant.key, query="anything at all", mode="vector", top_k=10)
    assert sorted(doc_ids(r)) == sorted(corpus.ids.values())  # every chunk of the tenant, and only those


async def test_filters(client: httpx.AsyncClient, corpus: Corpus) -> None:
    key, ids = corpus.tenant.key, corpus.ids
    q = "policy for records and schedules"
    r = await search(client, key, query=q, mode="hybrid", top_k=10, filters={"tags": ["ops"]})
    assert doc_ids(r) == [ids["boiler"]]  # selective: the one matching chunk still comes back
    r = await search(client, key, query=q, mode="vector", top_k=10, filters={"metadata": {"dept": "travel"}})
    assert doc_ids(r) == [ids["travel"]]
    r = await search(
        client,
        key,
        query=q,
        mode="vector",
        top_k=10,
        filters={"document_ids": [ids["vaccine"], ids["privacy"]]},
    )
    assert sorted(doc_ids(r)) == sorted([ids["vaccine"], ids["privacy"]])
    r = await search(
        client, key, query=q, mode="vector", top_k=10, filters={"content_types": ["application/pdf"]}
    )
    assert r.json()["results"] == []
    r = await search(client, key, query=q, mode="vector", top_k=10, filters={"content_types": ["text/plain"]})
    assert len(r.json()["results"]) == 4
    r = await search(client, key, query=q, mode="vector", filters={"created_after": "2100-01-01T00:00:00Z"})
    assert r.json()["results"] == []
    r = await search(client, key, query=q, mode="vector", filters={"created_before": "2100-01-01T00:00:00Z"})
    assert len(r.json()["results"]) == 4
    r = await search(client, key, query=q, filters={"document_ids": [new_id()]})
    assert r.json()["results"] == []


async def test_filters_in_fulltext_mode(client: httpx.AsyncClient, corpus: Corpus) -> None:
    """Full text runs through its own SQL function (GIN under RLS): the same filters must hold there."""
    key, ids = corpus.tenant.key, corpus.ids
    q = "six months records"  # every document has at least one of these words

    async def got(**filters: object) -> list[str]:
        r = await search(client, key, query=q, mode="fulltext", top_k=10, filters=filters)
        assert r.status_code == 200, r.text
        return sorted(doc_ids(r))

    assert await got() == sorted(ids.values())
    assert await got(tags=["ops"]) == [ids["boiler"]]
    assert await got(tags=["policy"]) == sorted(ids[n] for n in ("travel", "vaccine", "privacy"))
    assert await got(metadata={"dept": "travel"}) == [ids["travel"]]
    assert await got(document_ids=[ids["vaccine"], ids["privacy"]]) == sorted(
        [ids["vaccine"], ids["privacy"]]
    )
    assert await got(content_types=["application/pdf"]) == []
    assert await got(content_types=["text/plain"]) == sorted(ids.values())
    assert await got(created_after="2100-01-01T00:00:00Z") == []
    assert await got(created_before="2100-01-01T00:00:00Z") == sorted(ids.values())


async def test_tenant_b_never_sees_tenant_a(client: httpx.AsyncClient, corpus: Corpus) -> None:
    a_ids = set(corpus.ids.values())
    for mode in ("vector", "fulltext", "hybrid"):
        r = await search(
            client, corpus.other.key, query="boiler pressure relief valve inspection", mode=mode, top_k=50
        )
        got = set(doc_ids(r))
        assert got and not (got & a_ids), mode
        assert corpus.other_ids["boiler"] in got
        # A's document ids as a filter give B nothing either.
        r = await search(
            client, corpus.other.key, query="boiler", mode=mode, filters={"document_ids": list(a_ids)}
        )
        assert r.json()["results"] == []


async def test_cache_and_invalidation_and_deletion(
    client: httpx.AsyncClient, app, corpus: Corpus, app_db
) -> None:  # type: ignore[no-untyped-def]
    from tests.factories import make_tenant

    t = await make_tenant(app_db, role="editor")
    doc = await upload_text(
        client, t.key, "garden", "The garden hose is stored in the blue shed next to the compost bins."
    )
    await ingest_pending(app, t.id)
    body = {"query": "where is the garden hose", "mode": "hybrid", "top_k": 5}
    first = (await search(client, t.key, **body)).json()
    again = (await search(client, t.key, **body)).json()
    assert not first["cached"] and again["cached"]
    assert again["results"] == first["results"]
    # A new document changes the tenant's generation: the next search is computed afresh.
    hose = await upload_text(
        client, t.key, "hose", "Garden hose repair: replace the washer in the hose coupling."
    )
    await ingest_pending(app, t.id)
    fresh = (await search(client, t.key, **body)).json()
    assert not fresh["cached"] and hose in [x["document_id"] for x in fresh["results"]]
    cached = (await search(client, t.key, **body)).json()
    assert cached["cached"]
    # Deletion: gone from results at once, whether cached or not.
    assert (await client.delete(f"/api/v1/documents/{hose}", headers=bearer(t.key))).status_code == 204
    for _ in range(2):
        after = (await search(client, t.key, **body)).json()
        assert hose not in [x["document_id"] for x in after["results"]]
        assert doc in [x["document_id"] for x in after["results"]]


async def test_a_new_version_replaces_the_old_one_in_results(
    client: httpx.AsyncClient, app, app_db, settings
) -> None:  # type: ignore[no-untyped-def]
    from tests.factories import make_tenant

    t = await make_tenant(app_db, role="editor")
    doc = await upload_text(client, t.key, "menu", "The canteen serves lentil soup on Mondays.")
    await ingest_pending(app, t.id)
    r = await client.post(
        f"/api/v1/documents/{doc}/versions",
        content=b"The canteen serves tomato soup on Mondays and lentil stew on Fridays.",
        headers={**bearer(t.key), "Content-Type": "text/plain", "X-Filename": "menu.txt"},
    )
    assert r.status_code == 201, r.text
    await ingest_pending(app, t.id)
    res = (await search(client, t.key, query="soup", mode="fulltext", top_k=10)).json()["results"]
    assert [(x["document_id"], x["version"]) for x in res] == [(doc, 2)]
    assert "tomato" in res[0]["text"]
    assert_fulltext_statistics_exact(settings)


def assert_fulltext_statistics_exact(settings) -> None:  # type: ignore[no-untyped-def]
    """BM25's per-tenant statistics, kept by triggers, equal a recount from the chunks themselves."""
    import psycopg

    from tests.api.test_auth import owner_conninfo

    with psycopg.connect(owner_conninfo(settings)) as conn:
        lexemes = conn.execute(
            """
            (SELECT tenant_id, lexeme, df FROM fulltext_lexemes
             EXCEPT ALL
             SELECT c.tenant_id, u.lexeme, count(*)::int
             FROM chunks c, unnest(tsvector_to_array(c.tsv)) u(lexeme) GROUP BY 1, 2)
            UNION ALL
            (SELECT c.tenant_id, u.lexeme, count(*)::int
             FROM chunks c, unnest(tsvector_to_array(c.tsv)) u(lexeme) GROUP BY 1, 2
             EXCEPT ALL
             SELECT tenant_id, lexeme, df FROM fulltext_lexemes)
            """
        ).fetchall()
        assert lexemes == []
        stats = conn.execute(
            """
            SELECT s.tenant_id FROM fulltext_stats s
            FULL JOIN (SELECT tenant_id, count(*) AS n, sum(length(tsv)) AS len FROM chunks GROUP BY 1) c
              ON c.tenant_id = s.tenant_id
            WHERE coalesce(s.n_chunks, 0) <> coalesce(c.n, 0) OR coalesce(s.sum_len, 0) <> coalesce(c.len, 0)
            """
        ).fetchall()
        assert stats == []


async def test_bad_requests_are_problems(client: httpx.AsyncClient, corpus: Corpus) -> None:
    key = corpus.tenant.key
    cases = [
        ({"query": "x", "mode": "sideways"}, 422, "validation_error"),
        ({"query": "", "mode": "vector"}, 422, "validation_error"),
        ({"query": "x", "top_k": 0}, 422, "validation_error"),
        ({"query": "x", "filters": {"colour": "red"}}, 422, "validation_error"),
        ({"query": "x", "rerank": True}, 422, "rerank_unavailable"),
        ({"query": "word " * 400, "mode": "vector"}, 422, "query_too_long"),
    ]
    for body, status, code in cases:
        r = await search(client, key, **body)
        assert r.status_code == status, (body, r.text)
        assert r.headers["content-type"].startswith("application/problem+json")
        assert r.json()["code"] == code, r.json()
    r = await client.post("/api/v1/search", json={"query": "x"})
    assert r.status_code == 401


async def test_fulltext_function_is_scoped_like_the_policy(corpus: Corpus, settings) -> None:  # type: ignore[no-untyped-def]
    """`app_fulltext_ranked` runs as the owner: it must scope rows to the caller's tenant itself."""
    import psycopg

    from tests.db.test_rls import app_conninfo

    ranked = "app_fulltext_ranked('boiler', 100, 0.02, 500, 20000, NULL, NULL, NULL, NULL, NULL, NULL)"
    call = f"SELECT document_id::text FROM chunks WHERE id IN (SELECT id FROM {ranked})"
    count = f"SELECT count(*) FROM {ranked}"
    with psycopg.connect(app_conninfo(settings), autocommit=True) as conn:
        assert conn.execute(count).fetchone()[0] == 0  # no tenant set: nothing
        conn.execute("SELECT set_config('app.tenant_id', %s, false)", (str(corpus.other.id),))
        assert {r[0] for r in conn.execute(call)} == {corpus.other_ids["boiler"]}
        conn.execute("SELECT set_config('app.tenant_id', %s, false)", (str(corpus.tenant.id),))
        assert {r[0] for r in conn.execute(call)} == {corpus.ids["boiler"]}
        conn.execute("SELECT set_config('app.tenant_id', '', false)")
        assert conn.execute(count).fetchone()[0] == 0


async def test_fulltext_scores_are_bm25_recomputed_independently(corpus: Corpus, settings) -> None:  # type: ignore[no-untyped-def]
    """`app_fulltext_ranked`'s scores equal BM25 (k1 1.2, b 0.75; idf over all the tenant's chunks; a
    chunk's length is its number of distinct lexemes, tf its positions of the lexeme) computed here from
    the tenant's tsvectors, for a query whose words all fit the candidate budget (fraction 1.0)."""
    import math

    import psycopg

    from tests.api.test_auth import owner_conninfo

    query = "heating boiler travel receipts"
    with psycopg.connect(owner_conninfo(settings), autocommit=True) as conn:
        conn.execute("SELECT set_config('app.tenant_id', %s, false)", (str(corpus.tenant.id),))
        got = conn.execute(
            "SELECT id, rank FROM app_fulltext_ranked(%s, 100, 1.0, 500, 20000,"
            " NULL, NULL, NULL, NULL, NULL, NULL)",
            (query,),
        ).fetchall()
        terms = [
            r[0]
            for r in conn.execute("SELECT unnest(tsvector_to_array(to_tsvector('english', %s)))", (query,))
        ]
        chunks = conn.execute(
            "SELECT c.id, d.status = 'active', length(c.tsv),"
            " (SELECT array_agg(ARRAY[t.lexeme, coalesce(cardinality(t.positions), 1)::text])"
            "  FROM unnest(c.tsv) t)"
            " FROM chunks c JOIN documents d ON d.id = c.document_id WHERE c.tenant_id = %s",
            (corpus.tenant.id,),
        ).fetchall()
    tf = {cid: {lex: int(n) for lex, n in pairs} for cid, _, _, pairs in chunks}
    n = len(chunks)
    avg_len = sum(length for _, _, length, _ in chunks) / n
    df = {t: sum(1 for c in tf.values() if t in c) for t in terms}
    want = {}
    for cid, active, length, _ in chunks:
        score = 0.0
        for t in terms:
            f = tf[cid].get(t)
            if f:
                idf = math.log(1 + (n - df[t] + 0.5) / (df[t] + 0.5))
                score += idf * f * 2.2 / (f + 1.2 * (0.25 + 0.75 * length / avg_len))
        if active and score:
            want[cid] = score
    assert len(want) >= 2
    assert {cid for cid, _ in got} == set(want)
    for cid, rank in got:
        assert rank == pytest.approx(want[cid], rel=1e-5)
    assert [r for _, r in got] == sorted((r for _, r in got), reverse=True)


async def test_route_cache_writes_wait_for_the_response(settings) -> None:  # type: ignore[no-untyped-def]
    """Inside `deferred_cache_writes` a search's cache entries are kept, not written; `write_cache`
    (the route's background task, after the response) writes them all in one round trip."""
    import asyncio
    import uuid

    import redis.asyncio as aredis

    from appliance.keys.keyring import Keyring
    from appliance.search import service

    client = aredis.Redis.from_url(settings.redis_url)
    svc = service.SearchServices(settings=settings, keyring=Keyring.from_settings(settings), redis=client)
    keys = [f"appliance:test:deferred:{uuid.uuid4()}" for _ in range(2)]
    try:
        with service.deferred_cache_writes() as writes:
            service._redis_set_later(svc, keys[0], b"one", 60)
            service._redis_set_later(svc, keys[1], "two", 60)
        await asyncio.sleep(0.05)  # an immediate write would have landed by now
        assert await client.mget(keys) == [None, None]
        assert [w[0] for w in writes] == keys
        await service.write_cache(svc, writes)
        assert await client.mget(keys) == [b"one", b"two"]
        assert 0 < await client.ttl(keys[0]) <= 60
        # Outside the block: written at once (searches made by answers and chat).
        service._redis_set_later(svc, keys[0], b"three", 60)
        await asyncio.sleep(0.05)
        assert await client.get(keys[0]) == b"three"
    finally:
        await client.delete(*keys)
        await client.aclose()


async def test_cache_entries_are_read_in_the_rate_limit_round_trip(
    client: httpx.AsyncClient, corpus: Corpus, settings
) -> None:  # type: ignore[no-untyped-def]
    """With rate limits on, a search's cache reads (generation, result, query vector) ride in the rate
    limit's script: no MGET of its own, and a repeated search is still served from the cache. With
    rate limits off the search reads them itself."""
    import redis.asyncio as aredis

    from appliance.api import create_app
    from tests.api.test_rate_limits import limited, running

    redis = aredis.Redis.from_url(settings.redis_url)

    async def calls(command: str) -> int:
        stats = await redis.info("commandstats")
        return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))

    try:
        body = {"query": f"garden hose storage {new_id()}", "mode": "vector", "top_k": 3}
        mget, evalsha = await calls("mget"), await calls("evalsha")
        first = await search(client, corpus.tenant.key, **body)
        again = await search(client, corpus.tenant.key, **body)
        assert first.status_code == again.status_code == 200
        assert not first.json()["cached"] and again.json()["cached"]
        assert again.json()["results"] == first.json()["results"]
        assert await calls("mget") == mget
        assert await calls("evalsha") >= evalsha + 2
        assert "ratelimit-remaining" in again.headers

        unlimited = create_app(limited(settings, rate_limits_enabled=False))
        async with running(unlimited) as (plain,):
            mget = await calls("mget")
            third = await search(plain, corpus.tenant.key, **body)
            assert third.status_code == 200 and third.json()["cached"]
            assert "ratelimit-remaining" not in third.headers
            assert await calls("mget") == mget + 1
    finally:
        await redis.aclose()
