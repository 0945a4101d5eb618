"""Throughput of the encrypted blob format (BlobWriter / BlobReader) by segment size and data kind.

    .venv/bin/python bench/envelope_throughput.py [--mib 256] [--segments-kib 64,256,1024,4096]

Prints MiB/s of plaintext for writing (zstd + AES-256-GCM) and reading, the stored/plain ratio and
the latency of a 100-byte range read. The numbers behind the default segment size are in
docs/encryption.md.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from appliance.keys.envelope import BlobContext, BlobReader, BlobWriter, FileSource
from appliance.keys.kek import generate_dek

MiB = 1024 * 1024
WORDS = (
    "patient",
    "account",
    "ledger",
    "the",
    "of",
    "and",
    "report",
    "quarterly",
    "balance",
    "risk",
    "treatment",
    "invoice",
    "policy",
    "2026",
    "section",
    "clause",
    "agreement",
    "transfer",
)


def text_like(size: int, seed: int) -> bytes:
    rnd = random.Random(seed)
    out = bytearray()
    while len(out) < size:
        out += (" ".join(rnd.choice(WORDS) for _ in range(12)) + ".\n").encode()
    return bytes(out[:size])


def repeat(block: bytes, total: int) -> Iterator[bytes]:
    for _ in range(total // len(block)):
        yield block


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--segments-kib", default="64,256,1024,4096")
    args = ap.parse_args()
    total = args.mib * MiB
    blocks = {"random": os.urandom(16 * MiB), "text": text_like(16 * MiB, seed=1)}
    dek = generate_dek()
    ctx = BlobContext(uuid.uuid4(), "original", uuid.uuid4(), uuid.uuid4())
    print(f"{total // MiB} MiB per run, {os.cpu_count()} CPUs; MiB/s of plaintext")
    with tempfile.TemporaryDirectory() as tmp:
        for seg in (int(k) * 1024 for k in args.segments_kib.split(",")):
            for name, block in blocks.items():
                path = Path(tmp) / f"{name}-{seg}"
                t0 = time.perf_counter()
                with open(path, "wb") as sink, BlobWriter(dek, ctx, sink, segment_size=seg) as w:
                    for piece in repeat(block, total):
                        w.write(piece)
                t1 = time.perf_counter()
                with FileSource(path) as src:
                    reader = BlobReader(dek, ctx, src)
                    for _ in reader.iter_all(chunk=seg):
                        pass
                    t2 = time.perf_counter()
                    rnd = random.Random(0)
                    for _ in range(200):
                        a = rnd.randrange(total - 100)
                        reader.read_range(a, a + 100)
                    t3 = time.perf_counter()
                stored = path.stat().st_size
                path.unlink()
                print(
                    f"segment {seg // 1024:>5} KiB  {name:<6}  write {total / MiB / (t1 - t0):7.0f}  "
                    f"read {total / MiB / (t2 - t1):7.0f}  stored/plain {stored / total:.3f}  "
                    f"100-byte range {(t3 - t2) / 200 * 1e3:.2f} ms"
                )


if __name__ == "__main__":
    main()
