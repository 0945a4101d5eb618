"""Master keys (KEKs): the keys that wrap the per-tenant data keys (DEKs).

A KEK never encrypts documents. It only wraps 32-byte DEKs; a wrapped DEK is stored next to the
tenant (in the database), together with the `key_id` of the KEK that wrapped it, so rotation can
tell which KEK to ask. Three providers hold the KEK in this process:

- `LocalKeyProvider(key)`: a 32-byte key given in memory (tests, or a key obtained elsewhere).
- `FileKeyProvider.load(path)`: a 32-byte key file, mode 0600 (`create_key_file(path)` makes one).
- `PassphraseKeyProvider.derive(passphrase, params)`: Argon2id (Scrypt only where this build of
  `cryptography` has no Argon2id) over an operator passphrase; the salt and cost parameters are
  stored in clear in a `kek.json` descriptor (`PassphraseParams.to_json()`).

Wrapped DEK format (all local providers), 61 bytes for a 32-byte DEK:

    version u8 = 1 | nonce 12 B (random) | AES-256-GCM(kek, nonce, dek, aad) = ciphertext || tag 16 B
    aad = b"appliance-dek-wrap" || 0x00 || version u8 || caller aad (e.g. the tenant id's 16 bytes)

The caller's `aad` binds a wrapped DEK to its owner: a wrapped DEK copied to another tenant's row
fails to unwrap there. A wrong KEK, a wrong `aad` or any changed byte raise `KeyUnwrapError`.

`key_id` is the first 16 hex characters of HMAC-SHA256(kek, b"appliance-kek-id"): stable, safe to
log and store, and it tells "wrong passphrase / wrong key file" apart from a corrupt wrapped DEK
before anything is unwrapped. Key bytes never appear in `repr`, `str` or error messages.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import stat
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

try:  # cryptography >= 44 has Argon2id; OpenSSL builds without it raise UnsupportedAlgorithm on use.
    from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
except ImportError:  # pragma: no cover - depends on the installed cryptography
    Argon2id = None  # type: ignore[assignment,misc]

__all__ = [
    "DEK_SIZE",
    "KEK_SIZE",
    "WRAP_VERSION",
    "FileKeyProvider",
    "KeyFileError",
    "KeyProvider",
    "KeyProviderError",
    "KeyUnwrapError",
    "LocalKeyProvider",
    "PassphraseKeyProvider",
    "PassphraseParams",
    "argon2id_available",
    "create_key_file",
    "generate_dek",
    "kek_key_id",
]

KEK_SIZE = 32
DEK_SIZE = 32
WRAP_VERSION = 1
_NONCE_SIZE = 12
_TAG_SIZE = 16
_WRAP_LABEL = b"appliance-dek-wrap\x00"
_KEY_ID_LABEL = b"appliance-kek-id"


class KeyProviderError(Exception):
    """Base class for master-key failures. Messages never contain key material."""


class KeyUnwrapError(KeyProviderError):
    """A wrapped DEK did not authenticate: wrong KEK, wrong aad, or a changed byte."""


class KeyFileError(KeyProviderError):
    """A key file is missing, unsafe (permissions), or malformed. One line, naming the path."""


@runtime_checkable
class KeyProvider(Protocol):
    """Wraps and unwraps data keys with a master key that this interface never exposes.

    This is the seam for an HSM (PKCS#11 `C_WrapKey`/`C_Encrypt` with CKM_AES_GCM or
    CKM_AES_KEY_WRAP_PAD) or a KMS: an implementation needs only these three members and may keep
    the KEK inside the device. Its output format is its own business, as long as:

    - `key_id` is a stable, non-secret identifier of the KEK (stored next to every wrapped DEK so
      that a rotation knows which provider unwraps it);
    - `wrap(dek, aad=...)` returns bytes that only `unwrap(..., aad=<the same aad>)` on a provider
      with the same KEK turns back into `dek` (authenticated encryption: a changed byte, another
      KEK or another `aad` must fail);
    - `unwrap` raises `KeyUnwrapError` on any failure and never returns unauthenticated bytes.

    `aad` is not secret; callers pass the owner of the DEK (the tenant id's bytes).
    """

    @property
    def key_id(self) -> str: ...

    def wrap(self, dek: bytes, *, aad: bytes) -> bytes: ...

    def unwrap(self, wrapped: bytes, *, aad: bytes) -> bytes: ...


def generate_dek() -> bytes:
    """A fresh 256-bit data key from the OS CSPRNG."""
    return secrets.token_bytes(DEK_SIZE)


def kek_key_id(kek: bytes) -> str:
    """`key_id` of a KEK: 16 hex chars of HMAC-SHA256(kek, b"appliance-kek-id")."""
    return hmac.new(kek, _KEY_ID_LABEL, hashlib.sha256).hexdigest()[:16]


def _check_bytes(name: str, value: object) -> bytes:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise TypeError(f"{name} must be bytes, not {type(value).__name__}")
    return bytes(value)


class LocalKeyProvider:
    """AES-256-GCM key wrapping with a KEK held in this process (see the module docstring).

    Only the AESGCM object and the `key_id` are kept; the key bytes are not an attribute, so they
    cannot leak through `repr`, `vars()` or a debugger's locals view of this object.
    """

    __slots__ = ("_aead", "_key_id")

    def __init__(self, key: bytes) -> None:
        key = _check_bytes("key", key)
        if len(key) != KEK_SIZE:
            raise ValueError(f"a KEK must be {KEK_SIZE} bytes, got {len(key)}")
        self._aead = AESGCM(key)
        self._key_id = kek_key_id(key)

    @property
    def key_id(self) -> str:
        return self._key_id

    def __repr__(self) -> str:
        return f"{type(self).__name__}(key_id={self._key_id!r})"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError(f"{type(self).__name__} holds a secret key and cannot be pickled")

    @staticmethod
    def _aad(aad: bytes) -> bytes:
        return _WRAP_LABEL + bytes([WRAP_VERSION]) + aad

    def wrap(self, dek: bytes, *, aad: bytes) -> bytes:
        dek = _check_bytes("dek", dek)
        aad = _check_bytes("aad", aad)
        if len(dek) != DEK_SIZE:
            raise ValueError(f"a DEK must be {DEK_SIZE} bytes, got {len(dek)}")
        nonce = secrets.token_bytes(_NONCE_SIZE)
        return bytes([WRAP_VERSION]) + nonce + self._aead.encrypt(nonce, dek, self._aad(aad))

    def unwrap(self, wrapped: bytes, *, aad: bytes) -> bytes:
        wrapped = _check_bytes("wrapped", wrapped)
        aad = _check_bytes("aad", aad)
        expected = 1 + _NONCE_SIZE + DEK_SIZE + _TAG_SIZE
        if len(wrapped) != expected:
            raise KeyUnwrapError(f"wrapped DEK is {len(wrapped)} bytes, expected {expected}")
        if wrapped[0] != WRAP_VERSION:
            raise KeyUnwrapError(f"unsupported wrapped-DEK version {wrapped[0]}")
        nonce = wrapped[1 : 1 + _NONCE_SIZE]
        try:
            return self._aead.decrypt(nonce, wrapped[1 + _NONCE_SIZE :], self._aad(aad))
        except InvalidTag:
            raise KeyUnwrapError(
                f"wrapped DEK did not authenticate under KEK {self._key_id} "
                "(wrong master key, wrong owner/aad, or corrupted)"
            ) from None


# --- key file -------------------------------------------------------------------------------------


class FileKeyProvider(LocalKeyProvider):
    """A KEK read from a 32-byte raw key file that only its owner can read (mode 0600 or stricter)."""

    __slots__ = ("path",)

    def __init__(self, key: bytes, path: Path) -> None:
        super().__init__(key)
        self.path = path

    def __repr__(self) -> str:
        return f"FileKeyProvider(path={str(self.path)!r}, key_id={self.key_id!r})"

    __str__ = __repr__

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FileKeyProvider:
        """Read the key file; refuse one that group/other may access or that is not 32 bytes."""
        p = Path(path)
        try:
            fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KeyFileError(f"key file {p} does not exist") from None
        except OSError as e:
            raise KeyFileError(f"key file {p} cannot be opened: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise KeyFileError(f"key file {p} is not a regular file")
            mode = stat.S_IMODE(st.st_mode)
            if mode & 0o077:
                raise KeyFileError(
                    f"key file {p} has mode {mode:04o}; it must not be accessible by group or others "
                    f"(chmod 600 {p})"
                )
            if st.st_size != KEK_SIZE:
                raise KeyFileError(f"key file {p} is {st.st_size} bytes; expected {KEK_SIZE}")
            key = os.read(fd, KEK_SIZE + 1)
            if len(key) != KEK_SIZE:
                raise KeyFileError(f"key file {p} is {len(key)} bytes; expected {KEK_SIZE}")
        finally:
            os.close(fd)
        return cls(key, p)

    @classmethod
    def create_key_file(cls, path: str | os.PathLike[str]) -> FileKeyProvider:
        """Create a new random key file with mode 0600 and return its provider.

        Never overwrites: an existing file (or symlink) at `path` raises `KeyFileError`. The parent
        directory must exist. The file is fsynced, and so is its directory.
        """
        p = Path(path)
        key = secrets.token_bytes(KEK_SIZE)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(p, flags, 0o600)
        except FileExistsError:
            raise KeyFileError(f"key file {p} already exists; refusing to overwrite it") from None
        except OSError as e:
            raise KeyFileError(f"key file {p} cannot be created: {e.strerror}") from None
        try:
            os.fchmod(fd, 0o600)  # the umask can only remove bits, but be explicit
            view = memoryview(key)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            p.unlink(missing_ok=True)
            raise
        os.close(fd)
        try:
            dfd = os.open(p.parent, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:  # pragma: no cover - directory fsync is best effort
            pass
        else:
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        return cls(key, p)


def create_key_file(path: str | os.PathLike[str]) -> FileKeyProvider:
    """Module-level alias of `FileKeyProvider.create_key_file`."""
    return FileKeyProvider.create_key_file(path)


# --- passphrase -----------------------------------------------------------------------------------

MIN_MEMORY_KIB = 64 * 1024
MIN_ITERATIONS = 3
MIN_SALT_SIZE = 16
_SCRYPT_R = 8


def argon2id_available() -> bool:
    """Whether this build of `cryptography`/OpenSSL can run Argon2id."""
    if Argon2id is None:
        return False
    try:
        Argon2id(salt=b"\x00" * 16, length=32, iterations=1, lanes=1, memory_cost=8)
    except UnsupportedAlgorithm:  # pragma: no cover - depends on the OpenSSL build
        return False
    return True


@dataclass(frozen=True)
class PassphraseParams:
    """Salt and cost of a passphrase-derived KEK; stored in clear (`kek.json`).

    `kdf` is recorded so a descriptor is never silently re-derived with the other function:
    - "argon2id": RFC 9106 Argon2id, `memory_kib` KiB, `iterations` passes, `lanes` lanes.
    - "scrypt" (only where Argon2id is unavailable): N = `memory_kib` (a power of two; with r = 8
      scrypt uses 128·r·N bytes = `memory_kib` KiB), r = 8, p = `lanes`; `iterations` is recorded
      but scrypt has no separate pass count.
    Both the constructor and `from_json` refuse parameters below the floor (64 MiB, 3 passes,
    16-byte salt), so an edited descriptor cannot downgrade the cost.
    """

    salt: bytes
    memory_kib: int = MIN_MEMORY_KIB
    iterations: int = MIN_ITERATIONS
    lanes: int = 4
    kdf: str = "argon2id"

    def __post_init__(self) -> None:
        if not isinstance(self.salt, bytes) or len(self.salt) < MIN_SALT_SIZE:
            raise ValueError(f"salt must be at least {MIN_SALT_SIZE} bytes")
        if self.kdf not in ("argon2id", "scrypt"):
            raise ValueError(f"unknown kdf {self.kdf!r} (argon2id or scrypt)")
        for name, value, floor in (
            ("memory_kib", self.memory_kib, MIN_MEMORY_KIB),
            ("iterations", self.iterations, MIN_ITERATIONS),
            ("lanes", self.lanes, 1),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < floor:
                raise ValueError(f"{name} must be an integer >= {floor}, got {value!r}")
        if self.lanes > 255:
            raise ValueError("lanes must be <= 255")
        if self.kdf == "scrypt" and self.memory_kib & (self.memory_kib - 1):
            raise ValueError("for scrypt, memory_kib must be a power of two")

    @classmethod
    def generate(
        cls, *, memory_kib: int = MIN_MEMORY_KIB, iterations: int = MIN_ITERATIONS, lanes: int = 4
    ) -> PassphraseParams:
        """Fresh random 32-byte salt; Argon2id where available, otherwise Scrypt."""
        kdf = "argon2id" if argon2id_available() else "scrypt"
        return cls(secrets.token_bytes(32), memory_kib, iterations, lanes, kdf)

    def to_json(self) -> dict[str, Any]:
        """The `kek.json` descriptor: `{"type": "passphrase", "kdf", "salt" (base64), ...}`."""
        return {
            "type": "passphrase",
            "kdf": self.kdf,
            "salt": base64.b64encode(self.salt).decode("ascii"),
            "memory_kib": self.memory_kib,
            "iterations": self.iterations,
            "lanes": self.lanes,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PassphraseParams:
        if not isinstance(data, dict) or data.get("type") != "passphrase":
            raise ValueError('not a passphrase KEK descriptor (expected "type": "passphrase")')
        try:
            salt = base64.b64decode(data["salt"], validate=True)
            return cls(
                salt=salt,
                memory_kib=data["memory_kib"],
                iterations=data["iterations"],
                lanes=data["lanes"],
                kdf=data.get("kdf", "argon2id"),
            )
        except KeyError as e:
            raise ValueError(f"passphrase KEK descriptor lacks {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ValueError(f"invalid passphrase KEK descriptor: {e}") from None


class PassphraseKeyProvider(LocalKeyProvider):
    """A KEK derived from an operator passphrase (see `PassphraseParams`)."""

    __slots__ = ("params",)

    def __init__(self, key: bytes, params: PassphraseParams) -> None:
        super().__init__(key)
        self.params = params

    def __repr__(self) -> str:
        return f"PassphraseKeyProvider(kdf={self.params.kdf!r}, key_id={self.key_id!r})"

    __str__ = __repr__

    @classmethod
    def derive(cls, passphrase: str, params: PassphraseParams) -> PassphraseKeyProvider:
        """Derive the KEK. Deterministic for the same passphrase, salt and parameters.

        The passphrase is NFC-normalised and UTF-8 encoded, so the same text typed on consoles
        with different Unicode normal forms gives the same key. Compare `key_id` with the stored
        one to detect a wrong passphrase before unwrapping anything.
        """
        if not isinstance(passphrase, str) or not passphrase:
            raise ValueError("passphrase must be a non-empty string")
        secret = unicodedata.normalize("NFC", passphrase).encode("utf-8")
        if params.kdf == "argon2id":
            if not argon2id_available():
                raise KeyProviderError(
                    "this KEK descriptor needs Argon2id, which this cryptography/OpenSSL build lacks"
                )
            kdf: Any = Argon2id(
                salt=params.salt,
                length=KEK_SIZE,
                iterations=params.iterations,
                lanes=params.lanes,
                memory_cost=params.memory_kib,
            )
        else:
            kdf = Scrypt(salt=params.salt, length=KEK_SIZE, n=params.memory_kib, r=_SCRYPT_R, p=params.lanes)
        return cls(kdf.derive(secret), params)
