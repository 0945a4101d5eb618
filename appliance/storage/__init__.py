"""Object storage: one interface (`ObjectStore`), two implementations (filesystem, S3).

Stores move opaque, already-encrypted bytes under random keys; see `base` for the contract.
"""

from appliance.storage.base import (
    ChunkIterator,
    InvalidKey,
    ObjectChanged,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    RandomAccessSource,
    StorageError,
    StorageUnavailable,
    new_key,
)
from appliance.storage.factory import build_store
from appliance.storage.filesystem import FilesystemStore
from appliance.storage.s3 import S3Store

__all__ = [
    "ChunkIterator",
    "FilesystemStore",
    "InvalidKey",
    "ObjectChanged",
    "ObjectInfo",
    "ObjectNotFound",
    "ObjectStore",
    "RandomAccessSource",
    "S3Store",
    "StorageError",
    "StorageUnavailable",
    "build_store",
    "new_key",
]
