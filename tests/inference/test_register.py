"""`appliance models add`: a customer's own GGUF registered, verified, and then loadable by name."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.inference.manifest import get_model, load_manifest, model_path, verified_path
from appliance.settings import get_settings


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "APPLIANCE_LOG_JSON": "false"}
    return subprocess.run(
        [sys.executable, "-m", "appliance.cli.main", "models", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    """A models dir holding the shipped manifest (its files need not be present for `add`)."""
    shipped = get_settings().models_dir
    d = tmp_path / "models"
    d.mkdir()
    shutil.copy(shipped / "manifest.toml", d / "manifest.toml")
    return d


def shipped_file(purpose: str) -> tuple[Path, str]:
    settings = get_settings()
    spec = get_model(settings.models_dir, purpose=purpose)
    return model_path(spec, settings.models_dir), spec.sha256


def test_add_a_chat_model_then_load_it_by_name(models_dir: Path) -> None:
    src, sha = shipped_file("chat")  # stands in for a customer's 8-70B GGUF
    out = cli(
        "add",
        str(src),
        "--sha256",
        sha,
        "--purpose",
        "chat",
        "--name",
        "acme-chat",
        "--n-gpu-layers",
        "-1",
        "--n-ctx",
        "1024",
        "--models-dir",
        str(models_dir),
    )
    assert out.returncode == 0, out.stderr
    assert "registered acme-chat" in out.stdout and "APPLIANCE_CHAT_MODEL=acme-chat" in out.stdout
    spec = get_model(models_dir, name="acme-chat")
    assert spec.purpose == "chat" and spec.sha256 == sha and spec.params["n_gpu_layers"] == -1
    assert spec.params["n_ctx"] == 1024 and spec.params["architecture"] == "llama"
    assert verified_path(spec, models_dir).read_bytes()[:4] == b"GGUF"
    # The shipped models are still there, first, and the LLM server would load this one by name.
    assert [s.name for s in load_manifest(models_dir)][-1] == "acme-chat"
    from appliance.inference.llm_server import server_config

    settings = get_settings().model_copy(update={"models_dir": models_dir, "chat_model": "acme-chat"})
    _server, model = server_config(settings)
    assert model.model_alias == "acme-chat" and model.n_gpu_layers == -1 and model.n_ctx == 1024
    # Twice the same name: refused, nothing changed.
    again = cli(
        "add",
        str(src),
        "--sha256",
        sha,
        "--purpose",
        "chat",
        "--name",
        "acme-chat",
        "--models-dir",
        str(models_dir),
    )
    assert again.returncode == 1 and "already registered" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1


def test_wrong_sha256_non_gguf_and_wrong_dimensions_are_refused(models_dir: Path, tmp_path: Path) -> None:
    src, sha = shipped_file("chat")
    bad = cli(
        "add",
        str(src),
        "--sha256",
        "0" * 64,
        "--purpose",
        "chat",
        "--name",
        "x",
        "--models-dir",
        str(models_dir),
    )
    assert bad.returncode == 1 and "sha256 mismatch" in bad.stderr
    assert not (models_dir / "gguf" / "x.gguf").exists() and not (models_dir / "manifest.local.toml").exists()
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model at all")
    out = cli("add", str(junk), "--sha256", "1" * 64, "--purpose", "chat", "--models-dir", str(models_dir))
    assert out.returncode == 1 and "not a GGUF file" in out.stderr
    # A chat model registered as an embedding model: its 576-d vectors do not fit the 384-d index.
    out = cli(
        "add",
        str(src),
        "--sha256",
        sha,
        "--purpose",
        "embedding",
        "--name",
        "y",
        "--models-dir",
        str(models_dir),
    )
    assert out.returncode == 1 and "576-dimensional" in out.stderr and "384" in out.stderr
    assert not (models_dir / "gguf" / "y.gguf").exists()


def test_add_an_embedding_model_by_symlink(models_dir: Path) -> None:
    src, sha = shipped_file("embedding")
    out = cli(
        "add",
        str(src),
        "--sha256",
        sha,
        "--purpose",
        "embedding",
        "--name",
        "minilm-copy",
        "--link",
        "--models-dir",
        str(models_dir),
    )
    assert out.returncode == 0, out.stderr
    assert "appliance reindex --model minilm-copy" in out.stdout
    spec = get_model(models_dir, name="minilm-copy")
    assert spec.params["dimensions"] == 384 and (models_dir / "gguf" / "minilm-copy.gguf").is_symlink()
    assert verified_path(spec, models_dir).resolve() == src.resolve()
