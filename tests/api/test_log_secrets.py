"""No secret in any log: a real API server (gunicorn with the appliance's worker class, as `appliance up`
runs it) logging JSON at DEBUG, a whole session against it, then every line it wrote is searched for
key material, the master key and the datastore passwords."""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from appliance.auth.keys import KEY_RE
from appliance.settings import Settings
from tests.conftest import free_port

pytestmark = pytest.mark.slow


@pytest.fixture
def api_server(settings: Settings, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    port = free_port()
    log_path = tmp_path / "api.log"
    env = {
        **os.environ,
        "APPLIANCE_API_PORT": str(port),
        "APPLIANCE_LOG_LEVEL": "DEBUG",
        "APPLIANCE_LOG_JSON": "true",
    }
    argv = [
        str(Path(sys.executable).parent / "gunicorn"),
        "appliance.api:create_app()",
        "-k",
        "appliance.runtime.uvicorn.ApplianceWorker",
        "-w",
        "1",
        "-b",
        f"127.0.0.1:{port}",
        "--log-level",
        "debug",
        "--error-logfile",
        "-",
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=settings.home)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the API did not start: {log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        yield url, log_path
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def secret_forms(raw: bytes) -> set[str]:
    """A secret as it could appear in a log line: its text, hex (both cases), base64 variants."""
    forms = {
        raw.hex(),
        raw.hex().upper(),
        base64.b64encode(raw).decode().rstrip("="),
        base64.urlsafe_b64encode(raw).decode().rstrip("="),
    }
    with contextlib.suppress(UnicodeDecodeError):
        forms.add(raw.decode())
    return {f for f in forms if len(f) >= 8}


def key_forms(key: str) -> set[str]:
    """The whole key and its secret part (the prefix is public: lists, logs, audit)."""
    m = KEY_RE.match(key)
    assert m is not None, key
    return {key, m.group(2)}


def test_no_secret_in_any_log_line(settings: Settings, system_key: str, api_server: tuple[str, Path]) -> None:
    url, log_path = api_server
    keys_used = [system_key]
    with httpx.Client(base_url=url, timeout=120) as c:
        sys_h = {"Authorization": f"Bearer {system_key}"}
        r = c.post("/api/v1/tenants", json={"name": f"logs-{uuid.uuid4().hex[:8]}"}, headers=sys_h)
        assert r.status_code == 201, r.text
        tenant_id = r.json()["id"]
        r = c.post(
            "/api/v1/keys", json={"name": "admin", "role": "admin", "tenant_id": tenant_id}, headers=sys_h
        )
        assert r.status_code == 201, r.text
        admin = r.json()["key"]
        h = {"Authorization": f"Bearer {admin}"}
        r = c.post("/api/v1/keys", json={"name": "editor", "role": "editor"}, headers=h)
        editor, editor_id = r.json()["key"], r.json()["id"]
        keys_used += [admin, editor]
        eh = {"Authorization": f"Bearer {editor}"}
        r = c.post(
            "/api/v1/documents",
            content=b"The retention policy keeps incident records for seven years.",
            headers={**eh, "Content-Type": "text/plain", "X-Filename": "policy.txt"},
        )
        assert r.status_code == 201, r.text
        doc_id = r.json()["id"]
        assert c.get(f"/api/v1/documents/{doc_id}", headers=eh).status_code == 200
        assert c.get(f"/api/v1/documents/{doc_id}/content", headers=eh).status_code == 200
        r = c.post("/api/v1/documents/" + doc_id + "/download-url", json={}, headers=eh)
        if r.status_code == 200:
            assert c.get(r.json()["url"].removeprefix(url)).status_code == 200
        for mode in ("fulltext", "hybrid"):
            r = c.post("/api/v1/search", json={"query": "retention policy", "mode": mode}, headers=eh)
            assert r.status_code == 200, r.text
        c.post("/api/v1/answers", json={"question": "How long are records kept?"}, headers=eh)
        # Failing authentication: the right prefix with a wrong secret, a made-up key, a malformed one.
        wrong = editor[:17] + "W" * 43
        made_up = "apl_0123456789ab_" + "S" * 43
        keys_used += [wrong, made_up]
        for bad in (wrong, made_up, "not-a-key-" + "Q" * 30):
            assert c.get("/api/v1/whoami", headers={"Authorization": f"Bearer {bad}"}).status_code == 401
        # A revoked key, then used.
        assert c.post(f"/api/v1/keys/{editor_id}/revoke", headers=h).status_code == 200
        assert c.get("/api/v1/whoami", headers=eh).status_code == 401
        # Headers past the server's limit are refused by the HTTP parser, key and all.
        r = c.get("/api/v1/whoami", headers={**h, "X-Padding": "p" * (settings.max_header_bytes + 9000)})
        assert r.status_code in (400, 431)

    time.sleep(0.5)  # let the worker flush its last lines
    text = log_path.read_text(errors="replace")
    lines = text.splitlines()
    assert any('"event": "request"' in line and "/api/v1/search" in line for line in lines), text[-3000:]

    secrets: dict[str, set[str]] = {}
    for key in keys_used:
        secrets[f"api key {key[:16]}"] = key_forms(key)
    secrets["master key"] = secret_forms(settings.master_key_path.read_bytes())
    secrets["url signing key"] = secret_forms(settings.url_signing_key_path.read_bytes())
    for name in ("pg_superuser_password", "pg_owner_password", "pg_app_password", "redis_password"):
        value = getattr(settings, name)
        if value is not None:
            secrets[name] = {value.get_secret_value()}
    assert secrets.get("pg_app_password"), "the test home should have generated passwords"
    for number, line in enumerate(lines, 1):
        for what, forms in secrets.items():
            for form in forms:
                assert form not in line, f"{what} in log line {number}: {line[:300]}"
