"""Upload one large file through a real appliance and print throughput and the API's memory growth.

    .venv/bin/python bench/upload_large.py [--mib 1024]

Starts `appliance up --detach` in a throw-away data directory on free loopback ports (one API
worker), creates a tenant and an editor key, streams N MiB of random bytes (never held in memory
by the client) as a raw-body upload, samples the RSS of every API process every 50 ms, then
downloads the file back and checks its sha256. Prints MB/s both ways and the peak RSS growth of the
API worker. Run as root (the servers drop to the `appliance` user) after ./install.sh.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.ingest import cli, free_port  # noqa: E402

MiB = 1024 * 1024


def api_processes(env: dict[str, str]) -> list[psutil.Process]:
    status = json.loads(cli(env, "status", "--json").stdout)
    master = psutil.Process(status["components"]["api"]["pid"])
    return [master, *master.children(recursive=True)]


class RssSampler(threading.Thread):
    def __init__(self, procs: list[psutil.Process]) -> None:
        super().__init__(daemon=True)
        self.procs = procs
        self.peak = {p.pid: p.memory_info().rss for p in procs}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for p in self.procs:
                with contextlib.suppress(psutil.Error):
                    self.peak[p.pid] = max(self.peak[p.pid], p.memory_info().rss)
            time.sleep(0.05)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=1024, help="size of the upload in MiB (default 1024)")
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="appliance-bench-", dir="/var/tmp"))
    os.chmod(home, 0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env.update(
        APPLIANCE_HOME=str(home),
        APPLIANCE_API_PORT=str(free_port()),
        APPLIANCE_PG_PORT=str(free_port()),
        APPLIANCE_REDIS_PORT=str(free_port()),
        APPLIANCE_LLM_PORT=str(free_port()),
        APPLIANCE_API_WORKERS="1",
        APPLIANCE_MAX_UPLOAD_BYTES=str((args.mib + 1) * MiB),
    )
    try:
        out = cli(env, "up", "--detach", "--timeout", "300")
        if out.returncode:
            sys.exit(f"appliance up failed:\n{out.stdout}{out.stderr}")
        system_key = next(w for w in out.stdout.split() if w.startswith("apl_"))
        url = f"http://127.0.0.1:{env['APPLIANCE_API_PORT']}"
        with httpx.Client(base_url=url, timeout=600) as c:
            sys_h = {"Authorization": f"Bearer {system_key}"}
            tenant = c.post("/api/v1/tenants", json={"name": "bench"}, headers=sys_h).json()
            key = c.post(
                "/api/v1/keys",
                json={"name": "bench", "role": "editor", "tenant_id": tenant["id"]},
                headers=sys_h,
            ).json()["key"]
            h = {"Authorization": f"Bearer {key}"}
            procs = api_processes(env)
            before = {p.pid: p.memory_info().rss for p in procs}
            sent = hashlib.sha256()
            block = os.urandom(MiB)

            def body() -> Iterator[bytes]:
                for i in range(args.mib):
                    chunk = i.to_bytes(8, "big") + block[8:]
                    sent.update(chunk)
                    yield chunk

            sampler = RssSampler(procs)
            sampler.start()
            t0 = time.perf_counter()
            r = c.post("/api/v1/documents", content=body(), headers={**h, "X-Filename": "big.bin"})
            upload_s = time.perf_counter() - t0
            sampler.stop.set()
            sampler.join()
            if r.status_code != 201:
                sys.exit(f"upload failed: {r.status_code} {r.text[:500]}")
            doc = r.json()
            got = hashlib.sha256()
            t0 = time.perf_counter()
            with c.stream("GET", f"/api/v1/documents/{doc['id']}/content", headers=h) as resp:
                for chunk in resp.iter_bytes(MiB):
                    got.update(chunk)
            download_s = time.perf_counter() - t0
        size_mb = args.mib * MiB / 1e6
        print(f"size: {args.mib} MiB ({size_mb:.0f} MB), random bytes (incompressible)")
        print(f"upload:   {upload_s:6.1f} s  {size_mb / upload_s:7.1f} MB/s  (hash + zstd + AES-GCM + store)")
        print(
            f"download: {download_s:6.1f} s  {size_mb / download_s:7.1f} MB/s  sha256 "
            f"{'matches' if got.digest() == sent.digest() else 'DIFFERS'}"
        )
        for p in procs:
            growth = (sampler.peak[p.pid] - before[p.pid]) / MiB
            print(
                f"API pid {p.pid} ({p.name()}): RSS before {before[p.pid] / MiB:.0f} MiB, "
                f"peak growth during upload {growth:+.1f} MiB"
            )
        stored = sum(f.stat().st_size for f in (home / "objects").rglob("*") if f.is_file())
        print(f"stored blob: {stored / MiB:.1f} MiB")
    finally:
        cli(env, "down")
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
