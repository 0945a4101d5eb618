"""Signed checkpoints over the audit chain (Ed25519), checkable with the public key alone.

A checkpoint vouches that the chain's hash at `seq` was `hash` when it was signed. The signed
message is fixed and versioned, so any tool can check it (e.g. with OpenSSL or PyNaCl):

    b"appliance-audit-checkpoint-v1\\n" + f"{seq}\\n{hash_hex}\\n{signed_at}\\n".encode()

`hash_hex` is the 64 lowercase hex digits of the chain hash, `signed_at` is UTC ISO-8601 with
microseconds and a `Z` (`2026-11-26T10:00:00.123456Z`). The key id is the first 16 hex digits of
the sha256 of the raw 32-byte public key. Only this module touches the key material.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from appliance.audit.chain import Anchor

MESSAGE_PREFIX = b"appliance-audit-checkpoint-v1\n"
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
RAW_KEY_BYTES = 32


class SigningKeyError(Exception):
    """A key file that is missing or is not an Ed25519 key (the message is one readable line)."""


@dataclass(frozen=True)
class Checkpoint:
    seq: int
    hash: bytes
    signed_at: datetime
    key_id: str
    signature: bytes


def format_time(value: datetime) -> str:
    if value.tzinfo is None:
        raise ValueError("checkpoint timestamps must be timezone-aware")
    return value.astimezone(UTC).strftime(TIME_FORMAT)


def parse_time(value: str) -> datetime:
    """The inverse of `format_time` (exactly that form: anything else is refused)."""
    return datetime.strptime(value, TIME_FORMAT).replace(tzinfo=UTC)


def message(seq: int, hash_: bytes, signed_at: datetime) -> bytes:
    return MESSAGE_PREFIX + f"{seq}\n{hash_.hex()}\n{format_time(signed_at)}\n".encode()


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_pem(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def sign(private_key: Ed25519PrivateKey, seq: int, hash_: bytes, signed_at: datetime) -> Checkpoint:
    # Postgres keeps microseconds: sign exactly what will be stored.
    signed_at = signed_at.astimezone(UTC)
    signature = private_key.sign(message(seq, hash_, signed_at))
    return Checkpoint(seq, hash_, signed_at, key_id(private_key.public_key()), signature)


def check(checkpoint: Checkpoint, keys: Mapping[str, Ed25519PublicKey]) -> str | None:
    """Why this checkpoint's signature is refused by `keys` (by key id), or None when it verifies."""
    key = keys.get(checkpoint.key_id)
    if key is None:
        given = ", ".join(sorted(keys)) or "none"
        return f"signed by key {checkpoint.key_id}, not by the key given ({given})"
    try:
        key.verify(checkpoint.signature, message(checkpoint.seq, checkpoint.hash, checkpoint.signed_at))
    except InvalidSignature:
        return f"signature does not verify with key {checkpoint.key_id} (forged or altered)"
    return None


def anchors(checkpoints: Iterable[Checkpoint], keys: Iterable[Ed25519PublicKey]) -> list[Anchor]:
    """Checkpoints as the chain walk takes them: the hash each vouches for, or why it is refused."""
    by_id = {key_id(k): k for k in keys}
    return [Anchor(cp.seq, cp.hash, check(cp, by_id)) for cp in checkpoints]


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """The signing key: raw 32 bytes (as `appliance up` writes it) or an unencrypted PEM."""
    data = _read(path, "audit signing key")
    try:
        if len(data) == RAW_KEY_BYTES:
            return Ed25519PrivateKey.from_private_bytes(data)
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(f"{path} is not an Ed25519 private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"{path} holds a {type(key).__name__}, not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """A public key file: PEM (as `appliance audit pubkey` prints it) or raw 32 bytes."""
    data = _read(path, "public key")
    try:
        if len(data) == RAW_KEY_BYTES:
            return Ed25519PublicKey.from_public_bytes(data)
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(f"{path} is not an Ed25519 public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningKeyError(f"{path} holds a {type(key).__name__}, not an Ed25519 public key")
    return key


PREVIOUS_PUBKEY_GLOB = "audit-signing.previous-*.pub"


def previous_public_key_path(keys_dir: Path, public_key: Ed25519PublicKey) -> Path:
    """Where a public key of an earlier host (a restore's source) is kept, trusted for its checkpoints."""
    return keys_dir / f"audit-signing.previous-{key_id(public_key)}.pub"


def previous_public_keys(keys_dir: Path) -> list[Ed25519PublicKey]:
    """Public keys that signed checkpoints before this host's key: installed by `appliance restore`."""
    return [load_public_key(p) for p in sorted(keys_dir.glob(PREVIOUS_PUBKEY_GLOB))]


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SigningKeyError(f"cannot read the {what} {path}: {exc.strerror}") from None
