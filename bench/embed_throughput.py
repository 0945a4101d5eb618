"""Raw embedding throughput of the shipped embedding model on this machine, and chunking speed.

    .venv/bin/python bench/embed_throughput.py [--passages 32] [--rounds 3] [--threads 2,1] [--procs 2]
        [--batch-ctx 512,2048] [--flash on,off] [--pages 100] [--contention 0.1,0.2]
        [--corpus /work/shared/data/scifact/corpus.jsonl]

Passages are ~250-token runs of real English (SciFact abstracts, when the corpus is there; a built-in
sample text otherwise), counted by the model's own tokenizer. For each thread count it times:
  - one-per-call: `LlamaEmbedder.embed` (one passage per llama.cpp call, n_ctx 512), what ingest uses;
  - batched@N: one llama.cpp `embed()` call over all passages with n_ctx = n_batch = n_ubatch = N, so
    llama.cpp packs as many passages as fit in N tokens into each decode;
each with llama.cpp's flash attention on and off (`LlamaEmbedder` defaults to on).
Configurations run interleaved, `--rounds` times, and the median is printed (the machine is noisy:
compare ratios within one run). Tokens are the passage's own tokens, without [CLS]/[SEP]. With
`--procs N` (default: the CPU count) it also times N processes with a 1-thread model each, embedding at
the same time: the alternative to one process with N threads. With `--contention 0.1,0.2` it times the
first one-per-call configuration again while another process keeps that share of one core busy (a
busy loop for that fraction of every 10 ms): what the rest of an ingest pipeline (Postgres, the API,
parsers) costs the decode on a small machine. Each contended round is paired with an uncontended one.

Then it chunks a `--pages`-page document (the same text with title lines and page spans) with
`chunk_text` and prints its speed next to the embedding speed, so the ingest benchmark can tell how
far the pipeline is from raw embedding speed.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing as mp
import os
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import llama_cpp

from appliance.inference.embedding import LlamaEmbedder, available_cpus
from appliance.inference.manifest import get_model, verified_path
from appliance.ingest.chunking import chunk_text
from appliance.settings import get_settings

DEFAULT_CORPUS = Path("/work/shared/data/scifact/corpus.jsonl")
PASSAGE_TOKENS = 250
PAGE_CHARS = 3000  # about one printed page of prose

SAMPLE = (
    "The committee reviewed the quarterly report and found that operating costs had risen faster than "
    "revenue, mostly because of higher energy prices and the delayed opening of the northern warehouse. "
    "Staff were asked to prepare a revised budget before the end of the month, with particular attention "
    "to maintenance contracts that renew automatically. Several members noted that the customer survey "
    "showed strong satisfaction with delivery times but frequent complaints about invoices that were hard "
    "to read. The finance team agreed to redesign the invoice layout and to publish a short guide. "
)


def paragraphs(corpus: Path) -> Iterator[tuple[str, str]]:
    """(title, text) pairs of real English: SciFact abstracts, or the sample text repeated."""
    if corpus.exists():
        with corpus.open(encoding="utf-8") as fh:
            for line in fh:
                doc = json.loads(line)
                if doc["text"].strip():
                    yield doc["title"].strip(), doc["text"].strip()
    else:
        while True:
            yield "Quarterly review", SAMPLE.strip()


def make_passages(embedder: LlamaEmbedder, corpus: Path, n: int) -> list[tuple[str, int]]:
    """`n` passages of about PASSAGE_TOKENS tokens each (whole words), with their token counts."""
    passages: list[tuple[str, int]] = []
    words: list[str] = []
    total = 0
    for _, text in paragraphs(corpus):
        for word in text.split():
            words.append(word)
            total += embedder.count_tokens(word)
            if total >= PASSAGE_TOKENS:
                passage = " ".join(words)
                passages.append((passage, embedder.count_tokens(passage)))
                words, total = [], 0
                if len(passages) == n:
                    return passages
    raise SystemExit(f"not enough text for {n} passages")


def make_document(corpus: Path, pages: int) -> tuple[str, list[tuple[int | None, int, int]]]:
    """A `pages`-page document: title lines (blank line after) and abstracts, cut into page spans."""
    parts: list[str] = []
    size = 0
    for title, text in paragraphs(corpus):
        block = f"{title}\n\n{text}\n\n"
        parts.append(block)
        size += len(block)
        if size >= pages * PAGE_CHARS:
            break
    doc = "".join(parts)[: pages * PAGE_CHARS]
    spans: list[tuple[int | None, int, int]] = [
        (i + 1, i * PAGE_CHARS, min(len(doc), (i + 1) * PAGE_CHARS)) for i in range(pages)
    ]
    return doc, spans


def raw_llama(n_ctx: int, n_threads: int, flash_attn: bool) -> llama_cpp.Llama:
    settings = get_settings()
    spec = get_model(settings.models_dir, purpose="embedding")
    return llama_cpp.Llama(
        model_path=str(verified_path(spec, settings.models_dir)),
        embedding=True,
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_ubatch=n_ctx,
        pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
        n_threads=n_threads,
        n_threads_batch=n_threads,
        flash_attn=flash_attn,
        verbose=False,
    )


def _process_worker(texts: list[str], rounds: int, barrier: Any, out: Any) -> None:
    """One of `--procs` processes: its own 1-thread model, timed after every process has loaded."""
    emb = LlamaEmbedder.from_manifest(get_settings().models_dir, n_threads=1)
    emb.embed(texts[:2])
    barrier.wait()
    start = time.perf_counter()
    for _ in range(rounds):
        emb.embed(texts)
    out.put(time.perf_counter() - start)


def time_processes(texts: list[str], procs: int, rounds: int) -> float:
    """Wall time for `procs` processes (1 thread each) to embed `texts` `rounds` times each, concurrently."""
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(procs + 1), ctx.Queue()
    workers = [ctx.Process(target=_process_worker, args=(texts, rounds, barrier, out)) for _ in range(procs)]
    for w in workers:
        w.start()
    barrier.wait()
    start = time.perf_counter()
    for _ in workers:
        out.get()
    wall = time.perf_counter() - start
    for w in workers:
        w.join()
    return wall


def _burn(share: float, stop: Any) -> None:
    """Keep one core busy for `share` of every 10 ms until `stop` is set."""
    period = 0.01
    while not stop.is_set():
        start = time.perf_counter()
        while time.perf_counter() - start < share * period:
            pass
        time.sleep((1 - share) * period)


def time_contended(fn: Callable[[], Any], share: float, rounds: int) -> tuple[float, float]:
    """Median seconds of `fn` alone and with another process burning `share` of a core, in pairs."""
    ctx = mp.get_context("spawn")
    alone, contended = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        alone.append(time.perf_counter() - start)
        stop = ctx.Event()
        burner = ctx.Process(target=_burn, args=(share, stop))
        burner.start()
        try:
            time.sleep(0.3)  # the interpreter has started and is burning
            start = time.perf_counter()
            fn()
            contended.append(time.perf_counter() - start)
        finally:
            stop.set()
            burner.join()
    return statistics.median(alone), statistics.median(contended)


def max_abs_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for va, vb in zip(a, b, strict=True) for x, y in zip(va, vb, strict=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--passages", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", default="2,1", help="comma-separated llama.cpp thread counts")
    ap.add_argument(
        "--batch-ctx", default="512,2048", help="n_ctx values for the batched calls ('' for none)"
    )
    ap.add_argument("--flash", default="on,off", help="flash attention modes to time: on, off or both")
    ap.add_argument(
        "--procs",
        type=int,
        default=None,
        help="also time this many 1-thread processes at once (default: CPUs)",
    )
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    ap.add_argument("--pages", type=int, default=100, help="pages of the chunking test document (0: skip)")
    ap.add_argument(
        "--contention", default="", help="comma-separated shares of one core another process keeps busy"
    )
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",") if t.strip()]
    flash_modes = [m.strip() == "on" for m in args.flash.split(",") if m.strip()]
    batch_ctx = [int(c) for c in args.batch_ctx.split(",") if c.strip()]

    print(
        f"load average before: {os.getloadavg()[0]:.2f} on {available_cpus()} CPUs (other work skews results)"
    )
    settings = get_settings()
    t0 = time.perf_counter()
    embedders = {
        (t, flash): LlamaEmbedder.from_manifest(settings.models_dir, n_threads=t, flash_attn=flash)
        for t in threads
        for flash in flash_modes
    }
    load_s = (time.perf_counter() - t0) / len(embedders)
    first = next(iter(embedders.values()))
    passages = make_passages(first, args.corpus, args.passages)
    texts = [p for p, _ in passages]
    tokens = sum(n for _, n in passages)
    source = args.corpus if args.corpus.exists() else "built-in sample"
    print(
        f"model {first.name} ({first.dimensions}-d), load + sha256 {load_s:.2f} s; "
        f"{len(texts)} passages from {source}, {tokens / len(texts):.0f} tokens each on average"
    )

    configs: dict[str, Callable[[], list[list[float]]]] = {}
    keep: list[Any] = []
    for t in threads:
        for flash in flash_modes:
            fa = "on" if flash else "off"
            emb = embedders[t, flash]
            configs[f"one-per-call  threads={t} flash={fa}"] = functools.partial(emb.embed, texts)
            for n_ctx in batch_ctx:
                llm = raw_llama(n_ctx, t, flash)
                keep.append(llm)
                name = f"batched@{n_ctx:<5d} threads={t} flash={fa}"
                configs[name] = functools.partial(llm.embed, texts, normalize=True)

    results: dict[str, list[float]] = {name: [] for name in configs}
    vectors: dict[str, list[list[float]]] = {}
    for name, fn in configs.items():  # warm-up (first-call allocations), and the vectors to compare
        vectors[name] = fn()
    for _ in range(args.rounds):
        for name, fn in configs.items():
            start = time.perf_counter()
            fn()
            results[name].append(time.perf_counter() - start)

    reference = next(iter(vectors.values()))
    print(f"\n{'pattern':<46}{'chunks/s':>10}{'tokens/s':>10}{'ms/chunk':>10}  max |Δ| vs first")
    speed: dict[str, float] = {}
    for name, times in results.items():
        s = statistics.median(times)
        speed[name] = len(texts) / s
        print(
            f"{name:<46}{len(texts) / s:>10.2f}{tokens / s:>10.0f}{1000 * s / len(texts):>10.1f}"
            f"  {max_abs_diff(reference, vectors[name]):.2e}"
        )
    procs = available_cpus() if args.procs is None else args.procs
    if procs > 1:
        wall = time_processes(texts, procs, args.rounds)
        n = procs * args.rounds * len(texts)
        name = f"{procs} processes x one-per-call threads=1 flash=on"
        speed[name] = n / wall
        print(f"{name:<46}{n / wall:>10.2f}{procs * args.rounds * tokens / wall:>10.0f}   (all together)")
    best = max(speed, key=lambda k: speed[k])
    print(f"fastest: {best}; load average after: {os.getloadavg()[0]:.2f}")

    shares = [float(x) for x in args.contention.split(",") if x.strip()]
    if shares:
        name = next(iter(configs))
        print(f"\nunder contention ({name.strip()}; another process busy for a share of one core):")
        head = ("share of a core", "of the machine", "tokens/s alone", "contended", "ratio")
        print(f"{head[0]:<18}{head[1]:>16}{head[2]:>16}{head[3]:>11}{head[4]:>7}")
        for share in shares:
            alone, contended = time_contended(configs[name], share, args.rounds)
            print(
                f"{share:<18.2f}{share / available_cpus():>16.2f}{tokens / alone:>16.0f}"
                f"{tokens / contended:>11.0f}{alone / contended:>7.2f}"
            )

    if args.pages > 0:
        doc, spans = make_document(args.corpus, args.pages)
        times = []
        chunks = []
        for _ in range(3):
            start = time.perf_counter()
            chunks = chunk_text(doc, spans, tokenizer=first)
            times.append(time.perf_counter() - start)
        s = min(times)
        chunk_tokens = sum(c.token_count for c in chunks)
        embed_s = chunk_tokens / (tokens / statistics.median(results[next(iter(results))]))
        print(
            f"\nchunking {args.pages} pages ({len(doc):,} chars): {s * 1000:.0f} ms best of 3 -> "
            f"{len(chunks)} chunks, {chunk_tokens:,} tokens; {args.pages / s:,.0f} pages/s, "
            f"{len(chunks) / s:,.0f} chunks/s, {chunk_tokens / s:,.0f} tokens/s; "
            f"embedding them one-per-call would take ~{embed_s:.0f} s "
            f"(chunking = {100 * s / embed_s:.2f} % of it)"
        )
        mean = statistics.mean(c.token_count for c in chunks)
        print(f"chunk sizes: mean {mean:.0f} tokens, max {max(c.token_count for c in chunks)}")
    for llm in keep:
        llm.close()
    for emb in embedders.values():
        emb.close()


if __name__ == "__main__":
    main()
