"""API key format and hashing.

A key is `apl_<12 hex>_<43 url-safe chars>`: the first part is the public prefix (stored in clear,
shown in lists and logs), the rest is 256 bits of secret. Only SHA-256 of the whole key is stored:
the secret is random and long, so a slow password hash would add latency and no protection.
Comparison is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

KEY_RE = re.compile(r"^(apl_[0-9a-f]{12})_([A-Za-z0-9_-]{43})$")


@dataclass(frozen=True)
class NewKey:
    prefix: str
    plaintext: str
    secret_hash: bytes

    def __repr__(self) -> str:  # never print the secret by accident
        return f"NewKey(prefix={self.prefix!r}, plaintext='***')"


def generate_key() -> NewKey:
    prefix = f"apl_{secrets.token_hex(6)}"
    plaintext = f"{prefix}_{secrets.token_urlsafe(32)}"
    return NewKey(prefix=prefix, plaintext=plaintext, secret_hash=hash_key(plaintext))


def hash_key(plaintext: str) -> bytes:
    return hashlib.sha256(plaintext.encode()).digest()


def parse_prefix(plaintext: str) -> str | None:
    m = KEY_RE.match(plaintext)
    return m.group(1) if m else None


def matches(plaintext: str, stored_hash: bytes) -> bool:
    return hmac.compare_digest(hash_key(plaintext), bytes(stored_hash))
