"""Retrieval quality and search latency of a real appliance on a BEIR-format data set.

    .venv/bin/python bench/eval_retrieval.py --data DIR [--limit-docs N]
        [--modes vector,fulltext,hybrid] [--clients 4] [--keep-home] [--api URL --key KEY]
        [--json OUT] [--run-dir DIR] [--timeout S]
    .venv/bin/python bench/eval_retrieval.py --self-test

DIR is any BEIR-format directory: `corpus.jsonl` ({_id, title, text}), `queries.jsonl` ({_id, text})
and `qrels/test.tsv` (header `query-id<TAB>corpus-id<TAB>score`), e.g. /work/shared/data/scifact.

Without --api it starts `appliance up --detach` in a throw-away home on free loopback ports (one API
worker), creates a tenant and an editor key (as bench/ingest.py does) and always stops it at the end
(`appliance down`, also on errors and Ctrl-C; the home is removed unless --keep-home). With --api and
--key (an editor key of some tenant) it uses a running appliance instead.

1. Ingest through the real path: each corpus document is POSTed to /api/v1/documents as the raw
   body `title + "\\n\\n" + text` (`Content-Type: text/plain`, `X-Filename: <_id>.txt`, query parameter
   `metadata={"title": ..., "extra": {"beir_id": <_id>}}`) by --clients concurrent clients. Identical
   bytes are one document (200 instead of 201), so a document id maps to a list of corpus ids. Then
   the document list is polled until every uploaded document's current version is ready, failed or
   needs_ocr. Prints the wall time (first upload to last document done), docs/min and the chunk count
   (read from Postgres as the owner when this script started the appliance).
2. For each mode, every evaluated query is sent once, one request at a time, to POST /api/v1/search
   with top_k=100. The chunk ranking becomes a document ranking (a document ranks where its best chunk
   does; documents standing for several corpus ids list them in corpus order), scored with nDCG@10
   and recall@10 with trec_eval semantics (gain = qrels score, discount 1/log2(rank + 1), ideal DCG
   from the qrels, mean over every evaluated query: one with nothing relevant retrieved, or whose
   search failed, scores 0). Latency is the client-side round trip. Modes run in the order given; a
   later mode reuses the query embedding an earlier one cached (the API caches it per tenant).

--limit-docs N uploads only the first N corpus documents and evaluates only the queries whose
relevant documents are all among them (a quick, still meaningful subset). If DIR has a README.md,
its baseline table lines are printed next to the results. --json writes the numbers, --run-dir one
TREC run file per mode (for cross-checking with trec_eval/pytrec_eval). Run as root after ./install.sh.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from appliance.settings import load_settings  # noqa: E402
from bench.ingest import cli, free_port  # noqa: E402

DONE = ("ready", "failed", "needs_ocr")
K = 10

# ---------------------------------------------------------------------------------------------
# Metrics (trec_eval semantics; see the module docstring).


def ndcg_at(ranking: list[str], rels: dict[str, int], k: int = K) -> float:
    dcg = sum(rels.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranking[:k]) if rels.get(d, 0) > 0)
    ideal = sorted((g for g in rels.values() if g > 0), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def recall_at(ranking: list[str], rels: dict[str, int], k: int = K) -> float:
    relevant = {d for d, g in rels.items() if g > 0}
    return len(relevant.intersection(ranking[:k])) / len(relevant) if relevant else 0.0


def evaluate(run: dict[str, list[str]], qrels: dict[str, dict[str, int]], k: int = K) -> tuple[float, float]:
    """Mean nDCG@k and recall@k over every query in `qrels` (a query missing from `run` scores 0)."""
    if not qrels:
        return 0.0, 0.0
    ndcg = sum(ndcg_at(run.get(q, []), rels, k) for q, rels in qrels.items())
    recall = sum(recall_at(run.get(q, []), rels, k) for q, rels in qrels.items())
    return ndcg / len(qrels), recall / len(qrels)


def self_test() -> None:
    """Toy cases worked out by hand."""
    # Two relevant documents at ranks 2 and 4: DCG = 1/log2(3) + 1/log2(5) = 0.63093 + 0.43068,
    # IDCG = 1 + 1/log2(3) = 1.63093, nDCG = 0.65092; both are in the top 10, one in the top 2.
    rels = {"a": 1, "b": 1}
    assert abs(ndcg_at(["x", "a", "y", "b"], rels) - 0.650921) < 1e-6
    assert recall_at(["x", "a", "y", "b"], rels) == 1.0
    assert recall_at(["x", "a", "y", "b"], rels, k=2) == 0.5
    # Graded gains, ranked in the wrong order: DCG = 1 + 2/log2(3) = 2.26186,
    # IDCG = 2 + 1/log2(3) = 2.63093, nDCG = 0.859719. Unjudged and zero-score documents gain nothing.
    assert abs(ndcg_at(["b", "a", "z"], {"a": 2, "b": 1, "z": 0}) - 0.859719) < 1e-6
    # Relevant document only at rank 11: nothing within the cut-off.
    assert ndcg_at([f"n{i}" for i in range(10)] + ["a"], {"a": 1}) == 0.0
    # The mean counts a query that is absent from the run (or retrieved nothing) as 0.
    ndcg, recall = evaluate({"q1": ["a", "b"]}, {"q1": rels, "q2": {"c": 1}})
    assert (ndcg, recall) == (0.5, 0.5), (ndcg, recall)


# ---------------------------------------------------------------------------------------------
# The data set.


@dataclass
class Beir:
    corpus: list[dict[str, str]]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]  # the evaluated queries only
    qrels_total: int  # queries in qrels/test.tsv
    missing_queries: list[str] = field(default_factory=list)  # in the qrels, not in queries.jsonl


def load_beir(folder: Path, limit_docs: int | None) -> Beir:
    corpus: list[dict[str, str]] = []
    with (folder / "corpus.jsonl").open(encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            if limit_docs is not None and len(corpus) >= limit_docs:
                break
            doc = json.loads(line)
            corpus.append(
                {"_id": str(doc["_id"]), "title": doc.get("title") or "", "text": doc.get("text") or ""}
            )
    queries: dict[str, str] = {}
    with (folder / "queries.jsonl").open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                q = json.loads(line)
                queries[str(q["_id"])] = q["text"]
    qrels: dict[str, dict[str, int]] = {}
    with (folder / "qrels" / "test.tsv").open(encoding="utf-8", newline="") as fh:
        for i, row in enumerate(csv.reader(fh, delimiter="\t")):
            if not row or (i == 0 and row[0] == "query-id"):
                continue
            qid, did, score = row[0], row[1], int(float(row[2]))
            qrels.setdefault(qid, {})[did] = score
    total = len(qrels)
    if limit_docs is not None:
        in_subset = {d["_id"] for d in corpus}
        qrels = {
            q: rels
            for q, rels in qrels.items()
            if any(g > 0 for g in rels.values()) and all(d in in_subset for d, g in rels.items() if g > 0)
        }
    missing = sorted(q for q in qrels if q not in queries)
    return Beir(corpus, queries, qrels, total, missing)


def baseline_lines(folder: Path) -> list[str]:
    """The table lines under the README's first heading that mentions baselines, if any."""
    readme = folder / "README.md"
    if not readme.is_file():
        return []
    lines: list[str] = []
    inside = False
    for line in readme.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("#"):
            if inside:
                break
            inside = "baseline" in line.lower()
            if inside:
                lines.append(line)
        elif inside and line.lstrip().startswith("|"):
            lines.append(line)
    return lines


# ---------------------------------------------------------------------------------------------
# Ingest.


@dataclass
class Uploaded:
    docs: dict[str, list[str]]  # document id -> corpus ids, in corpus order
    created: int = 0
    duplicates: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)  # (corpus id, why)


def body_of(doc: dict[str, str]) -> bytes:
    return (doc["title"] + "\n\n" + doc["text"]).encode()


def upload_corpus(url: str, key: str, corpus: list[dict[str, str]], clients: int) -> Uploaded:
    """POST every corpus document with `clients` concurrent clients (each its own connection)."""
    out = Uploaded(docs={})
    order: dict[str, int] = {}
    lock = threading.Lock()
    stop = threading.Event()
    todo = iter(enumerate(corpus))

    def client_loop() -> None:
        with httpx.Client(base_url=url, timeout=300, headers={"Authorization": f"Bearer {key}"}) as c:
            while not stop.is_set():
                with lock:
                    item = next(todo, None)
                if item is None:
                    return
                i, doc = item
                meta = {"title": (doc["title"].strip() or doc["_id"])[:500], "extra": {"beir_id": doc["_id"]}}
                why = ""
                for attempt in range(4):
                    try:
                        r = c.post(
                            "/api/v1/documents",
                            content=body_of(doc),
                            params={"metadata": json.dumps(meta)},
                            headers={"Content-Type": "text/plain", "X-Filename": f"{doc['_id']}.txt"},
                        )
                    except httpx.TransportError as exc:
                        why = f"{type(exc).__name__}: {exc}"
                    else:
                        if r.status_code in (200, 201):
                            doc_id = r.json()["id"]
                            with lock:
                                order[doc["_id"]] = i
                                out.docs.setdefault(doc_id, []).append(doc["_id"])
                                if r.status_code == 201:
                                    out.created += 1
                                else:
                                    out.duplicates += 1
                            break
                        why = f"HTTP {r.status_code} {r.text[:200]}"
                        if r.status_code not in (429, 502, 503, 504):
                            break
                    time.sleep(2**attempt)
                else:
                    why += " (gave up after 4 tries)"
                if why and doc["_id"] not in order:
                    with lock:
                        out.errors.append((doc["_id"], why))

    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(client_loop) for _ in range(clients)]
        try:
            for f in futures:
                f.result()
        except BaseException:
            stop.set()  # the clients finish their current request and return; then re-raise
            raise
    for ids in out.docs.values():
        ids.sort(key=order.__getitem__)
    return out


def send(c: httpx.Client, method: str, path: str, **kw: Any) -> httpx.Response:
    """One request, sent again (up to twice) when the connection fails before a response arrives. The
    API (gunicorn's default `keepalive` of 2 s) closes idle keep-alive connections, and a request sent
    just as it does fails with "Server disconnected" / "Connection reset by peer"."""
    for attempt in range(3):
        try:
            return c.request(method, path, **kw)
        except httpx.TransportError:
            if attempt == 2:
                raise
            time.sleep(0.5)
    raise AssertionError("unreachable")


def list_statuses(c: httpx.Client, wanted: set[str]) -> dict[str, str]:
    """Current-version ingest status of the `wanted` documents, from the paged document list."""
    statuses: dict[str, str] = {}
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 500}
        if cursor:
            params["cursor"] = cursor
        r = send(c, "GET", "/api/v1/documents", params=params)
        r.raise_for_status()
        page = r.json()
        for item in page["items"]:
            if item["id"] in wanted:
                statuses[item["id"]] = item["current_version"]["ingest_status"]
        cursor = page.get("next_cursor")
        if not cursor or not page["items"]:
            return statuses


def wait_ingested(
    url: str, key: str, doc_ids: set[str], start: float, timeout: float, settings: Any = None
) -> dict[str, str]:
    """Wait until every document in `doc_ids` is ready, failed or needs_ocr; returns their statuses.

    With `settings` (an appliance this script started, so the tenant holds only these documents) it
    polls Postgres as the owner, as bench/ingest.py does: a cheap count. Otherwise it pages through
    GET /api/v1/documents, which costs the API real CPU on a large tenant (stolen from the workers on a
    small box), so it waits ten times as long as a listing took between two listings."""
    from sqlalchemy import create_engine, text

    engine = create_engine(settings.owner_database_url) if settings is not None else None
    last_print = 0.0
    try:
        with httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {key}"}) as c:
            while True:
                t0 = time.perf_counter()
                if engine is not None:
                    with engine.connect() as conn:
                        rows = conn.execute(
                            text("SELECT ingest_status, count(*) FROM document_versions GROUP BY 1")
                        ).all()
                    counts = Counter({str(status): int(n) for status, n in rows})
                else:
                    statuses = list_statuses(c, doc_ids)
                    counts = Counter(statuses.get(d, "missing") for d in doc_ids)
                now = time.perf_counter()
                done = sum(counts[s] for s in DONE)
                if done >= len(doc_ids):
                    return list_statuses(c, doc_ids) if engine is not None else statuses
                if now - last_print > 30:
                    last_print = now
                    print(
                        f"  {now - start:6.0f} s: {done}/{len(doc_ids)} done {dict(sorted(counts.items()))}"
                    )
                if now - start > timeout:
                    raise SystemExit(f"timed out after {timeout:.0f} s waiting for ingestion: {dict(counts)}")
                time.sleep(0.25 if engine is not None else max(1.0, 10 * (now - t0)))
    finally:
        if engine is not None:
            engine.dispose()


def owner_stats(settings: Any) -> tuple[int, int, list[tuple[str, int]]]:
    """Chunks, embedded tokens and failed jobs by error code, read as the database owner."""
    from sqlalchemy import create_engine, text

    engine = create_engine(settings.owner_database_url)
    try:
        with engine.connect() as conn:
            chunks, tokens = conn.execute(
                text("SELECT count(*), coalesce(sum(token_count), 0) FROM chunks")
            ).one()
            failures = conn.execute(
                text(
                    "SELECT coalesce(error_code, 'unknown'), count(*) FROM jobs "
                    "WHERE status IN ('failed', 'dead') GROUP BY 1 ORDER BY 2 DESC"
                )
            ).all()
    finally:
        engine.dispose()
    return int(chunks), int(tokens), [(str(c), int(n)) for c, n in failures]


# ---------------------------------------------------------------------------------------------
# Search.


@dataclass
class ModeResult:
    mode: str
    run: dict[str, list[str]]  # query id -> corpus ids, best first
    latencies_ms: list[float]
    errors: Counter[str]
    unmapped: int = 0  # hits on documents this run did not upload (a shared tenant)
    cached: int = 0  # responses served from the API's result cache
    warmup_ms: float = 0.0  # one unmeasured search first
    ndcg: float = 0.0
    recall: float = 0.0


def document_ranking(results: list[dict[str, Any]], docs: dict[str, list[str]]) -> tuple[list[str], int]:
    """Chunks best first -> corpus ids best first (a document ranks at its best chunk)."""
    seen: set[str] = set()
    ranking: list[str] = []
    unmapped = 0
    for r in results:
        doc_id = str(r["document_id"])
        if doc_id in seen:
            continue
        seen.add(doc_id)
        ids = docs.get(doc_id)
        if ids is None:
            unmapped += 1
            ranking.append(f"unmapped:{doc_id}")  # not ours: occupies a rank, never relevant
        else:
            ranking.extend(ids)
    return ranking, unmapped


def search_mode(url: str, key: str, mode: str, data: Beir, docs: dict[str, list[str]]) -> ModeResult:
    res = ModeResult(mode, {}, [], Counter())
    with httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {key}"}) as c:
        # Not measured: the first vector search of an API process loads the embedding model.
        t0 = time.perf_counter()
        send(c, "POST", "/api/v1/search", json={"query": f"warm-up {time.time()}", "mode": mode, "top_k": 1})
        res.warmup_ms = 1000 * (time.perf_counter() - t0)
        for qid in data.qrels:
            query = data.queries.get(qid)
            if query is None:
                res.errors["query_missing"] += 1
                continue
            r = None
            for attempt in range(
                2
            ):  # searches go back to back: a keep-alive race is unlikely, not impossible
                t0 = time.perf_counter()
                try:
                    r = c.post("/api/v1/search", json={"query": query, "mode": mode, "top_k": 100})
                except httpx.TransportError as exc:
                    if attempt:
                        res.errors[type(exc).__name__] += 1
                    continue
                res.latencies_ms.append(1000 * (time.perf_counter() - t0))
                break
            if r is None:
                continue
            if r.status_code != 200:
                try:
                    code = str(r.json().get("code", r.status_code))
                except ValueError:
                    code = str(r.status_code)
                res.errors[f"HTTP {r.status_code} {code}"] += 1
                if sum(res.errors.values()) <= 3:
                    print(f"  {mode} query {qid}: HTTP {r.status_code} {r.text[:300]}")
                continue
            body = r.json()
            res.cached += bool(body.get("cached"))
            res.run[qid], unmapped = document_ranking(body["results"], docs)
            res.unmapped += unmapped
    res.ndcg, res.recall = evaluate(res.run, data.qrels)
    return res


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def write_run(path: Path, mode: str, run: dict[str, list[str]]) -> None:
    with path.open("w") as fh:
        for qid, ranking in run.items():
            for rank, doc in enumerate(ranking, 1):
                fh.write(f"{qid} Q0 {doc} {rank} {len(ranking) - rank + 1} appliance-{mode}\n")


# ---------------------------------------------------------------------------------------------


def appliance_env(home: Path) -> tuple[dict[str, str], str, dict[str, str]]:
    """The environment for an appliance in `home` on free loopback ports (as bench/ingest.py sets it):
    (env, API URL, settings overrides)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    ports = {name: free_port() for name in ("api_port", "pg_port", "redis_port", "llm_port")}
    env.update(
        APPLIANCE_HOME=str(home),
        APPLIANCE_API_PORT=str(ports["api_port"]),
        APPLIANCE_PG_PORT=str(ports["pg_port"]),
        APPLIANCE_REDIS_PORT=str(ports["redis_port"]),
        APPLIANCE_LLM_PORT=str(ports["llm_port"]),
        APPLIANCE_API_WORKERS="1",
        # The rate limits stay in the path but must not trip: a corpus is uploaded, and its queries
        # searched, faster than the defaults allow one key (300 uploads, 1,200 searches a minute).
        **{
            f"APPLIANCE_{scope}RATE_LIMIT_{cls}": "1000000/minute"
            for scope in ("", "TENANT_")
            for cls in ("UPLOAD", "SEARCH")
        },
    )
    overrides = {
        k.removeprefix("APPLIANCE_").lower(): v for k, v in env.items() if k.startswith("APPLIANCE_")
    }
    overrides.pop("home")
    return env, f"http://127.0.0.1:{ports['api_port']}", overrides


def tenant_key(url: str, system_key: str) -> str:
    """A new tenant and an editor key for it."""
    with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {system_key}"}) as c:
        r = c.post("/api/v1/tenants", json={"name": "bench-eval"})
        r.raise_for_status()
        r = c.post("/api/v1/keys", json={"name": "bench-eval", "role": "editor", "tenant_id": r.json()["id"]})
        r.raise_for_status()
        return str(r.json()["key"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help="a BEIR-format directory")
    ap.add_argument("--limit-docs", type=int, default=None, help="only the first N corpus documents")
    ap.add_argument("--modes", default="vector,fulltext,hybrid", help="comma-separated search modes")
    ap.add_argument("--clients", type=int, default=4, help="concurrent upload clients (default 4)")
    ap.add_argument("--keep-home", action="store_true", help="keep the throw-away appliance home")
    ap.add_argument("--api", help="URL of a running appliance (with --key) instead of starting one")
    ap.add_argument("--key", help="an editor API key of the tenant to use (with --api)")
    ap.add_argument("--json", type=Path, help="write the numbers here")
    ap.add_argument("--run-dir", type=Path, help="write one TREC run file per mode here")
    ap.add_argument("--timeout", type=float, default=7200, help="give up waiting for ingestion (s)")
    ap.add_argument("--self-test", action="store_true", help="check the metrics on toy cases and exit")
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # progress through `tee`

    self_test()
    if args.self_test:
        print("metrics self-test passed")
        return
    if args.data is None:
        ap.error("--data is required")
    if bool(args.api) != bool(args.key):
        ap.error("--api and --key go together")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in ("vector", "fulltext", "hybrid") for m in modes):
        ap.error("--modes takes vector, fulltext and/or hybrid")

    # Ctrl-C (even where the shell started us with SIGINT ignored) and SIGTERM run the clean-up below.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    data = load_beir(args.data, args.limit_docs)
    print(
        f"data: {args.data}: {len(data.corpus)} documents"
        + (f" (first {args.limit_docs})" if args.limit_docs is not None else "")
        + f", {len(data.queries)} queries, {data.qrels_total} queries with qrels; "
        f"evaluating {len(data.qrels)} queries"
        + (" (those whose relevant documents are all in the subset)" if args.limit_docs is not None else "")
    )
    if data.missing_queries:
        print(f"  {len(data.missing_queries)} qrels queries are not in queries.jsonl (they score 0)")

    home: Path | None = None
    env: dict[str, str] | None = None
    try:
        settings = None
        if args.api:
            url, key = args.api.rstrip("/"), args.key
        else:
            home = Path(tempfile.mkdtemp(prefix="appliance-bench-eval-", dir="/var/tmp"))
            os.chmod(home, 0o755)
            env, url, overrides = appliance_env(home)
            t0 = time.perf_counter()
            out = cli(env, "up", "--detach", "--timeout", "300")
            if out.returncode:
                raise SystemExit(f"appliance up failed:\n{out.stdout}{out.stderr}")
            settings = load_settings(home=home, **overrides)
            print(
                f"appliance up in {time.perf_counter() - t0:.0f} s ({home}): API workers 1, worker processes "
                f"{settings.worker_processes}, worker threads {settings.worker_threads}; "
                f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs"
            )
            key = tenant_key(url, next(w for w in out.stdout.split() if w.startswith("apl_")))

        # Ingest.
        start = time.perf_counter()
        up = upload_corpus(url, key, data.corpus, args.clients)
        upload_s = time.perf_counter() - start
        print(
            f"uploaded {len(data.corpus) - len(up.errors)} of {len(data.corpus)} in {upload_s:.1f} s with "
            f"{args.clients} clients: {up.created} new, {up.duplicates} duplicates of stored bytes "
            f"({len(up.docs)} documents)"
        )
        for cid, why in up.errors[:10]:
            print(f"  upload failed: {cid}: {why}")
        statuses = wait_ingested(url, key, set(up.docs), start, args.timeout, settings)
        ingest_s = time.perf_counter() - start
        counts = Counter(statuses.values())
        chunks = tokens = None
        failures: list[tuple[str, int]] = []
        if settings is not None:
            chunks, tokens, failures = owner_stats(settings)
        not_ready = sorted((s, d) for d, s in statuses.items() if s != "ready")
        print()
        print(
            f"ingest: {len(up.docs)} documents ({counts['ready']} ready, {counts['failed']} failed, "
            f"{counts['needs_ocr']} needs_ocr) in {ingest_s:.1f} s (first upload to last document done), "
            f"{60 * len(up.docs) / ingest_s:.1f} docs/min"
            + (
                f", {chunks} chunks ({chunks / max(counts['ready'], 1):.2f} per ready document), "
                f"{tokens:,} embedded tokens"
                if chunks is not None
                else ""
            )
        )
        if not_ready:
            print("  not ready: " + ", ".join(f"{up.docs[d][0]} ({s})" for s, d in not_ready[:20]))
        if failures:
            print("  failed jobs by code: " + ", ".join(f"{c} {n}" for c, n in failures))

        # Search.
        results: list[ModeResult] = []
        for mode in modes:
            t0 = time.perf_counter()
            res = search_mode(url, key, mode, data, up.docs)
            results.append(res)
            print(
                f"{mode}: {len(res.latencies_ms)} searches in {time.perf_counter() - t0:.1f} s "
                f"(after a {res.warmup_ms:.0f} ms warm-up search); "
                f"nDCG@{K} {res.ndcg:.4f}, recall@{K} {res.recall:.4f}"
                + (f"; errors {dict(res.errors)}" if res.errors else "")
                + (f"; {res.cached} served from the result cache" if res.cached else "")
                + (f"; {res.unmapped} hits on documents not uploaded by this run" if res.unmapped else "")
            )
            if args.run_dir:
                args.run_dir.mkdir(parents=True, exist_ok=True)
                write_run(args.run_dir / f"{mode}.trec", mode, res.run)

        print()
        print(
            f"{args.data.name}: {len(data.corpus)} documents, {len(data.qrels)} queries evaluated; "
            f"ingest {ingest_s:.1f} s ({60 * len(up.docs) / ingest_s:.1f} docs/min"
            + (f", {chunks} chunks" if chunks is not None else "")
            + ")"
        )
        print(
            f"| mode | nDCG@{K} | recall@{K} | latency mean ms | p50 ms | p95 ms | errors |\n"
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
        )
        for res in results:
            lat = res.latencies_ms
            mean = statistics.fmean(lat) if lat else float("nan")
            print(
                f"| {res.mode} | {res.ndcg:.4f} | {res.recall:.4f} | {mean:.1f} | {pct(lat, 50):.1f} | "
                f"{pct(lat, 95):.1f} | {sum(res.errors.values())} |"
            )
        if "vector" in modes and "hybrid" in modes:
            first, second = sorted(("vector", "hybrid"), key=modes.index)
            print(
                f"({second} reused the query embeddings {first} cached: its latency omits embedding queries)"
            )
        baselines = baseline_lines(args.data)
        if baselines:
            print()
            print(
                f"from {args.data / 'README.md'}" + (" (full corpus)" if args.limit_docs is not None else "")
            )
            print("\n".join(baselines))

        if args.json:
            args.json.write_text(
                json.dumps(
                    {
                        "data": str(args.data),
                        "documents": len(data.corpus),
                        "limit_docs": args.limit_docs,
                        "queries_evaluated": len(data.qrels),
                        "ingest": {
                            "uploaded": len(data.corpus) - len(up.errors),
                            "upload_errors": len(up.errors),
                            "documents": len(up.docs),
                            "duplicates": up.duplicates,
                            "statuses": dict(counts),
                            "wall_s": round(ingest_s, 2),
                            "docs_per_min": round(60 * len(up.docs) / ingest_s, 1),
                            "chunks": chunks,
                            "tokens": tokens,
                        },
                        "modes": {
                            r.mode: {
                                f"ndcg@{K}": round(r.ndcg, 6),
                                f"recall@{K}": round(r.recall, 6),
                                "latency_ms": {
                                    "mean": round(statistics.fmean(r.latencies_ms), 2)
                                    if r.latencies_ms
                                    else None,
                                    "p50": round(pct(r.latencies_ms, 50), 2) if r.latencies_ms else None,
                                    "p95": round(pct(r.latencies_ms, 95), 2) if r.latencies_ms else None,
                                },
                                "searches": len(r.latencies_ms),
                                "warmup_ms": round(r.warmup_ms, 2),
                                "errors": dict(r.errors),
                                "cached": r.cached,
                                "unmapped_hits": r.unmapped,
                            }
                            for r in results
                        },
                    },
                    indent=2,
                )
                + "\n"
            )
            print(f"\nwrote {args.json}")
    finally:
        if env is not None:
            down = cli(env, "down")
            if down.returncode:
                print(f"appliance down failed:\n{down.stdout}{down.stderr}", file=sys.stderr)
        if home is not None:
            if args.keep_home:
                print(f"kept the appliance home {home}")
            else:
                shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
