"""`appliance models add`: register an operator's own GGUF file (a customer's 8–70B chat model, say).

The file is copied into `<models_dir>/gguf/` (or linked with `link=True`, for files too big to copy)
while its sha256 is computed; a digest that differs from the one the operator was given removes the
copy and fails. The GGUF header is then read (llama.cpp with `vocab_only`, so even a 70B file loads in
a second) to refuse what cannot work: a chat model without a chat template (unless `chat_format` names
one), an embedding model whose dimension is not the index's. The entry goes to
`<models_dir>/manifest.local.toml`; from then on the model is sha256-checked like a shipped one at
every load, and selected with APPLIANCE_CHAT_MODEL / APPLIANCE_EMBEDDING_MODEL.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance.inference.manifest import (
    GGUF_SUBDIR,
    HASH_CHUNK,
    LOCAL_MANIFEST_NAME,
    PURPOSES,
    ManifestError,
    load_manifest,
)

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,99}$")
GGUF_MAGIC = b"GGUF"


class RegisterError(ValueError):
    """One line saying why the model was not added."""


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string is a JSON string for these characters
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def gguf_metadata(path: Path) -> dict[str, str]:
    """The GGUF key/value metadata, read by llama.cpp without loading the weights."""
    import llama_cpp

    llama = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        return dict(llama.metadata)
    finally:
        llama.close()


def copy_hashing(src: Path, dest: Path, progress: Callable[[int], None] | None = None) -> str:
    digest = hashlib.sha256()
    tmp = dest.with_name(dest.name + ".part")
    with open(src, "rb") as fin, open(tmp, "wb") as fout:
        while chunk := fin.read(HASH_CHUNK * 8):
            digest.update(chunk)
            fout.write(chunk)
            if progress:
                progress(len(chunk))
        fout.flush()
        os.fsync(fout.fileno())
    os.replace(tmp, dest)
    return digest.hexdigest()


def hash_file(src: Path, progress: Callable[[int], None] | None = None) -> str:
    digest = hashlib.sha256()
    with open(src, "rb") as fin:
        while chunk := fin.read(HASH_CHUNK * 8):
            digest.update(chunk)
            if progress:
                progress(len(chunk))
    return digest.hexdigest()


def add_model(
    models_dir: Path,
    src: Path,
    *,
    sha256: str,
    purpose: str,
    name: str | None = None,
    n_ctx: int | None = None,
    n_gpu_layers: int = 0,
    chat_format: str | None = None,
    pooling: str | None = None,
    license: str = "customer-supplied",
    link: bool = False,
    index_dimensions: int = 384,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Copy/link, verify and register `src`; returns the manifest entry written."""
    sha256 = sha256.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise RegisterError("--sha256 must be 64 hex digits (the digest you were given for the file)")
    if purpose not in PURPOSES:
        raise RegisterError(f"--purpose must be one of {', '.join(PURPOSES)}")
    src = src.expanduser().resolve()
    if not src.is_file():
        raise RegisterError(f"{src}: no such file")
    with open(src, "rb") as fh:
        if fh.read(4) != GGUF_MAGIC:
            raise RegisterError(f"{src}: not a GGUF file (no GGUF magic); convert it with llama.cpp first")
    name = name or re.sub(r"[^a-z0-9._-]+", "-", src.stem.lower()).strip("-.")[:100]
    if not _NAME.match(name):
        raise RegisterError(f"model name {name!r}: use lower-case letters, digits, '.', '_' and '-'")
    try:
        existing = load_manifest(models_dir)
    except ManifestError as exc:
        raise RegisterError(str(exc)) from exc
    file_name = f"{name}.gguf"
    if any(s.name == name for s in existing):
        raise RegisterError(f"a model named {name!r} is already registered; choose another --name")
    if any(s.file == file_name for s in existing):
        raise RegisterError(f"the file name {file_name} is taken; choose another --name")
    gguf_dir = Path(models_dir) / GGUF_SUBDIR
    gguf_dir.mkdir(parents=True, exist_ok=True)
    dest = gguf_dir / file_name
    if link:
        got = hash_file(src, progress)
        if got != sha256:
            raise RegisterError(
                f"sha256 mismatch for {src}: expected {sha256}, got {got}; nothing registered"
            )
        dest.unlink(missing_ok=True)
        dest.symlink_to(src)
    else:
        got = copy_hashing(src, dest, progress)
        if got != sha256:
            dest.unlink(missing_ok=True)
            raise RegisterError(
                f"sha256 mismatch for {src}: expected {sha256}, got {got}; nothing registered"
            )
    try:
        meta = gguf_metadata(dest)
        arch = meta.get("general.architecture", "")
        entry: dict[str, Any] = {
            "name": name,
            "purpose": purpose,
            "file": file_name,
            "sha256": sha256,
            "size": src.stat().st_size,
            "license": license,
        }
        trained_ctx = int(meta.get(f"{arch}.context_length", 0) or 0)
        if purpose == "chat":
            if not meta.get("tokenizer.chat_template") and not chat_format:
                raise RegisterError(
                    f"{src.name} has no chat template in its metadata; "
                    "pass --chat-format (e.g. chatml, llama-3)"
                )
            entry["n_ctx"] = n_ctx or min(trained_ctx or 4096, 8192)
            entry["n_gpu_layers"] = n_gpu_layers
            if chat_format:
                entry["chat_format"] = chat_format
        else:
            dims = int(meta.get(f"{arch}.embedding_length", 0) or 0)
            if dims != index_dimensions:
                raise RegisterError(
                    f"{src.name} gives {dims}-dimensional vectors; the index holds {index_dimensions}"
                )
            entry.update(
                dimensions=dims, n_ctx=max(512, n_ctx or 512), max_tokens=max(64, (n_ctx or 512) // 2)
            )
            entry["pooling"] = pooling or "mean"
            entry["n_gpu_layers"] = n_gpu_layers
        if trained_ctx:
            entry["trained_context_length"] = trained_ctx
        entry["architecture"] = arch
    except RegisterError:
        dest.unlink(missing_ok=True)
        raise
    except Exception as exc:  # llama.cpp could not read it
        dest.unlink(missing_ok=True)
        raise RegisterError(f"{src.name}: llama.cpp cannot read it: {exc}") from exc
    local = Path(models_dir) / LOCAL_MANIFEST_NAME
    block = "\n[[model]]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in entry.items())
    header = (
        "" if local.exists() else "# Models added on this host with `appliance models add` (not in git).\n"
    )
    with open(local, "a", encoding="utf-8") as fh:
        fh.write(header + block)
    try:
        load_manifest(models_dir)  # what we wrote must parse, with everything else
    except ManifestError as exc:  # pragma: no cover - defensive: undo a bad write
        raise RegisterError(f"registering {name} produced an invalid manifest: {exc}") from exc
    return entry


__all__ = ["RegisterError", "add_model"]
