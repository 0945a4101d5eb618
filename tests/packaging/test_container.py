"""The compose stack's entry points (appliance.packaging.container) on the real test Postgres."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.packaging import container
from appliance.runtime.common import RuntimeFailure
from appliance.settings import Settings


@pytest.fixture
def volume() -> Iterator[Path]:
    """A fresh data volume (under /var/tmp: the service user must reach it when tests run as root)."""
    path = Path(tempfile.mkdtemp(prefix="appliance-volume-", dir="/var/tmp"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_init_prepares_the_volume_and_the_database_idempotently(settings: Settings, volume: Path) -> None:
    master = volume / "master_key"
    master.write_bytes(os.urandom(32))
    home = volume / "home"
    s = settings.model_copy(update={"home": home, "master_key_file": master})
    container.init(s)
    keys = {p.name for p in (home / "keys").iterdir()}
    assert {"url-signing.key", "audit-signing.key", "audit-signing.pub", "backup.key", "backup.pub"} <= keys
    assert "master.key" not in keys  # the secret is used where it is mounted, never copied
    assert not (home / "appliance.env").exists()  # no secret is written into the volume
    before = {p: p.read_bytes() for p in (home / "keys").iterdir()}
    container.init(s)  # a restart of the stack: nothing regenerated
    assert {p: p.read_bytes() for p in (home / "keys").iterdir()} == before


def test_init_refuses_without_the_master_key(settings: Settings, volume: Path) -> None:
    s = settings.model_copy(update={"home": volume / "home", "master_key_file": volume / "absent"})
    with pytest.raises(RuntimeFailure, match="master key .* is missing"):
        container.init(s)
    short = volume / "short"
    short.write_bytes(b"x" * 16)
    with pytest.raises(RuntimeFailure, match="16 bytes, expected 32"):
        container.init(s.model_copy(update={"master_key_file": short}))


def test_worker_health_looks_for_a_dramatiq_process(tmp_path: Path) -> None:
    def proc(pid: str, argv: list[str]) -> None:
        (tmp_path / pid).mkdir()
        (tmp_path / pid / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")

    proc("1", ["/usr/bin/tini", "--", "dramatiq", "appliance.workers"])  # tini's argv[0] is not dramatiq
    (tmp_path / "self").mkdir()
    assert not container._dramatiq_running(tmp_path)
    proc("7", ["/opt/venv/bin/python", "/opt/venv/bin/dramatiq", "appliance.workers", "-p", "1"])
    assert container._dramatiq_running(tmp_path)
