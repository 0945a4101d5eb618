"""A real S3 server for the storage contract tests: Ceph radosgw on loopback, started once per session.

`tests/support/s3/rgw-up.sh` builds a throw-away single-host cluster (1 mon, 1 OSD on a sparse file,
radosgw) in a short directory under /var/tmp, on free ports, with a random access/secret key pair; the
session ends with `rgw-down.sh` and the directory removed (kept when APPLIANCE_KEEP_TEST_RGW=1).
Ceph missing is a failure, not a skip: CI must run these tests against the real server.
Only the S3 half of the suite asks for it: `pytest tests/storage -k filesystem` starts nothing.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SUPPORT = Path(__file__).resolve().parent.parent / "support" / "s3"
RGW_UP = SUPPORT / "rgw-up.sh"
RGW_DOWN = SUPPORT / "rgw-down.sh"
CEPH_BINARIES = ("ceph", "ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "monmaptool", "uuidgen", "curl")
BASE_DIR = Path("/var/tmp")
DIR_PREFIX = "appliance-rgw-"  # + "<pid of the pytest process>-<random>"
OSD_PORTS = range(6800, 7301)  # the OSD binds there: radosgw and the mon must not
START_TIMEOUT_S = 240

_timing_key = pytest.StashKey[float]()


@dataclass(frozen=True)
class RGW:
    endpoint: str  # host:port
    access_key: str
    secret_key: str
    dir: Path
    start_seconds: float


def free_port(exclude: Collection[int] = ()) -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in OSD_PORTS and port not in exclude:
            return port


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _down(directory: Path) -> str:
    proc = subprocess.run(
        ["bash", str(RGW_DOWN), str(directory)], capture_output=True, text=True, timeout=120, check=False
    )
    return proc.stdout + proc.stderr


def _sweep_stale() -> None:
    """Stop and remove clusters left by test sessions that died (their pytest pid, in the name, is gone)."""
    for directory in BASE_DIR.glob(DIR_PREFIX + "*"):
        try:
            owner = int(directory.name[len(DIR_PREFIX) :].split("-", 1)[0])
        except ValueError:
            continue
        if owner == os.getpid() or _pid_alive(owner):
            continue
        _down(directory)
        shutil.rmtree(directory, ignore_errors=True)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@pytest.fixture(scope="session")
def rgw(request: pytest.FixtureRequest) -> Iterator[RGW]:
    missing = [b for b in CEPH_BINARIES if shutil.which(b) is None]
    if missing:
        pytest.fail(
            f"the S3 contract tests need a real radosgw, but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing: run `./install.sh --dev` "
            "(it apt-installs ceph-mon ceph-osd radosgw curl)",
            pytrace=False,
        )
    _sweep_stale()
    directory = Path(tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-", dir=BASE_DIR))
    assert len(str(directory)) <= 80, f"{directory} is too long for ceph's unix sockets"
    port = free_port()
    mon_port = free_port({port})
    access_key = "AK" + secrets.token_hex(9).upper()  # 20 characters, like AWS's
    secret_key = secrets.token_hex(20)
    env = {
        **os.environ,
        "S3_ACCESS_KEY": access_key,
        "S3_SECRET_KEY": secret_key,
        "MON_PORT": str(mon_port),
        "OSD_BYTES": str(2 << 30),  # sparse; the suite writes well under 1 GiB
        "RGW_UP_TIMEOUT": "90",
    }
    started = time.monotonic()
    try:
        try:
            proc = subprocess.run(
                ["bash", str(RGW_UP), str(directory), str(port)],
                env=env,
                capture_output=True,
                text=True,
                timeout=START_TIMEOUT_S,
                check=False,
            )
            output, rc = proc.stdout + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as exc:
            out = (exc.stdout or b"") + (exc.stderr or b"")
            text = out.decode(errors="replace") if isinstance(out, bytes) else out
            output, rc = f"{text}\n(timed out after {START_TIMEOUT_S}s)", -1
        elapsed = time.monotonic() - started
        if rc != 0:
            logs = "\n".join(
                f"--- {p.name}\n{_tail(p)}" for p in sorted((directory / "log").glob("*")) if p.is_file()
            )
            pytest.fail(f"radosgw did not start (rgw-up.sh exit {rc}):\n{output}\n{logs}", pytrace=False)
        values = dict(
            line.split("=", 1) for line in (directory / "s3.env").read_text().splitlines() if "=" in line
        )
        request.config.stash[_timing_key] = elapsed
        yield RGW(
            endpoint=values["S3_ENDPOINT"],
            access_key=values["S3_ACCESS_KEY"],
            secret_key=values["S3_SECRET_KEY"],
            dir=directory,
            start_seconds=elapsed,
        )
    finally:
        _down(directory)
        if not os.environ.get("APPLIANCE_KEEP_TEST_RGW"):
            shutil.rmtree(directory, ignore_errors=True)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    elapsed = config.stash.get(_timing_key, None)
    if elapsed is not None:
        terminalreporter.write_line(
            f"storage: radosgw cold start {elapsed:.1f}s (tests/support/s3/rgw-up.sh)"
        )
