"""`appliance ingest` against a real appliance: upload a folder, wait for ingestion, resume, re-upload.

Starts `appliance up --detach` (Postgres, Redis, the API, Dramatiq workers with the real embedding
model) in a throw-away home, like tests/e2e/test_ingest.py, and runs the typer command in-process.
The tests share one tenant and one folder and run in order.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import typer
from typer.testing import CliRunner

from appliance.cli.ingest import ingest
from tests.e2e.test_up import appliance_with_tenant

pytestmark = pytest.mark.slow

DOCS = {
    "policy.md": "# Travel policy\n\nEmployees book travel through the approved agency. "
    "Economy class is the default for flights shorter than six hours.\n",
    "notes.txt": "Minutes of the steering committee. The budget for the new warehouse was approved "
    "and the opening was moved to the second quarter.\n",
    "sub/handbook.md": "## Onboarding\n\nNew staff receive a laptop on their first day and meet their "
    "mentor during the first week.\n",
    "sub/faq.txt": "How do I reset my password? Use the self-service portal or call the help desk.\n",
    "sub/deeper/retention.md": "# Retention\n\nInvoices are kept for ten years, then destroyed securely.\n",
}


@pytest.fixture(scope="module")
def running() -> Iterator[tuple[str, str]]:
    """(API URL, editor key of a fresh tenant)."""
    with appliance_with_tenant("appliance-ingest-cli-", "cli-ingest") as (_, api, editor):
        yield api, editor


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ingest-cli-"))
    folder = path / "docs"
    for name, body in DOCS.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(body)
    (folder / ".hidden.txt").write_text("never uploaded\n")
    (folder / ".git").mkdir()
    (folder / ".git" / "config").write_text("never uploaded either\n")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run_ingest(cwd: Path, *args: str, key: str) -> tuple[int, str]:
    app = typer.Typer()
    app.command("ingest")(ingest)
    app.command("noop")(lambda: None)  # two commands: `ingest` stays a subcommand, as in `appliance`
    old = Path.cwd()
    os.chdir(cwd)
    try:
        result = CliRunner().invoke(app, ["ingest", *args], env={"APPLIANCE_API_KEY": key, "COLUMNS": "200"})
    finally:
        os.chdir(old)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def state(cwd: Path) -> dict[str, dict]:
    return json.loads((cwd / ".appliance-ingest-cli-ingest.json").read_text())["files"]


def test_folder_is_ingested_and_ready(running: tuple[str, str], workdir: Path) -> None:
    api, key = running
    code, out = run_ingest(workdir, "docs", "--tenant", "cli-ingest", "--url", api, "--wait", key=key)
    assert code == 0, out
    assert "uploaded 5 (5 new, 0 already stored), skipped 0 unchanged, 0 failed" in out, out
    assert "ready 5, failed 0" in out and "needs_ocr 0" in out, out
    files = state(workdir)
    assert sorted(files) == sorted(str((workdir / "docs" / n).absolute()) for n in DOCS)
    with httpx.Client(base_url=api, timeout=30, headers={"Authorization": f"Bearer {key}"}) as c:
        for entry in files.values():
            doc = c.get(f"/api/v1/documents/{entry['document_id']}").json()
            assert doc["current_version"]["ingest_status"] == "ready", doc
        names = {d["current_version"]["source_filename"] for d in c.get("/api/v1/documents").json()["items"]}
    assert names == {Path(n).name for n in DOCS}  # hidden files and folders skipped


def test_second_run_uploads_nothing(running: tuple[str, str], workdir: Path) -> None:
    api, key = running
    before = state(workdir)
    code, out = run_ingest(workdir, "docs", "--tenant", "cli-ingest", "--url", api, "--wait", key=key)
    assert code == 0, out
    assert "uploaded 0 (0 new, 0 already stored), skipped 5 unchanged, 0 failed" in out, out
    assert state(workdir) == before


def test_changed_file_is_uploaded_again_as_a_new_version(running: tuple[str, str], workdir: Path) -> None:
    api, key = running
    path = workdir / "docs" / "notes.txt"
    doc_id = state(workdir)[str(path.absolute())]["document_id"]
    time.sleep(0.01)
    path.write_text(path.read_text() + "The catering contract was renewed for two more years.\n")
    code, out = run_ingest(workdir, "docs", "--tenant", "cli-ingest", "--url", api, "--wait", key=key)
    assert code == 0, out
    assert "uploaded 1 (1 new, 0 already stored), skipped 4 unchanged, 0 failed" in out, out
    assert "ready 1, failed 0" in out, out
    entry = state(workdir)[str(path.absolute())]
    assert entry["document_id"] == doc_id and entry["size"] == path.stat().st_size
    with httpx.Client(base_url=api, timeout=30, headers={"Authorization": f"Bearer {key}"}) as c:
        doc = c.get(f"/api/v1/documents/{doc_id}").json()
    assert doc["current_version"]["version"] == 2 and doc["current_version"]["ingest_status"] == "ready"


def test_failing_files_exit_1_and_the_others_succeed(running: tuple[str, str], workdir: Path) -> None:
    api, key = running
    docs = workdir / "docs"
    (docs / "gone.txt").symlink_to(docs / "does-not-exist.txt")  # unreadable
    (docs / "empty.txt").write_bytes(b"")  # uploads, then ingestion fails with `empty`
    (docs / "fresh.md").write_text("# Parking\n\nVisitors park in the east lot and sign in at reception.\n")
    code, out = run_ingest(docs.parent, "docs", "--tenant", "cli-ingest", "--url", api, "--wait", key=key)
    assert code == 1, out
    assert "gone.txt: unreadable" in out, out
    assert "uploaded 2 (2 new, 0 already stored), skipped 5 unchanged, 1 failed" in out, out
    assert "ready 1, failed 1 (empty 1)" in out, out
    files = state(workdir)
    assert str((docs / "fresh.md").absolute()) in files
    assert str((docs / "gone.txt").absolute()) not in files


def test_rejected_key_fails_every_file(running: tuple[str, str], workdir: Path, tmp_path: Path) -> None:
    api, _ = running
    (tmp_path / "a.txt").write_text("Some text about the annual report.\n")
    state_file = tmp_path / "state.json"
    code, out = run_ingest(
        tmp_path,
        str(tmp_path / "a.txt"),
        "--tenant",
        "cli-ingest",
        "--url",
        api,
        "--state-file",
        str(state_file),
        key="apl_000000000000_" + "x" * 43,
    )
    assert code == 1, out
    assert "a.txt: HTTP 401" in out, out
    assert not state_file.exists()
