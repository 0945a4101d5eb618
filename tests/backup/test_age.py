"""appliance.backup.age against pyrage (the Rust age implementation): each decrypts what the other
encrypts, at every chunk boundary; damage of any kind is refused."""

from __future__ import annotations

import io
import os

import pyrage
import pytest
from pyrage import x25519

from appliance.backup.age import CHUNK, AgeError, AgeWriter, decrypt_stream, identity_key, recipient_bytes

SIZES = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + 17]


@pytest.fixture(scope="module")
def identity() -> x25519.Identity:
    return x25519.Identity.generate()


def encrypt(data: bytes, recipient: str, piece: int = 7777) -> bytes:
    out = io.BytesIO()
    writer = AgeWriter(out, recipient)
    for i in range(0, len(data), piece):
        writer.write(data[i : i + piece])
    writer.close()
    return out.getvalue()


def decrypt(blob: bytes, identity: str) -> bytes:
    sink = io.BytesIO()
    decrypt_stream(io.BytesIO(blob), identity, sink)
    return sink.getvalue()


@pytest.mark.parametrize("size", SIZES)
def test_pyrage_decrypts_ours(identity: x25519.Identity, size: int) -> None:
    data = os.urandom(size)
    assert pyrage.decrypt(encrypt(data, str(identity.to_public())), [identity]) == data


@pytest.mark.parametrize("size", SIZES)
def test_we_decrypt_pyrages(identity: x25519.Identity, size: int) -> None:
    data = os.urandom(size)
    assert decrypt(pyrage.encrypt(data, [identity.to_public()]), str(identity)) == data


def test_keys_decode_to_the_same_x25519_pair(identity: x25519.Identity) -> None:
    private = identity_key(str(identity))
    assert private.public_key().public_bytes_raw() == recipient_bytes(str(identity.to_public()))
    recipient = str(identity.to_public())
    with pytest.raises(AgeError, match="checksum"):  # another last character (it was "q" 1 time in 32)
        recipient_bytes(recipient[:-1] + ("q" if recipient[-1] != "q" else "p"))
    with pytest.raises(AgeError, match="prefix"):
        recipient_bytes(str(identity))


def test_damage_is_refused(identity: x25519.Identity) -> None:
    data = os.urandom(3 * CHUNK + 5)
    good = encrypt(data, str(identity.to_public()))
    header_end = good.index(b"\n", good.index(b"--- ")) + 1
    with pytest.raises(AgeError, match="no matching key"):
        decrypt(good, str(x25519.Identity.generate()))
    # A flipped payload byte, a dropped final chunk, a dropped middle chunk, appended bytes.
    flipped = bytearray(good)
    flipped[header_end + 16 + CHUNK // 2] ^= 1
    block = CHUNK + 16
    body = good[header_end + 16 :]
    prefix = good[: header_end + 16]
    damaged = [
        bytes(flipped),
        prefix + body[: 3 * block],  # the final chunk dropped
        prefix + body[:block] + body[2 * block :],  # a middle chunk dropped
        good + b"\0" * 10,  # bytes appended
        good[:-1],  # truncated
    ]
    for bad in damaged:
        with pytest.raises(AgeError, match="corrupted|truncated"):
            decrypt(bad, str(identity))
    # The header MAC covers the stanza: change a character of the wrapped key's line.
    lines = good[:header_end].split(b"\n")
    lines[2] = (b"A" if lines[2][:1] != b"A" else b"B") + lines[2][1:]
    with pytest.raises(AgeError):
        decrypt(b"\n".join(lines) + good[header_end:], str(identity))
    with pytest.raises(AgeError, match="not an age file"):
        decrypt(b"hello world\n" * 10, str(identity))
