"""The admin CLI as scripts use it: JSON out, one readable line and a non-zero exit on errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx

from appliance.settings import Settings
from tests.factories import bearer, unique_name


def run_cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "APPLIANCE_HOME": str(settings.home),
        "APPLIANCE_LOG_JSON": "false",
        "COLUMNS": "200",
    }
    return subprocess.run(
        [sys.executable, "-m", "appliance.cli.main", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


async def test_tenant_and_key_from_the_cli_work_against_the_api(
    settings: Settings, client: httpx.AsyncClient
) -> None:
    name = unique_name("cli")
    out = run_cli(settings, "tenants", "create", name, "--json")
    assert out.returncode == 0, out.stderr
    tenant = json.loads(out.stdout)
    assert tenant["name"] == name
    out = run_cli(settings, "keys", "create", "--tenant", name, "--role", "admin", "--json")
    assert out.returncode == 0, out.stderr
    key = json.loads(out.stdout)
    r = await client.get("/api/v1/whoami", headers=bearer(key["key"]))
    assert r.status_code == 200 and r.json()["tenant"]["name"] == name and r.json()["role"] == "admin"

    out = run_cli(settings, "keys", "revoke", key["prefix"], "--tenant", name)
    assert out.returncode == 0, out.stderr
    r = await client.get("/api/v1/whoami", headers=bearer(key["key"]))
    assert r.status_code == 401


def test_cli_errors_are_one_line_and_nonzero(settings: Settings) -> None:
    name = unique_name("dup")
    assert run_cli(settings, "tenants", "create", name).returncode == 0
    for args, needle in [
        (("tenants", "create", name), "already exists"),
        (("tenants", "create", "Bad Name"), "lowercase"),
        (("keys", "create", "--tenant", "no-such-tenant", "--role", "admin"), "No tenant"),
        (("keys", "create", "--tenant", name, "--role", "root"), "unknown role"),
    ]:
        out = run_cli(settings, *args)
        assert out.returncode != 0, args
        lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and needle in lines[0], (args, out.stderr)


def test_an_invalid_setting_is_one_line_naming_its_variable_in_every_command(settings: Settings) -> None:
    env = {**os.environ, "APPLIANCE_HOME": str(settings.home), "COLUMNS": "200"}
    for args in (("status",), ("tenants", "list"), ("audit", "verify")):
        out = subprocess.run(
            [sys.executable, "-m", "appliance.cli.main", *args],
            capture_output=True,
            text=True,
            env={**env, "APPLIANCE_PG_SHARED_BUFFERS": "2G"},
            timeout=120,
        )
        assert out.returncode == 1, (args, out.stderr)
        lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1, (args, out.stderr)
        assert "APPLIANCE_PG_SHARED_BUFFERS" in lines[0] and "'2G' is not a Postgres memory size" in lines[0]


def test_audit_verify_cli(settings: Settings) -> None:
    out = run_cli(settings, "audit", "verify", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    assert json.loads(out.stdout)["ok"] is True
