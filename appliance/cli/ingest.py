"""`appliance ingest PATH...`: upload files and folders through the HTTP API, resumably.

Walks the given files and folders (recursively, hidden files and folders skipped), streams each file
from disk to `POST /api/v1/documents` (a changed file that was uploaded before becomes a new version
of its document: `POST /api/v1/documents/{id}/versions`), `--concurrency` uploads at a time, with a
progress bar. A JSON state file (default `.appliance-ingest-<tenant>.json` in the current directory)
maps each absolute path to (size, mtime, document id), written after every upload, so a second run
skips files uploaded unchanged and an interrupted run resumes. With `--wait` it then polls each
uploaded document until its ingestion is `ready`, `failed` or `needs_ocr` and prints a summary.
One file's error (unreadable, network, 4xx/5xx) is reported and the others go on; the exit code is
1 when any file failed to upload or (with `--wait`) failed ingestion.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)

from appliance.cli._common import console, err_console

READ_BLOCK = 1024 * 1024
TERMINAL = ("ready", "failed", "needs_ocr")
STATE_VERSION = 1


def _default_url() -> str:
    from appliance.settings import get_settings

    return get_settings().api_url


def walk(paths: list[Path]) -> Iterator[Path]:
    """Regular files under `paths`, in a stable order; hidden files and folders are skipped.

    A path named explicitly is taken as given (even if hidden); a broken symlink is yielded so that
    the upload reports it as unreadable rather than it vanishing silently.
    """
    seen: set[Path] = set()
    for root in paths:
        if root.is_dir():
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for name in sorted(filenames):
                    if name.startswith("."):
                        continue
                    path = Path(dirpath, name)
                    if path.is_file() or path.is_symlink():
                        resolved = path.absolute()
                        if resolved not in seen:
                            seen.add(resolved)
                            yield path
        elif root.exists() or root.is_symlink():
            resolved = root.absolute()
            if resolved not in seen:
                seen.add(resolved)
                yield root
        else:
            raise FileNotFoundError(str(root))


class State:
    """path → {size, mtime_ns, document_id}, persisted atomically after each change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.files: dict[str, dict[str, Any]] = {}
        if path.exists():
            data = json.loads(path.read_text(encoding="utf-8"))
            self.files = dict(data.get("files", {}))

    def unchanged(self, key: str, st: os.stat_result) -> bool:
        entry = self.files.get(key)
        return (
            entry is not None
            and entry.get("size") == st.st_size
            and entry.get("mtime_ns") == st.st_mtime_ns
            and bool(entry.get("document_id"))
        )

    def document_id(self, key: str) -> str | None:
        entry = self.files.get(key)
        return entry.get("document_id") if entry else None

    def record(self, key: str, st: os.stat_result, document_id: str) -> None:
        with self.lock:
            self.files[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "document_id": document_id}
            self._save()

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump({"version": STATE_VERSION, "files": self.files}, fh, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


@dataclass
class Outcome:
    path: Path
    document_id: str | None = None
    version_id: str | None = None
    created: bool = False
    error: str | None = None
    size: int = 0


@dataclass
class Summary:
    uploaded: list[Outcome] = field(default_factory=list)
    skipped: int = 0
    errors: list[Outcome] = field(default_factory=list)


def _problem(r: httpx.Response) -> str:
    try:
        body = r.json()
        code = body.get("code") or body.get("title") or ""
        detail = body.get("detail") or ""
        return f"HTTP {r.status_code} {code}: {detail}".strip(": ")
    except ValueError:
        return f"HTTP {r.status_code}: {r.text[:200]}"


def _body(fh: Any, on_bytes: Any) -> Iterator[bytes]:
    while block := fh.read(READ_BLOCK):
        on_bytes(len(block))
        yield block


RETRIES = 3  # attempts for network errors, 429 and 5xx; 4xx (but 429) are final at once


def _retryable(r: httpx.Response) -> bool:
    return r.status_code == 429 or r.status_code >= 500


def upload_one(
    client: httpx.Client, headers: dict[str, str], path: Path, state: State, on_bytes: Any
) -> Outcome:
    """Stream one file to the API (a new version of its document if the state knows one)."""
    key = str(path.absolute())
    out = Outcome(path)
    sent = 0

    def count(n: int) -> None:
        nonlocal sent
        sent += n
        on_bytes(n)

    def rewind(fh: Any) -> None:
        nonlocal sent
        fh.seek(0)
        on_bytes(-sent)
        sent = 0

    try:
        with path.open("rb") as fh:
            st = os.fstat(fh.fileno())
            out.size = st.st_size
            h = {**headers, "X-Filename": path.name}
            target = f"/api/v1/documents/{doc}/versions" if (doc := state.document_id(key)) else None
            r: httpx.Response | None = None
            for attempt in range(1, RETRIES + 1):
                if sent:
                    rewind(fh)
                try:
                    r = client.post(target or "/api/v1/documents", content=_body(fh, count), headers=h)
                except httpx.TransportError:
                    if attempt == RETRIES:
                        raise
                    time.sleep(attempt)
                    continue
                if target and r.status_code == 404:  # the document was deleted: upload it anew
                    target = None
                    rewind(fh)
                    r = client.post("/api/v1/documents", content=_body(fh, count), headers=h)
                if not _retryable(r) or attempt == RETRIES:
                    break
                time.sleep(attempt)
        assert r is not None
        if r.status_code not in (200, 201):
            out.error = _problem(r)
            return out
        data = r.json()
        # /documents answers with the document; /versions with the version.
        if "current_version" in data:
            out.document_id, out.version_id = data["id"], data["current_version"]["id"]
        else:
            out.document_id, out.version_id = data["document_id"], data["id"]
        out.created = r.status_code == 201
        state.record(key, st, data.get("document_id") or data["id"])
    except OSError as exc:
        out.error = f"unreadable: {exc.strerror or exc}"
    except httpx.HTTPError as exc:
        out.error = f"network: {type(exc).__name__}: {exc}"
    finally:
        if out.error and sent:
            on_bytes(-sent)  # the bar counts bytes stored; the caller takes the file out of the total
    return out


def wait_all(
    client: httpx.Client, headers: dict[str, str], outcomes: list[Outcome], poll: float, timeout: float
) -> dict[str, tuple[str, str | None]]:
    """document id → (ingest status, error code) once every document reached a terminal status."""
    pending = {o.document_id: o for o in outcomes if o.document_id}
    done: dict[str, tuple[str, str | None]] = {}
    deadline = time.monotonic() + timeout
    with Progress(
        TextColumn("[bold]ingesting"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=False,
    ) as progress:
        task = progress.add_task("ingest", total=len(pending))
        while pending:
            for doc_id in list(pending):
                try:
                    r = client.get(f"/api/v1/documents/{doc_id}", headers=headers)
                except httpx.HTTPError:
                    continue
                if r.status_code == 404:
                    done[doc_id] = ("failed", "deleted")
                    pending.pop(doc_id)
                    continue
                if r.status_code != 200:
                    continue
                status = r.json()["current_version"]["ingest_status"]
                if status in TERMINAL:
                    code = None
                    if status != "ready":
                        code = _error_code(client, headers, doc_id, r.json()["current_version"]["id"])
                    done[doc_id] = (status, code)
                    pending.pop(doc_id)
            progress.update(task, completed=len(done))
            if not pending:
                break
            if time.monotonic() > deadline:
                for doc_id in pending:
                    done[doc_id] = ("timeout", None)
                break
            time.sleep(poll)
    return done


def _error_code(client: httpx.Client, headers: dict[str, str], doc_id: str, version_id: str) -> str | None:
    try:
        r = client.get("/api/v1/jobs", params={"document_id": doc_id}, headers=headers)
        jobs = r.json().get("items", []) if r.status_code == 200 else []
    except (httpx.HTTPError, ValueError):
        return None
    for job in jobs:
        if job.get("version_id") == version_id and job.get("error_code"):
            return job["error_code"]
    return next((j["error_code"] for j in jobs if j.get("error_code")), None)


def ingest(
    paths: list[Path] = typer.Argument(..., help="Files and folders to upload (folders recursively)."),
    tenant: str = typer.Option(..., "--tenant", help="Tenant name (names the state file)."),
    url: str | None = typer.Option(
        None, "--url", help="API base URL [default: this appliance's API URL from its settings]."
    ),
    key: str = typer.Option(
        ..., "--key", envvar="APPLIANCE_API_KEY", help="An editor (or admin) API key of the tenant."
    ),
    concurrency: int = typer.Option(4, "--concurrency", min=1, max=64, help="Uploads at a time."),
    wait: bool = typer.Option(
        False, "--wait/--no-wait", help="Wait until every uploaded document is ingested."
    ),
    state_file: Path | None = typer.Option(
        None, "--state-file", help="Resume state [default: ./.appliance-ingest-<tenant>.json]."
    ),
    timeout: float = typer.Option(3600.0, "--timeout", help="With --wait: give up after this many seconds."),
) -> None:
    """Upload files and folders to a tenant, skipping those already uploaded unchanged."""
    base_url = url or _default_url()
    state_path = state_file or Path.cwd() / f".appliance-ingest-{tenant}.json"
    try:
        state = State(state_path)
    except (OSError, ValueError) as exc:
        err_console.print(f"[bold red]error:[/] cannot read state file {state_path}: {exc}")
        raise typer.Exit(2) from exc
    try:
        files = list(walk(paths))
    except FileNotFoundError as exc:
        err_console.print(f"[bold red]error:[/] no such file or folder: {exc}")
        raise typer.Exit(2) from exc

    summary = Summary()
    todo: list[tuple[Path, int]] = []
    for path in files:
        try:
            st = path.stat()
        except OSError:
            todo.append((path, 0))  # reported as unreadable by the upload
            continue
        if state.unchanged(str(path.absolute()), st):
            summary.skipped += 1
        else:
            todo.append((path, st.st_size))

    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)
    http_timeout = httpx.Timeout(60.0, read=600.0)
    with httpx.Client(base_url=base_url, timeout=http_timeout, limits=limits) as client:
        if todo:
            with Progress(
                TextColumn("[bold]uploading"),
                BarColumn(),
                TextColumn("{task.fields[files]}/{task.fields[of]} files"),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeElapsedColumn(),
                console=err_console,
            ) as progress:
                # One row: the bar and rate follow bytes, the file counter is a field.
                sizes = dict(todo)
                task = progress.add_task("upload", total=sum(sizes.values()), files=0, of=len(todo))

                def on_bytes(n: int) -> None:
                    progress.advance(task, n)

                with ThreadPoolExecutor(max_workers=concurrency) as pool:
                    futures = [
                        pool.submit(upload_one, client, headers, path, state, on_bytes) for path, _ in todo
                    ]
                    for fut in as_completed(futures):
                        out = fut.result()
                        progress.update(task, files=progress.tasks[0].fields["files"] + 1)
                        if out.error:
                            total = progress.tasks[0].total or 0
                            progress.update(task, total=max(0, total - sizes[out.path]))
                            summary.errors.append(out)
                            progress.console.print(f"[red]failed[/] {out.path}: {out.error}", highlight=False)
                        else:
                            summary.uploaded.append(out)

        kind = Counter("new" if o.created else "existing" for o in summary.uploaded)
        console.print(
            f"uploaded {len(summary.uploaded)} ({kind['new']} new, {kind['existing']} already stored), "
            f"skipped {summary.skipped} unchanged, {len(summary.errors)} failed; state: {state_path}",
            highlight=False,
        )
        ingest_failed = 0
        if wait and summary.uploaded:
            results = wait_all(client, headers, summary.uploaded, poll=0.5, timeout=timeout)
            by_status = Counter(status for status, _ in results.values())
            codes = Counter(code or "unknown" for status, code in results.values() if status == "failed")
            ingest_failed = by_status["failed"] + by_status["timeout"]
            failed_txt = ", ".join(f"{c} {n}" for c, n in sorted(codes.items()))
            console.print(
                f"ingested: ready {by_status['ready']}, failed {by_status['failed']}"
                + (f" ({failed_txt})" if failed_txt else "")
                + f", needs_ocr {by_status['needs_ocr']}"
                + (f", timed out {by_status['timeout']}" if by_status["timeout"] else ""),
                highlight=False,
            )
            for o in summary.uploaded:
                status, code = results.get(o.document_id or "", ("?", None))
                if status not in ("ready",):
                    console.print(f"  {status:<9} {code or '':<18} {o.path}", highlight=False)
    if summary.errors or ingest_failed:
        raise typer.Exit(1)
