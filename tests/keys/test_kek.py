"""Master-key providers: real AES-GCM, Argon2id/Scrypt and real files; no mocks."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import pickle
import stat
from pathlib import Path

import pytest

from appliance.keys.kek import (
    DEK_SIZE,
    FileKeyProvider,
    KeyFileError,
    KeyProvider,
    KeyUnwrapError,
    LocalKeyProvider,
    PassphraseKeyProvider,
    PassphraseParams,
    create_key_file,
    generate_dek,
    kek_key_id,
)

TENANT_A = bytes.fromhex("0f" * 16)
TENANT_B = bytes.fromhex("1e" * 16)


def test_generate_dek_is_random_32_bytes() -> None:
    deks = {generate_dek() for _ in range(100)}
    assert len(deks) == 100
    assert all(len(d) == DEK_SIZE for d in deks)


def test_wrap_unwrap_round_trip() -> None:
    kek = LocalKeyProvider(os.urandom(32))
    dek = generate_dek()
    wrapped = kek.wrap(dek, aad=TENANT_A)
    assert len(wrapped) == 1 + 12 + 32 + 16
    assert wrapped[0] == 1
    assert dek not in wrapped
    assert kek.unwrap(wrapped, aad=TENANT_A) == dek
    # A random nonce per wrap: wrapping twice gives different bytes, both valid.
    again = kek.wrap(dek, aad=TENANT_A)
    assert again != wrapped
    assert kek.unwrap(again, aad=TENANT_A) == dek
    # Another instance with the same key unwraps it (no per-instance state).
    key = os.urandom(32)
    assert LocalKeyProvider(key).unwrap(LocalKeyProvider(key).wrap(dek, aad=b""), aad=b"") == dek


def test_wrong_aad_or_wrong_kek_is_refused() -> None:
    kek = LocalKeyProvider(os.urandom(32))
    wrapped = kek.wrap(generate_dek(), aad=TENANT_A)
    with pytest.raises(KeyUnwrapError):
        kek.unwrap(wrapped, aad=TENANT_B)
    with pytest.raises(KeyUnwrapError):
        kek.unwrap(wrapped, aad=b"")
    with pytest.raises(KeyUnwrapError) as exc:
        LocalKeyProvider(os.urandom(32)).unwrap(wrapped, aad=TENANT_A)
    assert "\n" not in str(exc.value)


def test_any_changed_byte_or_length_is_refused() -> None:
    kek = LocalKeyProvider(os.urandom(32))
    wrapped = kek.wrap(generate_dek(), aad=TENANT_A)
    for i in range(len(wrapped)):
        bad = bytearray(wrapped)
        bad[i] ^= 0x01
        with pytest.raises(KeyUnwrapError):
            kek.unwrap(bytes(bad), aad=TENANT_A)
    for short_or_long in (wrapped[:-1], wrapped + b"\x00", b""):
        with pytest.raises(KeyUnwrapError):
            kek.unwrap(short_or_long, aad=TENANT_A)


def test_key_and_dek_lengths_are_checked() -> None:
    with pytest.raises(ValueError):
        LocalKeyProvider(os.urandom(16))
    kek = LocalKeyProvider(os.urandom(32))
    with pytest.raises(ValueError):
        kek.wrap(os.urandom(16), aad=TENANT_A)
    with pytest.raises(TypeError):
        kek.wrap("not bytes", aad=TENANT_A)  # type: ignore[arg-type]


def test_key_id_is_stable_hmac_and_not_the_key() -> None:
    key = os.urandom(32)
    kek = LocalKeyProvider(key)
    expected = hmac.new(key, b"appliance-kek-id", hashlib.sha256).hexdigest()[:16]
    assert kek.key_id == expected == kek_key_id(key) == LocalKeyProvider(key).key_id
    assert len(kek.key_id) == 16
    assert kek.key_id not in key.hex()
    assert LocalKeyProvider(os.urandom(32)).key_id != kek.key_id


def test_providers_satisfy_the_protocol(tmp_path: Path) -> None:
    params = PassphraseParams(salt=os.urandom(16))
    providers = [
        LocalKeyProvider(os.urandom(32)),
        create_key_file(tmp_path / "master.key"),
        PassphraseKeyProvider.derive("correct horse battery staple", params),
    ]
    for p in providers:
        assert isinstance(p, KeyProvider)
        dek = generate_dek()
        assert p.unwrap(p.wrap(dek, aad=TENANT_A), aad=TENANT_A) == dek


# --- key file -------------------------------------------------------------------------------------


def test_create_key_file_is_0600_even_with_a_permissive_umask(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    old = os.umask(0)
    try:
        created = FileKeyProvider.create_key_file(path)
    finally:
        os.umask(old)
    st = path.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_size == 32
    loaded = FileKeyProvider.load(path)
    assert loaded.key_id == created.key_id
    dek = generate_dek()
    assert loaded.unwrap(created.wrap(dek, aad=TENANT_A), aad=TENANT_A) == dek


def test_create_key_file_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    first = create_key_file(path)
    before = path.read_bytes()
    with pytest.raises(KeyFileError, match="already exists"):
        create_key_file(path)
    assert path.read_bytes() == before
    assert FileKeyProvider.load(path).key_id == first.key_id
    # A symlink (even a dangling one) is not followed.
    target = tmp_path / "elsewhere.key"
    link = tmp_path / "link.key"
    link.symlink_to(target)
    with pytest.raises(KeyFileError):
        create_key_file(link)
    assert not target.exists()


def test_create_key_file_needs_the_directory(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="cannot be created"):
        create_key_file(tmp_path / "missing" / "master.key")


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602, 0o700])
def test_load_refuses_group_or_other_access(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "master.key"
    create_key_file(path)
    os.chmod(path, mode)
    if mode & 0o077 == 0:  # 0700: owner-only (the execute bit is odd but not a leak)
        FileKeyProvider.load(path)
        return
    with pytest.raises(KeyFileError) as exc:
        FileKeyProvider.load(path)
    msg = str(exc.value)
    assert str(path) in msg
    assert f"{mode:04o}" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("length", [0, 16, 31, 33, 64])
def test_load_refuses_wrong_length(tmp_path: Path, length: int) -> None:
    path = tmp_path / "master.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, os.urandom(length))
    os.close(fd)
    with pytest.raises(KeyFileError, match=f"{length} bytes; expected 32") as exc:
        FileKeyProvider.load(path)
    assert str(path) in str(exc.value)


def test_load_refuses_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="does not exist"):
        FileKeyProvider.load(tmp_path / "nope.key")
    d = tmp_path / "dir.key"
    d.mkdir(mode=0o700)
    with pytest.raises(KeyFileError, match="not a regular file"):
        FileKeyProvider.load(d)


# --- passphrase -----------------------------------------------------------------------------------


def test_passphrase_derivation_is_deterministic_and_passphrase_bound() -> None:
    params = PassphraseParams.generate()
    assert params.kdf == "argon2id"  # this build of cryptography has Argon2id
    a = PassphraseKeyProvider.derive("correct horse battery staple", params)
    b = PassphraseKeyProvider.derive("correct horse battery staple", params)
    c = PassphraseKeyProvider.derive("correct horse battery stapler", params)
    d = PassphraseKeyProvider.derive(
        "correct horse battery staple", PassphraseParams(salt=os.urandom(32), lanes=params.lanes)
    )
    assert a.key_id == b.key_id
    assert len({a.key_id, c.key_id, d.key_id}) == 3
    dek = generate_dek()
    wrapped = a.wrap(dek, aad=TENANT_A)
    assert b.unwrap(wrapped, aad=TENANT_A) == dek
    with pytest.raises(KeyUnwrapError):
        c.unwrap(wrapped, aad=TENANT_A)


def test_passphrase_is_unicode_normalised() -> None:
    params = PassphraseParams(salt=b"s" * 16)
    composed = PassphraseKeyProvider.derive("caf\u00e9 au lait", params)
    decomposed = PassphraseKeyProvider.derive("cafe\u0301 au lait", params)
    assert composed.key_id == decomposed.key_id


def test_scrypt_fallback_is_deterministic() -> None:
    params = PassphraseParams(salt=b"t" * 16, memory_kib=65536, iterations=3, lanes=1, kdf="scrypt")
    a = PassphraseKeyProvider.derive("pw one", params)
    b = PassphraseKeyProvider.derive("pw one", PassphraseParams.from_json(params.to_json()))
    assert a.key_id == b.key_id
    assert PassphraseKeyProvider.derive("pw two", params).key_id != a.key_id
    # Same passphrase and salt under Argon2id gives another key: the kdf is part of the descriptor.
    argon = PassphraseParams(salt=b"t" * 16, memory_kib=65536, iterations=3, lanes=1)
    assert PassphraseKeyProvider.derive("pw one", argon).key_id != a.key_id


def test_params_descriptor_round_trip() -> None:
    params = PassphraseParams.generate(memory_kib=128 * 1024, iterations=4, lanes=2)
    doc = json.loads(json.dumps(params.to_json()))
    assert doc["type"] == "passphrase"
    assert set(doc) == {"type", "kdf", "salt", "memory_kib", "iterations", "lanes"}
    assert doc["memory_kib"] == 128 * 1024 and doc["iterations"] == 4 and doc["lanes"] == 2
    assert PassphraseParams.from_json(doc) == params


@pytest.mark.parametrize(
    "change",
    [
        {"memory_kib": 32 * 1024},
        {"iterations": 2},
        {"lanes": 0},
        {"salt": "c2hvcnQ="},  # 5 bytes
        {"salt": "not base64!"},
        {"kdf": "pbkdf2"},
        {"type": "file"},
        {"iterations": "3"},
    ],
)
def test_weak_or_malformed_descriptor_is_refused(change: dict[str, object]) -> None:
    doc = PassphraseParams.generate().to_json() | change
    with pytest.raises(ValueError):
        PassphraseParams.from_json(doc)


def test_empty_passphrase_is_refused() -> None:
    with pytest.raises(ValueError):
        PassphraseKeyProvider.derive("", PassphraseParams(salt=b"x" * 16))


# --- no key material in repr ----------------------------------------------------------------------


def test_repr_never_shows_key_bytes(tmp_path: Path) -> None:
    key = os.urandom(32)
    path = tmp_path / "master.key"
    file_provider = create_key_file(path)
    file_key = path.read_bytes()
    pass_provider = PassphraseKeyProvider.derive("hunter2 hunter2", PassphraseParams(salt=b"r" * 16))
    for provider, secret in ((LocalKeyProvider(key), key), (file_provider, file_key)):
        for text in (repr(provider), str(provider), f"{provider}"):
            assert secret.hex() not in text
            assert repr(secret)[2:-1] not in text
            assert provider.key_id in text
        assert not hasattr(provider, "__dict__")  # no attribute can hold the key by accident
        with pytest.raises(TypeError):
            pickle.dumps(provider)
    assert "hunter2" not in repr(pass_provider)
    assert str(path) in repr(file_provider)
