"""Test session: one real Postgres (with pgvector) and one real Redis, started once through the same
code as `appliance up`, in a throw-away data directory; migrations run as the owner role.

Each test creates its own tenants (unique names), so tests never see each other's rows and
nothing needs truncating between them.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from appliance.api import create_app
from appliance.bootstrap import ensure_bootstrap
from appliance.db.engine import Database
from appliance.db.migrations import upgrade_head
from appliance.runtime import start_datastores
from appliance.settings import Settings, get_settings, load_settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def test_home() -> Iterator[Path]:
    # /var/tmp, not pytest's tmp_path: the service user must be able to traverse to it.
    home = Path(tempfile.mkdtemp(prefix="appliance-test-", dir="/var/tmp"))
    os.chmod(home, 0o755)
    yield home
    if not os.environ.get("APPLIANCE_KEEP_TEST_HOME"):
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def settings(test_home: Path) -> Iterator[Settings]:
    os.environ["APPLIANCE_HOME"] = str(test_home)
    os.environ["APPLIANCE_ENVIRONMENT"] = "test"
    os.environ["APPLIANCE_PG_PORT"] = str(free_port())
    os.environ["APPLIANCE_REDIS_PORT"] = str(free_port())
    os.environ["APPLIANCE_LLM_PORT"] = str(free_port())
    os.environ["APPLIANCE_LOG_JSON"] = "false"
    os.environ["APPLIANCE_LOG_LEVEL"] = "WARNING"
    # A test that ran before this fixture (the chunking tests need only the model) may have cached
    # the process-wide settings with the default ports: code that reads them later (the Dramatiq
    # broker, on the first enqueue) must see this session's.
    get_settings.cache_clear()
    datastores = start_datastores(load_settings(home=test_home))
    try:
        settings = load_settings(home=test_home)  # now with the generated secrets
        upgrade_head(settings)
        yield settings
    finally:
        datastores.stop()


@pytest.fixture(scope="session")
def system_key(settings: Settings) -> str:
    key = ensure_bootstrap(settings)
    assert key is not None, "a fresh test database must get a bootstrap key"
    return key


_SESSION_DB: list[Database] = []


@pytest.fixture(scope="session")
async def app_db(settings: Settings) -> AsyncIterator[Database]:
    db = Database(settings.app_database_url, pool_size=2)
    _SESSION_DB[:] = [db]
    yield db
    await db.dispose()


@pytest.fixture(scope="session")
def llm_server(settings: Settings) -> Iterator[str]:
    """The embedded LLM server (llama-cpp-python's, with the manifest's chat model), once per session."""
    import subprocess
    import sys
    import time

    log = open(settings.home / "llm-test.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance.inference.llm_server"], stdout=log, stderr=subprocess.STDOUT
    )
    url = settings.llm_base_url
    deadline = time.monotonic() + 120
    try:
        while True:
            try:
                if httpx.get(f"{url}/v1/models", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"the LLM server did not start: {(settings.home / 'llm-test.log').read_text()[-2000:]}"
                )
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="session")
async def app(settings: Settings, llm_server: str) -> AsyncIterator[FastAPI]:
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture(scope="session")
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://appliance.test", timeout=120) as c:
        yield c
