"""Encryption at rest: master keys (`kek`) and the encrypted blob format (`envelope`).

Key hierarchy: a KEK (key file, passphrase, later an HSM) wraps one DEK per tenant; each blob gets
its own subkey, HKDF(DEK, random salt, blob context). See docs/encryption.md.
"""

from appliance.keys.envelope import (
    BlobContext,
    BlobInfo,
    BlobIntegrityError,
    BlobReader,
    BlobWriter,
    BytesSource,
    FileSource,
    RandomAccessSource,
)
from appliance.keys.kek import (
    FileKeyProvider,
    KeyFileError,
    KeyProvider,
    KeyProviderError,
    KeyUnwrapError,
    LocalKeyProvider,
    PassphraseKeyProvider,
    PassphraseParams,
    create_key_file,
    generate_dek,
)

__all__ = [
    "BlobContext",
    "BlobInfo",
    "BlobIntegrityError",
    "BlobReader",
    "BlobWriter",
    "BytesSource",
    "FileKeyProvider",
    "FileSource",
    "KeyFileError",
    "KeyProvider",
    "KeyProviderError",
    "KeyUnwrapError",
    "LocalKeyProvider",
    "PassphraseKeyProvider",
    "PassphraseParams",
    "RandomAccessSource",
    "create_key_file",
    "generate_dek",
]
