"""Chaos against a real `appliance up`: steady uploads and searches while components are killed.

One driver for the CI test (tests/e2e/test_chaos.py, one round) and the benchmark
(bench/chaos.py, many rounds). For each fault in turn — an API worker, a Dramatiq worker process,
Redis, Postgres — it sends SIGKILL, then measures the recovery time: until `/readyz` answers 200
and a search and an upload both succeed again (the supervisor, gunicorn and Dramatiq restart what
died). Afterwards it waits for every upload that got a 2xx to reach `ready`, and counts the lost
(2xx but not ready), the duplicated chunks and the stuck jobs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
from sqlalchemy import create_engine, text

FAULTS = ("api-worker", "dramatiq-worker", "redis", "postgres")


@dataclass
class Load:
    """What the load threads saw: uploads acknowledged (2xx) and every failure, by kind."""

    acknowledged: list[str] = field(default_factory=list)  # document ids
    uploads_failed: int = 0
    searches_ok: int = 0
    searches_failed: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def note(self, what: str) -> None:
        with self.lock:
            self.statuses[what] = self.statuses.get(what, 0) + 1


@dataclass
class FaultResult:
    fault: str
    pid: int
    recovery_s: float


def _status(home_env: dict[str, str]) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "appliance.cli.main", "status", "--json"],
        env=home_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return json.loads(out.stdout)


def victim(fault: str, home_env: dict[str, str]) -> int:
    """The pid to kill for a fault: a worker process under a master, or the server itself."""
    components = _status(home_env)["components"]
    if fault == "api-worker":
        children = psutil.Process(components["api"]["pid"]).children()
        return children[0].pid  # a gunicorn worker; the master respawns it
    if fault == "dramatiq-worker":
        master = psutil.Process(components["workers"]["pid"])
        children = master.children(recursive=True)
        return (children or [master])[0].pid
    return int(components[fault]["pid"])


def _upload(c: httpx.Client, headers: dict[str, str], load: Load) -> bool:
    body = f"chaos document {uuid.uuid4()}: the boiler inspection report lists valve pressure readings.\n" * 8
    try:
        r = c.post("/api/v1/documents", content=body.encode(), headers={**headers, "X-Filename": "chaos.txt"})
    except httpx.HTTPError as exc:
        load.note(f"upload {type(exc).__name__}")
        with load.lock:
            load.uploads_failed += 1
        return False
    if r.status_code in (200, 201):
        with load.lock:
            load.acknowledged.append(r.json()["id"])
        return True
    load.note(f"upload {r.status_code}")
    with load.lock:
        load.uploads_failed += 1
    return False


def _search(c: httpx.Client, headers: dict[str, str], load: Load) -> bool:
    try:
        r = c.post("/api/v1/search", json={"query": "boiler valve pressure", "top_k": 5}, headers=headers)
    except httpx.HTTPError as exc:
        load.note(f"search {type(exc).__name__}")
        with load.lock:
            load.searches_failed += 1
        return False
    ok = r.status_code == 200
    with load.lock:
        if ok:
            load.searches_ok += 1
        else:
            load.searches_failed += 1
    if not ok:
        load.note(f"search {r.status_code}")
    return ok


def _load_loop(api: str, headers: dict[str, str], load: Load, stop: threading.Event, pause: float) -> None:
    with httpx.Client(base_url=api, timeout=10) as c:
        while not stop.is_set():
            _upload(c, headers, load)
            _search(c, headers, load)
            stop.wait(pause)


def _recovered(api: str, headers: dict[str, str], probe: Load) -> bool:
    with httpx.Client(base_url=api, timeout=5) as c:
        try:
            if c.get("/readyz").status_code != 200:
                return False
        except httpx.HTTPError:
            return False
        return _search(c, headers, probe) and _upload(c, headers, probe)


def run_chaos(
    home: Path,
    api: str,
    headers: dict[str, str],
    home_env: dict[str, str],
    owner_url: str,
    *,
    rounds: int = 1,
    settle_s: float = 3.0,
    pause_s: float = 0.2,
    recovery_timeout_s: float = 180.0,
    ready_timeout_s: float = 300.0,
    log: Callable[[str], None] = print,
) -> dict:
    load, probe = Load(), Load()
    stop = threading.Event()
    threads = [
        threading.Thread(target=_load_loop, args=(api, headers, load, stop, pause_s), daemon=True)
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    faults: list[FaultResult] = []
    try:
        time.sleep(settle_s)
        for _ in range(rounds):
            for fault in FAULTS:
                pid = victim(fault, home_env)
                os.kill(pid, signal.SIGKILL)
                killed = time.monotonic()
                while not _recovered(api, headers, probe):
                    if time.monotonic() - killed > recovery_timeout_s:
                        raise AssertionError(f"no recovery {recovery_timeout_s:.0f} s after killing {fault}")
                    time.sleep(0.2)
                faults.append(FaultResult(fault, pid, time.monotonic() - killed))
                log(f"killed {fault} (pid {pid}): recovered in {faults[-1].recovery_s:.1f} s")
                time.sleep(settle_s)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    acknowledged = load.acknowledged + probe.acknowledged
    outcome = _wait_ready(owner_url, acknowledged, ready_timeout_s)
    return {
        "faults": [f.__dict__ for f in faults],
        "uploads_acknowledged": len(acknowledged),
        "uploads_failed": load.uploads_failed,
        "searches_ok": load.searches_ok,
        "searches_failed": load.searches_failed,
        "failures_by_kind": dict(sorted(load.statuses.items())),
        **outcome,
    }


def _wait_ready(owner_url: str, doc_ids: list[str], timeout_s: float) -> dict:
    """Wait until every acknowledged upload is ready (or failed), then count lost, duplicated, stuck."""
    engine = create_engine(owner_url)
    started = time.monotonic()
    try:
        with engine.connect() as conn:
            while True:
                rows = conn.execute(
                    text(
                        "SELECT d.id::text, v.ingest_status FROM documents d "
                        "LEFT JOIN document_versions v ON v.document_id = d.id "
                        "WHERE d.id = ANY(CAST(:ids AS uuid[]))"
                    ),
                    {"ids": doc_ids},
                ).all()
                conn.commit()
                status = {r[0]: r[1] for r in rows}
                pending = [d for d in doc_ids if status.get(d) not in ("ready", "failed")]
                if not pending or time.monotonic() - started > timeout_s:
                    break
                time.sleep(1)
            duplicated = conn.execute(
                text(
                    # (version_id, ordinal) is unique by constraint: a duplicated or lost chunk shows
                    # as ordinals that are not exactly 0..n-1.
                    "SELECT count(*) FROM (SELECT version_id FROM chunks GROUP BY version_id "
                    "HAVING count(*) <> max(ordinal) + 1 OR min(ordinal) <> 0) dup"
                )
            ).scalar_one()
            stuck = conn.execute(
                text("SELECT count(*) FROM jobs WHERE status NOT IN ('succeeded', 'failed', 'dead')")
            ).scalar_one()
    finally:
        engine.dispose()
    return {
        "lost": sum(1 for d in doc_ids if d not in status),
        "not_ready": sum(1 for d in doc_ids if status.get(d) != "ready"),
        "duplicated_chunks": int(duplicated),
        "stuck_jobs": int(stuck),
        "seconds_to_all_ready": round(time.monotonic() - started, 1),
    }


def table(result: dict) -> str:
    lines = ["| fault | recovery (s) |", "| --- | --- |"]
    lines += [f"| {f['fault']} | {f['recovery_s']:.1f} |" for f in result["faults"]]
    lines.append(
        f"\nuploads acknowledged {result['uploads_acknowledged']}, failed {result['uploads_failed']}; "
        f"searches ok {result['searches_ok']}, failed {result['searches_failed']}; "
        f"lost {result['lost']}, not ready {result['not_ready']}, duplicated chunks "
        f"{result['duplicated_chunks']}, stuck jobs {result['stuck_jobs']} "
        f"(all ready {result['seconds_to_all_ready']} s after the last fault); "
        f"failures by kind {result['failures_by_kind']}"
    )
    return "\n".join(lines)
