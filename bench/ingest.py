"""End-to-end ingestion throughput through a real appliance, next to the raw embedding speed.

    .venv/bin/python bench/ingest.py [--docs 1000] [--clients 4] [--worker-processes N]
        [--worker-threads N] [--embedding-threads N] [--sample 64] [--rounds 3] [--seed 1]

Generates `--docs` documents of mixed formats (plain text, Markdown, HTML, CSV, DOCX, PDF; the DOCX
and PDF writers are the standard-library ones in tests/extract/conftest.py), each 300-2,000 words of
English prose built from a small grammar (business memos, policies, minutes; every document
different, so nothing is deduplicated). Starts `appliance up --detach` in a throw-away home on free
loopback ports (one API worker; `--worker-processes` / `--worker-threads` set
APPLIANCE_WORKER_PROCESSES / APPLIANCE_WORKER_THREADS), uploads everything with `--clients`
concurrent HTTP clients, and polls Postgres (as the owner) until every version is ready, failed or
needs_ocr. Prints docs, chunks, wall time (first upload to last document done), docs/min, chunks/s,
embedded tokens/s (sum of `chunks.token_count`), failures by error code, and the CPU seconds each group of
the appliance's processes used meanwhile (from /proc; extraction sandboxes count in their zygote's or
worker's).

Then, with the appliance stopped, it decrypts a sample of the chunks it just stored and embeds them
one passage per call (what the worker does) with the same model and the same llama.cpp thread count
as the workers (every CPU: `LlamaEmbedder`'s default), timed like bench/embed_throughput.py (warm-up,
median of `--rounds`). When the workers ran several processes or `--embedding-threads`, it also measures
that many embedders of that many threads embedding at once. It prints pipeline tokens/s ÷ the fastest
raw tokens/s measured. Run as root after ./install.sh.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from html import escape
from pathlib import Path

import httpx
from sqlalchemy import create_engine, text

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from appliance.settings import load_settings  # noqa: E402

FORMATS = ("txt", "md", "html", "csv", "docx", "pdf")

# ---------------------------------------------------------------------------------------------
# Prose: a small grammar over a business vocabulary.

SUBJECTS = [
    "the finance team",
    "the steering committee",
    "our regional office",
    "the project manager",
    "the board",
    "the procurement department",
    "the new supplier",
    "the audit committee",
    "every team lead",
    "the security officer",
    "the customer service desk",
    "the legal department",
    "the warehouse staff",
    "the engineering group",
    "the marketing department",
    "each employee",
    "the external auditor",
    "the works council",
    "the operations director",
    "the data protection officer",
]
VERBS_PAST = [
    "reviewed",
    "approved",
    "postponed",
    "questioned",
    "summarised",
    "rejected",
    "revised",
    "published",
    "discussed",
    "signed",
    "estimated",
    "reported",
    "negotiated",
    "audited",
    "documented",
    "analysed",
]
VERBS_BASE = [
    "review",
    "approve",
    "update",
    "check",
    "submit",
    "prepare",
    "archive",
    "confirm",
    "reduce",
    "monitor",
    "renew",
    "escalate",
    "document",
    "replace",
    "test",
    "publish",
]
ADJECTIVES = [
    "quarterly",
    "annual",
    "revised",
    "preliminary",
    "detailed",
    "confidential",
    "updated",
    "current",
    "draft",
    "final",
    "internal",
    "regional",
    "overdue",
    "standard",
    "additional",
    "temporary",
]
OBJECTS = [
    "budget",
    "maintenance contract",
    "travel policy",
    "incident report",
    "hiring plan",
    "risk register",
    "supplier agreement",
    "training schedule",
    "energy bill",
    "inventory count",
    "customer survey",
    "backup procedure",
    "pricing model",
    "expense claim",
    "safety inspection",
    "delivery schedule",
    "invoice layout",
    "retention policy",
    "access review",
    "sales forecast",
    "insurance renewal",
]
TIMES = [
    "before the end of the month",
    "by the next board meeting",
    "within two weeks",
    "in the third quarter",
    "before the audit starts",
    "by Friday",
    "at the start of the financial year",
    "after the holidays",
    "once the new system is live",
    "during the spring",
    "as soon as possible",
    "next year",
]
REASONS = [
    "because energy prices rose faster than expected",
    "since the northern warehouse opened late",
    "because two key staff members left the company",
    "as the regulator changed its guidance",
    "because customers complained about late deliveries",
    "since the old contract expires in June",
    "because the figures did not match the ledger",
    "as demand grew in the southern region",
    "because the previous estimate ignored currency risk",
    "since the software vendor ended support",
]
CONNECTIVES = ["However,", "In addition,", "As a result,", "Meanwhile,", "For this reason,", "In practice,"]
TITLES = [
    "Minutes of the {adj} {obj} meeting",
    "Policy on the {adj} {obj}",
    "Report: {adj} {obj}",
    "Guidance for the {obj}",
    "Memo on the {adj} {obj}",
    "Review of the {obj}",
]


def sentence(rng: random.Random) -> str:
    s, o, a = rng.choice(SUBJECTS), rng.choice(OBJECTS), rng.choice(ADJECTIVES)
    kind = rng.randrange(7)
    if kind == 0:
        out = f"{s} {rng.choice(VERBS_PAST)} the {a} {o} {rng.choice(REASONS)}"
    elif kind == 1:
        out = f"{s} will {rng.choice(VERBS_BASE)} the {o} {rng.choice(TIMES)}"
    elif kind == 2:
        out = (
            f"{rng.choice(CONNECTIVES)} {s} asked {rng.choice(SUBJECTS)} to {rng.choice(VERBS_BASE)} "
            f"the {a} {o} {rng.choice(TIMES)}"
        )
    elif kind == 3:
        out = f"the {a} {o} was {rng.choice(VERBS_PAST)} by {s}, {rng.choice(REASONS)}"
    elif kind == 4:
        n = rng.choice([2, 3, 5, 7, 10, 12, 15, 20, 25, 40])
        out = (
            f"according to {s}, costs for the {o} rose by {n} percent, "
            f"so {rng.choice(SUBJECTS)} must {rng.choice(VERBS_BASE)} it {rng.choice(TIMES)}"
        )
    elif kind == 5:
        out = (
            f"several members noted that the {o} had been {rng.choice(VERBS_PAST)} "
            f"but that the {rng.choice(OBJECTS)} still needed attention"
        )
    else:
        out = (
            f"{rng.choice(CONNECTIVES)} nobody may {rng.choice(VERBS_BASE)} the {o} "
            f"without written approval from {rng.choice(SUBJECTS)}"
        )
    return out[0].upper() + out[1:] + "."


def document(rng: random.Random, words: int) -> tuple[str, list[tuple[str, list[str]]]]:
    """(title, sections), each section a (heading, paragraphs) pair, about `words` words in all."""
    title = rng.choice(TITLES).format(adj=rng.choice(ADJECTIVES), obj=rng.choice(OBJECTS)).capitalize()
    sections: list[tuple[str, list[str]]] = []
    count = 0
    while count < words:
        heading = f"{rng.choice(ADJECTIVES).capitalize()} {rng.choice(OBJECTS)}"
        paras = []
        for _ in range(rng.randint(1, 4)):
            para = " ".join(sentence(rng) for _ in range(rng.randint(3, 7)))
            paras.append(para)
            count += len(para.split())
            if count >= words:
                break
        sections.append((heading, paras))
    return title, sections


def render(fmt: str, title: str, sections: list[tuple[str, list[str]]], rng: random.Random) -> bytes:
    # Imported here, not at the top, so other benchmarks can import this module's helpers without the
    # test suite's dependencies (pytest is a --dev install).
    from tests.extract.conftest import make_docx, make_pdf

    if fmt == "txt":
        parts = [title, ""]
        for heading, paras in sections:
            parts += [heading, "", *("\n".join(textwrap.wrap(p, 90)) + "\n" for p in paras)]
        return "\n".join(parts).encode()
    if fmt == "md":
        parts = [f"# {title}", ""]
        for heading, paras in sections:
            parts += [f"## {heading}", "", *(p + "\n" for p in paras)]
        return "\n".join(parts).encode()
    if fmt == "html":
        body = "".join(
            f"<h2>{escape(h)}</h2>" + "".join(f"<p>{escape(p)}</p>" for p in paras) for h, paras in sections
        )
        return (
            f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{escape(title)}</title></head>"
            f"<body><h1>{escape(title)}</h1>{body}</body></html>"
        ).encode()
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["id", "date", "owner", "topic", "amount", "notes"])
        i = 0
        for heading, paras in sections:
            for p in paras:
                i += 1
                w.writerow(
                    [
                        i,
                        f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
                        rng.choice(SUBJECTS),
                        heading,
                        f"{rng.uniform(100, 99999):.2f}",
                        p,
                    ]
                )
        return buf.getvalue().encode()
    if fmt == "docx":
        paras = [title]
        for heading, ps in sections:
            paras += [heading, *ps]
        return make_docx(paras)
    if fmt == "pdf":
        lines = [title, ""]
        for heading, paras in sections:
            lines += [heading, ""]
            for p in paras:
                lines += [*textwrap.wrap(p, 70), ""]
        pages = [lines[i : i + 36] for i in range(0, len(lines), 36)]
        return make_pdf(pages)
    raise ValueError(fmt)


def generate(folder: Path, n: int, seed: int) -> list[Path]:
    rng = random.Random(seed)
    paths = []
    for i in range(n):
        fmt = FORMATS[i % len(FORMATS)]
        title, sections = document(rng, rng.randint(300, 2000))
        path = folder / f"doc-{i:05d}.{fmt}"
        path.write_bytes(render(fmt, title, sections, rng))
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------
# The appliance.


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance.cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def upload_all(url: str, key: str, paths: list[Path], clients: int) -> list[tuple[Path, str]]:
    """Upload with `clients` concurrent clients (each its own connection); returns upload errors."""
    errors: list[tuple[Path, str]] = []
    lock = threading.Lock()
    queue = list(reversed(paths))

    def client_loop() -> None:
        with httpx.Client(base_url=url, timeout=300, headers={"Authorization": f"Bearer {key}"}) as c:
            while True:
                with lock:
                    if not queue:
                        return
                    path = queue.pop()

                def body(p: Path = path):  # type: ignore[no-untyped-def]
                    with p.open("rb") as fh:
                        while block := fh.read(1 << 20):
                            yield block

                try:
                    r = c.post("/api/v1/documents", content=body(), headers={"X-Filename": path.name})
                    if r.status_code != 201:
                        with lock:
                            errors.append((path, f"HTTP {r.status_code} {r.text[:200]}"))
                except httpx.HTTPError as exc:
                    with lock:
                        errors.append((path, f"{type(exc).__name__}: {exc}"))

    with ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(client_loop) for _ in range(clients)]:
            f.result()
    return errors


def sample_chunks(settings, tenant_id: str, n: int, seed: int) -> list[tuple[str, int]]:  # type: ignore[no-untyped-def]
    """`n` random chunks of the tenant, decrypted with its data key: (text, token_count)."""
    from appliance.db.engine import Database
    from appliance.keys.envelope import BlobContext, open_bytes
    from appliance.keys.keyring import Keyring
    from appliance.keys.service import tenant_dek

    async def run() -> list[tuple[str, int]]:
        db = Database(settings.app_database_url, pool_size=1)
        try:
            tid = uuid.UUID(tenant_id)
            async with db.transaction(tenant_id=tid) as session:
                dek = await tenant_dek(session, Keyring.from_settings(settings), tid, create=False)
                rows = (
                    await session.execute(
                        text(
                            "SELECT document_id, version_id, text_enc, token_count FROM chunks "
                            "ORDER BY md5(id::text || :seed) LIMIT :n"
                        ),
                        {"seed": str(seed), "n": n},
                    )
                ).all()
            return [
                (open_bytes(dek, BlobContext(tid, "chunk", d, v), bytes(blob)).decode(), tokens)
                for d, v, blob, tokens in rows
            ]
        finally:
            await db.dispose()

    return asyncio.run(run())


def raw_throughput(
    passages: list[tuple[str, int]], rounds: int, *, streams: int = 1, threads: int | None = None
) -> tuple[float, int]:
    """Tokens/s of `LlamaEmbedder.embed` one passage per call, as in bench/embed_throughput.py.

    `streams` embedders of `threads` llama.cpp threads each (default: every CPU, LlamaEmbedder's
    default) embed the sample at the same time, each in its own thread (llama.cpp releases the GIL),
    as that many worker processes would; tokens/s is the sample's tokens × streams ÷ the wall time."""
    from concurrent.futures import ThreadPoolExecutor

    from appliance.inference.embedding import LlamaEmbedder, available_cpus
    from appliance.settings import get_settings

    threads = threads or available_cpus()
    embedders = [
        LlamaEmbedder.from_manifest(get_settings().models_dir, n_threads=threads) for _ in range(streams)
    ]
    texts = [p for p, _ in passages]
    tokens = sum(t for _, t in passages) * streams
    try:
        with ThreadPoolExecutor(streams) as pool:
            list(pool.map(lambda e: e.embed(texts[: min(4, len(texts))]), embedders))  # warm-up
            times = []
            for _ in range(rounds):
                start = time.perf_counter()
                list(pool.map(lambda e: e.embed(texts), embedders))
                times.append(time.perf_counter() - start)
    finally:
        for emb in embedders:
            emb.close()
    return tokens / statistics.median(times), threads


CPU_GROUPS = (
    ("api", ("gunicorn",)),
    ("workers+extraction", ("dramatiq", "appliance.extract.zygote")),  # the zygote reaps the sandboxes
    ("postgres", ("postgres",)),
    ("redis", ("redis-server",)),
    ("object store", ("radosgw", "ceph-", "minio")),
    ("llm server", ("llm_server",)),
    ("supervisor", ("appliance.cli.server",)),
)


def cpu_by_group() -> dict[str, float]:
    """CPU seconds (user + system) of the appliance's processes by group, reaped children included
    (the extraction sandboxes count in the zygote's that forked them, or their worker's): from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            cmd = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        group = next((g for g, marks in CPU_GROUPS if any(m in cmd for m in marks)), None)
        if group is not None:
            out[group] = out.get(group, 0.0) + sum(int(f) for f in fields[11:15]) / tick
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=4, help="concurrent upload clients (default 4)")
    ap.add_argument("--worker-processes", type=int, default=None, help="APPLIANCE_WORKER_PROCESSES")
    ap.add_argument("--worker-threads", type=int, default=None, help="APPLIANCE_WORKER_THREADS")
    ap.add_argument(
        "--embedding-threads", type=int, default=None, help="APPLIANCE_EMBEDDING_THREADS (llama.cpp threads)"
    )
    ap.add_argument(
        "--no-zygote", action="store_true", help="APPLIANCE_EXTRACT_ZYGOTE=false: start each extraction child"
    )
    ap.add_argument("--sample", type=int, default=64, help="chunks embedded for the raw measurement")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=7200, help="give up waiting after this many seconds")
    args = ap.parse_args()

    home = Path(tempfile.mkdtemp(prefix="appliance-bench-ingest-", dir="/var/tmp"))
    os.chmod(home, 0o755)
    docs_dir = Path(tempfile.mkdtemp(prefix="bench-ingest-docs-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    ports = {name: free_port() for name in ("api_port", "pg_port", "redis_port", "llm_port")}
    env.update(
        APPLIANCE_HOME=str(home),
        APPLIANCE_API_PORT=str(ports["api_port"]),
        APPLIANCE_PG_PORT=str(ports["pg_port"]),
        APPLIANCE_REDIS_PORT=str(ports["redis_port"]),
        APPLIANCE_LLM_PORT=str(ports["llm_port"]),
        APPLIANCE_API_WORKERS="1",
        # The limits stay in the path but must not trip: the uploads come faster than the default
        # 300 a minute per key (appliance.ratelimit).
        APPLIANCE_RATE_LIMIT_UPLOAD="1000000/minute",
        APPLIANCE_TENANT_RATE_LIMIT_UPLOAD="1000000/minute",
    )
    if args.worker_processes is not None:
        env["APPLIANCE_WORKER_PROCESSES"] = str(args.worker_processes)
    if args.worker_threads is not None:
        env["APPLIANCE_WORKER_THREADS"] = str(args.worker_threads)
    if args.embedding_threads is not None:
        env["APPLIANCE_EMBEDDING_THREADS"] = str(args.embedding_threads)
    if args.no_zygote:
        env["APPLIANCE_EXTRACT_ZYGOTE"] = "false"
    overrides = {
        k.removeprefix("APPLIANCE_").lower(): v for k, v in env.items() if k.startswith("APPLIANCE_")
    }
    overrides.pop("home")
    try:
        t0 = time.perf_counter()
        paths = generate(docs_dir, args.docs, args.seed)
        size = sum(p.stat().st_size for p in paths)
        fmts = Counter(p.suffix[1:] for p in paths)
        print(
            f"generated {len(paths)} documents ({size / 1e6:.1f} MB; "
            + ", ".join(f"{f} {fmts[f]}" for f in FORMATS)
            + f") in {time.perf_counter() - t0:.1f} s"
        )
        out = cli(env, "up", "--detach", "--timeout", "300")
        if out.returncode:
            sys.exit(f"appliance up failed:\n{out.stdout}{out.stderr}")
        settings = load_settings(home=home, **overrides)
        print(
            f"appliance up: API workers 1, worker processes {settings.worker_processes}, "
            f"worker threads {settings.worker_threads}; load average {os.getloadavg()[0]:.2f} "
            f"on {os.cpu_count()} CPUs"
        )
        system_key = next(w for w in out.stdout.split() if w.startswith("apl_"))
        url = f"http://127.0.0.1:{ports['api_port']}"
        with httpx.Client(base_url=url, timeout=60) as c:
            sys_h = {"Authorization": f"Bearer {system_key}"}
            tenant = c.post("/api/v1/tenants", json={"name": "bench"}, headers=sys_h).json()
            key = c.post(
                "/api/v1/keys",
                json={"name": "bench", "role": "editor", "tenant_id": tenant["id"]},
                headers=sys_h,
            ).json()["key"]

        engine = create_engine(settings.owner_database_url)
        cpu_before, self_before = cpu_by_group(), time.process_time()
        start = time.perf_counter()
        upload_errors = upload_all(url, key, paths, args.clients)
        upload_s = time.perf_counter() - start
        print(f"uploaded {len(paths) - len(upload_errors)} in {upload_s:.1f} s with {args.clients} clients")
        for path, err in upload_errors[:10]:
            print(f"  upload failed: {path.name}: {err}")
        expected = len(paths) - len(upload_errors)
        last_print = 0.0
        with engine.connect() as conn:
            while True:
                counts: dict[str, int] = dict(
                    conn.execute(  # type: ignore[arg-type]
                        text("SELECT ingest_status, count(*) FROM document_versions GROUP BY ingest_status")
                    ).all()
                )
                conn.commit()
                done = sum(counts.get(s, 0) for s in ("ready", "failed", "needs_ocr"))
                now = time.perf_counter()
                if done >= expected:
                    break
                if now - last_print > 30:
                    last_print = now
                    print(f"  {now - start:6.0f} s: {done}/{expected} done {dict(sorted(counts.items()))}")
                if now - start > args.timeout:
                    sys.exit(f"timed out after {args.timeout:.0f} s: {counts}")
                time.sleep(0.25)
            wall = time.perf_counter() - start
            cpu_after, self_cpu = cpu_by_group(), time.process_time() - self_before
            chunks, tokens = conn.execute(
                text("SELECT count(*), coalesce(sum(token_count), 0) FROM chunks")
            ).one()
            failures = conn.execute(
                text(
                    "SELECT coalesce(error_code, 'unknown'), count(*) FROM jobs "
                    "WHERE status IN ('failed', 'dead') GROUP BY 1 ORDER BY 2 DESC"
                )
            ).all()
            by_fmt = conn.execute(
                text(
                    "SELECT substring(v.source_filename from '\\.([a-z]+)$'), v.ingest_status, count(*) "
                    "FROM document_versions v GROUP BY 1, 2 ORDER BY 1, 2"
                )
            ).all()
        engine.dispose()
        ready = counts.get("ready", 0)
        print()
        print(
            f"docs:             {expected} ({ready} ready, {counts.get('failed', 0)} failed, "
            f"{counts.get('needs_ocr', 0)} needs_ocr)"
        )
        print(f"chunks:           {chunks} ({chunks / max(ready, 1):.1f} per ready doc)")
        print(f"wall time:        {wall:.1f} s (first upload to last document done)")
        print(f"docs/min:         {60 * expected / wall:.1f}")
        print(f"chunks/s:         {chunks / wall:.2f}")
        print(f"embedded tokens/s: {tokens / wall:.0f} ({tokens:,} tokens)")
        print("failures by code: " + (", ".join(f"{c} {n}" for c, n in failures) or "none"))
        print("by format:        " + ", ".join(f"{f}:{s} {n}" for f, s, n in by_fmt))
        used = {g: cpu_after.get(g, 0.0) - cpu_before.get(g, 0.0) for g in cpu_after}
        used["this bench (uploads, polling)"] = self_cpu
        print(
            f"CPU seconds:      {sum(used.values()):.0f} of {wall * (os.cpu_count() or 1):.0f} available: "
            + ", ".join(f"{g} {s:.0f}" for g, s in sorted(used.items(), key=lambda kv: -kv[1]) if s >= 0.5)
        )

        passages = sample_chunks(settings, tenant["id"], args.sample, args.seed)
        cli(env, "down")
        if not passages:
            print("no chunks to measure raw embedding speed on")
            return
        mean = statistics.mean(t for _, t in passages)
        configs = [(1, None)]  # one stream on every CPU: the model's raw speed on this machine
        if settings.worker_processes > 1 or args.embedding_threads:
            configs.append((settings.worker_processes, args.embedding_threads))  # as the workers ran it
        best = 0.0
        for streams, want in configs:
            raw, threads = raw_throughput(passages, args.rounds, streams=streams, threads=want)
            best = max(best, raw)
            print(
                f"raw embedding:    {raw:.0f} tokens/s ({streams} stream(s) x {threads} llama.cpp threads, "
                f"one passage per call, {len(passages)} stored chunks of {mean:.0f} tokens on average, "
                f"median of {args.rounds})"
            )
        print(f"pipeline / raw:   {tokens / wall / best:.2f} (against the fastest raw configuration)")
    finally:
        cli(env, "down")
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(docs_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
