"""The models manifest and the integrity check every model load goes through."""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

import pytest

from appliance.inference.manifest import (
    ManifestError,
    ModelIntegrityError,
    ModelNotFoundError,
    ModelSpec,
    get_model,
    load_manifest,
    model_path,
    verified_path,
    verify_model,
)
from appliance.settings import get_settings

HEX64 = re.compile(r"^[0-9a-f]{64}$")


@pytest.fixture(scope="module")
def models_dir() -> Path:
    return get_settings().models_dir


@pytest.fixture(scope="module")
def specs(models_dir: Path) -> list[ModelSpec]:
    return load_manifest(models_dir)


@pytest.fixture(scope="module")
def chat_spec(models_dir: Path) -> ModelSpec:
    return get_model(models_dir, purpose="chat")


def test_manifest_names_one_embedding_and_one_chat_model(specs: list[ModelSpec]) -> None:
    assert sorted(s.purpose for s in specs) == ["chat", "embedding"]
    for spec in specs:
        assert HEX64.match(spec.sha256), spec
        assert spec.size > 0
        assert spec.file.endswith(".gguf")
        assert spec.license
        assert spec.source is not None and HEX64.match(spec.source.wheel_sha256)
        assert spec.produce is not None and spec.produce.method in ("extract", "convert_hf_to_gguf")
    embedding = next(s for s in specs if s.purpose == "embedding")
    assert embedding.params["dimensions"] == 384
    assert embedding.params["n_ctx"] >= 512
    assert embedding.produce is not None and embedding.produce.method == "convert_hf_to_gguf"
    assert all("==" in r for r in embedding.produce.requirements)


def test_license_files_are_committed(specs: list[ModelSpec], models_dir: Path) -> None:
    for spec in specs:
        assert spec.license_files, spec.name
        for rel in spec.license_files:
            assert (models_dir / rel).is_file(), rel


def test_get_model_by_name_and_purpose(models_dir: Path, specs: list[ModelSpec]) -> None:
    for spec in specs:
        assert get_model(models_dir, name=spec.name) == spec
        assert get_model(models_dir, name=spec.name, purpose=spec.purpose) == spec
    with pytest.raises(ModelNotFoundError, match="no-such-model"):
        get_model(models_dir, name="no-such-model")
    with pytest.raises(ModelNotFoundError):
        other_purpose = "chat" if specs[0].purpose != "chat" else "embedding"
        get_model(models_dir, name=specs[0].name, purpose=other_purpose)


def test_missing_and_invalid_manifest_are_clear(tmp_path: Path, models_dir: Path) -> None:
    with pytest.raises(ManifestError, match="models manifest not found"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.toml").write_text("[[model]]\nname = 'x'\n")
    with pytest.raises(ManifestError, match=r"model #1 \(x\): missing key 'purpose'"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.toml").write_text("this is = = not toml")
    with pytest.raises(ManifestError, match="invalid models manifest"):
        load_manifest(tmp_path)
    text = (models_dir / "manifest.toml").read_text()
    bad_sha = re.sub(r'^sha256 = "[0-9a-f]{64}"', 'sha256 = "abc"', text, count=1, flags=re.M)
    (tmp_path / "manifest.toml").write_text(bad_sha)
    with pytest.raises(ManifestError, match="'sha256' must be 64 lowercase hex digits"):
        load_manifest(tmp_path)
    escaping = re.sub(r'^file = ".*"', 'file = "../../etc/passwd"', text, count=1, flags=re.M)
    (tmp_path / "manifest.toml").write_text(escaping)
    with pytest.raises(ManifestError, match="plain file name"):
        load_manifest(tmp_path)


def test_real_model_files_verify(specs: list[ModelSpec], models_dir: Path) -> None:
    for spec in specs:
        check = verify_model(spec, models_dir)
        assert check.ok, f"{spec.name}: {check.reason} (run `appliance models build`)"
        assert check.reason is None
        assert verified_path(spec, models_dir) == model_path(spec, models_dir)


def test_missing_file_is_refused(tmp_path: Path, chat_spec: ModelSpec) -> None:
    check = verify_model(chat_spec, tmp_path, full=False)
    assert not check.ok and check.reason == "missing"
    with pytest.raises(ModelIntegrityError, match="missing"):
        verified_path(chat_spec, tmp_path)


@pytest.fixture
def tampered_dir(tmp_path: Path, models_dir: Path, chat_spec: ModelSpec) -> Path:
    """A models dir holding a copy of the manifest and of the chat model."""
    shutil.copyfile(models_dir / "manifest.toml", tmp_path / "manifest.toml")
    (tmp_path / "gguf").mkdir()
    shutil.copyfile(model_path(chat_spec, models_dir), model_path(chat_spec, tmp_path))
    return tmp_path


def test_flipped_byte_is_refused_by_sha256(tampered_dir: Path, chat_spec: ModelSpec) -> None:
    spec = get_model(tampered_dir, name=chat_spec.name)
    path = model_path(spec, tampered_dir)
    assert verified_path(spec, tampered_dir) == path  # the untouched copy passes
    offset = spec.size // 2
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0x01]))
    # Same size: the cheap readiness check cannot tell, the full check must.
    assert verify_model(spec, tampered_dir, full=False).ok
    check = verify_model(spec, tampered_dir)
    assert not check.ok
    assert check.reason is not None
    assert check.reason.startswith(f"sha256 mismatch: expected {spec.sha256}, got ")
    with pytest.raises(ModelIntegrityError, match="sha256 mismatch") as excinfo:
        verified_path(spec, tampered_dir)
    assert excinfo.value.name == spec.name
    assert excinfo.value.path == path


def test_truncated_file_is_refused_by_size(tampered_dir: Path, chat_spec: ModelSpec) -> None:
    path = model_path(chat_spec, tampered_dir)
    with open(path, "r+b") as fh:
        fh.truncate(chat_spec.size - 1)
    check = verify_model(chat_spec, tampered_dir, full=False)
    assert not check.ok
    assert check.reason == f"size {chat_spec.size - 1} != {chat_spec.size}"
    with pytest.raises(ModelIntegrityError, match=r"size \d+ != \d+"):
        verified_path(chat_spec, tampered_dir)


def test_spec_pointing_at_a_wrong_hash_is_refused(models_dir: Path, chat_spec: ModelSpec) -> None:
    """A spec whose pinned hash differs from the file refuses the real, intact file."""
    other = dataclasses.replace(chat_spec, sha256="0" * 64)
    with pytest.raises(ModelIntegrityError, match="sha256 mismatch: expected 0{64}, got " + chat_spec.sha256):
        verified_path(other, models_dir)
