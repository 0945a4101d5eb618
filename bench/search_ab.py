"""Interleaved A/B of the vector search over HTTP, on a home that `search_latency.py --home` loaded.

    .venv/bin/python bench/search_ab.py --home /var/tmp/sl1m [--rounds 3] [--queries 400]
        [--warmup 300] [--settle 3] 'before:PYTHONPATH=/var/tmp/wt_old' 'after:'

Each variant is `NAME:VAR=VALUE,VAR=VALUE` (environment for `appliance up`; empty for none). A code
change is compared by pointing PYTHONPATH at a git worktree of the other commit: the supervisor puts
it first on every child's path (the commands run in the home, not the checkout, whose directory
`python -m` would put first). Per round, per variant in turn: `appliance up --detach`, a wait until
Postgres's autoprewarm has read its buffers back (`search_latency.prewarm_watch`: until 2026-11-27 a
fixed 8 s, which at 6 GB of buffers left most passes inside the read-back, where an audited search's
commit waits behind the disk), a pause of `--settle` seconds, `--warmup` searches untimed, then
`--queries` searches over HTTP (one keep-alive connection, the bench's raw client), then the same
statement directly in Postgres for the same query vectors (as `search_latency.py`'s "pg direct"),
then `appliance down`; the API workers' and Postgres's CPU time per HTTP search is read from /proc
(less sensitive to the machine's speed of the hour than latency). The variants meet the same
machine minutes, so an hour's speed (this VM's varies by up to 2x) does not decide the comparison:
run at least 3 rounds and compare the pooled rows, printed last.

Query vectors: stored chunk vectors (a random sample) plus N(0, 0.03^2) noise, normalised; query
texts are unique, with their vectors put in the query-embedding cache first (nothing is embedded).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from search_latency import RawHTTP, pct, prewarm_watch, superuser_connect  # noqa: E402

from appliance.search.service import QEMB_KEY, knn_statement  # noqa: E402
from appliance.settings import Settings, load_settings  # noqa: E402

CLI = str(Path(sys.executable).parent / "appliance")


def parse_variant(spec: str) -> tuple[str, dict[str, str]]:
    name, _, envs = spec.partition(":")
    if not name:
        raise SystemExit(f"variant {spec!r}: NAME:VAR=VALUE,... expected")
    pairs = [e.split("=", 1) for e in envs.split(",") if e]
    if any(len(p) != 2 for p in pairs):
        raise SystemExit(f"variant {spec!r}: NAME:VAR=VALUE,... expected")
    return name, dict(pairs)  # type: ignore[arg-type]


def cpu_seconds(marker: str) -> float:
    """CPU time (user + system) of the processes whose command line contains `marker`."""
    total = 0.0
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if marker not in (proc / "cmdline").read_bytes().decode(errors="replace"):
                continue
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def sample_vectors(settings: Settings, n: int = 4000) -> np.ndarray:
    with superuser_connect(settings) as conn:
        rows = conn.execute(
            "SELECT embedding::text FROM chunks TABLESAMPLE SYSTEM (0.5) LIMIT %s", (n,)
        ).fetchall()
    return np.array([json.loads(r[0]) for r in rows], dtype="<f4")


async def measure(
    settings: Settings,
    state: dict,
    pool: np.ndarray,
    args: argparse.Namespace,
    seed: int,
    cpu_ms: list[float],
) -> tuple[list[float], list[float]]:
    """HTTP and direct latencies (ms); appends the API's and Postgres's CPU ms per HTTP search to `cpu_ms`."""
    import redis

    rng = np.random.default_rng(seed)
    client = redis.Redis.from_url(settings.redis_url)
    total = args.warmup + args.queries
    texts, vecs = [], []
    for _ in range(total):
        text = f"ab probe {uuid.uuid4().hex}"
        noisy = np.asarray(pool[rng.integers(len(pool))], dtype="<f4") + rng.normal(
            scale=0.03, size=pool.shape[1]
        )
        v = (noisy / np.linalg.norm(noisy)).astype("<f4")
        digest = hashlib.sha256(text.encode()).hexdigest()
        key = QEMB_KEY.format(tenant=state["tenant"], model=args.model, digest=digest)
        client.set(key, v.tobytes(), ex=3600)
        texts.append(text)
        vecs.append(v)
    client.close()
    http = await RawHTTP(f"http://127.0.0.1:{settings.api_port}", state["key"]).open()

    async def one(text: str) -> float:
        t0 = time.perf_counter()
        body = json.dumps({"query": text, "mode": "vector", "top_k": 10}).encode()
        status, data, done = await http.post_json("/api/v1/search", body)
        if status != 200 or b'"cached":false' not in data:
            raise SystemExit(f"HTTP {status}: {data[:300]!r}")
        return (done - t0) * 1000

    for text in texts[: args.warmup]:
        await one(text)
    api0, pg0 = cpu_seconds("appliance.api:create_app"), cpu_seconds("postgres")
    http_ms = [await one(text) for text in texts[args.warmup :]]
    cpu_ms.append((cpu_seconds("appliance.api:create_app") - api0) * 1000 / len(http_ms))
    cpu_ms.append((cpu_seconds("postgres") - pg0) * 1000 / len(http_ms))
    await http.close()
    url = settings.app_database_url.replace("postgresql+psycopg://", "postgresql://")
    direct_ms = []
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute(f"SET hnsw.ef_search = {settings.search_hnsw_ef_search}")
        await conn.execute("SET hnsw.iterative_scan = relaxed_order")
        await conn.execute("SELECT set_config('app.tenant_id', %s, false)", (state["tenant"],))
        for v in vecs[args.warmup :]:
            sql, params = knn_statement(v.tobytes(), args.model, None, 10, with_rows=True)
            t0 = time.perf_counter()
            await (await conn.execute(sql, params)).fetchall()
            direct_ms.append((time.perf_counter() - t0) * 1000)
    return http_ms, direct_ms


def line(label: str, http_ms: list[float], direct_ms: list[float], cpu_ms: list[float]) -> str:
    h50, h95, d50, d95 = pct(http_ms, 50), pct(http_ms, 95), pct(direct_ms, 50), pct(direct_ms, 95)
    api, pg = float(np.mean(cpu_ms[0::2])), float(np.mean(cpu_ms[1::2]))
    return (
        f"{label}: HTTP p50 {h50:.2f} p95 {h95:.2f} | direct p50 {d50:.2f} p95 {d95:.2f} | "
        f"gap p50 {h50 - d50:+.2f} p95 {h95 - d95:+.2f} | CPU per search: API {api:.2f} ms, "
        f"Postgres {pg:.2f} ms (n {len(http_ms)})"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", type=Path, required=True, help="a home loaded by search_latency.py --home")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--queries", type=int, default=400)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument(
        "--settle", type=float, default=3.0, help="seconds after autoprewarm is done before measuring"
    )
    ap.add_argument("--model", default="all-minilm-l6-v2")
    ap.add_argument("variants", nargs="+", help="NAME:VAR=VALUE,...")
    args = ap.parse_args()
    variants = [parse_variant(v) for v in args.variants]
    state = json.loads((args.home / "bench-state.json").read_text())
    base = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    base.update({f"APPLIANCE_{k.upper()}": str(v) for k, v in state["ports"].items()})
    base.update(
        APPLIANCE_HOME=str(args.home),
        APPLIANCE_RATE_LIMIT_SEARCH="1000000/minute",
        APPLIANCE_TENANT_RATE_LIMIT_SEARCH="1000000/minute",
    )
    settings = load_settings(home=args.home, **{k: str(v) for k, v in state["ports"].items()})
    pooled: dict[str, tuple[list[float], list[float], list[float]]] = {
        name: ([], [], []) for name, _ in variants
    }
    pool: np.ndarray | None = None
    subprocess.run([CLI, "down"], env=base, capture_output=True, cwd=args.home)
    for rnd in range(args.rounds):
        for name, extra in variants:
            env = {**base, **extra}
            # Not from the checkout: `python -m` would put the working directory first on the path.
            wait_for_prewarm = prewarm_watch(args.home)
            up = subprocess.run(
                [CLI, "up", "--detach", "--timeout", "300"], env=env, capture_output=True, cwd=args.home
            )
            if up.returncode:
                raise SystemExit(f"appliance up failed ({name}):\n{up.stdout.decode()}{up.stderr.decode()}")
            try:
                prewarm = wait_for_prewarm()
                if prewarm is not None:
                    print(f"  {name}: autoprewarm read back {prewarm[1]} in {prewarm[0]:.0f} s", flush=True)
                time.sleep(args.settle)
                if pool is None:
                    pool = sample_vectors(settings)
                cpu: list[float] = []
                h, d = asyncio.run(measure(settings, state, pool, args, seed=rnd * 7919 + 1, cpu_ms=cpu))
            finally:
                subprocess.run([CLI, "down"], env=env, capture_output=True, cwd=args.home)
            print(line(f"round {rnd} {name}", h, d, cpu), flush=True)
            pooled[name][0].extend(h)
            pooled[name][1].extend(d)
            pooled[name][2].extend(cpu)
    for name, (h, d, cpu) in pooled.items():
        print(line(f"ALL {name}", h, d, cpu))


if __name__ == "__main__":
    main()
