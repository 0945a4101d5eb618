"""The native install for real: site.yml (preflight, appliance in native mode, backup) against a Debian 12
target made here, then `/readyz`, then a second run that must change nothing.

The target is a `debootstrap --variant=minbase bookworm` root (plus python3 and python3-apt, the baseline
of a Debian server) reached through the `community.general.chroot` connection. The root is cached as a
tarball in $APPLIANCE_TEST_CACHE (default /var/cache/appliance/ansible-test), like install.sh's
wheelhouse, as are the wheelhouse of every pinned wheel and the .deb files the role installed, so a
warm run downloads almost nothing.

There is no systemd in a chroot: the role sees /run/systemd/system missing and starts the appliance
with `appliance up --detach` instead of the unit (the unit file is still installed). The firewall and
tls roles are off here: the chroot shares this machine's network namespace, so nftables rules would
land on the host itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = REPO / "ansible"
VENV_BIN = Path(sys.executable).parent
CACHE = Path(os.environ.get("APPLIANCE_TEST_CACHE", "/var/cache/appliance/ansible-test"))
WHEELHOUSE = Path(os.environ.get("APPLIANCE_WHEELHOUSE", "/var/cache/appliance/wheelhouse"))
MIRROR = os.environ.get("APPLIANCE_TEST_DEBIAN_MIRROR", "http://deb.debian.org/debian")
# The root's baseline: minbase plus what Ansible needs on a target (python3, python3-apt for apt).
BASE_PACKAGES = "python3,python3-apt"
BOOTSTRAP_WHEELS = ["pip==26.3", "setuptools==84.2.1", "wheel==0.48.0"]  # = appliance_native_bootstrap_wheels
# The release tree the role unpacks: what install.sh needs from a checkout, minus tests and tools.
RELEASE_PATHS = [
    "pyproject.toml",
    "constraints.txt",
    "README.md",
    "alembic.ini",
    "appliance",
    "migrations",
    "models/manifest.toml",
    "models/licenses",
    "docs",
]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(1800),
    pytest.mark.skipif(os.geteuid() != 0, reason="debootstrap, chroot and mounts need root"),
]


def _log(message: str) -> None:
    print(f"[native-install {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=True, text=True, **kwargs)  # type: ignore[call-overload,no-any-return]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _debootstrap() -> str:
    found = shutil.which("debootstrap") or next(
        (p for p in ("/usr/sbin/debootstrap", "/sbin/debootstrap") if os.access(p, os.X_OK)), None
    )
    if found is None:
        pytest.fail("debootstrap is missing: install the Debian package (./install.sh --dev installs it)")
    return found


def _compression(tarball: Path) -> str:
    return "--zstd" if tarball.suffix == ".zst" else "--gzip"


def _base_tarball() -> Path:
    """A bookworm minbase root with python3 (built once, ~40 s; then a 1-2 s unpack)."""
    tarball = CACHE / f"bookworm-minbase-python3.tar.{'zst' if shutil.which('zstd') else 'gz'}"
    if tarball.exists():
        return tarball
    CACHE.mkdir(parents=True, exist_ok=True)
    build = CACHE / "build-root"
    shutil.rmtree(build, ignore_errors=True)
    started = time.monotonic()
    _run(
        [
            _debootstrap(),
            "--variant=minbase",
            f"--include={BASE_PACKAGES}",
            "bookworm",
            str(build),
            MIRROR,
        ],
        stdout=subprocess.DEVNULL,
    )
    _log(f"debootstrap bookworm minbase: {time.monotonic() - started:.1f} s")
    partial = tarball.with_suffix(".partial")
    _run(["tar", _compression(tarball), "-C", str(build), "-cpf", str(partial), "."])
    partial.rename(tarball)
    shutil.rmtree(build, ignore_errors=True)
    return tarball


def _native_wheelhouse() -> Path:
    """A tarball of wheels/: every wheel the release pins, keyed by constraints.txt and pyproject.toml."""
    digest = hashlib.sha256(
        (REPO / "constraints.txt").read_bytes() + (REPO / "pyproject.toml").read_bytes()
    ).hexdigest()[:16]
    archive = CACHE / f"wheels-{digest}.tar"
    if archive.exists():
        return archive
    target = CACHE / "build-wheels" / "wheels"
    shutil.rmtree(target.parent, ignore_errors=True)
    started = time.monotonic()
    _run(
        [
            str(VENV_BIN / "python"),
            "-m",
            "pip",
            "wheel",
            "--disable-pip-version-check",
            "--quiet",
            "--wheel-dir",
            str(target),
            "--find-links",
            str(WHEELHOUSE),
            "--only-binary",
            "llama-cpp-python",
            "-c",
            str(REPO / "constraints.txt"),
            str(REPO),
            *BOOTSTRAP_WHEELS,
        ]
    )
    for own in target.glob("appliance-*.whl"):
        own.unlink()  # the release tree is installed editable from its own source
    partial = archive.with_suffix(".partial")
    _run(["tar", "-C", str(target.parent), "-cf", str(partial), "wheels"])
    partial.rename(archive)
    shutil.rmtree(target.parent, ignore_errors=True)
    for stale in CACHE.glob("wheels-*.tar"):
        if stale != archive:
            stale.unlink()  # built for older pins
    _log(f"wheelhouse built: {time.monotonic() - started:.1f} s")
    return archive


def _release_tarball(dest: Path) -> Path:
    tarball = dest / "appliance-release.tar.gz"

    def clean(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        if "__pycache__" in info.name or info.name.endswith(".pyc"):
            return None
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        info.mode = 0o755 if info.isdir() else 0o644
        return info

    with tarfile.open(tarball, "w:gz") as tar:
        for rel in RELEASE_PATHS:
            tar.add(REPO / rel, arcname=rel, filter=clean)
    return tarball


def _models_dir() -> Path:
    models = REPO / "models" / "gguf"
    if not any(models.glob("*.gguf")):
        pytest.fail(f"no built models in {models}: run ./install.sh first")
    return models


class ChrootTarget:
    """An unpacked root with /proc, /dev and /dev/shm mounted; `close` stops what ran in it, unmounts."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.mounts: list[Path] = []

    def mount(self) -> None:
        for args, where in (
            (["-t", "proc", "proc"], "proc"),
            (["--bind", "/dev"], "dev"),
            (["-t", "tmpfs", "-o", "mode=1777", "shm"], "dev/shm"),
        ):
            point = self.root / where
            point.mkdir(parents=True, exist_ok=True)
            _run(["mount", *args, str(point)])
            self.mounts.append(point)
        # What a chroot's package scripts must not do: start services (there is no init here).
        policy = self.root / "usr/sbin/policy-rc.d"
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        shutil.copy("/etc/resolv.conf", self.root / "etc/resolv.conf")

    def processes(self) -> list[psutil.Process]:
        """Processes whose root directory is this chroot (only what this test started there)."""
        found = []
        for proc in psutil.process_iter(["pid"]):
            with contextlib.suppress(psutil.Error, OSError):
                if os.readlink(f"/proc/{proc.pid}/root") == str(self.root):
                    found.append(proc)
        return found

    def close(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            subprocess.run(
                ["chroot", str(self.root), "/usr/local/sbin/appliance", "down"],
                timeout=120,
                capture_output=True,
            )
        left = self.processes()
        for proc in left:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(left, timeout=10)
        for point in reversed(self.mounts):
            if subprocess.run(["umount", str(point)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(point)], capture_output=True)
        self.mounts.clear()


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChrootTarget]:
    root = tmp_path_factory.mktemp("native-target") / "root"
    root.mkdir()
    started = time.monotonic()
    tarball = _base_tarball()
    _run(["tar", _compression(tarball), "-C", str(root), "-xpf", str(tarball)])
    # Seed apt's archive cache with the .debs an earlier run downloaded (apt still checks them).
    debs = CACHE / "debs"
    if debs.is_dir():
        for deb in debs.glob("*.deb"):
            shutil.copy2(deb, root / "var/cache/apt/archives" / deb.name)
    chroot = ChrootTarget(root)
    chroot.mount()
    _log(f"target root ready in {time.monotonic() - started:.1f} s: {root}")
    try:
        yield chroot
    finally:
        chroot.close()
        debs.mkdir(parents=True, exist_ok=True)
        for deb in (root / "var/cache/apt/archives").glob("*.deb"):
            if not (debs / deb.name).exists():
                shutil.copy2(deb, debs / deb.name)
        shutil.rmtree(root, ignore_errors=True)


def _playbook(inventory: Path, extra: Path, log: Path) -> tuple[int, str, float]:
    env = dict(os.environ)
    env.update(
        {
            "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"),
            "ANSIBLE_LOCAL_TEMP": str(log.parent / "ansible-tmp"),
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_DISPLAY_SKIPPED_HOSTS": "false",
            "ANSIBLE_CALLBACKS_ENABLED": "ansible.builtin.profile_tasks",
            "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        }
    )
    started = time.monotonic()
    proc = subprocess.run(
        [
            str(VENV_BIN / "ansible-playbook"),
            "-i",
            str(inventory),
            "-e",
            f"@{extra}",
            str(ANSIBLE_DIR / "site.yml"),
        ],
        cwd=ANSIBLE_DIR,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=1500,
    )
    elapsed = time.monotonic() - started
    log.write_text(proc.stdout)
    return proc.returncode, proc.stdout, elapsed


def _recap(output: str) -> dict[str, int]:
    """The PLAY RECAP counters of the one host."""
    for line in output.splitlines():
        if line.startswith("target") and "ok=" in line:
            return {k: int(v) for k, v in (part.split("=") for part in line.split()[2:])}
    raise AssertionError(f"no PLAY RECAP line in:\n{output[-3000:]}")


def test_native_install_answers_readyz_and_is_idempotent(target: ChrootTarget, tmp_path: Path) -> None:
    test_started = time.monotonic()
    work = tmp_path
    wheels = _native_wheelhouse()
    release = _release_tarball(work)
    api_port = _free_port()
    inventory = work / "hosts.yml"
    # One host in every group: the single-host install.
    inventory.write_text(
        json.dumps(
            {
                "all": {
                    "hosts": {
                        "target": {
                            "ansible_connection": "community.general.chroot",
                            "ansible_host": str(target.root),
                            "ansible_python_interpreter": "/usr/bin/python3",
                        }
                    },
                    "children": {g: {"hosts": {"target": {}}} for g in ("api", "workers", "db", "storage")},
                }
            }
        )
    )
    extra = work / "vars.json"
    extra.write_text(
        json.dumps(
            {
                "appliance_mode": "native",
                "appliance_native_source": str(release),
                "appliance_native_wheelhouse": str(wheels),
                "appliance_native_models": str(_models_dir()),
                # The chroot shares this machine's network: ports nobody else uses.
                "appliance_api_port": api_port,
                "appliance_pg_port": _free_port(),
                "appliance_redis_port": _free_port(),
                "appliance_llm_port": _free_port(),
                "appliance_api_workers": 1,
                "firewall_enabled": False,
                "tls_enabled": False,
                "preflight_min_disk_gb": 2,
                "preflight_min_memory_mb": 1024,
            }
        )
    )

    rc, out, first_s = _playbook(inventory, extra, work / "first-run.log")
    _log(f"first run: {first_s:.1f} s, rc {rc}")
    assert rc == 0, out[-6000:]
    first = _recap(out)
    assert first["failed"] == 0 and first["changed"] > 0, first

    # The appliance inside the target answers on the port the role configured.
    import httpx

    ready = httpx.get(f"http://127.0.0.1:{api_port}/readyz", timeout=10)
    assert ready.status_code == 200, ready.text
    _log(f"/readyz: {ready.status_code} {ready.text.strip()[:200]}")

    # What the role left on the host: the unit and the timer (installed even without systemd), the
    # configuration, the release link, the first-run key (root only), servers under `appliance`.
    root = target.root
    for path in (
        "etc/systemd/system/appliance.service",
        "etc/systemd/system/appliance-backup.service",
        "etc/systemd/system/appliance-backup.timer",
        "etc/appliance/appliance.conf",
        "var/lib/appliance/appliance.env",
    ):
        assert (root / path).is_file(), path
    assert os.readlink(root / "opt/appliance/current") == "/opt/appliance/releases/0.1.0/source"
    key_file = root / "etc/appliance/system-admin.key"
    assert key_file.read_text().startswith("apl_") and (key_file.stat().st_mode & 0o777) == 0o600
    status = subprocess.run(
        ["chroot", str(root), "/usr/local/sbin/appliance", "status", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    components = json.loads(status.stdout)["components"]
    assert all(c["state"] == "running" for c in components.values()), components
    owners = {p.username() for p in target.processes() if p.username() != "root"}
    assert owners == {"appliance"}, owners

    rc, out, second_s = _playbook(inventory, extra, work / "second-run.log")
    _log(f"second run: {second_s:.1f} s, rc {rc}")
    assert rc == 0, out[-6000:]
    second = _recap(out)
    assert second["changed"] == 0 and second["failed"] == 0, (second, out[-6000:])
    assert httpx.get(f"http://127.0.0.1:{api_port}/readyz", timeout=10).status_code == 200
    _log(f"test body: {time.monotonic() - test_started:.1f} s")
