"""The signed offline bundle: everything an air-gapped host needs, in one tar (docs/packaging.md).

Layout of `appliance-<version>.bundle.tar` (uncompressed: wheels, GGUF files and image layers are
compressed already):

    source/...            the project tree (git's tracked and unignored files): install.sh, compose/, ...
    wheels/*.whl          every pin of constraints.txt, llama-cpp-python from the local wheelhouse,
                          and pip/setuptools/wheel, so `pip install --no-index` needs nothing else
    models/gguf/*.gguf    the model files of models/manifest.toml, each checked by sha256 before it is packed
    images/*.tar          `docker save` of each image of docker-compose.prod.yml (skipped with --no-images)
    bundle.json           what is inside (version, commit, models, images, wheel count)
    SHA256SUMS            `sha256sum` format: one line per member above, nothing else
    SHA256SUMS.sig        detached Ed25519 signature (raw 64 bytes) over SHA256SUMS

Only regular files and directories with plain relative names are allowed. `verify_bundle` (and the
shell twin in install.sh, which uses only tar, sha256sum and openssl so that nothing from the bundle
runs before it is verified) refuses a bundle whose signature fails with the given public key, whose
members differ from the manifest (added, missing, duplicated) or whose bytes differ from their sha256.
The signing key stays with the vendor; the public key (PEM) ships to customers separately.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import IO

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from appliance.audit.signing import public_pem

MANIFEST = "SHA256SUMS"
SIGNATURE = "SHA256SUMS.sig"
METADATA = "bundle.json"
# The names install.sh accepts too (keep the two in step): no spaces, quotes, globs or backslashes.
SAFE_NAME = re.compile(r"^[A-Za-z0-9._+@=,-][A-Za-z0-9._+@=,/-]*$")
MANIFEST_LINE = re.compile(r"^([0-9a-f]{64})  (\S+)$")
# Build tools the offline venv needs next to constraints.txt (pinned to the builder's own versions).
BOOTSTRAP_PACKAGES = ("pip", "setuptools", "wheel")
CHUNK = 1024 * 1024
# Host state that must never leave in a bundle, even where .gitignore misses it.
NEVER_PACKED = ("secrets/", "var/", ".venv/", "models/gguf/", "models/manifest.local.toml")

Progress = Callable[[str], None]


class BundleError(Exception):
    """A bundle that cannot be built or must not be installed; the message is one line."""


@dataclass
class BuildResult:
    path: Path
    members: int
    size: int
    seconds: float
    wheels: int
    models: list[str] = field(default_factory=list)
    images: list[str] = field(default_factory=list)


# Keys ------------------------------------------------------------------------------------------------


def generate_keypair(private_path: Path) -> Path:
    """Write a new Ed25519 signing key (PKCS#8 PEM, 0600) and its public key beside it (`.pub`)."""
    public_path = private_path.with_name(private_path.name + ".pub")
    for path in (private_path, public_path):
        if path.exists():
            raise BundleError(f"{path} exists: refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    public_path.write_bytes(public_pem(key.public_key()))
    return public_path


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise BundleError(f"signing key {path} not found") from None
    except (ValueError, TypeError) as exc:
        raise BundleError(f"{path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError(f"{path} holds a {type(key).__name__}, not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except FileNotFoundError:
        raise BundleError(f"public key {path} not found") from None
    except ValueError as exc:
        raise BundleError(f"{path} is not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError(f"{path} holds a {type(key).__name__}, not an Ed25519 public key")
    return key


# Build -----------------------------------------------------------------------------------------------


class _HashingReader:
    """A file wrapper that hashes what tarfile reads from it (one read per member, no second pass)."""

    def __init__(self, fh: IO[bytes]) -> None:
        self.fh = fh
        self.digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.fh.read(size)
        self.digest.update(data)
        return data


class _Writer:
    def __init__(self, tar: tarfile.TarFile) -> None:
        self.tar = tar
        self.sums: dict[str, str] = {}
        self.dirs: set[str] = set()
        self.mtime = int(time.time())

    def _parents(self, name: str) -> None:
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in self.dirs:
                info = tarfile.TarInfo(d)
                info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, self.mtime
                self.tar.addfile(info)
                self.dirs.add(d)

    def _info(self, name: str, size: int, mode: int) -> tarfile.TarInfo:
        if not SAFE_NAME.match(name) or ".." in name.split("/") or name in self.sums:
            raise BundleError(f"cannot pack {name!r}: not a plain relative name, or a repeated one")
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = size, mode, self.mtime
        info.uname = info.gname = "root"
        return info

    def add_file(self, name: str, path: Path) -> None:
        st = path.stat()
        info = self._info(name, st.st_size, 0o755 if st.st_mode & 0o111 else 0o644)
        self._parents(name)
        with open(path, "rb") as fh:
            reader = _HashingReader(fh)
            self.tar.addfile(info, reader)  # type: ignore[arg-type]
        if path.stat().st_size != st.st_size:
            raise BundleError(f"{path} changed while it was packed")
        self.sums[name] = reader.digest.hexdigest()

    def add_bytes(self, name: str, data: bytes, *, listed: bool = True) -> None:
        info = self._info(name, len(data), 0o644)
        self._parents(name)
        self.tar.addfile(info, io.BytesIO(data))
        if listed:
            self.sums[name] = hashlib.sha256(data).hexdigest()


def source_files(repo: Path) -> list[str]:
    """The project tree as git sees it: tracked and untracked-but-not-ignored files that exist."""
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise BundleError(f"cannot list the source files of {repo} with git: {exc}") from None
    names = sorted({n for n in out.decode().split("\0") if n and not n.startswith(NEVER_PACKED)})
    return [n for n in names if (repo / n).is_file() and not (repo / n).is_symlink()]


def _constraint_pins(constraints: Path, packages: Iterable[str] | None) -> list[str]:
    pins = []
    for raw in constraints.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            pins.append(line)
    if packages is not None:
        wanted = {_norm(p) for p in packages}
        pins = [p for p in pins if _norm(p.split("==")[0]) in wanted]
        missing = wanted - {_norm(p.split("==")[0]) for p in pins}
        if missing:
            raise BundleError(f"not pinned in {constraints}: {', '.join(sorted(missing))}")
    return pins


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower().strip()


def download_wheels(
    dest: Path,
    constraints: Path,
    *,
    find_links: Iterable[Path] = (),
    packages: Iterable[str] | None = None,
    no_index: bool = False,
    bootstrap: bool = True,
) -> list[Path]:
    """`pip download` every pin (binary wheels only, no dependency resolution: the pins are the closure)."""
    pins = _constraint_pins(constraints, packages)
    if bootstrap:
        pins += [f"{name}=={metadata.version(name)}" for name in BOOTSTRAP_PACKAGES]
    dest.mkdir(parents=True, exist_ok=True)
    req = dest / "requirements.txt"
    req.write_text("\n".join(pins) + "\n")
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-deps"]
    cmd += ["--only-binary", ":all:", "--dest", str(dest), "--requirement", str(req)]
    for link in find_links:
        cmd += ["--find-links", str(link)]
    if no_index:
        cmd.append("--no-index")
    res = subprocess.run(cmd, capture_output=True, text=True)
    req.unlink()
    if res.returncode != 0:
        lines = [ln for ln in (res.stderr or res.stdout).strip().splitlines() if ln.strip()]
        raise BundleError(f"pip download failed: {lines[-1] if lines else res.returncode}")
    return sorted(dest.glob("*.whl"))


def compose_images(repo: Path) -> list[str]:
    """Every image of docker-compose.prod.yml, the GPU profile's included."""
    cmd = ["docker", "compose", "-f", str(repo / "docker-compose.prod.yml"), "--profile", "gpu"]
    res = subprocess.run([*cmd, "config", "--images"], capture_output=True, text=True)
    if res.returncode != 0:
        raise BundleError(f"docker compose config --images failed: {res.stderr.strip()[:300]}")
    return sorted({line.strip() for line in res.stdout.splitlines() if line.strip()})


def _image_file(image: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", image) + ".tar"


def build_bundle(
    out: Path,
    signing_key: Path,
    *,
    repo: Path,
    constraints: Path | None = None,
    models_dir: Path | None = None,
    find_links: Iterable[Path] = (),
    packages: Iterable[str] | None = None,
    no_index: bool = False,
    images: list[str] | None = None,
    with_models: bool = True,
    progress: Progress = lambda _msg: None,
) -> BuildResult:
    """Build and sign the bundle at `out` (written to a temp file, renamed when complete).

    `images=None` skips `docker save` (no engine); `packages` restricts the wheelhouse to those pins
    (a partial bundle, e.g. for tests: no pip/setuptools/wheel either); `no_index` takes wheels only
    from `find_links`.
    """
    from appliance.inference.manifest import (
        ManifestError,
        manifest_path,
        model_path,
        verify_model,
    )
    from appliance.inference.manifest import parse_manifest as parse_models

    t0 = time.monotonic()
    key = load_signing_key(signing_key)
    constraints = constraints or repo / "constraints.txt"
    models_dir = models_dir or repo / "models"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = BuildResult(path=out, members=0, size=0, seconds=0.0, wheels=0)
    with tempfile.TemporaryDirectory(prefix=".bundle-", dir=out.parent) as tmp:
        work = Path(tmp)
        progress("wheels: pip download of every pin in " + str(constraints))
        wheels = download_wheels(
            work / "wheels",
            constraints,
            find_links=find_links,
            packages=packages,
            no_index=no_index,
            bootstrap=packages is None,
        )
        result.wheels = len(wheels)
        saved: list[tuple[str, Path]] = []
        for image in images or []:
            target = work / "images" / _image_file(image)
            target.parent.mkdir(exist_ok=True)
            progress(f"images: docker save {image}")
            res = subprocess.run(["docker", "save", "-o", str(target), image], capture_output=True, text=True)
            if res.returncode != 0:
                raise BundleError(f"docker save {image} failed: {res.stderr.strip()[:300]}")
            saved.append((image, target))
        specs = []
        if with_models:
            path = manifest_path(models_dir)
            try:  # the shipped manifest only: a host's manifest.local.toml models stay on that host
                specs = parse_models(path.read_text(), origin=str(path))
            except OSError as exc:
                raise BundleError(f"cannot read {path}: {exc.strerror or exc}") from None
            except ManifestError as exc:
                raise BundleError(str(exc)) from None
            for spec in specs:
                progress(f"models: checking {spec.name} (sha256)")
                check = verify_model(spec, models_dir, full=True)
                if not check.ok:
                    raise BundleError(f"model {spec.name} ({check.path}): {check.reason}; run ./install.sh")

        partial = work / "bundle.tar"
        with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
            w = _Writer(tar)
            progress(f"source: {repo}")
            for name in source_files(repo):
                w.add_file(f"source/{name}", repo / name)
            for wheel in wheels:
                w.add_file(f"wheels/{wheel.name}", wheel)
            for spec in specs:
                progress(f"models: packing {spec.file}")
                w.add_file(f"models/gguf/{spec.file}", model_path(spec, models_dir))
            for _image, path in saved:
                w.add_file(f"images/{path.name}", path)
            meta = {
                "version": _project_version(repo),
                "commit": _git_commit(repo),
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
                "python": f"cp{sys.version_info.major}{sys.version_info.minor}",
                "wheels": len(wheels),
                "models": [{"name": s.name, "file": s.file, "sha256": s.sha256} for s in specs],
                "images": [{"image": image, "file": f"images/{p.name}"} for image, p in saved],
            }
            w.add_bytes(METADATA, json.dumps(meta, indent=2).encode() + b"\n")
            manifest = "".join(f"{digest}  {name}\n" for name, digest in sorted(w.sums.items())).encode()
            w.add_bytes(MANIFEST, manifest, listed=False)
            w.add_bytes(SIGNATURE, key.sign(manifest), listed=False)
            result.members = len(w.sums)
        os.replace(partial, out)
    result.size = out.stat().st_size
    result.seconds = time.monotonic() - t0
    result.models = [s.name for s in specs]
    result.images = [image for image, _ in saved]
    return result


def _project_version(repo: Path) -> str:
    import tomllib

    try:
        return str(tomllib.loads((repo / "pyproject.toml").read_text())["project"]["version"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "unknown"


def _git_commit(repo: Path) -> str | None:
    res = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
    return res.stdout.strip() or None if res.returncode == 0 else None


# Verify ----------------------------------------------------------------------------------------------


def parse_sums(data: bytes) -> dict[str, str]:
    sums: dict[str, str] = {}
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise BundleError(f"{MANIFEST} is not ASCII: refusing") from None
    for number, line in enumerate(text.splitlines(), 1):
        m = MANIFEST_LINE.match(line)
        if not m or not SAFE_NAME.match(m.group(2)) or ".." in m.group(2).split("/"):
            raise BundleError(f"{MANIFEST} line {number} is malformed: refusing")
        if m.group(2) in sums:
            raise BundleError(f"{MANIFEST} lists {m.group(2)} twice: refusing")
        sums[m.group(2)] = m.group(1)
    if not sums:
        raise BundleError(f"{MANIFEST} is empty: refusing")
    return sums


def _members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    seen: set[str] = set()
    for info in tar:
        name = info.name.rstrip("/") if info.isdir() else info.name
        if not (info.isfile() or info.isdir()):
            raise BundleError(f"bundle member {name} is not a regular file or directory: refusing")
        if not SAFE_NAME.match(name) or ".." in name.split("/"):
            raise BundleError(f"bundle member {name!r} has an unsafe name: refusing")
        if name in seen:
            raise BundleError(f"bundle member {name} appears twice: refusing")
        seen.add(name)
        yield info


def verify_bundle(bundle: Path, public_key: Path, *, extract_to: Path | None = None) -> dict[str, str]:
    """Check the signature and every member's sha256; `BundleError` (one line) on any mismatch.

    One pass over the tar: each member is hashed as it is read (and written under `extract_to` when
    given, which must be an empty directory: nothing there may be used unless this returns)."""
    key = load_public_key(public_key)
    digests: dict[str, str] = {}
    manifest = signature = None
    try:
        with tarfile.open(bundle, "r:") as tar:
            for info in _members(tar):
                if info.isdir():
                    if extract_to is not None:
                        (extract_to / info.name).mkdir(parents=True, exist_ok=True)
                    continue
                src = tar.extractfile(info)
                assert src is not None
                if info.name in (MANIFEST, SIGNATURE):
                    data = src.read()
                    if info.name == MANIFEST:
                        manifest = data
                    else:
                        signature = data
                    continue
                digests[info.name] = _copy_hashing(src, extract_to / info.name if extract_to else None)
    except FileNotFoundError:
        raise BundleError(f"bundle {bundle} not found") from None
    except tarfile.TarError as exc:
        raise BundleError(f"{bundle} is not a readable tar archive ({exc}): refusing") from None
    if manifest is None or signature is None:
        raise BundleError(f"bundle has no {MANIFEST if manifest is None else SIGNATURE}: refusing")
    try:
        key.verify(signature, manifest)
    except InvalidSignature:
        raise BundleError(
            f"the signature of {MANIFEST} does not verify with {public_key}: refusing "
            "(wrong public key, or the bundle was altered)"
        ) from None
    expected = parse_sums(manifest)
    for name in sorted(set(digests) - set(expected)):
        raise BundleError(f"bundle member {name} is not in the signed manifest: refusing")
    for name in sorted(set(expected) - set(digests)):
        raise BundleError(f"bundle member {name} is listed in the signed manifest but missing: refusing")
    for name in sorted(expected):
        if digests[name] != expected[name]:
            raise BundleError(
                f"bundle member {name} does not match its sha256 in the signed manifest: refusing"
            )
    return expected


def _copy_hashing(src: IO[bytes], target: Path | None) -> str:
    digest = hashlib.sha256()
    out = None
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        out = open(target, "xb")  # noqa: SIM115 - closed below
    try:
        while chunk := src.read(CHUNK):
            digest.update(chunk)
            if out is not None:
                out.write(chunk)
    finally:
        if out is not None:
            out.close()
    return digest.hexdigest()
