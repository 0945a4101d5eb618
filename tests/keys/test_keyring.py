"""The keyring: file keys, passphrase-derived keys, and reloading after a rotation elsewhere."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from appliance.keys.kek import FileKeyProvider, KeyUnwrapError, generate_dek
from appliance.keys.keyring import KEK_DESCRIPTOR, Keyring, UnknownKek


def test_passphrase_keyring_is_stable_and_needs_the_right_passphrase(tmp_path: Path) -> None:
    ring = Keyring(tmp_path / "master.key", passphrase="correct horse battery staple")
    assert ring.passphrase_mode and not (tmp_path / "master.key").exists()
    descriptor = tmp_path / KEK_DESCRIPTOR
    assert stat.S_IMODE(descriptor.stat().st_mode) == 0o600
    assert "correct horse" not in descriptor.read_text()
    dek = generate_dek()
    wrapped = ring.current.wrap(dek, aad=b"tenant")
    again = Keyring(tmp_path / "master.key", passphrase="correct horse battery staple")
    assert again.current.key_id == ring.current.key_id
    assert again.get(ring.current.key_id).unwrap(wrapped, aad=b"tenant") == dek
    wrong = Keyring(tmp_path / "master.key", passphrase="wrong passphrase")
    assert wrong.current.key_id != ring.current.key_id
    with pytest.raises(KeyUnwrapError):
        wrong.current.unwrap(wrapped, aad=b"tenant")


def test_file_keyring_reloads_when_it_meets_a_new_kek(tmp_path: Path) -> None:
    with pytest.raises(UnknownKek):
        Keyring(tmp_path / "master.key")
    FileKeyProvider.create_key_file(tmp_path / "master.key")
    ring = Keyring(tmp_path / "master.key")
    newer = FileKeyProvider.create_key_file(tmp_path / "master.key.next")  # another process rotates
    assert ring.get(newer.key_id).key_id == newer.key_id  # found by reloading the directory
    with pytest.raises(UnknownKek):
        ring.get("0" * 16)
