"""The embedded runtime against real processes: Postgres (pgvector) and Redis started by the same code
as `appliance up`, in throw-away data directories under /var/tmp (the service user must reach them).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest

from appliance.runtime import RuntimeFailure, start_datastores
from appliance.runtime import postgres as pg
from appliance.runtime import redis as rd
from appliance.runtime.supervisor import running_supervisor
from appliance.settings import PROJECT_ROOT, Settings, load_settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # The session fixtures of tests/conftest.py export APPLIANCE_*; these tests pick their own.
    for key in list(os.environ):
        if key.startswith("APPLIANCE_"):
            monkeypatch.delenv(key)


@pytest.fixture
def home() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="appliance-rt-", dir="/var/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def first_settings(home: Path, **overrides: object) -> Settings:
    overrides.setdefault("pg_port", free_port())
    overrides.setdefault("redis_port", free_port())
    return load_settings(home, environment="test", **overrides)


def connect(s: Settings, user: str, password: str, dbname: str | None = None) -> psycopg.Connection:
    return psycopg.connect(
        host="127.0.0.1",
        port=s.pg_port,
        user=user,
        password=password,
        dbname=dbname or s.pg_database,
        autocommit=True,
        connect_timeout=5,
    )


def row(conn: psycopg.Connection, query: str, *params: object) -> tuple[Any, ...]:
    result = conn.execute(query, params or None).fetchone()
    assert result is not None
    return result


def app_conn(s: Settings) -> psycopg.Connection:
    assert s.pg_app_password is not None
    return connect(s, s.pg_app_user, s.pg_app_password.get_secret_value())


def owner_conn(s: Settings) -> psycopg.Connection:
    assert s.pg_owner_password is not None
    return connect(s, s.pg_owner_user, s.pg_owner_password.get_secret_value())


def test_datastores_start_with_roles_extensions_and_private_redis(home: Path) -> None:
    ds = start_datastores(first_settings(home))
    try:
        s = ds.settings
        with app_conn(s) as conn:
            (version,) = row(conn, "SELECT extversion FROM pg_extension WHERE extname = 'vector'")
            assert version.startswith("0.8")
            exts = {r[0] for r in conn.execute("SELECT extname FROM pg_extension").fetchall()}
            assert {"vector", "pg_trgm", "btree_gin"} <= exts
            attrs = row(conn, "SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = current_user")
            assert attrs == (False, False)
            # The app role may use the schema but not create in it.
            assert row(conn, "SELECT has_schema_privilege('public', 'CREATE')") == (False,)
        with owner_conn(s) as conn:
            attrs = row(
                conn,
                "SELECT rolsuper, rolbypassrls, rolcreaterole FROM pg_roles WHERE rolname = current_user",
            )
            assert attrs == (False, False, False)
            assert row(conn, "SELECT has_schema_privilege('public', 'CREATE')") == (True,)
            owner = row(
                conn, "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s", s.pg_database
            )
            assert owner == (s.pg_owner_user,)

        # Nothing runs as root; Postgres listens on loopback with the socket in $home/run.
        pg_proc = psutil.Process(ds.postgres_pid)
        assert pg_proc.uids().real != 0 and pg_proc.uids().effective != 0
        assert psutil.Process(ds.redis_pid).uids().effective != 0
        assert (s.run_dir / f".s.PGSQL.{s.pg_port}").exists()

        # Redis answers only with the password, and persists with the AOF.
        with rd.client(s) as r:
            assert r.ping() is True
            assert r.config_get("appendonly") == {"appendonly": "yes"}
            assert r.config_get("appendfsync") == {"appendfsync": "everysec"}
            assert r.info("persistence")["aof_enabled"] == 1
        with socket.create_connection(("127.0.0.1", s.redis_port), timeout=5) as raw:
            raw.sendall(b"PING\r\n")
            assert raw.recv(100).startswith(b"-NOAUTH")

        # Layout and secrets: service-user owned, 0700 dirs, 0600 secrets.
        for sub in (s.run_dir, s.log_dir, s.redis_dir, s.keys_dir, s.pg_data_dir.parent):
            assert sub.stat().st_mode & 0o777 == 0o700, sub
        for secret in (home / "appliance.env", s.master_key_path, rd.config_path(s)):
            assert secret.stat().st_mode & 0o777 == 0o600, secret
            assert secret.stat().st_uid == pg_proc.uids().real
        assert s.master_key_path.stat().st_size == 32
        assert running_supervisor(s) == os.getpid()
    finally:
        ds.stop()
    assert running_supervisor(ds.settings) is None
    assert pg.postmaster_pid(ds.settings) is None


def test_second_start_reuses_the_data_directory(home: Path) -> None:
    first = start_datastores(first_settings(home))
    s1 = first.settings
    try:
        with owner_conn(s1) as conn:
            conn.execute("CREATE TABLE kept (v text)")
            conn.execute("INSERT INTO kept VALUES ('still here')")
        with rd.client(s1) as r:
            r.set("kept", "yes")
    finally:
        first.stop()
    key_before = s1.master_key_path.read_bytes()
    env_before = (home / "appliance.env").read_text()
    # autoprewarm listed the cluster's buffers at shutdown, to read them back at the next start.
    assert (s1.pg_data_dir / "autoprewarm.blocks").stat().st_size > 0

    # No overrides: ports and secrets come back from appliance.env. Memory settings given on this
    # start reach Postgres (the managed file is rewritten at each start and read last).
    second = start_datastores(
        load_settings(home, environment="test", pg_shared_buffers="48MB", pg_work_mem="12MB")
    )
    try:
        s2 = second.settings
        with owner_conn(s2) as conn:
            assert row(conn, "SHOW shared_buffers") == ("48MB",)
            assert row(conn, "SHOW work_mem") == ("12MB",)
            assert row(conn, "SHOW pg_prewarm.autoprewarm") == ("on",)
        assert (s2.pg_port, s2.redis_port) == (s1.pg_port, s1.redis_port)
        for field in ("pg_superuser_password", "pg_owner_password", "pg_app_password", "redis_password"):
            assert getattr(s1, field).get_secret_value() == getattr(s2, field).get_secret_value()
        assert (home / "appliance.env").read_text() == env_before
        assert s2.master_key_path.read_bytes() == key_before
        assert "initdb" not in second.timings
        with owner_conn(s2) as conn:
            assert conn.execute("SELECT v FROM kept").fetchone() == ("still here",)
        with rd.client(s2) as r:
            assert r.get("kept") == b"yes"
    finally:
        second.stop()


def test_a_second_start_on_a_running_home_is_refused(home: Path) -> None:
    ds = start_datastores(first_settings(home))
    try:
        with pytest.raises(RuntimeFailure, match=rf"already running, pid {os.getpid()}"):
            start_datastores(load_settings(home, environment="test"))
    finally:
        ds.stop()


@pytest.mark.parametrize("component", ["postgres", "redis"])
def test_a_taken_port_names_the_component_and_port(home: Path, component: str) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        field = "pg_port" if component == "postgres" else "redis_port"
        settings = first_settings(home, **{field: port})
        with pytest.raises(RuntimeFailure) as err:
            start_datastores(settings)
    assert f"{component}: port {port} on 127.0.0.1 is already in use" in str(err.value)
    # A failed start leaves nothing behind: no lock, no postmaster.
    assert running_supervisor(settings) is None
    assert pg.postmaster_pid(settings) is None


def test_a_stale_postmaster_left_by_a_killed_parent_is_stopped(
    home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = first_settings(home)
    script = textwrap.dedent(
        f"""
        import json, os, signal
        from pathlib import Path
        from appliance.runtime import start_datastores
        from appliance.settings import load_settings
        ds = start_datastores(load_settings(Path({str(home)!r}), environment="test",
                              pg_port={settings.pg_port}, redis_port={settings.redis_port}))
        print(json.dumps({{"postgres": ds.postgres_pid, "redis": ds.redis_pid}}), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # the parent dies; its servers do not
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env["PYTHONPATH"] = str(PROJECT_ROOT)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == -signal.SIGKILL, out.stderr
    old = json.loads(out.stdout.strip().splitlines()[-1])
    assert psutil.pid_exists(old["postgres"]) and psutil.pid_exists(old["redis"])
    assert pg.postmaster_pid(settings) == old["postgres"]

    caplog.set_level("INFO", logger="appliance.runtime")
    ds = start_datastores(load_settings(home, environment="test"))
    try:
        assert not psutil.pid_exists(old["postgres"]) or psutil.Process(old["postgres"]).status() == "zombie"
        assert not psutil.pid_exists(old["redis"]) or psutil.Process(old["redis"]).status() == "zombie"
        assert ds.postgres_pid != old["postgres"]
        assert "stale" in caplog.text and str(old["postgres"]) in caplog.text
        with app_conn(ds.settings) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        ds.stop()


def test_a_stale_postmaster_pid_file_without_process_is_removed(home: Path) -> None:
    ds = start_datastores(first_settings(home))
    ds.stop()
    settings = ds.settings
    # A pid file as a crash leaves it, naming a pid that is not a postmaster (this test process).
    pid_file = settings.pg_data_dir / "postmaster.pid"
    pid_file.write_text(
        f"{os.getpid()}\n{settings.pg_data_dir}\n{int(time.time())}\n{settings.pg_port}\n\n\n\n"
    )
    again = start_datastores(load_settings(home, environment="test"))
    try:
        with app_conn(again.settings) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        again.stop()


def test_bootstrap_database_is_idempotent_and_resets_passwords(home: Path) -> None:
    ds = start_datastores(first_settings(home))
    try:
        s = ds.settings
        from pydantic import SecretStr

        changed = s.model_copy(update={"pg_app_password": SecretStr("rotated-password")})
        pg.bootstrap_database(changed)
        pg.bootstrap_database(changed)
        with app_conn(changed) as conn:
            assert conn.execute("SELECT current_user").fetchone() == (s.pg_app_user,)
        with pytest.raises(psycopg.OperationalError):
            app_conn(s).close()
        with pytest.raises(psycopg.OperationalError):  # CONNECT revoked from PUBLIC
            assert s.pg_superuser_password is not None
            with connect(s, s.pg_superuser, s.pg_superuser_password.get_secret_value()) as conn:
                conn.execute("CREATE ROLE nobody_special LOGIN PASSWORD 'x'")
            connect(s, "nobody_special", "x").close()
    finally:
        ds.stop()


def test_an_unreachable_home_names_the_blocking_directory(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root drops privileges to the service user")
    blocked = Path(tempfile.mkdtemp(prefix="appliance-rt-blocked-", dir="/var/tmp"))
    try:
        os.chmod(blocked, 0o700)
        with pytest.raises(RuntimeFailure) as err:
            start_datastores(first_settings(blocked / "home"))
        message = str(err.value)
        assert str(blocked) in message and "APPLIANCE_HOME" in message
    finally:
        shutil.rmtree(blocked, ignore_errors=True)


@pytest.mark.slow
def test_up_detach_status_down_end_to_end(home: Path) -> None:
    """The whole stack through the CLI: `up --detach` → `status --json` → second `up` refused → `down`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env.update(
        APPLIANCE_HOME=str(home),
        APPLIANCE_ENVIRONMENT="test",
        APPLIANCE_API_PORT=str(free_port()),
        APPLIANCE_PG_PORT=str(free_port()),
        APPLIANCE_REDIS_PORT=str(free_port()),
        APPLIANCE_LLM_PORT=str(free_port()),
        APPLIANCE_API_WORKERS="1",
        PYTHONPATH=str(PROJECT_ROOT),
    )

    def cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "appliance.cli.main", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
        )

    up = cli("up", "--detach", "--timeout", "120")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"http://127.0.0.1:{env['APPLIANCE_API_PORT']}" in up.stdout
        assert "will not be shown again" in up.stdout  # first run: the bootstrap key, once
        assert not (home / "run" / "bootstrap.key").exists()

        status = cli("status", "--json")
        assert status.returncode == 0, status.stdout + status.stderr
        info = json.loads(status.stdout)
        assert {name: c["state"] for name, c in info["components"].items()} == {
            "postgres": "running",
            "redis": "running",
            "llm": "running",
            "api": "running",
            "workers": "running",
        }
        for name in ("postgres", "redis", "llm", "api", "workers"):
            assert psutil.Process(info["components"][name]["pid"]).uids().effective != 0

        again = cli("up")
        assert again.returncode == 1 and "already running, pid" in again.stderr
    finally:
        down = cli("down")
    assert down.returncode == 0, down.stdout + down.stderr
    after = cli("status", "--json")
    assert after.returncode == 3
    assert all(c["state"] == "stopped" for c in json.loads(after.stdout)["components"].values())
    assert cli("down").stdout.strip() == "not running"
