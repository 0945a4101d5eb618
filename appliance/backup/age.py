"""age v1 (https://age-encryption.org/v1), X25519 recipients only, as a streaming writer and reader.

Why not only `pyrage`: on the 2-core reference VM pyrage (the Rust implementation's binding)
encrypts 1 GiB at 261 MB/s file to file and holds the GIL meanwhile, which made backups 5x slower
than tar. The same primitives from `cryptography` (OpenSSL's ChaCha20-Poly1305) run at 2.7 GB/s.
So the format is written here with those primitives, and pyrage stays the reference: the tests
encrypt with each and decrypt with the other (tests/backup/test_age.py), and an archive opens with
the stock `age` / `rage` tools. Keys are pyrage's (`generate_identity` in archive.py).

Format, in short (the spec is normative):

    age-encryption.org/v1
    -> X25519 <base64 ephemeral share>
    <base64 wrapped file key>
    --- <base64 HMAC-SHA256 of the header up to "---">
    <16-byte nonce><STREAM: 64 KiB ChaCha20-Poly1305 chunks, nonce = 11-byte counter || last flag>

File key: 16 random bytes. Wrap key: HKDF-SHA256(shared secret, salt = share || recipient,
info "age-encryption.org/v1/X25519"). Header MAC key: HKDF(file key, info "header"). Payload key:
HKDF(file key, salt = nonce, info "payload").
"""

from __future__ import annotations

import base64
import hmac
import os
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

VERSION_LINE = b"age-encryption.org/v1"
X25519_LABEL = b"age-encryption.org/v1/X25519"
CHUNK = 64 * 1024
TAG = 16
MAX_HEADER = 64 * 1024


class AgeError(Exception):
    """Not an age file, no matching key, or failed authentication (one line)."""


# Keys (bech32, BIP-173) -----------------------------------------------------------------------------
_CHARSET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
_GEN = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)


def _polymod(values: list[int]) -> int:
    chk = 1
    for v in values:
        top = chk >> 25
        chk = (chk & 0x1FFFFFF) << 5 ^ v
        for i in range(5):
            chk ^= _GEN[i] if (top >> i) & 1 else 0
    return chk


def _bech32_decode(text: str, hrp: str) -> bytes:
    s = text.strip().lower()
    pos = s.rfind("1")
    if s[:pos] != hrp.lower() or pos < 1 or len(s) - pos < 7:
        raise AgeError(f"not an age key (expected the {hrp!r} prefix)")
    try:
        data = [_CHARSET.index(c) for c in s[pos + 1 :]]
    except ValueError:
        raise AgeError("not an age key (invalid bech32 character)") from None
    expanded = [ord(c) >> 5 for c in s[:pos]] + [0] + [ord(c) & 31 for c in s[:pos]]
    if _polymod(expanded + data) != 1:
        raise AgeError("not an age key (bad checksum)")
    acc = bits = 0
    out = bytearray()
    for value in data[:-6]:
        acc = (acc << 5) | value
        bits += 5
        if bits >= 8:
            bits -= 8
            out.append((acc >> bits) & 0xFF)
    if bits >= 5 or (acc << (8 - bits)) & 0xFF:
        raise AgeError("not an age key (bad padding)")
    return bytes(out)


def recipient_bytes(recipient: str) -> bytes:
    """The 32-byte X25519 public key of an `age1…` recipient."""
    raw = _bech32_decode(recipient, "age")
    if len(raw) != 32:
        raise AgeError("not an X25519 age recipient")
    return raw


def identity_key(identity: str) -> X25519PrivateKey:
    """The X25519 private key of an `AGE-SECRET-KEY-1…` identity."""
    raw = _bech32_decode(identity, "age-secret-key-")
    if len(raw) != 32:
        raise AgeError("not an X25519 age identity")
    return X25519PrivateKey.from_private_bytes(raw)


# Helpers --------------------------------------------------------------------------------------------
def _hkdf(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(ikm)


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data).rstrip(b"=")


def _unb64(data: bytes) -> bytes:
    if b"=" in data or b"\r" in data:
        raise AgeError("not an age file (bad base64 in the header)")
    try:
        return base64.b64decode(data + b"=" * (-len(data) % 4), validate=True)
    except ValueError:
        raise AgeError("not an age file (bad base64 in the header)") from None


def _chunk_nonce(counter: int, last: bool) -> bytes:
    return counter.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


# Writing --------------------------------------------------------------------------------------------
class AgeWriter:
    """Encrypt to one X25519 recipient into `out`: `write()` plaintext, then `close()` (which writes the
    final chunk; it does not close `out`)."""

    def __init__(self, out: BinaryIO, recipient: str) -> None:
        pub = recipient_bytes(recipient)
        file_key = os.urandom(16)
        ephemeral = X25519PrivateKey.generate()
        share = ephemeral.public_key().public_bytes_raw()
        shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(pub))
        wrap_key = _hkdf(shared, share + pub, X25519_LABEL)
        body = ChaCha20Poly1305(wrap_key).encrypt(b"\x00" * 12, file_key, None)
        header = VERSION_LINE + b"\n-> X25519 " + _b64(share) + b"\n" + _b64(body) + b"\n---"
        mac = hmac.new(_hkdf(file_key, b"", b"header"), header, "sha256").digest()
        nonce = os.urandom(16)
        self._aead = ChaCha20Poly1305(_hkdf(file_key, nonce, b"payload"))
        self._out = out
        self._pending = bytearray()
        self._counter = 0
        self._closed = False
        out.write(header + b" " + _b64(mac) + b"\n" + nonce)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._pending += data
        if len(self._pending) > CHUNK:
            # Keep at least one byte back: the final chunk must carry the last flag.
            n = (len(self._pending) - 1) // CHUNK * CHUNK
            view = memoryview(self._pending)
            enc = self._aead.encrypt
            parts = []
            for off in range(0, n, CHUNK):
                parts.append(enc(_chunk_nonce(self._counter, False), view[off : off + CHUNK], None))
                self._counter += 1
            view.release()
            self._out.write(b"".join(parts))
            del self._pending[:n]
        return len(data)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._out.write(self._aead.encrypt(_chunk_nonce(self._counter, True), bytes(self._pending), None))
        self._pending.clear()


# Reading --------------------------------------------------------------------------------------------
def _read_header(src: BinaryIO) -> tuple[bytes, list[tuple[list[bytes], bytes]], bytes]:
    """(bytes covered by the MAC, stanzas as (args, body), the MAC)."""
    lines: list[bytes] = []
    size = 0
    while True:
        line = src.readline(MAX_HEADER)
        size += len(line)
        if not line.endswith(b"\n") or size > MAX_HEADER:
            raise AgeError("not an age file (no complete header)")
        lines.append(line[:-1])
        if line.startswith(b"---"):
            break
    if lines[0] != VERSION_LINE:
        raise AgeError("not an age file (bad version line)")
    last = lines[-1]
    if not last.startswith(b"--- "):
        raise AgeError("not an age file (bad MAC line)")
    covered = b"\n".join(lines[:-1]) + b"\n---"
    stanzas: list[tuple[list[bytes], bytes]] = []
    i = 1
    while i < len(lines) - 1:
        if not lines[i].startswith(b"-> "):
            raise AgeError("not an age file (bad stanza)")
        args = lines[i][3:].split(b" ")
        body = b""
        i += 1
        while True:
            if i >= len(lines) - 1:
                raise AgeError("not an age file (unterminated stanza)")
            body_line = lines[i]
            i += 1
            body += body_line
            if len(body_line) < 64:
                break
        stanzas.append((args, _unb64(body)))
    return covered, stanzas, _unb64(last[4:])


def _unwrap(stanzas: list[tuple[list[bytes], bytes]], identity: X25519PrivateKey) -> bytes:
    own = identity.public_key().public_bytes_raw()
    for args, body in stanzas:
        if len(args) != 2 or args[0] != b"X25519":
            continue
        share = _unb64(args[1])
        if len(share) != 32 or len(body) != 32:
            raise AgeError("not an age file (bad X25519 stanza)")
        shared = identity.exchange(X25519PublicKey.from_public_bytes(share))
        if shared == b"\x00" * 32:
            raise AgeError("not an age file (degenerate X25519 share)")
        try:
            return ChaCha20Poly1305(_hkdf(shared, share + own, X25519_LABEL)).decrypt(
                b"\x00" * 12, body, None
            )
        except InvalidTag:
            continue
    raise AgeError("no matching key: the archive was encrypted to another key")


def decrypt_stream(src: BinaryIO, identity: str, sink: BinaryIO) -> int:
    """Decrypt `src` into `sink.write()`, chunk by chunk; return the plaintext size.

    Every chunk is authenticated before it is written; a truncated or extended file fails at its
    end (the last chunk carries a flag), an edited one at the edited chunk."""
    key = identity_key(identity)
    covered, stanzas, mac = _read_header(src)
    file_key = _unwrap(stanzas, key)
    if not hmac.compare_digest(hmac.new(_hkdf(file_key, b"", b"header"), covered, "sha256").digest(), mac):
        raise AgeError("the archive header was modified (MAC mismatch)")
    nonce = src.read(16)
    if len(nonce) != 16:
        raise AgeError("the archive is truncated (no payload)")
    aead = ChaCha20Poly1305(_hkdf(file_key, nonce, b"payload"))
    block = CHUNK + TAG
    counter = 0
    total = 0
    current = src.read(block)
    while True:
        following = src.read(block) if len(current) == block else b""
        last = not following
        if len(current) < TAG or (not last and len(current) != block):
            raise AgeError(f"the archive is truncated or corrupted after {total} bytes")
        try:
            plain = aead.decrypt(_chunk_nonce(counter, last), current, None)
        except InvalidTag:
            raise AgeError(
                f"the archive is corrupted or truncated after {total} bytes (authentication failed)"
            ) from None
        if last and not plain and counter > 0:
            raise AgeError("the archive ends with an empty chunk (not a valid age file)")
        sink.write(plain)
        total += len(plain)
        if last:
            return total
        counter += 1
        current = following
