"""compose/Dockerfile and compose/Dockerfile.cuda: hadolint, and the properties the issue asks for."""

from __future__ import annotations

import re
import subprocess

import pytest

from appliance.settings import PROJECT_ROOT
from tests.packaging.conftest import hadolint_path

COMPOSE = PROJECT_ROOT / "compose"
DOCKERFILES = ("Dockerfile", "Dockerfile.cuda")
CONTEXT = {"constraints.txt", "pyproject.toml", "README.md", "alembic.ini", "appliance", "migrations"}
BUILD_TOOLS = ("build-essential", "cmake", "git", "gcc", "g++", "make", "python3-dev", "nvcc")


def stages(text: str) -> list[tuple[str, str]]:
    """(FROM line, body) per stage, continuation lines joined, comments dropped."""
    lines = re.sub(r"\\\n\s*", " ", text).splitlines()
    out: list[tuple[str, list[str]]] = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            out.append((line, []))
        elif out:
            out[-1][1].append(line)
    return [(head, "\n".join(body)) for head, body in out]


def arg_defaults(text: str) -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_passes(name: str) -> None:
    res = subprocess.run(
        [hadolint_path(), "--no-color", "--config", str(COMPOSE / ".hadolint.yaml"), str(COMPOSE / name)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The linter really runs with our config: an unpinned base and a root user are reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\nUSER root\n")
    res = subprocess.run(
        [hadolint_path(), "--no-color", "--config", str(COMPOSE / ".hadolint.yaml"), str(bad)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 1
    assert "DL3007" in res.stdout and "DL3013" in res.stdout and "DL3002" in res.stdout


@pytest.mark.parametrize("name", DOCKERFILES)
def test_final_stage_is_small_non_root_and_model_free(name: str) -> None:
    text = (COMPOSE / name).read_text()
    args = arg_defaults(text)
    all_stages = stages(text)
    assert len(all_stages) >= 2, "multi-stage"
    for head, _ in all_stages:
        image = head.split()[1]
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        assert re.search(r":[^:/]*\d+\.\d+[^:/]*$", image) or "@sha256:" in image, f"unpinned base {image}"
    final_head, final = all_stages[-1]
    users = re.findall(r"^USER (\S+)", final, re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root"), "the final stage runs as root"
    installs = " ".join(re.findall(r"apt-get install[^\n&]*", final))
    for tool in BUILD_TOOLS:
        assert not re.search(rf"(^|\s){re.escape(tool)}(\s|$)", installs), f"{tool} in the final stage"
    assert "COPY --from=build /opt/venv /opt/venv" in final
    assert not re.search(r"^(COPY|ADD) .*models", final, re.M), "models are mounted, never baked in"
    assert "APPLIANCE_MODELS_DIR=/models" in final
    assert re.search(r'^ENTRYPOINT \["/usr/bin/tini", "--"\]', final, re.M)
    assert "rm -rf /var/lib/apt/lists/*" in final


def test_cuda_variant_builds_llama_cpp_with_cuda() -> None:
    text = (COMPOSE / "Dockerfile.cuda").read_text()
    (build_head, build), *_, (final_head, _) = stages(text)
    assert "nvidia/cuda:${CUDA_VERSION}-devel-" in build_head
    assert "nvidia/cuda:${CUDA_VERSION}-runtime-" in final_head
    assert "-DGGML_CUDA=on" in build
    assert re.search(r"CMAKE_CUDA_ARCHITECTURES", build)


def test_build_context_excludes_models_and_local_state() -> None:
    for name in DOCKERFILES:
        ignore = (COMPOSE / f"{name}.dockerignore").read_text().splitlines()
        rules = [r.strip() for r in ignore if r.strip() and not r.startswith("#")]
        assert rules[0] == "*", "allow-list: everything is excluded first"
        allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
        assert allowed == CONTEXT
        copied = re.findall(r"^COPY (?!--from)(.+) \S+$", (COMPOSE / name).read_text(), re.M)
        for sources in copied:
            for src in sources.split():
                assert src in allowed, f"{name} copies {src}, which the build context leaves out"
