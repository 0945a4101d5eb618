"""Load: a realistic mix of uploads, job polling, searches and answers against the embedded appliance.

    .venv/bin/python bench/load.py [--users 50] [--minutes 10] [--spawn-rate 5] [--docs 30]

Starts `appliance up --detach` in a throw-away data directory on free loopback ports, creates a
tenant and an editor key, uploads `--docs` seed documents and waits until they are indexed, then
runs Locust (as a library, headless) with `--users` users for `--minutes`:

    search 6 : document status poll 3 : upload 2 : answer 1   (each user waits 1-3 s between tasks)

Prints per endpoint: requests, throughput, p50/p95/p99, and the responses by status. Acceptable
non-2xx are only 429, and 503 with Retry-After (load shedding); anything else is counted as an
error. Also prints the RSS of every appliance process before and after (a leak shows as growth
from a third of the run to its end). Run as root after ./install.sh --dev (Locust is a dev dependency).
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import collections  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
import psutil  # noqa: E402
import requests  # noqa: E402
from locust import HttpUser, between, task  # noqa: E402
from locust.env import Environment  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.ingest import cli, free_port  # noqa: E402

WORDS = [
    "boiler",
    "valve",
    "pressure",
    "inspection",
    "policy",
    "travel",
    "expense",
    "hotel",
    "vaccine",
    "dose",
    "clinic",
    "record",
    "retention",
    "backup",
    "encryption",
    "audit",
    "contract",
    "liquidity",
    "branch",
    "patient",
    "triage",
    "reimbursement",
    "safety",
    "officer",
]
QUESTIONS = [
    "How often is the boiler inspected?",
    "What is the hotel reimbursement limit?",
    "How long are backups with personal data kept?",
    "Who signs the repair report?",
]


def text_body(seed: int) -> bytes:
    rnd = random.Random(seed)
    paragraphs = [" ".join(rnd.choice(WORDS) for _ in range(60)) + "." for _ in range(6)]
    return (f"Document {seed}\n\n" + "\n\n".join(paragraphs) + "\n").encode()


def processes(env: dict[str, str]) -> dict[str, list[psutil.Process]]:
    status = json.loads(cli(env, "status", "--json").stdout)
    out = {}
    for name, comp in status["components"].items():
        if comp.get("pid"):
            master = psutil.Process(comp["pid"])
            out[name] = [master, *master.children(recursive=True)]
    return out


def rss(env: dict[str, str]) -> dict[str, tuple[float, float]]:
    """(RSS, USS) in MiB per component, summed over its processes. RSS counts shared memory (Postgres's
    shared buffers) once per process that touched it; USS, the memory only that process holds, is the
    figure that shows a leak."""
    out = {}
    for name, procs in processes(env).items():
        infos = [p.memory_full_info() for p in procs if p.is_running()]
        out[name] = (sum(i.rss for i in infos) / 2**20, sum(i.uss for i in infos) / 2**20)
    return out


STATE: dict[str, Any] = {"key": "", "docs": []}
STATUS: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)


def _count(name: str, response: Any, exception: Any, **_: Any) -> None:
    if exception is not None and response is None:
        STATUS[name][type(exception).__name__] += 1
        return
    code = getattr(response, "status_code", 0)
    retry = response is not None and response.headers.get("Retry-After")
    label = f"{code}+Retry-After" if code == 503 and retry else str(code)
    STATUS[name][label] += 1


class ApplianceUser(HttpUser):
    wait_time = between(1, 3)

    def on_start(self) -> None:
        self.client.headers["Authorization"] = f"Bearer {STATE['key']}"

    def _accept(self, r: Any) -> None:
        # Load shedding is an acceptable answer; any other non-2xx is a failure.
        if (
            r.status_code < 400
            or r.status_code == 429
            or (r.status_code == 503 and r.headers.get("Retry-After"))
        ):
            r.success()
        else:
            r.failure(f"HTTP {r.status_code}: {r.text[:120]}")

    @task(6)
    def search(self) -> None:
        query = " ".join(random.sample(WORDS, 3))
        with self.client.post(
            "/api/v1/search", json={"query": query, "top_k": 5}, name="search", catch_response=True
        ) as r:
            self._accept(r)

    @task(3)
    def poll_status(self) -> None:
        if not STATE["docs"]:
            return
        with self.client.get(
            f"/api/v1/documents/{random.choice(STATE['docs'])}", name="document status", catch_response=True
        ) as r:
            self._accept(r)

    @task(2)
    def upload(self) -> None:
        with self.client.post(
            "/api/v1/documents",
            data=text_body(random.randrange(10**9)),
            headers={"Content-Type": "text/plain", "X-Filename": "load.txt"},
            name="upload",
            catch_response=True,
        ) as r:
            self._accept(r)
            if r.status_code in (200, 201):
                STATE["docs"].append(r.json()["id"])

    @task(1)
    def answer(self) -> None:
        with self.client.post(
            "/api/v1/answers",
            json={"question": random.choice(QUESTIONS), "stream": False},
            name="answer",
            catch_response=True,
            timeout=180,
        ) as r:
            self._accept(r)


def seed(api: str, system_key: str, docs: int) -> str:
    s = requests.Session()
    s.headers["Authorization"] = f"Bearer {system_key}"
    tenant = s.post(f"{api}/api/v1/tenants", json={"name": "load"}).json()["id"]
    key = s.post(f"{api}/api/v1/keys", json={"name": "load", "role": "editor", "tenant_id": tenant}).json()[
        "key"
    ]
    s.headers["Authorization"] = f"Bearer {key}"
    ids = []
    for i in range(docs):
        r = s.post(
            f"{api}/api/v1/documents",
            data=text_body(i),
            headers={"Content-Type": "text/plain", "X-Filename": f"seed{i}.txt"},
        )
        r.raise_for_status()
        ids.append(r.json()["id"])
    STATE["docs"] = list(ids)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        jobs = s.get(f"{api}/api/v1/jobs", params={"limit": 500, "status": "succeeded"}).json()["items"]
        if len(jobs) >= docs:
            break
        time.sleep(2)
    return key


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--spawn-rate", type=float, default=5)
    parser.add_argument("--docs", type=int, default=30)
    args = parser.parse_args()

    home = tempfile.mkdtemp(prefix="bench-load-", dir="/var/tmp")
    os.chmod(home, 0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env.update(
        APPLIANCE_HOME=home,
        APPLIANCE_API_PORT=str(free_port()),
        APPLIANCE_PG_PORT=str(free_port()),
        APPLIANCE_REDIS_PORT=str(free_port()),
        APPLIANCE_LLM_PORT=str(free_port()),
    )
    api = f"http://127.0.0.1:{env['APPLIANCE_API_PORT']}"
    try:
        out = cli(env, "up", "--detach", "--timeout", "300")
        if out.returncode != 0:
            sys.exit(f"appliance up failed:\n{out.stdout}{out.stderr}")
        system_key = next(w for w in out.stdout.split() if w.startswith("apl_"))
        STATE["key"] = seed(api, system_key, args.docs)
        before = rss(env)
        environment = Environment(user_classes=[ApplianceUser], host=api)
        environment.events.request.add_listener(_count)
        runner = environment.create_local_runner()
        started = time.monotonic()
        runner.start(args.users, spawn_rate=args.spawn_rate)
        warm: dict[str, tuple[float, float]] = {}
        # After a third of the run the caches are warm: growth from there to the end would be a leak.
        gevent.spawn_later(args.minutes * 20, lambda: warm.update(rss(env)))
        gevent.spawn_later(args.minutes * 60, runner.quit)
        runner.greenlet.join()
        elapsed = time.monotonic() - started
        time.sleep(5)  # let in-flight work settle before the second RSS reading
        after = rss(env)
        report(environment, elapsed, before, warm, after, args)
    finally:
        cli(env, "down")
        shutil.rmtree(home, ignore_errors=True)


def report(
    environment: Environment,
    elapsed: float,
    before: dict,
    warm: dict,
    after: dict,
    args: argparse.Namespace,
) -> None:
    print(f"\n{args.users} users, {elapsed / 60:.1f} min, {args.docs} seed documents\n")
    print("| endpoint | requests | req/s | p50 ms | p95 ms | p99 ms | failures | responses |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for (name, _method), entry in sorted(environment.stats.entries.items()):
        codes = ", ".join(f"{k}: {v}" for k, v in sorted(STATUS[name].items()))
        print(
            f"| {name} | {entry.num_requests} | {entry.num_requests / elapsed:.2f} | "
            f"{entry.get_response_time_percentile(0.5):.0f} | "
            f"{entry.get_response_time_percentile(0.95):.0f} | "
            f"{entry.get_response_time_percentile(0.99):.0f} | {entry.num_failures} | {codes} |"
        )
    print("\n| process | RSS before | RSS at 1/3 | RSS after | USS before | USS at 1/3 | USS after | (MiB) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in sorted(set(before) | set(after)):
        b, w, a = (d.get(name, (0.0, 0.0)) for d in (before, warm, after))
        print(f"| {name} | {b[0]:.0f} | {w[0]:.0f} | {a[0]:.0f} | {b[1]:.0f} | {w[1]:.0f} | {a[1]:.0f} | |")


if __name__ == "__main__":
    main()
