"""End to end: the real `appliance up --detach` / `status` / `down`, as an admin types them.

Starts every process (Postgres, Redis, gunicorn with uvicorn workers, Dramatiq) in its own data
directory on free ports, talks to the API over TCP, and checks a real worker consumes a job.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import dramatiq
import httpx
import psutil
import pytest
import redis
from dramatiq.brokers.redis import RedisBroker
from sqlalchemy import create_engine, text

from appliance.settings import load_settings
from tests.conftest import free_port

pytestmark = pytest.mark.slow

KEY_RE = re.compile(r"System-admin API key: (apl_[0-9a-f]{12}_[A-Za-z0-9_-]{43})")


@pytest.fixture
def home() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="appliance-e2e-", dir="/var/tmp"))
    os.chmod(path, 0o755)
    env = cli_env(path)
    yield path
    subprocess.run(
        [sys.executable, "-m", "appliance.cli.main", "down"], env=env, capture_output=True, timeout=120
    )
    shutil.rmtree(path, ignore_errors=True)


_PORTS: dict[Path, dict[str, str]] = {}


def cli_env(home: Path) -> dict[str, str]:
    ports = _PORTS.setdefault(
        home,
        {
            "APPLIANCE_API_PORT": str(free_port()),
            "APPLIANCE_PG_PORT": str(free_port()),
            "APPLIANCE_REDIS_PORT": str(free_port()),
            "APPLIANCE_LLM_PORT": str(free_port()),
        },
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    return {
        **env,
        **ports,
        "APPLIANCE_HOME": str(home),
        "APPLIANCE_ENVIRONMENT": "test",
        "APPLIANCE_API_WORKERS": "1",
        "COLUMNS": "200",
    }


def home_settings(home: Path):  # type: ignore[no-untyped-def]
    """The settings the CLI sees for `home`, whatever this test process's environment says."""
    env = cli_env(home)
    return load_settings(
        home=home,
        api_port=int(env["APPLIANCE_API_PORT"]),
        pg_port=int(env["APPLIANCE_PG_PORT"]),
        redis_port=int(env["APPLIANCE_REDIS_PORT"]),
        llm_port=int(env["APPLIANCE_LLM_PORT"]),
    )


@contextlib.contextmanager
def appliance_with_tenant(prefix: str, tenant: str, *, env_file: str = "") -> Iterator[tuple[Path, str, str]]:
    """A real `appliance up --detach` in a fresh home, a tenant and an editor key for it:
    yields (home, API URL, editor key); `down` and removes the home afterwards. `env_file` lines are
    written to the home's appliance.env first (settings every process of that home reads)."""
    home = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    os.chmod(home, 0o755)
    if env_file:
        (home / "appliance.env").write_text(env_file)
    try:
        out = appliance(home, "up", "--detach", "--timeout", "200")
        assert out.returncode == 0, out.stdout + out.stderr
        key = KEY_RE.search(out.stdout).group(1)  # type: ignore[union-attr]
        api = f"http://127.0.0.1:{cli_env(home)['APPLIANCE_API_PORT']}"
        with httpx.Client(base_url=api, timeout=30) as c:
            sys_h = {"Authorization": f"Bearer {key}"}
            tenant_id = c.post("/api/v1/tenants", json={"name": tenant}, headers=sys_h).json()["id"]
            editor = c.post(
                "/api/v1/keys", json={"name": "e", "role": "editor", "tenant_id": tenant_id}, headers=sys_h
            ).json()["key"]
        yield home, api, editor
    finally:
        appliance(home, "down")
        shutil.rmtree(home, ignore_errors=True)


def appliance(home: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance.cli.main", *args],
        env=cli_env(home),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_up_status_down_and_reuse(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Read this home's settings as the CLI does, not the test session's (which lives in os.environ).
    for name in [k for k in os.environ if k.startswith("APPLIANCE_")]:
        monkeypatch.delenv(name)
    for name, value in cli_env(home).items():
        if name.startswith("APPLIANCE_"):
            monkeypatch.setenv(name, value)
    started = time.monotonic()
    out = appliance(home, "up", "--detach", "--timeout", "200")
    up_seconds = time.monotonic() - started
    assert out.returncode == 0, out.stdout + out.stderr
    match = KEY_RE.search(out.stdout)
    assert match, out.stdout
    key = match.group(1)
    settings = load_settings(home=home)
    api = settings.api_url
    assert api in out.stdout
    print(f"first `up --detach`: {up_seconds:.1f}s")

    # Every component reports running; none of the servers runs as root.
    status = appliance(home, "status", "--json")
    assert status.returncode == 0, status.stdout + status.stderr
    report = json.loads(status.stdout)
    assert report["api_url"] == api
    assert set(report["components"]) == {"postgres", "redis", "llm", "api", "workers"}
    for name, comp in report["components"].items():
        assert comp["state"] == "running", (name, comp)
        if os.geteuid() == 0:
            assert psutil.Process(comp["pid"]).uids().real != 0, name

    with httpx.Client(base_url=api, timeout=10) as client:
        assert client.get("/readyz").status_code == 200
        headers = {"Authorization": f"Bearer {key}", "X-Request-ID": "e2e-request-1"}
        r = client.post("/api/v1/tenants", json={"name": "e2e-tenant"}, headers=headers)
        assert r.status_code == 201, r.text
        assert r.headers["x-request-id"] == "e2e-request-1"
        assert "appliance_http_requests_total" in client.get("/metrics").text

    # The API logs JSON lines carrying the request id.
    lines = [
        json.loads(ln) for ln in (home / "logs" / "api.log").read_text().splitlines() if ln.startswith("{")
    ]
    assert any(ln.get("request_id") == "e2e-request-1" and ln.get("status") == 201 for ln in lines)

    # A real Dramatiq worker consumes a job from the appliance's Redis.
    broker = RedisBroker(url=settings.redis_url, namespace="appliance")
    ping = dramatiq.actor(lambda token: None, actor_name="system_ping", queue_name="system", broker=broker)
    token = uuid.uuid4().hex
    ping.send(token)
    r = redis.Redis.from_url(settings.redis_url)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not r.exists(f"appliance:ping:{token}"):
        time.sleep(0.2)
    assert r.exists(f"appliance:ping:{token}"), (home / "logs" / "worker.log").read_text()[-2000:]
    r.close()
    broker.close()

    # Documents through the real server; the purge after a delete runs in the real Dramatiq worker.
    with httpx.Client(base_url=api, timeout=30) as client:
        tenant_id = client.get("/api/v1/tenants", headers={"Authorization": f"Bearer {key}"}).json()["items"][
            0
        ]["id"]
        r = client.post(
            "/api/v1/keys",
            json={"name": "e2e", "role": "editor", "tenant_id": tenant_id},
            headers={"Authorization": f"Bearer {key}"},
        )
        editor = {"Authorization": f"Bearer {r.json()['key']}"}
        data = os.urandom(700_000)
        doc = client.post(
            "/api/v1/documents", content=data, headers={**editor, "X-Filename": "e2e.bin"}
        ).json()
        assert client.get(f"/api/v1/documents/{doc['id']}/content", headers=editor).content == data
        assert client.delete(f"/api/v1/documents/{doc['id']}", headers=editor).status_code == 204
    engine = create_engine(settings.owner_database_url)
    try:
        deadline = time.monotonic() + 60
        purged = None
        while time.monotonic() < deadline and purged is None:
            with engine.connect() as conn:
                purged = conn.execute(
                    text("SELECT purged_at FROM documents WHERE id = :d"), {"d": doc["id"]}
                ).scalar()
            time.sleep(0.2)
        assert purged is not None, (home / "logs" / "worker.log").read_text()[-2000:]
        with engine.connect() as conn:
            left = conn.execute(
                text("SELECT count(*) FROM document_versions WHERE document_id = :d"), {"d": doc["id"]}
            ).scalar()
        assert left == 0
    finally:
        engine.dispose()
    assert list((home / "objects").rglob("*")) == [p for p in (home / "objects").rglob("*") if p.is_dir()]

    # A second `up` while running is refused with the pid.
    again = appliance(home, "up", "--detach")
    assert again.returncode != 0 and "already running" in again.stderr

    out = appliance(home, "down")
    assert out.returncode == 0, out.stdout + out.stderr
    stopped = appliance(home, "status", "--json")
    assert stopped.returncode == 3
    assert all(c["state"] == "stopped" for c in json.loads(stopped.stdout)["components"].values())

    # A second `up` reuses the data directory: same data, no new bootstrap key.
    started = time.monotonic()
    out = appliance(home, "up", "--detach", "--timeout", "200")
    print(f"second `up --detach`: {time.monotonic() - started:.1f}s")
    assert out.returncode == 0, out.stdout + out.stderr
    assert not KEY_RE.search(out.stdout)
    with httpx.Client(base_url=api, timeout=10) as client:
        tenants = client.get("/api/v1/tenants", headers={"Authorization": f"Bearer {key}"}).json()
        assert "e2e-tenant" in [t["name"] for t in tenants["items"]]
    assert appliance(home, "audit", "verify").returncode == 0
    assert appliance(home, "down").returncode == 0


def test_taken_port_is_named(home: Path) -> None:
    import socket

    env = cli_env(home)
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", int(env["APPLIANCE_REDIS_PORT"])))
        s.listen()
        out = appliance(home, "up", "--detach", "--timeout", "120")
    assert out.returncode != 0
    assert "redis" in out.stderr and env["APPLIANCE_REDIS_PORT"] in out.stderr, out.stderr


def test_up_refuses_a_model_that_does_not_match_its_hash(home: Path, tmp_path: Path) -> None:
    from appliance.settings import PROJECT_ROOT

    models = Path(tempfile.mkdtemp(prefix="models-", dir="/var/tmp"))
    try:
        shutil.copy(PROJECT_ROOT / "models" / "manifest.toml", models / "manifest.toml")
        (models / "gguf").mkdir()
        for src in (PROJECT_ROOT / "models" / "gguf").glob("*.gguf"):
            shutil.copy(src, models / "gguf" / src.name)
        victim = next((models / "gguf").glob("SmolLM2*.gguf"))
        with open(victim, "r+b") as f:  # flip one byte, same size: only the sha256 can tell
            f.seek(1000)
            byte = f.read(1)
            f.seek(1000)
            f.write(bytes([byte[0] ^ 0xFF]))
        os.chmod(models, 0o755)
        env = cli_env(home)
        env["APPLIANCE_MODELS_DIR"] = str(models)
        out = subprocess.run(
            [sys.executable, "-m", "appliance.cli.main", "up", "--detach", "--timeout", "120"],
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert out.returncode != 0
        assert "smollm2-135m-instruct" in out.stderr and "sha256" in out.stderr, out.stderr
        status = subprocess.run(
            [sys.executable, "-m", "appliance.cli.main", "status", "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert all(c["state"] == "stopped" for c in json.loads(status.stdout)["components"].values())
    finally:
        shutil.rmtree(models, ignore_errors=True)
