"""The signed offline bundle: built small (a one-wheel wheelhouse, a tiny model, no images), then
verified by `appliance bundle verify` and by `install.sh --bundle --verify-only` (the shell twin that
runs before anything of the bundle is used). A tampered, missing or extra member, an unsafe member and
a wrong public key are each refused with one clear line by both."""

from __future__ import annotations

import hashlib
import io
import subprocess
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from appliance.cli.main import app
from appliance.packaging.bundle import (
    MANIFEST,
    SIGNATURE,
    BundleError,
    build_bundle,
    generate_keypair,
    parse_sums,
    verify_bundle,
)
from appliance.settings import PROJECT_ROOT

MODEL_BYTES = b"GGUF" + bytes(range(256)) * 4
METADATA = "Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
WHEEL = b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"


def make_wheel(directory: Path, name: str = "tinypkg", version: str = "1.0") -> Path:
    path = directory / f"{name}-{version}-py3-none-any.whl"
    files = {
        f"{name}/__init__.py": b"",
        f"{name}-{version}.dist-info/METADATA": METADATA.format(name=name, version=version).encode(),
        f"{name}-{version}.dist-info/WHEEL": WHEEL,
    }
    record = "".join(f"{n},,\n" for n in files) + f"{name}-{version}.dist-info/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as zf:
        for n, data in files.items():
            zf.writestr(n, data)
        zf.writestr(f"{name}-{version}.dist-info/RECORD", record)
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("bundle")
    wheels = tmp / "wheels"
    wheels.mkdir()
    make_wheel(wheels)
    constraints = tmp / "constraints.txt"
    constraints.write_text("# test pins\ntinypkg==1.0\nnot-in-the-bundle==2.0\n")
    models = tmp / "models"
    (models / "gguf").mkdir(parents=True)
    (models / "gguf" / "tiny.gguf").write_bytes(MODEL_BYTES)
    (models / "manifest.toml").write_text(
        '[[model]]\nname = "tiny"\npurpose = "embedding"\nfile = "tiny.gguf"\n'
        f'sha256 = "{hashlib.sha256(MODEL_BYTES).hexdigest()}"\nsize = {len(MODEL_BYTES)}\nlicense = "MIT"\n'
    )
    key = tmp / "signing.key"
    pub = generate_keypair(key)
    other = tmp / "other.key"
    other_pub = generate_keypair(other)
    out = tmp / "appliance.bundle.tar"
    result = build_bundle(
        out,
        key,
        repo=PROJECT_ROOT,
        constraints=constraints,
        models_dir=models,
        find_links=[wheels],
        packages=["tinypkg"],
        no_index=True,
        images=None,
    )
    assert result.wheels == 1 and result.models == ["tiny"] and result.images == []
    return {"bundle": out, "pub": pub, "other_pub": other_pub, "tmp": tmp}


def rewrite(
    src: Path, dst: Path, edit: Callable[[tarfile.TarInfo, bytes | None], bytes | None | bool]
) -> Path:
    """Copy the tar member by member; `edit` returns new bytes, True (keep), or False (drop)."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w", format=tarfile.PAX_FORMAT) as tout:
        for info in tin:
            data = tin.extractfile(info).read() if info.isfile() else None  # type: ignore[union-attr]
            verdict = edit(info, data)
            if verdict is False:
                continue
            if isinstance(verdict, bytes):
                data, info.size = verdict, len(verdict)
            tout.addfile(info, io.BytesIO(data) if data is not None else None)
    return dst


def install_sh_verify(bundle: Path, pub: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "bash",
            str(PROJECT_ROOT / "install.sh"),
            "--bundle",
            str(bundle),
            "--pubkey",
            str(pub),
            "--verify-only",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_refused(bundle: Path, pub: Path, expected: str) -> None:
    with pytest.raises(BundleError, match=expected) as err:
        verify_bundle(bundle, pub)
    assert "\n" not in str(err.value)
    res = install_sh_verify(bundle, pub)
    assert res.returncode == 1, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("install.sh: error: bundle "), res.stderr
    assert lines[0].endswith(": refusing"), lines[0]
    assert __import__("re").search(expected, lines[0]), lines[0]


def test_bundle_layout_and_manifest(built: dict[str, Path]) -> None:
    with tarfile.open(built["bundle"]) as tar:
        names = {m.name for m in tar if m.isfile()}
        sums = parse_sums(tar.extractfile(MANIFEST).read())  # type: ignore[union-attr]
    assert SIGNATURE in names and "bundle.json" in sums
    assert set(sums) == names - {MANIFEST, SIGNATURE}
    assert "source/install.sh" in sums and "source/docker-compose.prod.yml" in sums
    assert "wheels/tinypkg-1.0-py3-none-any.whl" in sums
    assert not any(n.startswith("wheels/not-in") for n in names)
    assert sums["models/gguf/tiny.gguf"] == hashlib.sha256(MODEL_BYTES).hexdigest()
    host_state = ("source/.venv/", "source/var/", "source/models/gguf/", "source/secrets/")
    assert not any(n.startswith(host_state) for n in names)


def test_a_good_bundle_verifies(built: dict[str, Path], tmp_path: Path) -> None:
    sums = verify_bundle(built["bundle"], built["pub"], extract_to=tmp_path)
    assert (tmp_path / "models/gguf/tiny.gguf").read_bytes() == MODEL_BYTES
    assert len(sums) > 100
    res = install_sh_verify(built["bundle"], built["pub"])
    assert res.returncode == 0, res.stderr
    assert f"bundle {built['bundle']} verified with {built['pub']}" in res.stdout
    assert "signature ok" in res.stdout
    cli = CliRunner().invoke(app, ["bundle", "verify", str(built["bundle"]), "--pubkey", str(built["pub"])])
    assert cli.exit_code == 0 and "signature ok" in cli.output


def test_a_wrong_public_key_is_refused(built: dict[str, Path]) -> None:
    assert_refused(built["bundle"], built["other_pub"], r"signature of SHA256SUMS does not verify")
    cli = CliRunner().invoke(
        app, ["bundle", "verify", str(built["bundle"]), "--pubkey", str(built["other_pub"])]
    )
    assert cli.exit_code == 1 and "does not verify" in cli.output


def test_a_tampered_member_is_refused(built: dict[str, Path], tmp_path: Path) -> None:
    def edit(info: tarfile.TarInfo, data: bytes | None) -> bytes | bool:
        return data + b"# tampered\n" if info.name == "source/install.sh" and data else True

    bad = rewrite(built["bundle"], tmp_path / "tampered.tar", edit)
    assert_refused(bad, built["pub"], r"member source/install\.sh does not match its sha256")


def test_a_tampered_model_of_the_same_size_is_refused(built: dict[str, Path], tmp_path: Path) -> None:
    def edit(info: tarfile.TarInfo, data: bytes | None) -> bytes | bool:
        return b"X" + data[1:] if info.name == "models/gguf/tiny.gguf" and data else True

    bad = rewrite(built["bundle"], tmp_path / "model.tar", edit)
    assert_refused(bad, built["pub"], r"member models/gguf/tiny\.gguf does not match its sha256")


def test_a_missing_member_is_refused(built: dict[str, Path], tmp_path: Path) -> None:
    bad = rewrite(
        built["bundle"],
        tmp_path / "missing.tar",
        lambda info, _: info.name != "wheels/tinypkg-1.0-py3-none-any.whl",
    )
    assert_refused(
        bad, built["pub"], r"member wheels/tinypkg-1\.0-py3-none-any\.whl is listed .* but missing"
    )


def test_an_unlisted_member_is_refused(built: dict[str, Path], tmp_path: Path) -> None:
    bad = rewrite(built["bundle"], tmp_path / "extra.tar", lambda *_: True)
    with tarfile.open(bad, "a") as tar:
        info = tarfile.TarInfo("wheels/evil-1.0-py3-none-any.whl")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    assert_refused(
        bad, built["pub"], r"member wheels/evil-1\.0-py3-none-any\.whl is not in the signed manifest"
    )


def test_a_link_member_is_refused(built: dict[str, Path], tmp_path: Path) -> None:
    bad = rewrite(built["bundle"], tmp_path / "link.tar", lambda *_: True)
    with tarfile.open(bad, "a") as tar:
        info = tarfile.TarInfo("source/escape")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    assert_refused(bad, built["pub"], r"member source/escape is not a regular file or directory")


def test_a_missing_signature_is_refused(built: dict[str, Path], tmp_path: Path) -> None:
    bad = rewrite(built["bundle"], tmp_path / "nosig.tar", lambda info, _: info.name != SIGNATURE)
    assert_refused(bad, built["pub"], r"no SHA256SUMS\.sig")


def test_not_a_tar_is_refused(built: dict[str, Path], tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar archive at all" * 100)
    assert_refused(junk, built["pub"], r"not a readable tar archive")


def test_the_builder_refuses_a_model_that_fails_its_sha256(built: dict[str, Path], tmp_path: Path) -> None:
    models = tmp_path / "models"
    (models / "gguf").mkdir(parents=True)
    (models / "gguf" / "tiny.gguf").write_bytes(MODEL_BYTES[:-1] + b"?")
    (models / "manifest.toml").write_text(
        '[[model]]\nname = "tiny"\npurpose = "embedding"\nfile = "tiny.gguf"\n'
        f'sha256 = "{hashlib.sha256(MODEL_BYTES).hexdigest()}"\nsize = {len(MODEL_BYTES)}\nlicense = "MIT"\n'
    )
    with pytest.raises(BundleError, match=r"model tiny .*sha256 mismatch"):
        build_bundle(
            tmp_path / "b.tar",
            built["tmp"] / "signing.key",
            repo=PROJECT_ROOT,
            constraints=built["tmp"] / "constraints.txt",
            models_dir=models,
            find_links=[built["tmp"] / "wheels"],
            packages=["tinypkg"],
            no_index=True,
        )
    assert not (tmp_path / "b.tar").exists()
